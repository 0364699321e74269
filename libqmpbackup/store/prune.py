"""``qmpbackup prune``: delete whole old chains of a backup folder, without a VM.

What goes is decided in :mod:`retention`; this module makes it happen
safely next to backups and restores that touch the same folders:

1. every chain folder (the target and its ``YYYY-MM`` month folders) is
   locked first, so a running backup or in-place restore refuses the prune
   before anything is deleted, and none can start while it works;
2. each folder's metadata is rewritten atomically *before* any file goes:
   the pruned chains disappear from ``chains`` and their files are listed
   in ``pruning``.  A prune killed after that leaves only files no chain
   lists, and :func:`finish_pruning` (next prune or backup run) deletes
   exactly those;
3. files are deleted through descriptors (:mod:`handles`): the target and
   its month folders are opened when they are first looked at and held, a
   disk folder is opened below them never through a symlink, and only plain
   files go; then empty disk folders, the metadata of a folder left without
   chains, and empty month folders.  A folder swapped for a symlink during
   the prune leads nowhere: nothing is looked up by name again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from libqmpbackup.errors import ChainError, TargetError
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.journal import refuse_unfinished_restores
from libqmpbackup.store.layout import MONTH_FOLDER_RE, existing_backup_folder
from libqmpbackup.store.locks import chain_lock
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.mounts import refuse_if_mounted
from libqmpbackup.store.names import METADATA_NAME
from libqmpbackup.store.retention import (
    ROOT_FOLDER,
    ChainSummary,
    FolderChange,
    RetentionPlan,
    check_keep,
    listed_files,
    plan_retention,
    pruning_entry,
)

log = logging.getLogger(__name__)


@dataclass
class PruneOptions:
    """What the user chose for one prune."""

    target: Path
    keep: int
    dry_run: bool = False


@dataclass
class PruneResult:
    """What a prune kept and removed (or, in a dry run, would remove)."""

    target: Path
    keep: int
    dry_run: bool
    plan: RetentionPlan
    sizes: dict[Path, int] = field(default_factory=dict)     # plain files of every chain
    removed_files: list[Path] = field(default_factory=list)
    leftover_files: list[Path] = field(default_factory=list)  # of an interrupted prune
    bitmaps: list[str] = field(default_factory=list)         # disk:bitmap, with --socket

    def chain_size(self, summary: ChainSummary) -> int:
        return sum(self.sizes.get(summary.root / f, 0) for f in summary.files)

    @property
    def bytes_freed(self) -> int:
        return sum(self.sizes.get(p, 0) for p in [*self.removed_files, *self.leftover_files])


@contextlib.contextmanager
def _disk_folder(root: Folder, name: str) -> Iterator[Optional[Folder]]:
    """ROOT's real sub-folder NAME (ROOT itself for :data:`ROOT_FOLDER`); None when there is none.

    A symlink or other non-folder is left alone with a warning: a ``pruning``
    entry never leads out of the folder that is held open.
    """
    if name == ROOT_FOLDER:
        yield root
        return
    if root.entry(name) is None:
        yield None
        return
    try:
        sub = root.sub(name, "disk folder")
    except (ChainError, TargetError) as err:
        log.warning("%s is not a directory (%s): nothing in it is touched", root.path / name, err)
        yield None
        return
    with sub:
        yield sub


def _plain_file_size(folder: Folder, name: str) -> Optional[int]:
    info = folder.entry(name)
    return info.st_size if info is not None and stat.S_ISREG(info.st_mode) else None


def _sizes(root: Folder, entries: list[str]) -> dict[Path, int]:
    """Sizes of the plain files among ROOT/<disk folder>/<file> ENTRIES (the rest is skipped)."""
    sizes = {}
    for entry in entries:
        parts = pruning_entry(entry)
        if parts is None:
            continue
        with _disk_folder(root, parts[0]) as folder:
            size = None if folder is None else _plain_file_size(folder, parts[1])
        if size is not None:
            sizes[root.path / entry] = size
    return sizes


def _delete(root: Folder, disk_folder: str, name: str) -> bool:
    """Unlink one plain file directly inside ROOT/DISK_FOLDER; True when it was there."""
    with _disk_folder(root, disk_folder) as folder:
        if folder is None:
            return False
        info = folder.entry(name)
        path = folder.path / name
        if info is None:
            return False
        if not stat.S_ISREG(info.st_mode):
            log.warning("%s is not a plain file: left alone", path)
            return False
        try:
            removed = folder.remove(name, "backup file")
            folder.fsync()
        except (ChainError, TargetError) as err:
            raise TargetError(f"{err}; the chain is already gone from the metadata, the next "
                              "prune removes the file") from err
    if removed:
        log.info("removed %s", path)
    return removed


def _remove_empty_dir(parent: Folder, name: str) -> None:
    """rmdir PARENT/NAME when it is an empty real folder (rmdir never follows a symlink)."""
    path = parent.path / name
    try:
        os.rmdir(name, dir_fd=parent.fd)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
            log.warning("cannot remove empty folder %s: %s", path, err.strerror)
        return
    log.info("removed empty folder %s", path)


def _delete_pruned_files(store: ChainStore, root: Folder) -> list[Path]:
    listed = {f for chain in store.chains for f in listed_files(chain)}
    deleted, folders = [], set()
    for entry in store.pruning:
        parts = pruning_entry(entry)
        if parts is None or entry in listed:
            log.warning("%s: %r is not deleted: %s", store.path, entry,
                        "a chain still lists it" if parts else "not a backup file of a disk folder")
            continue
        folders.add(parts[0])
        if _delete(root, *parts):
            deleted.append(store.root / entry)
    for folder in sorted(folders - {ROOT_FOLDER}):
        _remove_empty_dir(root, folder)
    return deleted


@contextlib.contextmanager
def _held(store: ChainStore, root: Optional[Folder]) -> Iterator[Folder]:
    """ROOT, or STORE's folder opened now (a backup run's own --target)."""
    if root is not None:
        yield root
        return
    with Folder.open_root(store.root) as opened:
        yield opened


def finish_pruning(store: ChainStore, root: Optional[Folder] = None) -> list[Path]:
    """Delete the files STORE's ``pruning`` names; return those that were there.

    Run under the folder's lock.  ROOT is STORE's folder as the caller opened
    it when it looked at it (opened here when not given): every file goes
    through that descriptor, so a folder swapped for a symlink meanwhile
    leads nowhere.  A name a chain still lists, or one that could lead out of
    its disk folder, is never deleted.  A folder left without chains loses
    its metadata file too, so a new chain can start there.
    """
    with _held(store, root) as folder:
        deleted = _delete_pruned_files(store, folder) if store.pruning else []
        try:
            if not store.chains:
                folder.remove(METADATA_NAME, "chain metadata")
                folder.fsync()
                log.info("removed %s: no chain left in %s", store.path, store.root)
            elif store.pruning:
                store.pruning = []
                store.save(held=folder)
        except OSError as err:
            raise TargetError(f"cannot update chain metadata {store.path}: "
                              f"{err.strerror}") from err
    return deleted


def finish_interrupted_prune(store: ChainStore, root: Optional[Folder] = None) -> list[Path]:
    """Complete a prune killed after its metadata commit (the caller holds the folder's lock)."""
    if not store.pruning:
        return []
    log.warning("finishing a prune that was interrupted in %s", store.root)
    return finish_pruning(store, root)


def chain_folders(base: Path) -> list[Path]:
    """BASE if it holds chain metadata, and its YYYY-MM month folders that do (no symlinks)."""
    folders = [base] if (base / METADATA_NAME).is_file() else []
    try:
        names = sorted(os.listdir(base))
    except OSError as err:
        raise TargetError(f"cannot read {base}: {err.strerror}") from err
    for name in filter(MONTH_FOLDER_RE.match, names):
        path = base / name
        if path.is_symlink():
            log.warning("%s is a symlink: its chains are neither counted nor pruned", path)
        elif path.is_dir() and (path / METADATA_NAME).is_file():
            folders.append(path)
    return folders


def _commit(change: FolderChange, held: Folder) -> None:
    """Drop the pruned chains from the metadata and name their files, before deleting any."""
    store = change.store
    store.chains = change.remaining
    store.pruning = change.delete
    try:
        store.save(held=held)
    except OSError as err:
        raise TargetError(f"cannot write chain metadata {store.path}: {err.strerror}; "
                          f"nothing was deleted in {store.root}") from err


def _leftovers(stores: list[ChainStore], held: dict[Path, Folder], sizes: dict[Path, int],
               dry_run: bool) -> list[Path]:
    """Files of interrupted prunes: deleted now (listed, in a dry run); their sizes into SIZES."""
    found = []
    for store in stores:
        sizes.update(_sizes(held[store.root], store.pruning))
        found += ([store.root / e for e in store.pruning if store.root / e in sizes] if dry_run
                  else finish_interrupted_prune(store, held[store.root]))
    return found


def _apply(result: PruneResult, held: dict[Path, Folder]) -> None:
    """Every folder's metadata first, then the files: a kill in between loses no kept point."""
    for change in result.plan.changes:
        _commit(change, held[change.store.root])
    for change in result.plan.changes:
        result.removed_files += finish_pruning(change.store, held[change.store.root])


def _open_chain_folders(base: Folder, folders: list[Path], stack: contextlib.ExitStack
                        ) -> dict[Path, Folder]:
    """Each chain folder held open from now on: BASE itself, its month folders never through a link."""
    return {path: base if path == base.path
            else stack.enter_context(base.sub(path.name, "month folder")) for path in folders}


def prune(opts: PruneOptions) -> PruneResult:
    """Keep the ``keep`` chains below the target with the newest backups whole, delete the others whole."""
    dry_run = opts.dry_run
    check_keep(opts.keep)
    base = existing_backup_folder(opts.target)
    folders = chain_folders(base)
    if not folders:
        raise ChainError(f"{base} holds no backup chain (no {METADATA_NAME} in it or in its "
                         "YYYY-MM folders)")
    with Folder.open_root(base) as base_folder:
        with contextlib.ExitStack() as locks:
            held = _open_chain_folders(base_folder, folders, locks)
            if not dry_run:   # a dry run changes no byte, not even a lock file
                for folder in folders:
                    locks.enter_context(chain_lock(folder))
            for folder in folders:
                refuse_unfinished_restores(folder)
            stores = [ChainStore.load(folder) for folder in folders]
            sizes: dict[Path, int] = {}
            leftovers = _leftovers(stores, held, sizes, dry_run)
            plan = plan_retention(stores, opts.keep)
            if not dry_run:   # a mounted chain's files must stay (busy, exit 4)
                for summary in plan.removed:
                    refuse_if_mounted(summary.root, "prune", [summary.chain.uuid])
            for summary in plan.chains:
                sizes.update(_sizes(held[summary.root], list(summary.files)))
            result = PruneResult(target=base, keep=opts.keep, dry_run=dry_run, plan=plan,
                                 sizes=sizes, leftover_files=leftovers)
            if dry_run:
                result.removed_files = [root / f for root, f in plan.delete_entries()
                                        if root / f in sizes]
                return result
            _apply(result, held)
        for store in stores:
            if store.root != base and not store.chains:
                _remove_empty_dir(base_folder, store.root.name)   # once its lock file is gone
    return result
