"""Reading a backup folder for restore: what --dir names, and whether it can be trusted.

``--dir`` may name a chain folder (it holds ``qmpbackup.json``), one disk
folder inside it, or — for ``list`` and ``verify`` only — a ``--monthly``
base whose YYYY-MM sub-folders are chain folders.  The chain folder is
held open for the whole command as one
:class:`~libqmpbackup.store.backup_folder.BackupFolder` (its records read
once, every disk folder and file reached through its descriptor); what
--dir is gets decided from the entries of --dir and its parent, each
opened once.  The pre-check every restore runs is :mod:`precheck`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from libqmpbackup.errors import ChainError, QmpBackupError, UsageError
from libqmpbackup.restore.rules import (
    RestorePoint,
    disks_in,
    select_disk_point,
    select_root_points,
)
from libqmpbackup.store import upstream
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import existing_backup_folder, month_names
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import CHAIN_FOLDER, DISK_METADATA_NAME, METADATA_NAME, safe_component

log = logging.getLogger(__name__)


@dataclass
class BackupDir:
    """A chain folder held open, the part of it --dir named, and the --filter.

    SELECTED is the disk folder --dir named, relative to the chain folder:
    None when --dir named the chain folder itself (all its disks),
    CHAIN_FOLDER for the disks the chain folder keeps in itself (a disk
    folder copied on its own is such a chain folder, read from its own
    records), else one disk folder's name.
    """

    backup_folder: BackupFolder
    selected: Optional[str] = None
    name_filter: Optional[str] = None

    @property
    def store(self) -> ChainStore:
        """The chain metadata, read once (again only if :meth:`BackupFolder.locked` must)."""
        return self.backup_folder.store

    @property
    def metadata_name(self) -> Optional[str]:
        """``qmpbackup.json``, ``qmpbackup-disk.json`` (a disk folder on its own), None (upstream)."""
        return self.backup_folder.metadata_name

    @property
    def root(self) -> Path:
        return self.backup_folder.path

    @property
    def folder(self) -> Path:
        """The folder --dir named (for messages)."""
        return self.root if self.selected in (None, CHAIN_FOLDER) else self.root / self.selected

    def disk_folder(self, name: str) -> Folder:
        """The disk folder NAME of the chain folder, opened once (a symlink is refused)."""
        return self.backup_folder.disk_folder(name)

    def folder_name_of(self, disk_id: str) -> str:
        """The disk folder holding DISK_ID's files (newest chain that has the disk)."""
        chain = next((c for c in reversed(self.store.chains) if disk_id in c.disks), None)
        return chain.folder_of(disk_id) if chain else safe_component(disk_id)

    def close(self) -> None:
        self.backup_folder.close()

    def __enter__(self) -> BackupDir:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def disk_ids(self) -> list[str]:
        """The disks --dir and --filter select, oldest chain first."""
        return disks_in(self.store, self.selected, self.name_filter)

    def disk_id(self) -> str:
        ids = self.disk_ids()
        if not ids:
            where = (f"in {self.root}" if self.selected in (None, CHAIN_FOLDER)
                     else f"in folder {self.selected!r}")
            matching = f" matching --filter {self.name_filter!r}" if self.name_filter else ""
            raise ChainError(f"{self.folder}: the chain metadata in {self.root} has no disk "
                             f"stored {where}{matching}")
        if len(ids) > 1 and self.selected is None:
            raise UsageError(f"{self.folder} holds several disks ({', '.join(ids)}): choose one "
                             "with --filter")
        return ids[-1]   # a disk folder: the newest chain's name for its disk

    def disk_names(self) -> str:
        return ", ".join(sorted({safe_component(d) for c in self.store.chains for d in c.disks}))

    def single_disk(self) -> bool:
        """One disk: a disk folder, or a root where --filter (or a flat layout) leaves one."""
        if self.selected is not None:
            return True
        return len(self.disk_ids()) == 1 and (self.name_filter is not None
                                              or not self.store.folders())

    def require_disk_folder(self, command: str) -> str:
        if not self.single_disk():
            raise UsageError(f"{command} works on one disk: use --dir {self.root}/DISK or "
                             f"--filter NAME (disks: {self.disk_names() or 'none'})")
        return self.disk_id()

    def points(self, until: Optional[str], uuid: Optional[str]) -> list[RestorePoint]:
        if self.single_disk():
            return [select_disk_point(self.store, self.disk_id(), until, uuid)]
        return select_root_points(self.store, until, uuid, self.disk_ids())


def _chain_folder(folder: Folder, name: str = METADATA_NAME) -> BackupFolder:
    """FOLDER as a chain folder read from its records NAME, which must list a chain."""
    backup_folder = BackupFolder(folder, name)
    if not backup_folder.store.chains:
        raise ChainError(f"the chain metadata {folder.path / name} lists no chain")
    return backup_folder


def _find_backup(path: Path, here: Folder, parent: Optional[Folder], months: list[str],
                 name_filter: Optional[str]) -> Optional[BackupDir]:
    """What PATH (opened as HERE; its parent as PARENT; MONTHS: its month folders) is, in order:
    a chain folder, a disk folder in place, a disk folder on its own, a disk folder of an
    upstream folder, an upstream folder (or a copy of its disk folder).  Decided from the
    entries of the two folders."""
    if here.entry(METADATA_NAME) is not None:   # whatever it is: the reader refuses a non-file
        return BackupDir(_chain_folder(here), None, name_filter)
    ours = None
    if parent is not None and parent.entry(METADATA_NAME) is not None:
        ours = _chain_folder(parent)
        if path.name in ours.store.folders():   # a disk folder in place
            return BackupDir(ours, path.name, name_filter)
    if here.entry(DISK_METADATA_NAME) is not None:
        log.debug("%s: a disk folder on its own, read from its %s", path, DISK_METADATA_NAME)
        return BackupDir(_chain_folder(here, DISK_METADATA_NAME), CHAIN_FOLDER, name_filter)
    if ours is not None:
        # the parent is ours but does not know this folder: its metadata is the truth
        return BackupDir(ours, path.name, name_filter)
    if months:
        return None     # a --monthly base: its months are chain folders of ours
    if (parent is not None and upstream.chain_id(parent) is not None
            and upstream.looks_like_upstream(here)):
        return BackupDir(BackupFolder(parent, None), path.name, name_filter)
    if upstream.looks_like_upstream(here):
        log.info("%s has no %s: reading it as a folder of upstream qmpbackup (order from the "
                 "times in the file names)", path, METADATA_NAME)
        return BackupDir(BackupFolder(here, None), None, name_filter)
    return None


@dataclass
class _Probe:
    """What --dir is: HERE (its folder, held), its month folders, and what it was found to be."""

    here: Folder
    months: list[str]
    found: Optional[BackupDir]
    kept: list[BackupDir]


@contextlib.contextmanager
def _probed(path: Path, name_filter: Optional[str]) -> Iterator[_Probe]:
    """PATH and its parent, each opened once, and what PATH is (:func:`_find_backup`).

    The BackupDirs in ``kept`` go to the caller; whatever is not kept (or
    everything, on an error) is closed on the way out.
    """
    here = Folder.open_root(path)
    parent: Optional[Folder] = None
    kept: list[BackupDir] = []
    try:
        if path.parent != path:
            with contextlib.suppress(QmpBackupError):   # an unreadable parent holds no chain
                parent = Folder.open_root(path.parent)
        months = month_names(here)
        found = _find_backup(path, here, parent, months, name_filter)
        if found is not None:
            kept.append(found)
        yield _Probe(here, months, found, kept)
    except BaseException:
        for backup in kept:
            backup.close()
        kept.clear()
        raise
    finally:
        used = [backup.backup_folder.folder for backup in kept]
        for opened in (here, parent):
            if opened is not None and not any(opened is folder for folder in used):
                opened.close()


def open_backup_dir(path: Path, name_filter: Optional[str] = None) -> BackupDir:
    """The chain (and disk folder) --dir names; a --monthly base is refused as ambiguous.

    The caller closes it (it is a context manager).
    """
    path = existing_backup_folder(path)
    with _probed(path, name_filter) as probe:
        found, months = probe.found, probe.months
        if found is not None:
            if months and found.selected is None:
                log.warning("%s also holds --monthly chains (%s): give one of them as --dir to "
                            "restore from it", path, ", ".join(months))
            return found
        if months:
            raise UsageError(f"{path} holds one chain folder per month "
                             f"({', '.join(months)}): give one of them as --dir")
        raise ChainError(f"{path} is neither a backup folder (no {METADATA_NAME}) nor a disk "
                         "folder of one")


def open_for_listing(path: Path, name_filter: Optional[str] = None) -> list[BackupDir]:
    """Like open_backup_dir, but a --monthly base lists all its months (after its own chain,
    in a folder an older release let hold both: no chain of the folder stays unseen).

    The caller closes them (:func:`listed`).
    """
    path = existing_backup_folder(path)
    with _probed(path, name_filter) as probe:
        found, kept = probe.found, probe.kept
        if found is not None and found.selected is not None:
            return list(kept)
        # a month a killed prune emptied lists no chain, only its leftovers
        for month in probe.months:
            kept.append(BackupDir(BackupFolder.below(probe.here, month), None, name_filter))
        if found is None and not any(backup.store.chains for backup in kept):
            raise ChainError(f"{path} holds no backup chain (no {METADATA_NAME} in it, its "
                             "parent or its sub-folders)")
        return list(kept)


@contextlib.contextmanager
def listed(path: Path, name_filter: Optional[str] = None) -> Iterator[list[BackupDir]]:
    """:func:`open_for_listing`, every folder closed at the end of the block."""
    backups = open_for_listing(path, name_filter)
    try:
        yield backups
    finally:
        for backup in backups:
            backup.close()
