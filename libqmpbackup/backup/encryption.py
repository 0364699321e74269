"""Encrypted chains on the backup side: which runs may write them, and the key inside QEMU.

A chain is encrypted as a whole (:attr:`Chain.encrypted`).  Everything a
run can find wrong about the key is found before the run touches QEMU or
the folder (:func:`precheck`): no key for an encrypted chain the run would
continue, a key for a clear chain the run would continue (a mixed chain),
and a wrong key (the newest file of the chain does not open with it: its
LUKS header is the check).  So a refused run leaves the bitmaps as they
were and the next run with the right key still holds every change.

QEMU gets the key as a ``secret`` object that reads a descriptor (see
:mod:`libqmpbackup.keys`); the object is deleted when the run ends, and a
killed run's object is removed by the next run (:func:`clean_leftover_secrets`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

from libqmpbackup.errors import ChainError, QemuImgError, UsageError, VMGoneError
from libqmpbackup.keys import SECRET_PREFIX, Key
from libqmpbackup.qemu import qemuimg
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.metadata import Chain

log = logging.getLogger(__name__)

CONTINUING_LEVELS = ("inc", "diff", "auto")


def precheck(chain_folder: Optional[BackupFolder], level: str, key: Optional[Key],
             passes_fds: bool) -> None:
    """Refuse (exit 2) a run whose key does not fit the chain it would write; read-only.

    CHAIN_FOLDER: the run's chain folder, None when it does not exist yet.
    """
    if key is not None and not passes_fds:
        raise UsageError("--encrypt-key-file needs a unix QMP socket: the key goes to QEMU "
                         "as a file descriptor, which QMP over tcp: cannot carry")
    if chain_folder is None:
        return
    store, root = chain_folder.store, chain_folder.path
    chain = store.copies if level == "copy" else store.current
    if chain is None:
        return
    if level in CONTINUING_LEVELS or level == "copy":
        if chain.encrypted and key is None:
            raise UsageError(f"chain {chain.uuid} in {root} is encrypted: give its key with "
                             "--encrypt-key-file (nothing was changed)")
        if not chain.encrypted and key is not None:
            raise UsageError(f"chain {chain.uuid} in {root} is not encrypted and a chain cannot "
                             "mix encrypted and clear files: start an encrypted chain in a new "
                             "folder or month (--monthly) (nothing was changed)")
    if chain.encrypted and key is not None:
        check_key(chain_folder, chain, key)


def check_key(chain_folder: BackupFolder, chain: Chain, key: Key) -> None:
    """KEY opens the newest file of CHAIN (LUKS verifies it), else exit 2."""
    store = chain_folder.store
    for disk_id, disk in chain.disks.items():
        if not disk.backups:
            continue
        name = disk.backups[-1].file
        handle = chain_folder.disk_folder(chain.folder_of(disk_id)).open_existing(name)
        with handle, qemuimg.using_key(key):
            try:
                qemuimg.check(handle.dev_path, fmt="qcow2", without_backing=True,
                              pass_fds=[handle.fd])
            except QemuImgError as err:
                if "Invalid password" in str(err):
                    raise UsageError(f"key file {key.source} is not the key of encrypted chain "
                                     f"{chain.uuid} in {store.root} (nothing was "
                                     "changed)") from err
                raise ChainError(f"cannot open {name} of encrypted chain {chain.uuid} with "
                                 f"the key: {err}") from err
        return


async def add_secret(session: QmpSession, key: Key, tag: str) -> str:
    """Give KEY to QEMU as a ``secret`` object (by descriptor); its id."""
    secret_id = f"{SECRET_PREFIX}-{tag}"
    if not session.has_guest:
        # our own qemu-storage-daemon runs as this user: it reads our memfd through procfs
        path = f"/proc/{os.getpid()}/fd/{key.fd}"
        fdset = None
    else:
        fdset, number = await session.pass_fd(key.fd, secret_id)
        path = f"/proc/self/fd/{number}"
    try:
        await session.execute("object-add", {"qom-type": "secret", "id": secret_id,
                                             "file": path})
    finally:
        if fdset is not None:   # the object has read the key: QEMU needs the descriptor no more
            await session.remove_fdset(fdset)
    return secret_id


async def remove_secret(session: QmpSession, secret_id: str) -> None:
    if not session.connected:
        return
    with contextlib.suppress(QmpCommandError, VMGoneError):
        await session.execute("object-del", {"id": secret_id})


async def clean_leftover_secrets(session: QmpSession) -> None:
    """A killed run's secret objects (the key, in QEMU's memory): removed."""
    try:
        objects = await session.execute("qom-list", {"path": "/objects"})
    except QmpCommandError:
        return
    for entry in objects:
        name = str(entry.get("name", ""))
        if name.startswith(SECRET_PREFIX + "-"):
            await remove_secret(session, name)
            log.warning("removed secret object %s of an interrupted run", name)
