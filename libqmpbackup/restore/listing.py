"""The ``list`` table: which points exist, before choosing one to restore.

Listing reads only metadata and file sizes, so it works without qemu-img
and on a damaged folder; files the metadata names but the folder lacks are
shown as missing, and leftovers (``.partial``, an unfinished in-place
restore) are reported as warnings.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Optional

from tabulate import tabulate

from libqmpbackup import folder_safety
from libqmpbackup.errors import QmpBackupError
from libqmpbackup.journal import JOURNAL_NAME
from libqmpbackup.layout import disk_folders
from libqmpbackup.restore.folder import BackupDir, open_for_listing
from libqmpbackup.restore.rules import partial_leftovers, record_label
from libqmpbackup.units import local_time

log = logging.getLogger(__name__)

HEADERS = ("chain", "disk", "restore point", "time", "level", "file", "size", "virtual size")


def _size(folder: Path, name: str) -> str:
    """Bytes on disk, read from the entry itself: a symlink is reported, never followed."""
    try:
        info = folder_safety.entry(folder, name)
    except QmpBackupError:
        return "missing"
    if info is None:
        return "missing"
    return str(info.st_size) if stat.S_ISREG(info.st_mode) else f"refused: {folder_safety.kind(info)}"


def _rows(backup: BackupDir, prefix: str) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    chosen = set(backup.disk_ids())
    for chain in backup.store.chains:
        for disk_id, disk in chain.disks.items():
            if disk_id not in chosen or (backup.disk_folder is not None
                                         and chain.folder_of(disk_id) != backup.disk_folder):
                continue
            for record in disk.backups:
                rows.append((prefix + chain.uuid, disk_id, record_label(record),
                             local_time(record.point_time), record.level, record.file,
                             _size(backup.root / chain.folder_of(disk_id), record.file),
                             record.virtual_size or "unknown"))
    return rows


def _warn_leftovers(backup: BackupDir) -> None:
    if backup.store.pruning:
        log.warning("%s: %d file(s) of pruned chains are not deleted yet (an interrupted prune); "
                    "the next prune or backup run removes them", backup.root,
                    len(backup.store.pruning))
    folders = ([backup.folder] if backup.disk_folder is not None
               else [backup.root, *disk_folders(backup.root)])
    for folder in folders:
        entries = os.listdir(folder)
        for name in partial_leftovers(entries):
            log.warning("%s: unfinished backup file %s", folder, name)
        if JOURNAL_NAME in entries:
            log.warning("%s: an in-place restore was interrupted (%s)", folder, JOURNAL_NAME)


def list_table(path: Path, name_filter: Optional[str] = None) -> str:
    """Every chain, disk and restore point below PATH (chain folder, disk folder or --monthly base)."""
    given = Path(os.path.abspath(path))
    rows = []
    for backup in open_for_listing(path, name_filter):
        _warn_leftovers(backup)
        # below a --monthly base, chains are told apart by their month folder
        rows += _rows(backup, "" if backup.folder == given else f"{backup.root.name}/")
    return tabulate(rows, headers=HEADERS)
