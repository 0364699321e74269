"""The pre-check every restore runs: does the chain match its metadata, are its files intact?

The rules are in :mod:`rules`; this module fetches the facts (the disk
folder's listing, ``qemu-img info`` and ``check`` of every file, their
checksums) through the command's
:class:`~libqmpbackup.store.backup_folder.BackupFolder`: the disk folder
is the one it opened, the metadata, intent record and restore journal
the ones it read once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import BackupDamaged, ChainError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.restore.folder import BackupDir
from libqmpbackup.restore.images import ChainFiles, image_findings
from libqmpbackup.restore.rules import (
    RestorePoint,
    folder_problems,
    parent_record,
    partial_leftovers,
    record_problems,
)
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.digests import DigestCheck, check_handles
from libqmpbackup.store.handles import FileHandle
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import link_name
from libqmpbackup.store.verified import DEFAULT_WITHIN, Verified

log = logging.getLogger(__name__)


def note_partial(folder: Path, entries: list[str]) -> None:
    """A .partial file is a backup being written, or one a killed run left: never a point.

    Restores read only recorded files, which no backup run changes, so the
    leftover is harmless; the next backup removes it.
    """
    for name in partial_leftovers(entries):
        log.warning("%s: ignoring %s: a backup is writing it or was killed while writing it "
                    "(the next backup removes it)", folder, name)


def known_files(backup_folder: BackupFolder, name: str) -> set[str]:
    """Files the disk folder NAME may hold: every chain's records (and their convenience
    links), files a prune is deleting, and a killed backup run's unrecorded files.

    The last are named by the run's intent record in the chain folder; they
    are complete but were never committed, so no point refers to them (see
    libqmpbackup.store.intent).
    """
    store = backup_folder.store
    known = {file.name for file in store.pruning if file.folder == name}
    for chain in store.chains:
        for disk_id, disk in chain.disks.items():
            if chain.folder_of(disk_id) != name:
                continue
            for record in disk.backups:
                known.add(record.file)
                if not record.timestamped:
                    known.add(link_name(record.level, record.file))
    intent = backup_folder.intent
    for file in intent.unrecorded(store) if intent else []:
        if file.folder == name:
            log.warning("%s: ignoring %s: a killed backup run wrote it and never recorded it "
                        "(the next backup removes it)", backup_folder.path / name, file.name)
            known.add(file.name)
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


def check_before_restore(point: RestorePoint, backup: BackupDir, *, skip_check: bool = False,
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
    encrypted, chain_key_ = chain_key(backup.store, point.chain_id, key, point.folder)
    # the disk folder BACKUP opened (never through a symlink); ChainFiles leaves it open
    files = ChainFiles.open(backup.disk_folder(point.folder_name), writable=writable,
                            dry_run=dry_run).use_key(encrypted, chain_key_)
    try:
        with files.keyed():
            _check_files(point, backup.backup_folder, files, skip_check=skip_check,
                         whole_chain=whole_chain, verified_within=verified_within,
                         defer_digests=defer_digests)
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


def _check_files(point: RestorePoint, backup_folder: BackupFolder, files: ChainFiles, *,
                 skip_check: bool, whole_chain: bool, verified_within: float,
                 defer_digests: bool) -> None:
    folder = files.path
    entries = files.names()
    backup_folder.refuse_unfinished_restore(point.folder_name)
    note_partial(folder, entries)
    used = list(point.records) if whole_chain else point.segment()
    if skip_check:
        log.warning("%s: --skip-check: restoring %s without checking the chain",
                    point.disk_id, point.label)
        for record in used:
            files.inspect(record.file)
        return
    problems = record_problems(point.records)
    problems += folder_problems(entries, [r.file for r in used],
                                known_files(backup_folder, point.folder_name))
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
