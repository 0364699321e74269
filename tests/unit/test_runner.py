"""The runner turns signals into one interruption whose cleanup always completes."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from typing import Optional

import pytest

from libqmpbackup.backup.run_steps import finish_regardless
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
