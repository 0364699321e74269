"""Reading a backup folder for restore: what --dir names, and whether it can be trusted.

``--dir`` may name a chain folder (it holds ``qmpbackup.json``), one disk
folder inside it, or — for ``list`` and ``verify`` only — a ``--monthly``
base whose YYYY-MM sub-folders are chain folders.  :func:`check_before_restore` is the
pre-check every restore runs: the rules are in :mod:`restore`, this module fetches
the facts (folder listing, ``qemu-img info`` and ``check`` of every file).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import BackupDamaged, ChainError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.restore.images import ChainFiles, image_findings
from libqmpbackup.restore.rules import (
    RestorePoint,
    disks_in,
    folder_problems,
    parent_record,
    partial_leftovers,
    record_problems,
    select_disk_point,
    select_root_points,
)
from libqmpbackup.store import folder_safety, upstream
from libqmpbackup.store.digests import DigestCheck, check_handles
from libqmpbackup.store.handles import FileHandle, Folder
from libqmpbackup.store.intent import load_intent
from libqmpbackup.store.journal import JOURNAL_NAME, Journal, unfinished_error
from libqmpbackup.store.layout import existing_backup_folder, holds_metadata, month_folders
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import DISK_METADATA_NAME, METADATA_NAME, link_name, safe_component
from libqmpbackup.store.retention import pruning_entry
from libqmpbackup.store.verified import DEFAULT_WITHIN, Verified

log = logging.getLogger(__name__)


@dataclass
class BackupDir:
    """A chain folder's metadata, the part of it --dir named, and the --filter.

    DISK_FOLDER is the folder --dir named, relative to the root (None: the
    root itself).  A disk folder copied on its own is a root whose disks
    live in the root itself (folder ""), read from its own records.
    """

    store: ChainStore
    disk_folder: Optional[str] = None
    name_filter: Optional[str] = None
    metadata_name: Optional[str] = METADATA_NAME   # None: an upstream folder, read from names

    def folder_of(self, disk_id: str) -> Path:
        """The folder holding DISK_ID's files (newest chain that has the disk)."""
        chain = next((c for c in reversed(self.store.chains) if disk_id in c.disks), None)
        return self.root / (chain.folder_of(disk_id) if chain else safe_component(disk_id))

    def reload(self) -> ChainStore:
        if self.metadata_name is None:
            return upstream.read_folder(self.root)
        return ChainStore.load(self.root, self.metadata_name)

    def save(self, store: ChainStore) -> None:
        """Record a change an in-place restore made; an upstream folder's names are its record."""
        if self.metadata_name == METADATA_NAME:
            store.save()
        elif self.metadata_name is not None:
            store.write(self.metadata_name)

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def folder(self) -> Path:
        return self.root / self.disk_folder if self.disk_folder else self.root

    def disk_ids(self) -> list[str]:
        """The disks --dir and --filter select, oldest chain first."""
        return disks_in(self.store, self.disk_folder, self.name_filter)

    def disk_id(self) -> str:
        ids = self.disk_ids()
        if not ids:
            where = (f"in folder {self.disk_folder!r}" if self.disk_folder
                     else f"in {self.root}")
            matching = f" matching --filter {self.name_filter!r}" if self.name_filter else ""
            raise ChainError(f"{self.folder}: the chain metadata in {self.root} has no disk "
                             f"stored {where}{matching}")
        if len(ids) > 1 and self.disk_folder is None:
            raise UsageError(f"{self.folder} holds several disks ({', '.join(ids)}): choose one "
                             "with --filter")
        return ids[-1]   # a disk folder: the newest chain's name for its disk

    def disk_names(self) -> str:
        return ", ".join(sorted({safe_component(d) for c in self.store.chains for d in c.disks}))

    def single_disk(self) -> bool:
        """One disk: a disk folder, or a root where --filter (or a flat layout) leaves one."""
        if self.disk_folder is not None:
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


def _load(root: Path, name: str = METADATA_NAME) -> ChainStore:
    store = ChainStore.load(root, name)
    if not store.chains:
        raise ChainError(f"the chain metadata {root / name} lists no chain")
    return store


def _parent_lists(path: Path) -> Optional[ChainStore]:
    """The parent's metadata, if it keeps disks in PATH (a disk folder in place)."""
    if not holds_metadata(path.parent):
        return None
    store = _load(path.parent)
    return store if path.name in store.folders() else None


def _find_backup(path: Path, name_filter: Optional[str]) -> Optional[BackupDir]:
    """What PATH is, in order: a chain folder, a disk folder in place, a disk folder on its
    own, a disk folder of an upstream folder, an upstream folder (or a copy of its disk folder)."""
    if holds_metadata(path):   # whatever it is: the metadata reader refuses a non-file
        return BackupDir(_load(path), None, name_filter)
    parent = _parent_lists(path)
    if parent is not None:
        return BackupDir(parent, path.name, name_filter)
    if os.path.lexists(path / DISK_METADATA_NAME):
        log.debug("%s: a disk folder on its own, read from its %s", path, DISK_METADATA_NAME)
        return BackupDir(_load(path, DISK_METADATA_NAME), "", name_filter, DISK_METADATA_NAME)
    if holds_metadata(path.parent):
        # the parent is ours but does not know this folder: its metadata is the truth
        return BackupDir(_load(path.parent), path.name, name_filter)
    if month_folders(path):
        return None     # a --monthly base: its months are chain folders of ours
    if upstream.chain_id(path.parent) is not None and upstream.looks_like_upstream(path):
        return BackupDir(upstream.read_folder(path.parent), path.name, name_filter, None)
    if upstream.looks_like_upstream(path):
        log.info("%s has no %s: reading it as a folder of upstream qmpbackup (order from the "
                 "times in the file names)", path, METADATA_NAME)
        return BackupDir(upstream.read_folder(path), None, name_filter, None)
    return None


def open_backup_dir(path: Path, name_filter: Optional[str] = None) -> BackupDir:
    """The chain (and disk folder) --dir names; a --monthly base is refused as ambiguous."""
    path = existing_backup_folder(path)
    found = _find_backup(path, name_filter)
    months = month_folders(path)
    if found is not None:
        if months and found.disk_folder is None:
            log.warning("%s also holds --monthly chains (%s): give one of them as --dir to "
                        "restore from it", path, ", ".join(m.name for m in months))
        return found
    if months:
        raise UsageError(f"{path} holds one chain folder per month "
                         f"({', '.join(m.name for m in months)}): give one of them as --dir")
    raise ChainError(f"{path} is neither a backup folder (no {METADATA_NAME}) nor a disk folder "
                     "of one")


def open_for_listing(path: Path, name_filter: Optional[str] = None) -> list[BackupDir]:
    """Like open_backup_dir, but a --monthly base lists all its months (after its own chain,
    in a folder an older release let hold both: no chain of the folder stays unseen)."""
    path = existing_backup_folder(path)
    found = _find_backup(path, name_filter)
    if found is not None and found.disk_folder is not None:
        return [found]
    # a month a killed prune emptied lists no chain, only its leftovers
    months = [BackupDir(ChainStore.load(m), None, name_filter) for m in month_folders(path)]
    if found is None and not any(m.store.chains for m in months):
        raise ChainError(f"{path} holds no backup chain (no {METADATA_NAME} in it, its parent "
                         "or its sub-folders)")
    return ([found] if found is not None else []) + months


def folder_names(folder: Path) -> list[str]:
    """Every entry of FOLDER (the admin's folder or a real folder below it), by descriptor."""
    with Folder.open_root(folder) as opened:
        return opened.names()


def note_partial(folder: Path, entries: list[str]) -> None:
    """A .partial file is a backup being written, or one a killed run left: never a point.

    Restores read only recorded files, which no backup run changes, so the
    leftover is harmless; the next backup removes it.
    """
    for name in partial_leftovers(entries):
        log.warning("%s: ignoring %s: a backup is writing it or was killed while writing it "
                    "(the next backup removes it)", folder, name)


def refuse_unfinished(folder: Path, entries: list[str]) -> None:
    """A half-done in-place restore: no check may skip that refusal."""
    if JOURNAL_NAME in entries:
        journal = Journal.load(folder)
        if journal is not None:
            raise unfinished_error(folder, journal)


def known_files(store: ChainStore, folder: Path) -> set[str]:
    """Files a disk folder may hold: every chain's records (and their convenience links),
    files a prune is deleting, and a killed backup run's unrecorded files.

    The last are named by the run's intent record in the chain folder; they
    are complete but were never committed, so no point refers to them (see
    libqmpbackup.store.intent).
    """
    known = {parts[1] for parts in map(pruning_entry, store.pruning)
             if parts and store.root / parts[0] == folder}
    for chain in store.chains:
        for disk_id, disk in chain.disks.items():
            if store.root / chain.folder_of(disk_id) != folder:
                continue
            for record in disk.backups:
                known.add(record.file)
                if not record.timestamped:
                    known.add(link_name(record.level, record.file))
    intent = load_intent(store.root)
    for path in intent.unrecorded_paths(store) if intent else []:
        if path.parent == folder:
            log.warning("%s: ignoring %s: a killed backup run wrote it and never recorded it "
                        "(the next backup removes it)", folder, path.name)
            known.add(path.name)
    return known


def chain_key(store: ChainStore, chain_id: str, key: Optional[Key],
               where: Optional[Path] = None) -> tuple[bool, Optional[Key]]:
    """Whether CHAIN_ID is encrypted, and the key to open it; refused (exit 2) without one.

    The key is checked by the first image qemu-img opens with it: the LUKS
    header of every file refuses a wrong key.
    """
    chain = store.find(chain_id)
    encrypted = chain is not None and chain.encrypted
    if encrypted and key is None:
        raise UsageError(f"chain {chain_id} in {where or store.root} is encrypted: give its key "
                         "with --key-file FILE")
    if not encrypted and key is not None:
        log.warning("chain %s in %s is not encrypted: --key-file is not used", chain_id,
                    where or store.root)
    return encrypted, key if encrypted else None


def check_before_restore(point: RestorePoint, store: ChainStore, *, skip_check: bool = False,
                         whole_chain: bool = False, writable: bool = False,
                         dry_run: bool = False, key: Optional[Key] = None,
                         verified_within: float = DEFAULT_WITHIN,
                         defer_digests: bool = False) -> ChainFiles:
    """Refuse a chain that does not match its metadata, or whose files are damaged.

    Only the files the point is read from (its FULL and the INCs up to it)
    are opened, checked and hashed, so the cost grows with the chain up to
    --until and a damaged later file does not block an earlier point;
    WHOLE_CHAIN (commit, snapshotrebase: they re-base the next INC too)
    extends that to every file of the disk's chain.  The metadata rules and
    the refusal of unknown backup files always cover the whole folder.
    --skip-check skips all of it except the refusal of a half-done in-place
    restore and the folder rule (:mod:`folder_safety`): restoring past a
    half-done commit is never what the admin wants, and no folder content
    may lead the restore outside the folder.  Returns the checked files,
    open: the restore reads exactly those descriptors (the caller closes them).
    A file verified within VERIFIED_WITHIN seconds and unchanged since is
    not hashed again (:mod:`libqmpbackup.store.verified`).  DEFER_DIGESTS
    (``mount``, ``merge``: they write nothing into the folder): the files
    still to hash are left in ``files.deferred`` for the caller to hash while
    it serves or copies them, publishing nothing before :func:`refuse_damaged`
    passed; the in-place commands hash here, before they write anything.
    """
    folder = point.folder
    encrypted, chain_key_ = chain_key(store, point.chain_id, key, point.folder)
    folder_safety.require_content_folder(folder, point.root)
    files = ChainFiles.open(point.root, folder, writable=writable,
                            dry_run=dry_run).use_key(encrypted, chain_key_)
    try:
        with files.keyed():
            _check_files(point, store, files, skip_check=skip_check, whole_chain=whole_chain,
                         verified_within=verified_within, defer_digests=defer_digests)
    except BaseException:
        files.close()
        raise
    return files


def _check_digests(files: ChainFiles, point: RestorePoint, verified_within: float,
                   defer: bool) -> list[DigestCheck]:
    """Hash the point's files, except those verified recently and unchanged; remember the rest."""
    record = Verified()
    pairs = digest_sources(point, files)
    todo = [(h, d) for h, d in pairs if not record.fresh(h.fd, d, verified_within)]
    if len(todo) < len(pairs):
        log.info("%s: %d of %d file(s) verified within %g s and unchanged: not hashed again",
                 point.disk_id, len(pairs) - len(todo), len(pairs), verified_within)
    if defer:
        files.deferred = todo
        return []
    checks = check_handles(todo)
    remember_verified(todo, checks, record)
    return checks


def _check_files(point: RestorePoint, store: ChainStore, files: ChainFiles, *, skip_check: bool,
                 whole_chain: bool, verified_within: float, defer_digests: bool) -> None:
    folder = files.path
    entries = files.names()
    refuse_unfinished(folder, entries)
    note_partial(folder, entries)
    used = list(point.records) if whole_chain else point.segment()
    if skip_check:
        log.warning("%s: --skip-check: restoring %s without checking the chain",
                    point.disk_id, point.label)
        for record in used:
            files.inspect(record.file)
        return
    problems = record_problems(point.records)
    problems += folder_problems(entries, [r.file for r in used], known_files(store, folder))
    if problems:
        raise ChainError(f"{folder} (chain {point.chain_id}): {'; '.join(problems)}")
    position = {r.file: index for index, r in enumerate(point.records)}
    for record in used:
        files.handle(record.file)   # a missing or unsafe file is refused before any is read
    for record in used:   # record_problems made sure a FULL comes first
        problems += image_findings(files, record,
                                   parent_record(point.records, position[record.file]))
    if problems:
        raise ChainError(f"{folder} (chain {point.chain_id}): {'; '.join(problems)}")
    refuse_damaged(_check_digests(files, point, verified_within, defer_digests))
    log.debug("%s: chain %s checked (%d files)", point.disk_id, point.chain_id, len(used))


def remember_verified(checked: list[tuple[FileHandle, Optional[str]]], checks: list[DigestCheck],
                      record: Optional[Verified] = None) -> None:
    """Remember the files whose content matched, so the next restore need not hash them again."""
    (record or Verified()).remember((h.fd, d) for (h, d), c in zip(checked, checks)
                                    if c.status == "ok")


def digest_sources(point: RestorePoint,
                   files: ChainFiles) -> list[tuple[FileHandle, Optional[str]]]:
    """The files a restore of POINT reads, by descriptor, with the digests recorded for them."""
    return [(files.handle(r.file), r.digest) for r in point.segment()]


def refuse_damaged(checks: list[DigestCheck]) -> None:
    """BackupDamaged (exit 11) when a file's content differs from its recorded digest."""
    damaged = [f"{c.path}: {c.detail}" for c in checks if c.status not in ("ok", "unrecorded")]
    if damaged:
        raise BackupDamaged([f"{line}; restore from another chain or copy (qmprestore verify "
                             "shows which points are intact)" for line in damaged])
