"""``make man``: qmpbackup(1) and qmprestore(1) in roff, generated from the argparse parsers.

A small generator of our own instead of a build dependency: the pages take the
exit-code table from :mod:`libqmpbackup.errors` and the examples from the
parsers' epilogs, so ``--help``, the man page and the code cannot disagree.
tests/unit/test_manpages.py fails when the committed pages are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from libqmpbackup import __version__
from libqmpbackup.errors import EXIT_CODES
from tools.parsers import PROGRAMS, options, subcommands

OTHER = {"qmpbackup": "qmprestore", "qmprestore": "qmpbackup"}


def roff(text: str) -> str:
    """TEXT safe as roff: backslashes, minus signs, and a leading dot or quote neutralised."""
    lines = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def _option_items(parser: argparse.ArgumentParser, skip: set[str]) -> list[str]:
    formatter = parser._get_formatter()
    out = []
    for action in options(parser):
        if set(action.option_strings) & skip:
            continue
        invocation = formatter._format_action_invocation(action)
        help_text = formatter._expand_help(action) if action.help else ""
        out += [".TP", f"\\fB{roff(invocation)}\\fR", roff(" ".join(help_text.split()))]
    return out


def _examples(epilog: str | None) -> list[str]:
    if not epilog:
        return []
    body = epilog.split("\n", 1)[1] if epilog.startswith("examples:") else epilog
    return [".PP", ".nf", ".RS 4", roff(body.rstrip("\n")), ".RE", ".fi"]


def manpage(program: str) -> str:
    """The roff source of PROGRAM's man page."""
    parser = PROGRAMS[program]()
    globals_ = {o for a in options(parser) for o in a.option_strings}
    usage = parser.format_usage().removeprefix("usage: ").strip()
    lines = [
        f'.TH {program.upper()} 1 "" "{program} {__version__}" "User Commands"',
        ".SH NAME", f"{program} \\- {roff((parser.description or '').split(':')[0])}",
        ".SH SYNOPSIS", roff(" ".join(usage.split())),
        ".SH DESCRIPTION", roff(parser.description or ""),
        ".SH OPTIONS", *_option_items(parser, set()),
        ".SH COMMANDS",
        ".PP", "The logging options above may also follow the command.",
    ]
    for name, help_text, sub in subcommands(parser):
        sub_usage = " ".join(sub.format_usage().removeprefix("usage: ").split())
        lines += [f".SS {name}", roff(help_text + "."), ".PP", f"\\fB{roff(sub_usage)}\\fR",
                  *_option_items(sub, globals_), *_examples(sub.epilog)]
    lines += [".SH EXIT STATUS", "Both programs share one table of exit codes."]
    for code, meaning in EXIT_CODES:
        lines += [".TP", f"\\fB{code}\\fR", roff(meaning)]
    lines += [".SH EXAMPLES", *_examples(parser.epilog)]
    lines += [".SH SEE ALSO", f"\\fB{OTHER[program]}\\fR(1), \\fBqemu\\-img\\fR(1); "
              "README.md and docs/ of the qmpbackup source"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "contrib/man")
    folder.mkdir(parents=True, exist_ok=True)
    for program in PROGRAMS:
        (folder / f"{program}.1").write_text(manpage(program))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
