"""Reading a backup folder for restore: what --dir names, and whether it can be trusted.

``--dir`` may name a chain folder (it holds ``qmpbackup.json``), one disk
folder inside it, or — for ``list`` only — a ``--monthly`` base whose
YYYY-MM sub-folders are chain folders.  :func:`verify` is the pre-check
every restore runs: the rules are in :mod:`restore`, this module fetches
the facts (folder listing, ``qemu-img info`` and ``check`` of every file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import ChainError, QemuImgError, TargetError, UsageError
from libqmpbackup.journal import JOURNAL_NAME, Journal, unfinished_error
from libqmpbackup.layout import existing_backup_folder, month_folders
from libqmpbackup.metadata import ChainStore
from libqmpbackup.names import METADATA_NAME, safe_component
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore.rules import (
    RestorePoint,
    disk_ids_in_folder,
    folder_problems,
    image_problems,
    parent,
    partial_leftovers,
    record_problems,
    select_disk_point,
    select_root_points,
)
from libqmpbackup.retention import pruning_entry

log = logging.getLogger(__name__)


@dataclass
class BackupDir:
    """A chain folder's metadata, and the disk folder --dir named inside it, if any."""

    store: ChainStore
    disk_folder: Optional[str] = None

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def folder(self) -> Path:
        return self.root / self.disk_folder if self.disk_folder else self.root

    def disk_id(self) -> str:
        assert self.disk_folder is not None
        ids = disk_ids_in_folder(self.store, self.disk_folder)
        if not ids:
            raise ChainError(f"{self.folder}: the chain metadata in {self.root} has no disk "
                             f"stored in folder {self.disk_folder!r}")
        return ids[-1]

    def disk_names(self) -> str:
        return ", ".join(sorted({safe_component(d) for c in self.store.chains for d in c.disks}))

    def require_disk_folder(self, command: str) -> str:
        if self.disk_folder is None:
            raise UsageError(f"{command} works on one disk: use --dir {self.root}/DISK "
                             f"(disks: {self.disk_names() or 'none'})")
        return self.disk_id()

    def points(self, until: Optional[str], uuid: Optional[str]) -> list[RestorePoint]:
        if self.disk_folder is not None:
            return [select_disk_point(self.store, self.disk_id(), until, uuid)]
        return select_root_points(self.store, until, uuid)


def _load(root: Path) -> ChainStore:
    store = ChainStore.load(root)
    if not store.chains:
        raise ChainError(f"the chain metadata {root / METADATA_NAME} lists no chain")
    return store


def open_backup_dir(path: Path) -> BackupDir:
    """The chain (and disk folder) --dir names; a --monthly base is refused as ambiguous."""
    path = existing_backup_folder(path)
    if (path / METADATA_NAME).is_file():
        return BackupDir(_load(path))
    if (path.parent / METADATA_NAME).is_file():
        return BackupDir(_load(path.parent), path.name)
    months = month_folders(path)
    if months:
        raise UsageError(f"{path} holds one chain folder per month "
                         f"({', '.join(m.name for m in months)}): give one of them as --dir")
    raise ChainError(f"{path} is neither a backup folder (no {METADATA_NAME}) nor a disk folder "
                     "of one")


def open_for_listing(path: Path) -> list[BackupDir]:
    """Like open_backup_dir, but a --monthly base lists all its months."""
    path = existing_backup_folder(path)
    if (path / METADATA_NAME).is_file() or (path.parent / METADATA_NAME).is_file():
        return [open_backup_dir(path)]
    months = month_folders(path)
    if not months:
        raise ChainError(f"{path} holds no backup chain (no {METADATA_NAME} in it, its parent "
                         "or its sub-folders)")
    return [BackupDir(_load(m)) for m in months]


def folder_entries(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError as err:
        raise ChainError(f"disk folder {folder} is missing") from err
    except OSError as err:
        raise TargetError(f"cannot read {folder}: {err.strerror}") from err


def refuse_partial(folder: Path, entries: list[str]) -> None:
    """A .partial file means a backup is writing (or died writing) into this folder."""
    leftovers = partial_leftovers(entries)
    if leftovers:
        raise ChainError(f"{folder}: unfinished backup file {leftovers[0]}: a backup is running "
                         "or was killed; remove the .partial file once no backup runs")


def refuse_unfinished(folder: Path, entries: list[str]) -> None:
    """Leftovers no check may skip: a half-written backup or a half-done in-place restore."""
    refuse_partial(folder, entries)
    if JOURNAL_NAME in entries:
        journal = Journal.load(folder)
        if journal is not None:
            raise unfinished_error(folder, journal)


def _known_files(point: RestorePoint, store: ChainStore) -> set[str]:
    """Every file any chain of the store keeps in this disk folder, or a prune is deleting."""
    folder_name = point.folder.name
    pruned = {parts[1] for parts in map(pruning_entry, store.pruning)
              if parts and parts[0] == folder_name}
    return pruned | {r.file for c in store.chains for d_id, d in c.disks.items()
                     if safe_component(d_id) == folder_name for r in d.backups}


def verify(point: RestorePoint, store: ChainStore, *, skip_check: bool = False) -> None:
    """Refuse a chain that does not match its metadata, or whose files qemu-img finds damaged.

    --skip-check skips the comparison and qemu-img check, never the refusal of
    leftovers: restoring past a running backup or a half-done commit is never
    what the admin wants.
    """
    folder = point.folder
    entries = folder_entries(folder)
    refuse_unfinished(folder, entries)
    if skip_check:
        log.warning("%s: --skip-check: restoring %s without checking the chain",
                    point.disk_id, point.label)
        return
    records = list(point.records)
    problems = record_problems(records)
    problems += folder_problems(entries, [r.file for r in records], _known_files(point, store))
    if not problems:
        problems += _image_problems(point)
    if not problems:
        problems += _check_problems(point)
    if problems:
        raise ChainError(f"{folder} (chain {point.chain_id}): {'; '.join(problems)}")
    log.debug("%s: chain %s verified (%d files)", point.disk_id, point.chain_id, len(records))


def _image_problems(point: RestorePoint) -> list[str]:
    """Each file against its metadata; runs after record_problems found every record in place."""
    problems = []
    for index, record in enumerate(point.records):
        backs_onto = parent(point.records, index)
        try:
            info = qemuimg.info(point.folder / record.file, fmt="qcow2")
        except QemuImgError as err:
            problems.append(f"{record.file} is unreadable ({err})")
        else:
            problems += image_problems(
                record, None if backs_onto is None else point.records[backs_onto], info,
                point.folder)
    return problems


def _check_problems(point: RestorePoint) -> list[str]:
    problems = []
    for record in point.records:
        path = point.folder / record.file
        try:
            result = qemuimg.check(path, fmt="qcow2")
        except QemuImgError as err:
            problems.append(f"{record.file} failed qemu-img check ({err})")
            continue
        if result.damaged:
            problems.append(f"qemu-img check found {result.corruptions} corruption(s) and "
                            f"{result.check_errors} error(s) in {record.file}")
        elif result.leaks:
            log.warning("%s: %d leaked cluster(s) (wasted space, no data lost; "
                        "`qemu-img check -r leaks` reclaims them)", path, result.leaks)
    return problems
