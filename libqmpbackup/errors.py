"""The one exception hierarchy of qmpbackup and qmprestore.

Every error a user can cause or meet carries its exit code on the class, so
the command-line entry points map exceptions to exit codes in exactly one
place (:func:`libqmpbackup.runner.run`).  Each layer wraps the error of the
layer below with its cause (``raise X(...) from err``, as qemu.qmp does): a
refused QMP command is a :class:`CommandRefused` until the job layer, and only
there, turns a refused job start into a :class:`JobError`.  The table in the README is generated
from the same numbers; keep them stable, scripts depend on them.
"""

from __future__ import annotations

import signal
from typing import Any, Optional


class QmpBackupError(Exception):
    """Base class: a failure that is reported in one line, without traceback."""

    exit_code = 1
    #: what the command had found before it failed, shown beside the error under --json
    document: Optional[dict[str, Any]] = None

    def lines(self) -> list[str]:
        """The error lines to print: one, unless the error is about several things."""
        return [str(self)]


class UsageError(QmpBackupError):
    """The command line is inconsistent (wrong combination, unsafe value)."""

    exit_code = 2


class CommandLineError(UsageError):
    """What argparse found wrong in the command line: one line, pointing at ``--help``."""

    def __init__(self, message: str, *, usage: str, prog: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog

    def report(self) -> str:
        """``PROG: error: MESSAGE``, like every other error; not argparse's page of usage."""
        return f"{self.prog}: error: {self} (see {self.prog} --help)\n"


class ConnectError(QmpBackupError):
    """QMP/agent socket missing, not QMP, refused, busy or stuck; or qemu-storage-daemon cannot open
    an --image."""

    exit_code = 3


class LockBusyError(QmpBackupError):
    """Another qmpbackup run holds the lock of this VM or backup folder."""

    exit_code = 4


class TargetError(QmpBackupError):
    """The backup target cannot be used (not empty for a new chain, not a directory, unwritable, full)."""

    exit_code = 5


class ChainError(QmpBackupError):
    """Chain metadata, backup files or dirty bitmaps disagree or are unusable, or folder content is unsafe."""

    exit_code = 6


class JobError(QmpBackupError):
    """QEMU refused to start the backup jobs, or a block job failed (not on its target) or was cancelled."""

    exit_code = 7


class VMGoneError(QmpBackupError):
    """The VM quit or the QMP connection broke while the tool was working."""

    exit_code = 8


class QemuImgError(QmpBackupError):
    """qemu-img is missing or one of its commands failed."""

    exit_code = 9


class QemuImgLimitError(QemuImgError):
    """qemu-img was stopped at its CPU, memory or time limit: the image is crafted or damaged."""


class AgentError(QmpBackupError):
    """The QEMU guest agent did not answer or refused a command."""

    exit_code = 10


class BackupDamaged(QmpBackupError):
    """A backup file is damaged or missing: its checksum, qemu-img check or chain link fails."""

    exit_code = 11

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems

    def lines(self) -> list[str]:
        """One line per bad file, so each can be acted on (and grepped) by itself."""
        return list(self.problems)


class ImageInUseError(QmpBackupError):
    """An --image is in use by a running QEMU (it holds the image lock): back that VM up with --socket."""

    exit_code = 12


class FleecingError(QmpBackupError):
    """Fleecing snapshot broke: the fleecing storage was slower than --cbw-timeout, or full."""

    exit_code = 13


class CommandRefused(QmpBackupError):
    """QEMU refused a QMP command outside a block job (a query, opening or closing a node, a
    bitmap, pause/resume, the switch back from a fleecing filter)."""

    exit_code = 14


class MountError(QmpBackupError):
    """mount/umount: no /dev/fuse or qemu-storage-daemon, the daemon failed, or a mount stays busy."""

    exit_code = 15


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown"


class Interrupted(QmpBackupError):
    """SIGINT, SIGTERM or SIGHUP arrived; raised in the main task so cleanup runs."""

    exit_code = 130

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by signal {signum} ({_signal_name(signum)}): "
                                    "what this run had started was cancelled and removed")
        self.signum = signum
        self.exit_code = 128 + signum


def _row(error: type[QmpBackupError]) -> tuple[int, str]:
    """An error class's code and its docstring on one line (docstrings wrap; tables do not)."""
    return error.exit_code, " ".join((error.__doc__ or "").split())


EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "unexpected internal error (run with --debug for the traceback)"),
    _row(UsageError),
    _row(ConnectError),
    _row(LockBusyError),
    _row(TargetError),
    _row(ChainError),
    _row(JobError),
    _row(VMGoneError),
    _row(QemuImgError),
    _row(AgentError),
    _row(BackupDamaged),
    _row(ImageInUseError),
    _row(FleecingError),
    _row(CommandRefused),
    _row(MountError),
    (129, "interrupted by SIGHUP"),
    (130, "interrupted by SIGINT"),
    (143, "interrupted by SIGTERM"),
)
