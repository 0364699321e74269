"""Starting qemu-storage-daemon: the pieces that need no QMP client.

:mod:`storage_daemon` (offline backups, a QMP session) and
:mod:`libqmpbackup.restore.mount` (a FUSE export, no QMP at all: restores
never load the QMP client) both start the daemon; what they share lives
here so that importing it pulls in nothing of QMP.
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Callable

DAEMON = "qemu-storage-daemon"
PR_SET_PDEATHSIG = 1


def die_with_parent_hook() -> Callable[[], None]:
    """A preexec_fn that makes the kernel SIGTERM the child when this process dies.

    libc is looked up before the fork; the child checks that its parent is
    still the one that forked it (a parent that died before prctl would
    never send the signal).
    """
    parent = os.getpid()
    try:
        prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # not Linux: the terminate on exit still holds
        prctl = None

    def hook() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)
    return hook
