"""``qmprestore verify``: is every backup file still what was backed up?

Meant to run unattended (weekly from cron) and long before anyone needs a
restore: it reads every file of every chain below ``--dir``, recomputes the
checksum recorded at backup time, runs ``qemu-img check`` and the chain
rules of :mod:`rules` (names, order, backing links, virtual sizes), and says
per file ok / damaged / missing / unverifiable (no checksum recorded: a
backup made before checksums existed) / extra (a backup file no metadata
lists; restores refuse its folder).  A point is restorable when every file
it is read from is ok or unverifiable.

It changes nothing and needs no VM.  Backups never re-read old files, so
this is the one place where rot in an old FULL is found.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from libqmpbackup.errors import BackupDamaged, ChainError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore.folder import BackupDir, listed
from libqmpbackup.restore.images import ChainFiles, image_findings
from libqmpbackup.restore.precheck import known_files, note_partial
from libqmpbackup.restore.rules import (
    WHOLE_LEVELS,
    parent_record,
    record_problems,
    unknown_backup_files,
)
from libqmpbackup.restore.status import FileStatus
from libqmpbackup.store.digests import check_handles
from libqmpbackup.store.metadata import BackupRecord, Chain
from libqmpbackup.store.verified import Verified
from libqmpbackup.tables import table
from libqmpbackup.units import local_time

log = logging.getLogger(__name__)

BAD_STATUSES = tuple(s for s in FileStatus if s.bad)
HEADERS = ("chain", "disk", "file", "status", "restorable", "problems", "last verified")


@dataclass
class FileReport:
    """One backup file's verdict."""

    chain: str                  # chain id ("<YYYY-MM>/<id>" below a --monthly base)
    disk: str
    path: Path
    level: str
    time: int
    status: str = "ok"          # ok, damaged, missing, unverifiable, extra
    restorable: bool = True     # every file this point is read from is ok or unverifiable
    problems: list[str] = field(default_factory=list)
    recorded_digest: Optional[str] = None
    last_verified: Optional[float] = None   # the previous remembered check (store/verified.py)

    @property
    def bad(self) -> bool:
        return self.status in BAD_STATUSES

    def error_line(self) -> str:
        return f"{self.path}: {self.status}: {'; '.join(self.problems)}"

    def to_json(self) -> dict[str, Any]:
        return {"chain": self.chain, "disk": self.disk, "file": self.path.name,
                "path": str(self.path), "level": self.level, "time": self.time,
                "status": self.status, "restorable": self.restorable,
                "problems": self.problems, "last_verified": self.last_verified}


@dataclass
class VerifyReport:
    dir: Path
    files: list[FileReport] = field(default_factory=list)

    @property
    def bad(self) -> list[FileReport]:
        return [f for f in self.files if f.bad]

    def counts(self) -> dict[str, int]:
        return {s.value: sum(1 for f in self.files if f.status == s) for s in FileStatus}

    def table(self) -> str:
        rows = [(f.chain, f.disk, f.path.name, f.status, "yes" if f.restorable else "no",
                 "; ".join(f.problems),
                 local_time(int(f.last_verified)) if f.last_verified else "never")
                for f in self.files]
        return table(rows, headers=HEADERS)

    def to_json(self) -> dict[str, Any]:
        return {"command": "verify", "dir": str(self.dir), "ok": not self.bad,
                "counts": self.counts(),
                "files": [f.to_json() for f in self.files]}

    def raise_if_bad(self, *, with_document: bool = False) -> None:
        """Damage is an error (exit 11); WITH_DOCUMENT keeps the report for --json beside it."""
        if self.bad:
            damaged = BackupDamaged([f.error_line() for f in self.bad])
            if with_document:
                damaged.document = self.to_json()
            raise damaged


def verify_dir(path: Path, uuid: Optional[str] = None,
               name_filter: Optional[str] = None, key: Optional[Key] = None) -> VerifyReport:
    """Check every backup file below PATH (a --monthly base, a chain folder or a disk folder).

    UUID keeps one chain, NAME_FILTER the disks whose id or image name
    contains it (the --filter of every restore command).  KEY opens the
    files of encrypted chains for ``qemu-img check``; without it their
    checksums, headers and chain rules are checked, and the report says so.
    """
    qemuimg.binary()
    given = Path(os.path.abspath(path))
    report = VerifyReport(given)
    with listed(path, name_filter) as backups:
        if uuid and not any(b.store.find(uuid) for b in backups):
            known = ", ".join(c.uuid for b in backups for c in b.store.chains) or "none"
            raise UsageError(f"--uuid {uuid}: no such chain in {given} (chains: {known})")
        for backup in backups:
            prefix = "" if given in (backup.folder, backup.root) else f"{backup.root.name}/"
            report.files += _verify_backup(backup, uuid, prefix, key)
    mark_restorable(report.files)
    unverifiable = sum(1 for f in report.files if f.status == "unverifiable")
    if unverifiable:
        log.warning("%d file(s) have no checksum recorded (backed up before qmpbackup recorded "
                    "checksums): only qemu-img check and the chain rules could verify them",
                    unverifiable)
    return report


def _verify_backup(backup: BackupDir, uuid: Optional[str], prefix: str,
                   key: Optional[Key]) -> list[FileReport]:
    wanted = set(backup.disk_ids())
    reports: list[FileReport] = []
    folders_seen: set[str] = set()
    for chain in backup.store.chains:
        if uuid and chain.uuid != uuid:
            continue
        for disk_id, disk in chain.disks.items():
            name = chain.folder_of(disk_id)
            if disk_id not in wanted or backup.selected not in (None, name):
                continue
            # the disk folder the BackupFolder holds (never through a link); one folder's
            # files are open at a time: checked, hashed, closed
            opened = ChainFiles.open(backup.disk_folder(name)).use_key(chain.encrypted, key)
            folder = opened.path
            if chain.encrypted and key is None:
                log.warning("%s: chain %s is encrypted and no --key-file was given: checked "
                            "checksums, chain rules and headers (encrypted: yes), not qemu-img "
                            "check (it needs the key)", folder, chain.uuid)
            with opened as files:
                entries = files.names()
                backup.backup_folder.refuse_unfinished_restore(name)
                found = _verify_disk(chain, disk_id, disk.backups, files, entries, prefix)
                _check_digests(files, found)
            reports += found
            if name not in folders_seen:
                folders_seen.add(name)
                note_partial(folder, entries)
                reports += _extra_files(backup, name, folder, entries, prefix)
    return reports


def _verify_disk(chain: Chain, disk_id: str, records: list[BackupRecord], files: ChainFiles,
                 entries: list[str], prefix: str) -> list[FileReport]:
    reports = []
    seen: set[str] = set()
    for index, record in enumerate(records):
        # the chain rules judge a whole list; what a record adds to its prefix is its own
        new = [p for p in record_problems(records[:index + 1]) if p not in seen]
        seen.update(new)
        report = FileReport(chain=prefix + chain.uuid, disk=disk_id, path=files.path / record.file,
                            level=record.level, time=record.time, problems=new,
                            recorded_digest=record.digest)
        if record.file not in entries:
            report.status = "missing"
            report.problems.insert(0, "listed in the chain metadata, not in the folder")
        else:
            # a symlink, device or hostile header is damage here, not a reason to follow it
            report.problems += image_findings(files, record, _parent_record(records, index))
        if report.problems and report.status == "ok":
            report.status = "damaged"
        reports.append(report)
    return reports


def _parent_record(records: list[BackupRecord], index: int) -> Optional[BackupRecord]:
    """What RECORDS[INDEX] must back onto; a chain without a FULL first is reported by the rules."""
    try:
        return parent_record(records, index)
    except ChainError:
        return None


def _extra_files(backup: BackupDir, name: str, folder: Path, entries: list[str],
                 prefix: str) -> list[FileReport]:
    known = known_files(backup.backup_folder, name)
    return [FileReport(chain=prefix + "-", disk=folder.name, path=folder / file, level="",
                       time=0, status="extra", restorable=False,
                       problems=["not in the chain metadata: restores refuse this folder "
                                 "until it is moved away"])
            for file in unknown_backup_files(entries, known)]


def _check_digests(files: ChainFiles, reports: list[FileReport]) -> None:
    """Recompute the checksum of every file that could be opened (through its descriptor).

    Always every byte (rot changes no timestamp); the remembered check is
    reported as it was before this run, and refreshed for the files found ok.
    """
    present = [r for r in reports if r.status != "missing" and r.path.name in files.handles]
    pairs = [(files.handles[r.path.name], r.recorded_digest) for r in present]
    record = Verified()
    for report, (handle, digest) in zip(present, pairs):
        report.last_verified = record.verified_at(handle.fd, digest)
    checks = check_handles(pairs)
    for report, check in zip(present, checks):
        if check.status == "unrecorded":
            if report.status == "ok":
                report.status = "unverifiable"
        elif check.status != "ok":
            report.status = "damaged"
            report.problems.append(check.detail)
    record.remember((h.fd, d) for (h, d), c in zip(pairs, checks) if c.status == "ok")


def mark_restorable(reports: list[FileReport]) -> None:
    """A point is restorable when every file it is read from is intact.

    Those are the point's file and its parents (:func:`rules.parent`): an INC
    reads through the point before it, a DIFF through its chain's FULL.
    """
    previous: dict[tuple[str, str], bool] = {}    # the point before, per chain and disk
    whole: dict[tuple[str, str], bool] = {}       # the last FULL (or COPY)
    for report in reports:
        if report.status == "extra":
            continue
        key = (report.chain, report.disk)
        good = not report.bad
        if report.level in WHOLE_LEVELS:
            report.restorable = whole[key] = good
        else:
            below = whole if report.level == "diff" else previous
            report.restorable = good and below.get(key, False)
        previous[key] = report.restorable
