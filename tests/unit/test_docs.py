"""The README documents exactly the options and exit codes the code has."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from libqmpbackup.errors import EXIT_CODES
from qmpbackup.cli import build_parser as backup_parser
from qmprestore.cli import build_parser as restore_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
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
    json_md = (Path(__file__).resolve().parents[2] / "docs" / "json.md").read_text()
    status_row = next(line for line in json_md.splitlines() if line.startswith("| `files[].status`"))
    statuses = status_row.split("|")[3].split("(")[0]
    assert re.findall(r"`(\w+)`", statuses) == [s.value for s in FileStatus]
    assert set(re.findall(r"^\| `counts\.(\w+)`", json_md, re.M)) == {s.value for s in FileStatus}
