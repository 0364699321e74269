"""Continuing a chain that upstream qmpbackup 0.67 started, in its own folder.

Upstream names a disk's folder ``DIR/<image>/`` (and, with ``--no-subdir``,
its files ``FULL-<t>-<image>``) after the base name of the disk's image file
as ``query-block`` shows it — the image below the overlay when an active
snapshot sits on top — and writes that image's ``qemu-img info`` as
``DIR/<image>.config``.  Each folder is matched to a disk of this VM by that
base name, with the ``.config``'s file name as the second witness when the
base name alone is ambiguous; QEMU's device and node names stay a fallback
(folders renamed after a disk by hand).  The chain then continues like one
of ours: the plan checks that the VM still has the chain's bitmap
``qmpbackup-<uuid>`` (the uuid from ``DIR/uuid``), and the first committed
run writes ``qmpbackup.json`` — the adoption.  Upstream's files are never
renamed, rewritten or removed.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from libqmpbackup.errors import ChainError, TargetError
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.store import folder_safety, upstream
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.metadata import ChainStore, DiskChain
from libqmpbackup.store.names import UPSTREAM_CONFIG_SUFFIX

log = logging.getLogger(__name__)


def _config_filename(root: Folder, name: str) -> Optional[str]:
    """The image file ROOT/<NAME>.config describes (upstream's qemu-img info), if it says one.

    A missing, unreadable or odd file is no witness, never an error: the
    base name alone still matches.
    """
    try:
        raw = folder_safety.read_json(root, name + UPSTREAM_CONFIG_SUFFIX, "upstream disk config")
    except (ChainError, TargetError):
        return None
    filename = raw.get("filename") if isinstance(raw, dict) else None
    return filename if isinstance(filename, str) else None


def _owner(root: Folder, key: str, disk: DiskChain, disks: list[BlockDevice]) -> Optional[str]:
    """The VM disk an upstream folder (or, with --no-subdir, an image name) belongs to."""
    name = disk.folder or key
    by_image = [d for d in disks if name in {os.path.basename(f) for f in d.image_files()}]
    config = _config_filename(root, name)
    witnessed = [d for d in by_image if config in d.image_files()] if config else []
    if len(witnessed) == 1:
        return witnessed[0].disk_id
    if len(by_image) == 1:
        return by_image[0].disk_id
    if by_image:
        log.warning("%s: upstream folder %s matches disks %s by image name: matching by device "
                    "name instead", root.path, name, ", ".join(d.disk_id for d in by_image))
    return next((d.disk_id for d in disks if disk.folder and disk.folder in d.names()), None)


def adopt_upstream(chain_folder: BackupFolder, disks: list[BlockDevice]) -> ChainStore:
    """The folder's upstream chain (its uuid file names it) as metadata of ours, keyed by this
    VM's disk ids; from now on it is CHAIN_FOLDER's store, saved with the run's commit.

    A folder that matches no disk (or a disk another folder matched already)
    keeps its own name as disk id: its records stay readable, and the run
    reports the disk it could not match as started afresh.
    """
    root = chain_folder.folder
    store = upstream.read_folder(root)
    chain_folder.replace_store(store)
    for chain in store.chains:
        adopted: dict[str, DiskChain] = {}
        for key, disk in chain.disks.items():
            owner = _owner(root, key, disk, disks)
            if owner is None or owner in adopted:
                log.warning("%s: upstream folder %s matches no disk of this VM", root.path,
                            disk.folder or key)
                owner = key
                store.unmatched.append(disk.folder or key)
            adopted[owner] = disk
        chain.disks = adopted
    current = store.current
    if current is not None:
        log.info("%s was written by upstream qmpbackup: continuing its chain %s (disks %s) "
                 "in place; its files stay as they are", root.path, current.uuid,
                 ", ".join(current.disks))
    return store
