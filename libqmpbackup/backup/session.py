"""A QMP session that belongs to this run alone: to a VM (its lock first), or to a private
qemu-storage-daemon on the images of a VM that is shut down (the image locks first)."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator, Sequence

from libqmpbackup.qemu.qmp import QmpSession, check_unix_socket
from libqmpbackup.qemu.storage_daemon import DaemonImage, StorageDaemon
from libqmpbackup.store.locks import hold, image_lock, lock_dir, vm_lock


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


@contextlib.asynccontextmanager
async def image_session(images: Sequence[DaemonImage]) -> AsyncIterator[QmpSession]:
    """A QMP session to a qemu-storage-daemon of this run alone, on IMAGES.

    Each image is locked first, so a second offline run of the same image
    says "another backup is running" rather than "in use by a running QEMU".
    """
    with contextlib.ExitStack() as locks:
        for image in images:
            locks.enter_context(image_lock(image.path))
        async with StorageDaemon(images) as session:
            yield session
