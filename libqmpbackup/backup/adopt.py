"""Continuing a chain that upstream qmpbackup 0.67 started, in its own folder.

Upstream names a disk's folder after the QEMU device (``ide0-hd0``) or node,
so each folder is matched to a disk of the VM by any of the disk's names
(with ``--no-subdir``, by the image name in the file names).  The chain then
continues like one of ours: the plan checks that the VM still has the
chain's bitmap ``qmpbackup-<uuid>`` (the uuid from ``DIR/uuid``), and the
first committed run writes ``qmpbackup.json`` — the adoption.  Upstream's
files are never renamed, rewritten or removed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.store import upstream
from libqmpbackup.store.metadata import ChainStore, DiskChain
from libqmpbackup.store.names import image_name

log = logging.getLogger(__name__)


def _owner(key: str, disk: DiskChain, disks: list[BlockDevice]) -> str:
    """The VM disk a folder (or, without sub-folders, an image name) of upstream belongs to."""
    for candidate in disks:
        if disk.folder and disk.folder in candidate.names():
            return candidate.disk_id
        if not disk.folder and image_name(candidate.filename) == key:
            return candidate.disk_id
    return key


def adopt_upstream(root: Path, disks: list[BlockDevice]) -> ChainStore:
    """ROOT's upstream chain (ROOT/uuid names it) as metadata of ours, keyed by this VM's disk ids."""
    store = upstream.read_folder(root)
    for chain in store.chains:
        chain.disks = {_owner(key, disk, disks): disk for key, disk in chain.disks.items()}
    current = store.current
    if current is not None:
        log.info("%s was written by upstream qmpbackup: continuing its chain %s (disks %s) "
                 "in place; its files stay as they are", root, current.uuid,
                 ", ".join(current.disks))
    return store
