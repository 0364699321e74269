"""Logging for both commands: one line per message on stderr, optional file and syslog.

--debug also turns on qemu.qmp's own DEBUG logging, which prints every QMP
message sent and received; without it that library is silenced, because it
logs connection failures at ERROR that the tool reports itself in one line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from libqmpbackup.errors import UsageError

SYSLOG_SOCKET = "/dev/log"


class _ConsoleFormatter(logging.Formatter):
    """``qmpbackup: message`` for information, ``qmpbackup: error: message`` for problems."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def format(self, record: logging.LogRecord) -> str:
        label = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"{self.name}: {label}{record.getMessage()}"


def configure(*, debug: bool = False, quiet: bool = False, logfile: Optional[str] = None,
              syslog: bool = False, name: str = "qmpbackup") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if debug else logging.INFO)

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s") if debug else _ConsoleFormatter(name))
    root.addHandler(console)

    if logfile:
        try:
            file_handler = logging.FileHandler(logfile)
        except OSError as err:
            raise UsageError(f"cannot open log file {logfile}: {err.strerror}") from err
        file_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    if syslog:
        if not os.path.exists(SYSLOG_SOCKET):
            raise UsageError(f"--syslog: {SYSLOG_SOCKET} does not exist (no syslog daemon)")
        from logging.handlers import SysLogHandler  # only here: it loads pickle and socket

        syslog_handler = SysLogHandler(address=SYSLOG_SOCKET)
        syslog_handler.setFormatter(
            logging.Formatter(f"{name}[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(syslog_handler)

    qmp_logger = logging.getLogger("qemu.qmp")
    qmp_logger.setLevel(logging.DEBUG if debug else logging.CRITICAL + 1)
