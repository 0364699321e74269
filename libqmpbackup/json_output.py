"""``--json``: one machine-readable document on stdout per run, and nothing else there.

Scripts parse stdout, so while a command runs with ``--json`` everything
that would print to stdout (tables, dry-run steps) goes to stderr instead,
and the runner writes exactly one document at the end: the command's result,
or ``{"error": {"code": N, "message": "..."}}`` when it failed.  Logs and
progress keep going to stderr (or the log file) as usual.  The keys are
listed in docs/json.md; a test compares them with real output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, TextIO

JSON_OPTION = "--json"

Document = dict[str, Any]


@dataclass
class JsonResult:
    """What a command returns under --json: its result document (and exit code)."""

    document: Document
    exit_code: int = 0


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(JSON_OPTION, dest="json", action="store_true",
                        help="print one JSON document on stdout (keys: docs/json.md); "
                             "logs and progress go to stderr")


def wants_json(args: Optional[argparse.Namespace], argv: Optional[list[str]]) -> bool:
    """--json was given (ARGS may be missing when the command line did not parse)."""
    if args is not None:
        return bool(getattr(args, "json", False))
    return argv is not None and JSON_OPTION in argv


def error_document(code: int, message: str) -> Document:
    return {"error": {"code": code, "message": message}}


class JsonStdout:
    """The real stdout, kept for the one document while sys.stdout points at stderr."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.written = False

    def write(self, document: Document) -> None:
        if self.written:   # one run, one document: a second one would break every parser
            raise RuntimeError("a JSON document was already written")
        self.written = True
        self.stream.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        self.stream.flush()


@contextlib.contextmanager
def json_stdout() -> Iterator[JsonStdout]:
    """Route sys.stdout to stderr for the duration, so only the document reaches stdout."""
    output = JsonStdout(sys.stdout)
    with contextlib.redirect_stdout(sys.stderr):
        yield output
