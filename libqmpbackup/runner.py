"""What both command-line programs share: running a command and ending it.

Exceptions become exit codes here and nowhere else, each as one line on
stderr (the traceback only with --debug).  SIGINT, SIGTERM and SIGHUP (an ssh
session or terminal that goes away) are turned into cancellation of the
running command, so its ``finally`` blocks and exit stacks clean up QEMU and
the target before the process exits with 128 + the signal number; a second
signal during that cleanup is ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import signal
import sys
import traceback
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

from libqmpbackup.errors import Interrupted, QmpBackupError
from libqmpbackup.logsetup import configure
from libqmpbackup.units import parse_size

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], Union[int, Awaitable[Optional[int]], None]]
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def byte_rate(text: str) -> int:
    """argparse type for sizes and rates such as ``50M``: bad input is a usage error."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def positive_seconds(text: str) -> float:
    """argparse type for an interval: a number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from err
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds above 0")
    return value


def add_logging_options(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """The logging options; AFTER_COMMAND adds them to a subcommand as well.

    Upstream qmpbackup crontabs put ``--debug`` or ``-L`` after the
    subcommand.  There the options default to SUPPRESS: argparse copies a
    subcommand's defaults over the main parser's values, which would
    otherwise reset a ``--quiet`` given before the subcommand.
    """
    group = parser.add_argument_group("logging")
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    group.add_argument("--debug", "--verbose", dest="debug", action="store_true", **unset,
                       help="log debug messages, including every QMP command and reply")
    group.add_argument("-L", "--logfile", metavar="FILE", **unset,
                       help="also append log messages to FILE")
    group.add_argument("--syslog", action="store_true", **unset,
                       help="also log to syslog (/dev/log)")
    group.add_argument("--quiet", action="store_true", **unset,
                       help="log only warnings and errors")


class _FirstSignal:
    """Only the first signal interrupts: a second one must not cut the cleanup it started short."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def take(self, signum: int) -> bool:
        name = signal.Signals(signum).name
        if self.signum is not None:
            log.warning("%s ignored: already cleaning up", name)
            return False
        self.signum = signum
        log.warning("received %s: cancelling what this run started and cleaning up", name)
        return True


async def _run_cancellable(coro: Awaitable[Optional[int]], first: _FirstSignal) -> Optional[int]:
    """Run CORO; the first signal cancels it, so its ``finally`` blocks clean up."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)

    def on_signal(signum: int) -> None:
        if first.take(signum):
            task.cancel()

    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if first.signum is not None:
            raise Interrupted(first.signum) from None
        raise
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)


def _dispatch(command: Command, args: argparse.Namespace) -> Optional[int]:
    first = _FirstSignal()

    def interrupt(signum: int, _frame: Any) -> None:
        if first.take(signum):
            raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in HANDLED_SIGNALS}
    try:
        result = command(args)
        if inspect.isawaitable(result):
            return asyncio.run(_run_cancellable(result, first))
        return result
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run(parser: argparse.ArgumentParser, command_of: Callable[[argparse.Namespace], Command],
        argv: Optional[Sequence[str]], name: str) -> int:
    """Parse ARGV, run the chosen command, and map its outcome to an exit code."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        configure(debug=args.debug, quiet=args.quiet, logfile=args.logfile,
                  syslog=args.syslog, name=name)
        return _dispatch(command_of(args), args) or 0
    except BrokenPipeError:
        # `qmprestore list | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except QmpBackupError as err:
        log.error("%s", err)
        log.debug("%s", "".join(traceback.format_exception(*sys.exc_info())))
        return err.exit_code
    except Exception as err:  # the last line of defence: never a traceback by default
        log.error("unexpected %s: %s (run with --debug for details)", type(err).__name__, err)
        log.debug("%s", "".join(traceback.format_exception(*sys.exc_info())))
        return 1
