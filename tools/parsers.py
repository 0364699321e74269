"""The two programs' argparse parsers, walked the same way by every generator."""

from __future__ import annotations

import argparse
from typing import Callable, Iterator

from qmpbackup.parser import build_parser as backup_parser
from qmprestore.cli import build_parser as restore_parser

PROGRAMS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "qmpbackup": backup_parser,
    "qmprestore": restore_parser,
}


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order ``--help`` lists them."""
    for action in parser._actions:  # argparse offers no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The optional arguments of PARSER itself (not of its subcommands), --help left out."""
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS \
                and not isinstance(action, argparse._HelpAction):
            yield action


def all_option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--long`` option of PARSER and its subcommands (what the docs must name)."""
    found = {o for a in options(parser) for o in a.option_strings if o.startswith("--")}
    for _, _, sub in subcommands(parser):
        found |= all_option_strings(sub)
    return found
