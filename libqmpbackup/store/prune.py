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
from typing import Optional

from libqmpbackup.errors import ChainError, TargetError
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import chain_folder_names, existing_backup_folder
from libqmpbackup.store.mounts import refuse_if_mounted
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import (
    CHAIN_FOLDER,
    METADATA_NAME,
    Level,
    is_backup_file_name,
    link_name,
)
from libqmpbackup.store.retention import (
    ChainSummary,
    FolderChange,
    RetentionPlan,
    chain_files,
    check_keep,
    plan_retention,
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
        return sum(self.sizes.get(f.path(summary.root), 0) for f in summary.files)

    @property
    def bytes_freed(self) -> int:
        return sum(self.sizes.get(p, 0) for p in [*self.removed_files, *self.leftover_files])


def _disk_folder(chain_folder: BackupFolder, name: str) -> Optional[Folder]:
    """The real disk folder NAME of CHAIN_FOLDER (held by it); None when there is none.

    A symlink or other non-folder is left alone with a warning: a ``pruning``
    entry never leads out of the folder that is held open.
    """
    if name != CHAIN_FOLDER and chain_folder.folder.entry(name) is None:
        return None
    try:
        return chain_folder.disk_folder(name)
    except (ChainError, TargetError) as err:
        log.warning("%s is not a directory (%s): nothing in it is touched",
                    chain_folder.path / name, err)
        return None


def _plain_file_size(folder: Folder, name: str) -> Optional[int]:
    info = folder.entry(name)
    return info.st_size if info is not None and stat.S_ISREG(info.st_mode) else None


def _sizes(chain_folder: BackupFolder, files: list[ChainFile]) -> dict[Path, int]:
    """Sizes of the plain files among FILES (the rest is skipped)."""
    sizes = {}
    for file in files:
        folder = _disk_folder(chain_folder, file.folder)
        size = None if folder is None else _plain_file_size(folder, file.name)
        if size is not None:
            sizes[file.path(chain_folder.path)] = size
    return sizes


def _delete(chain_folder: BackupFolder, file: ChainFile) -> bool:
    """Unlink one plain file directly inside its disk folder; True when it was there."""
    folder = _disk_folder(chain_folder, file.folder)
    if folder is None:
        return False
    info = folder.entry(file.name)
    path = folder.path / file.name
    if info is None:
        return False
    if not stat.S_ISREG(info.st_mode):
        log.warning("%s is not a plain file: left alone", path)
        return False
    try:
        removed = folder.remove(file.name, "backup file")
        folder.fsync()
    except (ChainError, TargetError) as err:
        raise TargetError(f"{err}; the chain is already gone from the metadata, the next "
                          "prune removes the file") from err
    if removed:
        log.info("removed %s", path)
    return removed


def _drop_links(chain_folder: BackupFolder, file: ChainFile) -> None:
    """Remove the ``FULL-<image>``/``COPY-<image>`` links a --no-timestamp backup left beside NAME.

    Only a symlink pointing at exactly NAME (as the backup run made it) goes:
    once NAME is deleted it would be a dead link, and it would keep the disk
    folder from being removed as empty.
    """
    name = file.name
    if is_backup_file_name(name):
        return      # a timestamped file never gets a link
    folder = _disk_folder(chain_folder, file.folder)
    if folder is None or folder.entry(name) is not None:
        return      # NAME is still there (left alone): so is its link
    for level in (Level.FULL.value, Level.COPY.value):
        link = link_name(level, name)
        info = folder.entry(link)
        if info is None or not stat.S_ISLNK(info.st_mode):
            continue
        try:
            if os.readlink(link, dir_fd=folder.fd) != name:
                continue
            os.unlink(link, dir_fd=folder.fd)
        except OSError as err:
            log.warning("cannot remove link %s: %s", folder.path / link, err.strerror)
            continue
        log.info("removed link %s", folder.path / link)


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


def _delete_pruned_files(chain_folder: BackupFolder) -> list[Path]:
    store = chain_folder.store
    listed = {f for chain in store.chains for f in chain_files(chain)}
    deleted, folders = [], set()
    for file in store.pruning:
        if file in listed:
            log.warning("%s: %s is not deleted: a chain still lists it", store.path,
                        file.pruning_text())
            continue
        folders.add(file.folder)
        if _delete(chain_folder, file):
            deleted.append(file.path(store.root))
        _drop_links(chain_folder, file)
    chain_folder.close_disk_folders()
    for folder in sorted(folders - {CHAIN_FOLDER}):
        _remove_empty_dir(chain_folder.folder, folder)
    return deleted


def finish_pruning(chain_folder: BackupFolder) -> list[Path]:
    """Delete the files the ``pruning`` list of CHAIN_FOLDER names; return those that were there.

    Run under the folder's lock.  Every file goes through the folder's held
    descriptor, so a folder swapped for a symlink meanwhile leads nowhere.
    A name a chain still lists is never deleted (and none that could lead
    out of its disk folder is ever read, :class:`ChainFile`).  A folder left
    without chains loses its metadata file too, so a new chain can start there.
    """
    store = chain_folder.store
    folder = chain_folder.folder
    deleted = _delete_pruned_files(chain_folder) if store.pruning else []
    try:
        if not store.chains:
            folder.remove(METADATA_NAME, "chain metadata")
            folder.fsync()
            log.info("removed %s: no chain left in %s", store.path, store.root)
        elif store.pruning:
            store.pruning = []
            chain_folder.save()
    except OSError as err:
        raise TargetError(f"cannot update chain metadata {store.path}: "
                          f"{err.strerror}") from err
    return deleted


def finish_interrupted_prune(chain_folder: BackupFolder) -> list[Path]:
    """Complete a prune killed after its metadata commit (the caller holds the folder's lock)."""
    if not chain_folder.store.pruning:
        return []
    log.warning("finishing a prune that was interrupted in %s", chain_folder.path)
    return finish_pruning(chain_folder)


def _commit(change: FolderChange, chain_folder: BackupFolder) -> None:
    """Drop the pruned chains from the metadata and name their files, before deleting any."""
    store = change.store
    store.chains = change.remaining
    store.pruning = change.delete
    try:
        chain_folder.save()
    except TargetError as err:
        raise TargetError(f"{err}; nothing was deleted in {store.root}") from err


def _leftovers(held: list[BackupFolder], sizes: dict[Path, int], dry_run: bool) -> list[Path]:
    """Files of interrupted prunes: deleted now (listed, in a dry run); their sizes into SIZES."""
    found = []
    for chain_folder in held:
        store = chain_folder.store
        sizes.update(_sizes(chain_folder, store.pruning))
        found += ([path for f in store.pruning if (path := f.path(store.root)) in sizes]
                  if dry_run else finish_interrupted_prune(chain_folder))
    return found


def _apply(result: PruneResult, held: dict[Path, BackupFolder]) -> None:
    """Every folder's metadata first, then the files: a kill in between loses no kept point."""
    for change in result.plan.changes:
        _commit(change, held[change.store.root])
    for change in result.plan.changes:
        result.removed_files += finish_pruning(held[change.store.root])


def _open_chain_folders(base: Folder, names: list[str], stack: contextlib.ExitStack
                        ) -> list[BackupFolder]:
    """Each chain folder held open from now on: BASE itself, its month folders never through a link."""
    return [stack.enter_context(BackupFolder.below(base, name)) for name in names]


def prune(opts: PruneOptions) -> PruneResult:
    """Keep the ``keep`` chains below the target with the newest backups whole, delete the others whole."""
    dry_run = opts.dry_run
    check_keep(opts.keep)
    base = existing_backup_folder(opts.target)
    base_folder = Folder.open_root(base)
    with contextlib.ExitStack() as held_open:
        held_open.callback(base_folder.close)
        names = chain_folder_names(base_folder)
        if not names:
            raise ChainError(f"{base} holds no backup chain (no {METADATA_NAME} in it or in its "
                             "YYYY-MM folders)")
        with contextlib.ExitStack() as locks:
            held = _open_chain_folders(base_folder, names, held_open)
            if not dry_run:   # a dry run changes no byte, not even a lock file
                for chain_folder in held:
                    locks.enter_context(chain_folder.locked())
            for chain_folder in held:
                chain_folder.refuse_unfinished_restores()
            stores = [chain_folder.store for chain_folder in held]
            by_root = {chain_folder.path: chain_folder for chain_folder in held}
            sizes: dict[Path, int] = {}
            leftovers = _leftovers(held, sizes, dry_run)
            plan = plan_retention(stores, opts.keep)
            if not dry_run:   # a mounted chain's files must stay (busy, exit 4)
                for summary in plan.removed:
                    refuse_if_mounted(summary.root, "prune", [summary.chain.uuid])
            for summary in plan.chains:
                sizes.update(_sizes(by_root[summary.root], list(summary.files)))
            result = PruneResult(target=base, keep=opts.keep, dry_run=dry_run, plan=plan,
                                 sizes=sizes, leftover_files=leftovers)
            if dry_run:
                result.removed_files = [path for path in plan.delete_paths() if path in sizes]
                return result
            _apply(result, by_root)
        for store in stores:
            if store.root != base and not store.chains:
                _remove_empty_dir(base_folder, store.root.name)   # once its lock file is gone
    return result
