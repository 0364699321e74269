"""The README documents exactly the options and exit codes the code has."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from libqmpbackup.errors import EXIT_CODES
from qmpbackup.cli import build_parser as backup_parser
from qmprestore.cli import build_parser as restore_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
# options of other programs that the README quotes
FOREIGN = {"--output", "--backing-chain", "--dist", "--strict"}


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:  # argparse offers no public walk over subcommands
        found.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= parser_options(sub)
    return found


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    code = parser_options(backup_parser()) | parser_options(restore_parser())
    code -= {"--help"}
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", README)) - FOREIGN
    assert sorted(code - documented) == [], "options missing from the README"
    assert sorted(documented - code) == [], "README options the code lacks"


def test_exit_code_table_matches_the_library() -> None:
    section = README.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for cell in re.findall(r"^\| ([\d /]+) \|", section, re.MULTILINE):
        documented |= {int(c) for c in cell.split("/")}
    assert documented == {code for code, _ in EXIT_CODES}
