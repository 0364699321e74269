"""A QMP session that belongs to this run alone (the VM lock comes first)."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

from libqmpbackup.locks import hold, lock_dir, vm_lock
from libqmpbackup.qemu.qmp import QmpSession, check_unix_socket


@contextlib.asynccontextmanager
async def locked_session(address: str) -> AsyncIterator[QmpSession]:
    """A QMP session to the VM at ADDRESS, held by this run alone.

    The lock comes before the connection: a second run must say "another
    backup is running" at once instead of waiting for a greeting the busy
    socket never sends.  Bad addresses are refused before any lock file exists.
    Once connected, a second lock on QEMU's pid covers VMs with several sockets.
    """
    session = QmpSession(address)
    if isinstance(session.address, str):
        check_unix_socket(session.address)
    with vm_lock(address):
        async with session:
            if session.peer_pid is None:
                yield session
                return
            # a VM with several QMP sockets is still one VM: leftovers of
            # "another run" must never be a live run on the other socket
            with hold(lock_dir() / f"qemu-{session.peer_pid}.lock",
                      f"QEMU process {session.peer_pid}", address):
                yield session
