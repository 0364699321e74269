"""The ``list`` table: which points exist, before choosing one to restore.

Listing reads only metadata and file sizes, so it works without qemu-img
and on a damaged folder; files the metadata names but the folder lacks are
shown as missing, and leftovers (``.partial``, an unfinished in-place
restore) are reported as warnings.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from tabulate import tabulate

from libqmpbackup.journal import JOURNAL_NAME
from libqmpbackup.json_output import Document
from libqmpbackup.metadata import BackupRecord, Chain
from libqmpbackup.restore.folder import BackupDir, open_for_listing
from libqmpbackup.restore.rules import partial_leftovers, record_label
from libqmpbackup.units import local_time

log = logging.getLogger(__name__)

HEADERS = ("chain", "disk", "restore point", "time", "level", "file", "size", "virtual size")


def _size(path: Path) -> Optional[int]:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _disk_ids(backup: BackupDir, chain: Chain) -> list[str]:
    """The chain's disks --dir (and --filter) chose."""
    chosen = set(backup.disk_ids())
    return [d for d in chain.disks if d in chosen and (
        backup.disk_folder is None or chain.folder_of(d) == backup.disk_folder)]


def _point_document(folder: Path, record: BackupRecord) -> Document:
    return {"point": record_label(record), "file": str(folder / record.file),
            "level": record.level, "time": record.point_time,
            "size": _size(folder / record.file),
            "virtual_size": record.virtual_size, "compressed": record.compressed,
            "quiesced": record.quiesced}


def _chain_document(backup: BackupDir, chain: Chain) -> Document:
    disks = []
    for disk_id in _disk_ids(backup, chain):
        folder = backup.root / chain.folder_of(disk_id)
        disks.append({"disk": disk_id, "folder": str(folder), "points": [
            _point_document(folder, r) for r in chain.disks[disk_id].backups]})
    return {"chain": chain.uuid, "folder": str(backup.root), "bitmap": chain.bitmap,
            "created": chain.created, "disks": disks}


def _rows(backup: BackupDir, prefix: str) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for chain in backup.store.chains:
        for disk in _chain_document(backup, chain)["disks"]:
            for point in disk["points"]:
                size = point["size"]
                rows.append((prefix + chain.uuid, disk["disk"], point["point"],
                             local_time(point["time"]), point["level"], Path(point["file"]).name,
                             "missing" if size is None else size,
                             point["virtual_size"] or "unknown"))
    return rows


def _warn_leftovers(backup: BackupDir) -> None:
    if backup.store.pruning:
        log.warning("%s: %d file(s) of pruned chains are not deleted yet (an interrupted prune); "
                    "the next prune or backup run removes them", backup.root,
                    len(backup.store.pruning))
    folders = [backup.folder] if backup.disk_folder is not None else [backup.root, *sorted(
        p for p in backup.root.iterdir() if p.is_dir() and not p.is_symlink())]
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


def list_document(path: Path, name_filter: Optional[str] = None) -> Document:
    """The ``list --json`` document: the same chains, disks and points as the table."""
    chains = []
    for backup in open_for_listing(path, name_filter):
        _warn_leftovers(backup)
        chains += [_chain_document(backup, c) for c in backup.store.chains]
    return {"command": "list", "dir": os.path.abspath(path), "chains": chains}
