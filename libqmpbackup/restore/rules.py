"""Restore points, and the rules a chain must satisfy before it is restored.

This module is pure: chain metadata, folder listings and ``qemu-img info``
answers go in, restore points and plain-language problems come out.  Every
decision about *whether* and *from which files* a point may be restored is
made here, so it is unit-tested without QEMU; :mod:`backupdir` feeds it from
the disk and the operations only execute what it decided.

The metadata is the truth about order.  File names and each file's backing
file are only cross-checks: a disagreement means someone or something
changed the folder behind the tool's back, and restoring anyway could
silently produce a different disk than the one that was backed up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

from libqmpbackup.errors import ChainError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain
from libqmpbackup.store.names import (
    LEVEL_PREFIX,
    PARTIAL_SUFFIX,
    is_plain_file_name,
    parse_backup_name,
    point_label,
    safe_component,
)
from libqmpbackup.store.verified import DEFAULT_WITHIN

CHAIN_LEVELS = ("full", "inc", "diff")
WHOLE_LEVELS = ("full", "copy")
"""Levels whose file is a whole image on its own."""
_SHOWN_POINTS = 8


@dataclass
class RestoreOptions:
    """What the user chose for a restore command (shared by every operation)."""

    dir: Path
    until: Optional[str] = None
    uuid: Optional[str] = None
    skip_check: bool = False
    dry_run: bool = False
    rate_limit: int = 0
    name_filter: Optional[str] = None
    key: Optional[Key] = None           # --key-file: opens an encrypted chain
    encrypt_output: bool = False        # merge --encrypt-output: the image stays encrypted
    verified_within: float = DEFAULT_WITHIN   # seconds; 0: hash every file (store/verified.py)


@dataclass(frozen=True)
class RestorePoint:
    """One disk at one point of one chain: the record chosen and the whole disk chain."""

    root: Path                          # the folder holding qmpbackup.json
    chain_id: str
    disk_id: str
    records: tuple[BackupRecord, ...]   # this disk's backups in this chain, metadata order
    index: int                          # the chosen point
    subdir: Optional[str] = None        # the disk folder below root (CHAIN_FOLDER: root itself);
                                        # None: named after the disk id

    @classmethod
    def of(cls, store: ChainStore, chain: Chain, disk_id: str,
           index: Optional[int] = None) -> RestorePoint:
        """Disk DISK_ID of CHAIN at INDEX (default: its newest backup)."""
        records = tuple(chain.disks[disk_id].backups)
        return cls(root=store.root, chain_id=chain.uuid, disk_id=disk_id, records=records,
                   index=len(records) - 1 if index is None else index,
                   subdir=chain.folder_of(disk_id))

    @property
    def folder_name(self) -> str:
        """The disk folder holding the point's files, relative to the chain folder."""
        return safe_component(self.disk_id) if self.subdir is None else self.subdir

    @property
    def folder(self) -> Path:
        return self.root / self.folder_name

    @property
    def record(self) -> BackupRecord:
        return self.records[self.index]

    @property
    def path(self) -> Path:
        return self.folder / self.record.file

    @property
    def label(self) -> str:
        return self.record.label

    def segment(self) -> list[BackupRecord]:
        return segment(self.records, self.index)

    def span(self) -> list[BackupRecord]:
        return span(self.records, self.index)


def matches(file_name: str, name: str) -> bool:
    """--until accepts the file name, the name without extension, or the FULL-/INC-<time> label."""
    return name in (file_name, os.path.splitext(file_name)[0], point_label(file_name))


def record_matches(record: BackupRecord, name: str) -> bool:
    """Like :func:`matches`, for a record (its file name or its label).

    A FULL that holds a later point answers to that point, as ``FULL-`` or
    ``INC-<time>``; its own original label no longer does: that moment is gone.
    """
    if record.holds is None:
        return matches(record.file, name) or name == record.label
    return name in (record.file, os.path.splitext(record.file)[0], record.label,
                    f"{LEVEL_PREFIX['inc']}-{record.holds}")


def find_point(records: Sequence[BackupRecord], name: str) -> Optional[int]:
    return next((i for i, r in enumerate(records) if record_matches(r, name)), None)


def last_full(records: Sequence[BackupRecord], index: int) -> int:
    """The index of the last whole image (FULL, or COPY) at or before INDEX."""
    for start in range(index, -1, -1):
        if records[start].level in WHOLE_LEVELS:
            return start
    raise ChainError(f"{records[index].file} has no FULL backup before it")


def parent(records: Sequence[BackupRecord], index: int) -> Optional[int]:
    """The record a backup file backs onto: an INC its predecessor, a DIFF its FULL, a FULL none."""
    level = records[index].level
    if level in WHOLE_LEVELS:
        return None
    if level == "diff":
        return last_full(records, index)
    if index == 0:
        raise ChainError(f"{records[index].file} has no FULL backup before it")
    return index - 1


def parent_record(records: Sequence[BackupRecord], index: int) -> Optional[BackupRecord]:
    """The record RECORDS[INDEX] must back onto (see :func:`parent`); None for a whole image."""
    backs_onto = parent(records, index)
    return None if backs_onto is None else records[backs_onto]


def segment(records: Sequence[BackupRecord], index: int) -> list[BackupRecord]:
    """The files a point is read from, oldest first: its FULL, then each backing step up to it.

    Disks without bitmaps (raw, pflash) get a FULL at every run, so their
    segment is one file; a DIFF point needs its FULL and itself; an INC
    point goes back through INCs to the last DIFF or the FULL.
    """
    last_full(records, index)   # a point without a FULL is refused by its own name
    path: list[BackupRecord] = []
    current: Optional[int] = index
    while current is not None:
        path.append(records[current])
        current = parent(records, current)
    return path[::-1]


def span(records: Sequence[BackupRecord], index: int) -> list[BackupRecord]:
    """Every record from the point's FULL up to it: what an in-place restore consumes.

    Applied in this order each one is valid on top of the one before: an INC
    holds the changes since its predecessor, a DIFF every change since the
    FULL (so also those of the INCs between).
    """
    return list(records[last_full(records, index):index + 1])


def _unknown_point(name: str, where: str, labels: Sequence[str]) -> UsageError:
    shown = ", ".join(labels[-_SHOWN_POINTS:])
    more = "… (see qmprestore list), " if len(labels) > _SHOWN_POINTS else ""
    return UsageError(f"--until {name!r}: no such restore point {where} "
                      f"(points: {more}{shown})")


def name_matches(disk_id: str, disk: DiskChain, name_filter: Optional[str]) -> bool:
    """--filter: a substring of the disk id or of an image name, as upstream's qmprestore."""
    if not name_filter:
        return True
    names = [disk_id, *(os.path.basename(r.source_image) for r in disk.backups),
             *(r.file for r in disk.backups)]
    return any(name_filter in n for n in names)


def disks_in(store: ChainStore, folder_name: Optional[str],
             name_filter: Optional[str] = None) -> list[str]:
    """Disk ids whose backups live in DIR/FOLDER_NAME (None: anywhere), oldest chain first."""
    ids: list[str] = []
    for chain in store.chains:
        for disk_id, disk in chain.disks.items():
            if folder_name is not None and chain.folder_of(disk_id) != folder_name:
                continue
            if name_matches(disk_id, disk, name_filter) and disk_id not in ids:
                ids.append(disk_id)
    return ids


def _chains_with(store: ChainStore, disk_id: Optional[str], uuid: Optional[str]) -> list[Chain]:
    chains = [c for c in store.chains
              if disk_id is None or (disk_id in c.disks and c.disks[disk_id].backups)]
    if uuid is not None:
        chains = [c for c in chains if c.uuid == uuid]
        if not chains:
            known = ", ".join(c.uuid for c in store.chains) or "none"
            raise UsageError(f"--uuid {uuid}: no such chain in {store.root} (chains: {known})")
    if not chains:
        what = f" with backups of disk {disk_id}" if disk_id else ""
        raise ChainError(f"the chain metadata in {store.root} lists no chain{what}")
    return chains


def select_disk_point(store: ChainStore, disk_id: str, until: Optional[str],
                      uuid: Optional[str]) -> RestorePoint:
    """The point to restore for one disk folder.

    Without --until: the newest backup of the newest chain (or of --uuid).
    With --until: the named backup in whichever chain holds it, newest first,
    because a folder may hold several chains of the same disk.
    """
    chains = _chains_with(store, disk_id, uuid)
    for chain in reversed(chains):
        records = tuple(chain.disks[disk_id].backups)
        index = len(records) - 1 if until is None else find_point(records, until)
        if index is not None:
            return RestorePoint.of(store, chain, disk_id, index)
    assert until is not None
    raise _unknown_point(until, f"for disk {disk_id}",
                         [r.label for r in chains[-1].disks[disk_id].backups])


def select_root_points(store: ChainStore, until: Optional[str], uuid: Optional[str],
                       disk_ids: Optional[Collection[str]] = None) -> list[RestorePoint]:
    """One point per disk of a chain, for restoring a whole VM.

    --until names one backup run (its FULL-/INC-<time> label; a raw disk's
    FULL and a qcow2 disk's INC of the same run share the time), so every
    disk is restored to that same moment.  A disk without a backup in that
    run is refused rather than silently taken from another moment.
    Without --until each disk gets its newest backup.  DISK_IDS limits the
    disks (--filter, or the disks of one folder).
    """
    def chosen(disk_id: str) -> bool:
        return disk_ids is None or disk_id in disk_ids

    chains = [c for c in _chains_with(store, None, uuid)
              if any(chosen(d) and dc.backups for d, dc in c.disks.items())]
    if not chains:
        raise ChainError(f"the chain metadata in {store.root} lists no chain with the chosen disks")
    if until is None:
        chain = chains[-1]
        return [RestorePoint.of(store, chain, disk_id)
                for disk_id, d in chain.disks.items() if d.backups and chosen(disk_id)]
    for chain in reversed(chains):
        hits = [r for d_id, d in chain.disks.items() if chosen(d_id)
                for r in d.backups if record_matches(r, until)]
        if not hits:
            continue
        when = hits[0].point_time
        points = []
        for disk_id, disk in chain.disks.items():
            if not chosen(disk_id):
                continue
            index = next((i for i, r in enumerate(disk.backups) if r.point_time == when), None)
            if index is None:
                raise ChainError(f"disk {disk_id} of chain {chain.uuid} has no backup from the "
                                 f"run of {hits[0].label}: restore the other disks one by "
                                 "one with --dir ROOT/<disk id>")
            points.append(RestorePoint.of(store, chain, disk_id, index))
        return points
    runs = sorted({(r.point_time, r.label) for c in chains for d in c.disks.values()
                   for r in d.backups})
    raise _unknown_point(until, f"in {store.root}", [name for _, name in runs])


# -- consistency rules ------------------------------------------------------------------------

def record_problems(records: Sequence[BackupRecord]) -> list[str]:
    """Metadata against file names: each record named for its level and time, in time order."""
    if not records:
        return ["the chain metadata lists no backup of this disk"]
    problems = []
    previous: Optional[BackupRecord] = None
    copies = all(r.level == "copy" for r in records)
    for record in records:
        parsed = parse_backup_name(record.file)
        if not record.timestamped and record.level in WHOLE_LEVELS:
            if not is_plain_file_name(record.file):
                problems.append(f"{record.file!r} in the metadata is not a backup file name")
        elif parsed is None or os.path.basename(record.file) != record.file:
            problems.append(f"{record.file!r} in the metadata is not a backup file name")
        elif record.level not in CHAIN_LEVELS and not copies:
            problems.append(f"{record.file} has level {record.level!r}, which has no place in a chain")
        elif parsed.level != record.level or parsed.timestamp != record.time:
            problems.append(f"{record.file} does not match its metadata "
                            f"(level {record.level}, time {record.time})")
        if previous is not None and record.time <= previous.time:
            problems.append(f"{record.file} is not newer than {previous.file} before it")
        previous = record
    if records[0].level not in WHOLE_LEVELS:
        problems.append(f"{records[0].file} has no FULL backup before it")
    return problems


def partial_leftovers(entries: Collection[str]) -> list[str]:
    return sorted(name for name in entries if name.endswith(PARTIAL_SUFFIX))


def folder_problems(entries: Collection[str], chain_files: Sequence[str],
                    known_files: Collection[str]) -> list[str]:
    """Files the chain needs but the folder lacks, and backup files no metadata knows.

    KNOWN_FILES are the files of every chain of the folder (several chains
    may share a disk folder).  COPY files are standalone by design, and
    anything not named like a backup (the ``image`` link, notes) is the
    admin's business.
    """
    present = set(entries)
    problems = [f"{name} is missing (listed in the chain metadata)"
                for name in chain_files if name not in present]
    problems += [f"{name} is not in the chain metadata"
                 for name in unknown_backup_files(entries, known_files)]
    return problems


def unknown_backup_files(entries: Collection[str], known_files: Collection[str]) -> list[str]:
    """FULL-/INC- files of a folder that no chain lists (restores refuse such a folder)."""
    unknown = []
    for name in sorted(set(entries) - set(known_files)):
        parsed = parse_backup_name(name)
        if parsed and parsed.level in CHAIN_LEVELS and not name.endswith(PARTIAL_SUFFIX):
            unknown.append(name)
    return unknown


def backs_onto(folder: Path, backing: str, expected: str) -> bool:
    """Does backing name BACKING (relative names start at FOLDER) reach file EXPECTED?"""
    def resolved(name: str) -> str:
        return os.path.normpath(os.path.join(folder, name))
    return resolved(backing) == resolved(expected)


def image_problems(record: BackupRecord, previous: Optional[BackupRecord], info: dict[str, Any],
                   folder: Path) -> list[str]:
    """One file's qemu-img info against what the metadata says it must be.

    PREVIOUS is the record it must back onto (see :func:`parent`).

    Format, data file and backing format are the folder rule's, checked
    before this (:func:`libqmpbackup.store.folder_safety.image_problems`).
    """
    problems = []
    name = shown(record.file)
    size = info.get("virtual-size")
    if record.virtual_size and size != record.virtual_size:
        problems.append(f"{name} has virtual size {size}, the metadata says {record.virtual_size}")
    if info.get("format-specific", {}).get("data", {}).get("corrupt"):
        problems.append(f"{name} is marked corrupt")
    backing = info.get("backing-filename")
    if record.level in WHOLE_LEVELS:
        if backing:
            problems.append(f"{name} is a FULL backup but has backing file {shown(backing)}")
    elif previous is not None:
        if not backing and not record.backed:
            pass    # upstream's INCs name no backing file: the metadata gives the order
        elif not backing:
            problems.append(f"{name} has no backing file (expected {shown(previous.file)})")
        elif not backs_onto(folder, backing, previous.file):
            problems.append(f"{name} is backed by {shown(backing)}, expected {shown(previous.file)}")
    return problems


def shown(name: str) -> str:
    """NAME for a message: as it is when printable, else escaped (a header's bytes are anything)."""
    return name if name.isprintable() else ascii(name)


def needs_rebase(info: dict[str, Any], expected: str) -> bool:
    """True unless the header already names EXPECTED, relatively, as qcow2."""
    return (info.get("backing-filename") != expected
            or info.get("backing-filename-format") != "qcow2")
