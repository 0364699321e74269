"""The README documents exactly the options and exit codes the code has."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

from libqmpbackup.errors import EXIT_CODES
from qmpbackup.parser import build_parser as backup_parser
from qmprestore.cli import build_parser as restore_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# options of other programs that the README quotes
FOREIGN = {"--output", "--backing-chain", "--dist", "--strict", "--image-opts", "--now", "--object",
           "--help"}
MISTYPED = {"--sock", "--levle"}              # the README's examples of refused command lines
UPSTREAM_SECTION = "## Coming from upstream qmpbackup"
FIRST_CELL = r"^\|((?:[^|\\]|\\.)*)\|"     # a table row's first cell (``\|`` stays inside)


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:  # argparse offers no public walk over subcommands
        found.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= parser_options(sub)
    return found


def without_upstream_spellings(readme: str) -> str:
    """The README without the first column of the upstream table: those are upstream's options."""
    head, _, rest = readme.partition(UPSTREAM_SECTION)
    section, _, tail = rest.partition("\n## ")
    ours = re.sub(FIRST_CELL, "|", section, flags=re.MULTILINE)
    return head + ours + tail


def options_in(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text)) - FOREIGN - MISTYPED


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    code = parser_options(backup_parser()) | parser_options(restore_parser())
    code -= {"--help"}
    documented = options_in(without_upstream_spellings(README))
    assert sorted(code - documented) == [], "options missing from the README"
    assert sorted(documented - code) == [], "README options the code lacks"


def test_exit_code_table_matches_the_library() -> None:
    section = README.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for cell in re.findall(r"^\| ([\d /]+) \|", section, re.MULTILINE):
        documented |= {int(c) for c in cell.split("/")}
    assert documented == {code for code, _ in EXIT_CODES}


def test_upstream_table_names_every_upstream_option() -> None:
    """Users of upstream qmpbackup 0.67 find each of its options, implemented or not."""
    section = README.split(UPSTREAM_SECTION, 1)[1].split("\n## ", 1)[0]
    upstream = {"--socket", "--agent-socket", "--debug", "--syslog", "--logfile", "--level",
                "--target", "--include", "--exclude", "--uuid", "--monthly", "--quiesce",
                "--quisce", "--include-raw", "--compress", "--speed-limit", "--no-progress",
                "--progress-interval", "--pause", "--blockdev-disable-cache", "--blockdev-aio",
                "--remove-delay", "--cbw-timeout", "--no-subdir", "--no-timestamp",
                "--no-symlink", "--show", "--remove-bitmap", "--dir", "--until", "--targetfile",
                "--filter", "--skip-check"}
    first_column = "\n".join(re.findall(FIRST_CELL, section, re.MULTILINE))
    assert sorted(upstream - options_in(first_column)) == []
    for short in ("-l", "-t", "-i", "-e", "-L"):
        assert re.search(rf"[` ]{short} ", first_column), short


def test_levels_and_statuses_are_enums_that_print_and_serialise_as_their_words() -> None:
    """One enum each, one description table each; output stays byte-identical to the strings."""
    from libqmpbackup.restore.status import STATUS_DESCRIPTIONS, FileStatus
    from libqmpbackup.store.names import LEVEL_DESCRIPTIONS, Level, parse_backup_name
    parsed = parse_backup_name("INC-12-disk.qcow2")
    assert parsed is not None and parsed.level is Level.INC and parsed.level == "inc"
    assert json.dumps({Level.DIFF: [Level.FULL, FileStatus.UNVERIFIABLE]}) == \
        '{"diff": ["full", "unverifiable"]}'
    assert f"{Level.COPY}|{FileStatus.EXTRA:>6}|{Level.FULL.prefix}" == "copy| extra|FULL"
    assert set(LEVEL_DESCRIPTIONS) == set(Level) and set(STATUS_DESCRIPTIONS) == set(FileStatus)
    json_md = (ROOT / "docs" / "json.md").read_text()
    status_row = next(line for line in json_md.splitlines() if line.startswith("| `files[].status`"))
    statuses = status_row.split("|")[3].split("(")[0]
    assert re.findall(r"`(\w+)`", statuses) == [s.value for s in FileStatus]
    assert set(re.findall(r"^\| `counts\.(\w+)`", json_md, re.M)) == {s.value for s in FileStatus}


SHELL_BLOCK = r"^ *```(?:sh|crontab)\n(.*?)^ *```"       # the README's shell and crontab examples
PROGRAMS = {"qmpbackup": backup_parser, "qmprestore": restore_parser}
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", ">", ">>", "<", "2>"}


def readme_command_lines() -> list[tuple[str, list[str]]]:
    """Every qmpbackup/qmprestore command in a shell or crontab block: (program, arguments).

    Continuation lines are joined and comments dropped; a command ends at a
    shell operator, so ``out=$(qmpbackup ... --json)`` and ``... | jq`` give
    just the tool's own words.
    """
    commands = []
    for block in re.findall(SHELL_BLOCK, README, re.MULTILINE | re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            for start, word in enumerate(words):
                if word.rsplit("/", 1)[-1] in PROGRAMS:
                    rest = words[start + 1:]
                    end = next((i for i, w in enumerate(rest) if w in SHELL_OPERATORS), len(rest))
                    commands.append((word.rsplit("/", 1)[-1], rest[:end]))
    return commands


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_every_readme_command_line_uses_only_options_its_command_has() -> None:
    """Each option of each example exists where it stands: before the command, or in it."""
    commands = readme_command_lines()
    assert len(commands) >= 30, "the README's examples were not found"
    unknown = []
    for program, words in commands:
        top = PROGRAMS[program]()
        subs = subcommand_parsers(top)
        command = next((w for w in words if w in subs), None)
        assert command is not None, f"no command in: {program} {shlex.join(words)}"
        split = words.index(command)
        for parser, part in ((top, words[:split]), (subs[command], words[split + 1:])):
            known = {o for a in parser._actions for o in a.option_strings}
            for word in part:
                option = word.split("=", 1)[0]
                if option.startswith("-") and option not in known | MISTYPED:
                    unknown.append(f"{program} {shlex.join(words)}: {option}")
    assert unknown == []


def test_every_readme_command_line_parses() -> None:
    """The examples run as written as far as the parser goes: values, choices, combinations."""
    for program, words in readme_command_lines():
        if MISTYPED & set(words):
            continue
        PROGRAMS[program]().parse_args(words)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks skipped)."""
    prose = re.sub(r"^ *```.*?^ *```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.*)$", prose, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeated = sum(1 for a in anchors if re.fullmatch(rf"{re.escape(anchor)}(-\d+)?", a))
        anchors.add(f"{anchor}-{repeated}" if repeated else anchor)  # GitHub's -1, -2, ...
    return anchors


def test_links_to_headings_resolve() -> None:
    """The table of contents and every cross reference of the README and bench/README.md."""
    files = {"README.md": README, "bench/README.md": (ROOT / "bench" / "README.md").read_text()}
    anchors = {name: heading_anchors(text) for name, text in files.items()}
    broken = []
    for name, text in files.items():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", text):
            other = str((Path(name).parent / target).as_posix()) if target else name
            other = other.replace("bench/../", "")
            if other in anchors and anchor not in anchors[other]:
                broken.append(f"{name}: {target}#{anchor}")
    assert broken == []
