"""The runner turns signals into one interruption whose cleanup always completes."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
from typing import Optional

import pytest

from libqmpbackup.backup.run_steps import finish_regardless
from libqmpbackup.errors import UsageError
from libqmpbackup.runner import add_logging_options, run


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser()
    add_logging_options(built)
    return built


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_second_signal_during_cleanup_is_ignored_in_the_synchronous_path(signum: int) -> None:
    cleaned: list[str] = []

    def command(_args: argparse.Namespace) -> Optional[int]:
        try:
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal did not interrupt")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)   # an impatient admin sends another
            cleaned.append("done")

    assert run(parser(), lambda _args: command, [], "test") == 128 + signum
    assert cleaned == ["done"]


def test_sighup_cancels_the_asynchronous_command_and_its_cleanup_completes() -> None:
    cleaned: list[str] = []

    async def command() -> Optional[int]:
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(30)
            return 0
        finally:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.05)             # cleanup awaits: the second signal arrives here
            cleaned.append("done")

    assert run(parser(), lambda _args: lambda _a: command(), [], "test") == 129
    assert cleaned == ["done"]


@pytest.mark.parametrize("build, argv, prog, message", [
    ("qmpbackup", ["backup", "--level", "x", "--target", "t"], "qmpbackup backup",
     "argument -l/--level: invalid choice: 'x'"),
    ("qmpbackup", [], "qmpbackup", "the following arguments are required: COMMAND"),
    ("qmprestore", ["merge", "--dir", "d"], "qmprestore merge",
     "one of the arguments --targetfile --targetdir is required"),
])
def test_the_parsers_raise_the_usage_error_itself(build: str, argv: list[str], prog: str,
                                                  message: str) -> None:
    """No scraping of argparse's stderr: the parser (and each subcommand's) raises UsageError."""
    built = importlib.import_module(f"{build}.cli").build_parser()
    with pytest.raises(UsageError) as info:
        built.parse_args(argv)
    assert info.value.exit_code == 2 and str(info.value).startswith(message)
    assert info.value.lines() == [str(info.value)] and vars(info.value).get("prog") == prog
def test_a_signal_after_the_record_lets_the_run_finish_and_exit_0(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The run absorbs a cancellation once recorded; the runner learns it from the result."""
    finished: list[str] = []

    async def after_commit() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)                 # the signal arrives while this step awaits
        finished.append("cleanup")

    async def command() -> Optional[int]:
        await finish_regardless(after_commit())
        finished.append("returned")
        return 0

    assert run(parser(), lambda _args: lambda _a: command(), [], "test") == 0
    assert finished == ["cleanup", "returned"]
    assert "received SIGTERM after the backup was recorded" in capsys.readouterr().err


@pytest.mark.parametrize("program, argv, line", [
    ("qmpbackup", ["--sock", "/run/x", "info"],
     "qmpbackup: error: unrecognized option --sock; did you mean --socket? "
     "(see qmpbackup --help)"),
    ("qmpbackup", ["--socket", "/run/x", "backup", "--levle", "full", "-t", "/b"],
     "qmpbackup backup: error: unrecognized option --levle; did you mean --level? "
     "(see qmpbackup backup --help)"),
    ("qmpbackup", ["prune", "--target=/b", "--kep", "2"],
     "qmpbackup prune: error: unrecognized option --kep; did you mean --keep? "
     "(see qmpbackup prune --help)"),
    ("qmprestore", ["list", "--frobnicate"],
     "qmprestore list: error: unrecognized option --frobnicate (see qmprestore list --help)"),
    ("qmprestore", ["merge", "--dir", "d"],
     "qmprestore merge: error: one of the arguments --targetfile --targetdir is required "
     "(see qmprestore merge --help)"),
])
def test_a_bad_command_line_is_one_line_naming_the_option(
        program: str, argv: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    """No abbreviations, the unknown option first (not the option it was meant to be), no usage page."""
    main = importlib.import_module(f"{program}.cli").main
    assert main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_values_that_look_like_options_are_left_to_argparse() -> None:
    built = importlib.import_module("qmpbackup.parser").build_parser()
    args = built.parse_args(["prune", "--target", "/b", "--keep", "-1"])
    assert args.keep == -1
