"""Logging for both commands: one line per message on stderr, optional file and syslog.

--debug also turns on qemu.qmp's own DEBUG logging, which prints every QMP
message sent and received; without it that library is silenced, because it
logs connection failures at ERROR that the tool reports itself in one line.

Messages carry data the tool does not control (disk ids and file names from
a backup folder, qemu-img output, guest agent replies): every handler's
formatter escapes control characters in the message (:func:`one_line`), so
no data can forge a log line or send escape sequences to a terminal.  Only
a traceback (``exc_info``, with --debug) keeps its line breaks.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import sys
from typing import Any, Optional

from libqmpbackup.errors import UsageError
from libqmpbackup.printable import escape

SYSLOG_SOCKET = "/dev/log"
DEBUG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


STRUCTURED_LOGGERS = ("qemu.qmp",)
"""Loggers whose messages keep their line breaks: qemu.qmp prints each QMP message (--debug
only) as JSON indented over several lines; JSON spells every control character of the data
inside its strings, so the line breaks are its own."""


def one_line(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of RECORD whose message (arguments filled in) has every control character escaped."""
    escaped = logging.makeLogRecord(record.__dict__)
    keep = "\n" if record.name.startswith(STRUCTURED_LOGGERS) else ""
    escaped.msg, escaped.args = escape(record.getMessage(), keep), None
    return escaped


class _EscapingFormatter(logging.Formatter):
    """A formatter of one line per message, whatever the message's data holds."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(one_line(record))

    def formatException(self, ei: Any) -> str:
        """A traceback keeps its lines; no other control character reaches the terminal."""
        return escape(super().formatException(ei), keep="\n")


class _ConsoleFormatter(_EscapingFormatter):
    """``qmpbackup: message`` for information, ``qmpbackup: error: message`` for problems."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def formatMessage(self, record: logging.LogRecord) -> str:
        label = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"{self.name}: {label}{record.message}"


class _PrivateFileHandler(logging.FileHandler):
    """logging's file handler, opening its file the safe way (and closing it on reconfigure)."""

    def _open(self) -> io.TextIOWrapper:
        return open_logfile(self.baseFilename)


def open_logfile(path: str) -> io.TextIOWrapper:
    """Append to PATH, created 0600 (logs name hosts, disks and paths), never through a symlink.

    Root writes this file: a symlink planted where it will be created must
    not turn the log into a write to whatever file it points to.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        reason = "it is a symlink" if err.errno == errno.ELOOP else err.strerror
        raise UsageError(f"cannot open log file {path}: {reason}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"cannot open log file {path}: not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def configure(*, debug: bool = False, quiet: bool = False, logfile: Optional[str] = None,
              syslog: bool = False, name: str = "qmpbackup") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if debug else logging.INFO)

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(_EscapingFormatter(DEBUG_FORMAT) if debug else _ConsoleFormatter(name))
    root.addHandler(console)

    if logfile:
        file_handler = _PrivateFileHandler(logfile)
        file_handler.setFormatter(_EscapingFormatter(DEBUG_FORMAT))
        root.addHandler(file_handler)
    if syslog:
        if not os.path.exists(SYSLOG_SOCKET):
            raise UsageError(f"--syslog: {SYSLOG_SOCKET} does not exist (no syslog daemon)")
        from logging.handlers import SysLogHandler  # only here: it loads pickle and socket

        syslog_handler = SysLogHandler(address=SYSLOG_SOCKET)
        syslog_handler.setFormatter(
            _EscapingFormatter(f"{name}[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(syslog_handler)

    qmp_logger = logging.getLogger("qemu.qmp")
    qmp_logger.setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)
