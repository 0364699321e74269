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
3. files are deleted through a descriptor of their disk folder, never
   following a symlink, and only plain files; then empty disk folders, the
   metadata of a folder left without chains, and empty month folders.
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
from libqmpbackup.store.fsutil import fsync_dir
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
def _disk_folder(root: Path, name: str) -> Iterator[Optional[int]]:
    """A descriptor of ROOT/NAME when it is a real directory (not a symlink), else None."""
    try:
        fd = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    except OSError as err:
        log.warning("%s is not a directory (%s): nothing in it is touched", root / name,
                    err.strerror)
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _plain_file_size(folder_fd: int, name: str) -> Optional[int]:
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _sizes(root: Path, entries: list[str]) -> dict[Path, int]:
    """Sizes of the plain files among ROOT/<disk folder>/<file> ENTRIES (the rest is skipped)."""
    sizes = {}
    for entry in entries:
        parts = pruning_entry(entry)
        if parts is None:
            continue
        with _disk_folder(root, parts[0]) as fd:
            size = None if fd is None else _plain_file_size(fd, parts[1])
        if size is not None:
            sizes[root / entry] = size
    return sizes


def _delete(root: Path, disk_folder: str, name: str) -> bool:
    """Unlink one plain file directly inside ROOT/DISK_FOLDER; True when it was there."""
    with _disk_folder(root, disk_folder) as fd:
        if fd is None:
            return False
        try:
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        path = root / disk_folder / name
        if not stat.S_ISREG(info.st_mode):
            log.warning("%s is not a plain file: left alone", path)
            return False
        try:
            os.unlink(name, dir_fd=fd)
            os.fsync(fd)
        except OSError as err:
            raise TargetError(f"cannot remove {path}: {err.strerror}; the chain is already "
                              "gone from the metadata, the next prune removes the file") from err
    log.info("removed %s", path)
    return True


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
            log.warning("cannot remove empty folder %s: %s", path, err.strerror)
        return
    log.info("removed empty folder %s", path)


def _delete_pruned_files(store: ChainStore) -> list[Path]:
    listed = {f for chain in store.chains for f in listed_files(chain)}
    deleted, folders = [], set()
    for entry in store.pruning:
        parts = pruning_entry(entry)
        if parts is None or entry in listed:
            log.warning("%s: %r is not deleted: %s", store.path, entry,
                        "a chain still lists it" if parts else "not a backup file of a disk folder")
            continue
        folders.add(parts[0])
        if _delete(store.root, *parts):
            deleted.append(store.root / entry)
    for folder in sorted(folders - {ROOT_FOLDER}):
        _remove_empty_dir(store.root / folder)
    return deleted


def finish_pruning(store: ChainStore) -> list[Path]:
    """Delete the files STORE's ``pruning`` names; return those that were there.

    Run under the folder's lock.  A name a chain still lists, or one that
    could lead out of its disk folder, is never deleted.  A folder left
    without chains loses its metadata file too, so a new chain can start there.
    """
    deleted = _delete_pruned_files(store) if store.pruning else []
    try:
        if not store.chains:
            store.path.unlink(missing_ok=True)
            fsync_dir(store.root)
            log.info("removed %s: no chain left in %s", store.path, store.root)
        elif store.pruning:
            store.pruning = []
            store.save()
    except OSError as err:
        raise TargetError(f"cannot update chain metadata {store.path}: {err.strerror}") from err
    return deleted


def finish_interrupted_prune(store: ChainStore) -> list[Path]:
    """Complete a prune killed after its metadata commit (the caller holds the folder's lock)."""
    if not store.pruning:
        return []
    log.warning("finishing a prune that was interrupted in %s", store.root)
    return finish_pruning(store)


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


def _commit(change: FolderChange) -> None:
    """Drop the pruned chains from the metadata and name their files, before deleting any."""
    store = change.store
    store.chains = change.remaining
    store.pruning = change.delete
    try:
        store.save()
    except OSError as err:
        raise TargetError(f"cannot write chain metadata {store.path}: {err.strerror}; "
                          f"nothing was deleted in {store.root}") from err


def _leftovers(stores: list[ChainStore], sizes: dict[Path, int], dry_run: bool) -> list[Path]:
    """Files of interrupted prunes: deleted now (listed, in a dry run); their sizes into SIZES."""
    found = []
    for store in stores:
        sizes.update(_sizes(store.root, store.pruning))
        found += ([store.root / e for e in store.pruning if store.root / e in sizes] if dry_run
                  else finish_interrupted_prune(store))
    return found


def _apply(result: PruneResult) -> None:
    """Every folder's metadata first, then the files: a kill in between loses no kept point."""
    for change in result.plan.changes:
        _commit(change)
    for change in result.plan.changes:
        result.removed_files += finish_pruning(change.store)


def prune(opts: PruneOptions) -> PruneResult:
    """Keep the ``keep`` chains below the target with the newest backups whole, delete the others whole."""
    dry_run = opts.dry_run
    check_keep(opts.keep)
    base = existing_backup_folder(opts.target)
    folders = chain_folders(base)
    if not folders:
        raise ChainError(f"{base} holds no backup chain (no {METADATA_NAME} in it or in its "
                         "YYYY-MM folders)")
    with contextlib.ExitStack() as locks:
        if not dry_run:   # a dry run changes no byte, not even a lock file
            for folder in folders:
                locks.enter_context(chain_lock(folder))
        for folder in folders:
            refuse_unfinished_restores(folder)
        stores = [ChainStore.load(folder) for folder in folders]
        sizes: dict[Path, int] = {}
        leftovers = _leftovers(stores, sizes, dry_run)
        plan = plan_retention(stores, opts.keep)
        if not dry_run:   # a mounted chain's files must stay (busy, exit 4)
            for summary in plan.removed:
                refuse_if_mounted(summary.root, "prune", [summary.chain.uuid])
        for summary in plan.chains:
            sizes.update(_sizes(summary.root, list(summary.files)))
        result = PruneResult(target=base, keep=opts.keep, dry_run=dry_run, plan=plan, sizes=sizes,
                             leftover_files=leftovers)
        if dry_run:
            result.removed_files = [root / f for root, f in plan.delete_entries()
                                    if root / f in sizes]
            return result
        _apply(result)
    for store in stores:
        if store.root != base and not store.chains:
            _remove_empty_dir(store.root)   # once its lock file is gone
    return result
