"""What both command-line programs share: running a command and ending it.

Exceptions become exit codes here and nowhere else, each as one line on
stderr (the traceback only with --debug).  SIGINT, SIGTERM and SIGHUP (an ssh
session or terminal that goes away) are turned into cancellation of the
running command, so its ``finally`` blocks and exit stacks clean up QEMU and
the target before the process exits with 128 + the signal number; a second
signal during that cleanup is ignored.  With ``--json`` the outcome is also
one document on stdout (see :mod:`libqmpbackup.json_output`): the command's
result, or the error envelope made here from the same exception that sets
the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import inspect
import logging
import os
import re
import signal
import sys
from typing import Any, Awaitable, Callable, NoReturn, Optional, Sequence, Union

from libqmpbackup.errors import CommandLineError, Interrupted, QmpBackupError
from libqmpbackup.json_output import Document, JsonResult, error_document, json_stdout, wants_json
from libqmpbackup.logsetup import configure
from libqmpbackup.units import parse_size

log = logging.getLogger(__name__)

CommandResult = Union[int, JsonResult, None]
Command = Callable[[argparse.Namespace], Union[CommandResult, Awaitable[CommandResult]]]
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
NEGATIVE_NUMBER = re.compile(r"-\d+|-\d*\.\d+")    # a value, as argparse itself reads it


_AT_EXIT: list[Callable[[int], None]] = []
"""Who wants the process's final exit code (``--metrics-file``), in order."""


def at_exit(callback: Callable[[int], None]) -> None:
    """Call CALLBACK with the run's exit code once it is final (``--metrics-file``).

    Whatever the way out, signals and unexpected errors included: the code is
    the one the process exits with.  A failing callback is a warning; it never
    changes that code.
    """
    _AT_EXIT.append(callback)


def _report_exit(code: int) -> None:
    callbacks = list(_AT_EXIT)
    _AT_EXIT.clear()
    for callback in callbacks:
        try:
            callback(code)
        except Exception as err:
            log.warning("could not record the outcome: %s", err)
            log.debug("where it failed:", exc_info=True)


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


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """argparse type for an age such as ``24h``, ``90m``, ``2d`` or plain seconds; 0 allowed."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        value = float(number) * DURATION_UNITS[unit]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (like 24h, 90m, 0)") from err
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration of 0 or more")
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


async def _run_cancellable(coro: Awaitable[CommandResult], first: _FirstSignal) -> CommandResult:
    """Run CORO; the first signal cancels it, so its ``finally`` blocks clean up."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)

    def on_signal(signum: int) -> None:
        if first.take(signum):
            task.cancel()

    for signum in HANDLED_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result = await task
        if first.signum is not None:
            # the command absorbed the cancellation: what it promised was on disk already
            log.warning("received %s after the backup was recorded: the run finished "
                        "(the backup stands)", signal.Signals(first.signum).name)
        return result
    except asyncio.CancelledError:
        if first.signum is not None:
            raise Interrupted(first.signum) from None
        raise
    finally:
        for signum in HANDLED_SIGNALS:
            loop.remove_signal_handler(signum)


def _dispatch(command: Command, args: argparse.Namespace) -> CommandResult:
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises its errors as :class:`CommandLineError` instead of exiting.

    The runner maps that like any other error (exit 2, the ``--json`` error
    document) from the exception itself; argparse's own ``error()`` prints and
    calls ``sys.exit``, which left only its stderr to read the message from.
    Subcommand parsers are made of the same class (argparse's default).

    Abbreviations are refused (``--sock`` is not ``--socket``: a crontab must
    say what it means, and a later option would change what it meant), and
    an unknown option is reported first, by name, with the closest known one:
    argparse itself would first complain that the option the typo was meant
    to be (``--levle`` for ``--level``) is missing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message, usage=self.format_usage(), prog=self.prog)

    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        _refuse_unknown_options(self, argv)
        return super().parse_args(argv, namespace)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public walk over subcommands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Raise for the first option token that neither PARSER nor the chosen subcommand knows."""
    known, subs, current = _option_strings(parser), _subcommands(parser), parser
    for token in argv:
        if token == "--":
            return
        if current is parser and token in subs:
            current = subs[token]
            known = _option_strings(current)
            continue
        if not token.startswith("-") or token == "-" or NEGATIVE_NUMBER.fullmatch(token):
            continue
        name = token.split("=", 1)[0] if token.startswith("--") else token[:2]
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        current.error(f"unrecognized option {name}{hint}")


def _parse(parser: argparse.ArgumentParser,
           argv: list[str]) -> Union[argparse.Namespace, int]:
    """The parsed ARGV, or the exit code of a command line that runs nothing.

    That is a usage error (printed as argparse prints it, plus the ``--json``
    error document), or ``--help``/``--version``, which argparse prints and
    ends with ``parser.exit()``.
    """
    try:
        return parser.parse_args(argv)
    except CommandLineError as err:
        sys.stderr.write(err.report())
        if wants_json(None, argv):
            with json_stdout() as out:
                out.write(error_document(err.exit_code, str(err)))
        return err.exit_code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2


def _outcome(command_of: Callable[[argparse.Namespace], Command], args: argparse.Namespace,
             name: str) -> tuple[int, Optional[Document]]:
    """Run the command: its exit code, and its result or error document (None: nothing to say)."""
    try:
        configure(debug=args.debug, quiet=args.quiet, logfile=args.logfile,
                  syslog=args.syslog, name=name)
        result = _dispatch(command_of(args), args)
    except BrokenPipeError:
        # `qmprestore list | head`: the reader left; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0, None
    except QmpBackupError as err:
        for line in err.lines():
            log.error("%s", line)
        log.debug("where it failed:", exc_info=True)
        return err.exit_code, {**(err.document or {}), **error_document(err.exit_code, str(err))}
    except Exception as err:  # the last line of defence: never a traceback by default
        message = f"unexpected {type(err).__name__}: {err}"
        log.error("%s (run with --debug for details)", message)
        log.debug("where it failed:", exc_info=True)
        return 1, error_document(1, message)
    if isinstance(result, JsonResult):
        return result.exit_code, result.document
    return result or 0, None


def run(parser: argparse.ArgumentParser, command_of: Callable[[argparse.Namespace], Command],
        argv: Optional[Sequence[str]], name: str) -> int:
    """Parse ARGV, run the chosen command, and map its outcome to an exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parsed = _parse(parser, arguments)
    if isinstance(parsed, int):
        return parsed
    if not wants_json(parsed, None):
        code = _outcome(command_of, parsed, name)[0]
        _report_exit(code)
        return code
    with json_stdout() as out:
        code, document = _outcome(command_of, parsed, name)
        _report_exit(code)
        if document is not None:
            with contextlib.suppress(BrokenPipeError):
                out.write(document)
    return code
