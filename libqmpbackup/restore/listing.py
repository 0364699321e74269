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

from libqmpbackup.errors import QmpBackupError
from libqmpbackup.json_output import Document
from libqmpbackup.restore.folder import BackupDir, listed
from libqmpbackup.restore.rules import partial_leftovers
from libqmpbackup.store.handles import kind
from libqmpbackup.store.journal import JOURNAL_NAME
from libqmpbackup.store.metadata import BackupRecord, Chain
from libqmpbackup.store.mounts import MountRecord, alive, checking, records
from libqmpbackup.tables import table
from libqmpbackup.units import local_time

log = logging.getLogger(__name__)

HEADERS = ("chain", "disk", "restore point", "time", "level", "file", "size", "virtual size")


def _entry(backup: BackupDir, folder: str, name: str) -> Optional[os.stat_result]:
    """NAME in the disk folder FOLDER, never followed (a symlink is reported as one); None when
    missing, or when the disk folder cannot be used (missing, or a symlink: never followed)."""
    try:
        return backup.disk_folder(folder).entry(name)
    except QmpBackupError:
        return None


def _size(info: Optional[os.stat_result]) -> str:
    if info is None:
        return "missing"
    return str(info.st_size) if stat.S_ISREG(info.st_mode) else f"refused: {kind(info)}"


def _disk_ids(backup: BackupDir, chain: Chain) -> list[str]:
    """The chain's disks --dir (and --filter) chose."""
    chosen = set(backup.disk_ids())
    return [d for d in chain.disks if d in chosen and (
        backup.selected is None or chain.folder_of(d) == backup.selected)]


def _point_document(backup: BackupDir, name: str, record: BackupRecord) -> Document:
    info = _entry(backup, name, record.file)
    return {"point": record.label, "file": str(backup.root / name / record.file),
            "level": record.level, "time": record.point_time,
            "size": info.st_size if info is not None and stat.S_ISREG(info.st_mode) else None,
            "virtual_size": record.virtual_size, "compressed": record.compressed,
            "quiesced": record.quiesced}


def _chain_document(backup: BackupDir, chain: Chain) -> Document:
    disks = []
    for disk_id in _disk_ids(backup, chain):
        name = chain.folder_of(disk_id)
        disks.append({"disk": disk_id, "folder": str(backup.root / name), "points": [
            _point_document(backup, name, r) for r in chain.disks[disk_id].backups]})
    return {"chain": chain.uuid, "folder": str(backup.root), "bitmap": chain.bitmap,
            "created": chain.created, "encrypted": chain.encrypted, "disks": disks}


def _rows(backup: BackupDir, prefix: str) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for chain in backup.store.chains:
        for disk_id in _disk_ids(backup, chain):
            name = chain.folder_of(disk_id)
            for record in chain.disks[disk_id].backups:
                # an encrypted chain is marked where its id is shown (clear ones unchanged)
                rows.append((prefix + chain.uuid + (" (encrypted)" if chain.encrypted else ""),
                             disk_id, record.label,
                             local_time(record.point_time), record.level, record.file,
                             _size(_entry(backup, name, record.file)),
                             record.virtual_size or "unknown"))
    return rows


def _warn_leftovers(backup: BackupDir) -> None:
    if backup.store.pruning:
        log.warning("%s: %d file(s) of pruned chains are not deleted yet (an interrupted prune); "
                    "the next prune or backup run removes them", backup.root,
                    len(backup.store.pruning))
    names = ([backup.selected] if backup.selected is not None
             else backup.backup_folder.disk_folder_names())
    for name in names:
        try:
            folder = backup.disk_folder(name)
            entries = folder.names()
        except QmpBackupError as err:   # missing, or a symlink: never followed
            log.warning("%s", err)
            continue
        for file in partial_leftovers(entries):
            log.warning("%s: unfinished backup file %s", folder.path, file)
        if JOURNAL_NAME in entries:
            log.warning("%s: an in-place restore was interrupted (%s)", folder.path,
                        JOURNAL_NAME)


def list_table(path: Path, name_filter: Optional[str] = None) -> str:
    """Every chain, disk and restore point below PATH (chain folder, disk folder or --monthly base)."""
    given = Path(os.path.abspath(path))
    rows = []
    with listed(path, name_filter) as backups:
        for backup in backups:
            _warn_leftovers(backup)
            # below a --monthly base, chains are told apart by their month folder
            rows += _rows(backup, "" if backup.folder == given else f"{backup.root.name}/")
        found = _mounts(backups)
    return "\n".join([table(rows, headers=HEADERS), *map(_mount_line, found)])


def _mount_line(record: MountRecord) -> str:
    line = (f"mounted at {record.mountpoint} (daemon pid {record.pid}): "
            + ", ".join(f"{d.disk} {d.point}" for d in record.disks))
    if record.damaged:
        return f"{line}: ENDED, DAMAGED: {'; '.join(record.damaged)}"
    if not alive(record):
        return f"{line}: the daemon died, run qmprestore umount {record.mountpoint}"
    return line + (" (checksums being verified)" if checking(record) else "")


def _mounts(backups: list[BackupDir]) -> list[MountRecord]:
    """``qmprestore mount``s of these chain folders (each once): live, or to be unmounted."""
    roots = {os.path.realpath(b.root) for b in backups}
    return [r for r in records() if r.root in roots]


def list_document(path: Path, name_filter: Optional[str] = None) -> Document:
    """The ``list --json`` document: the same chains, disks and points as the table."""
    chains = []
    with listed(path, name_filter) as backups:
        for backup in backups:
            _warn_leftovers(backup)
            chains += [_chain_document(backup, c) for c in backup.store.chains]
        found = _mounts(backups)
    return {"command": "list", "dir": os.path.abspath(path), "chains": chains,
            "mounts": [r.document() for r in found]}
