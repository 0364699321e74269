"""Active ``qmprestore mount``s: what ``umount`` needs, and the mark that protects their files.

A mount never writes into the backup folder, so its record lives in the
private runtime directory (:func:`statedirs.runtime_dir`, e.g.
``/run/qmpbackup/mounts``): one JSON file per mountpoint, named by a hash of
its real path, written before the daemon can expose anything, so that
``umount`` can clean up after any failure (even a SIGKILL of the tool).

A mount is *active* while its daemon lives: the record keeps the daemon's
pid and its start time (``/proc/PID/stat``), so a reused pid is not taken
for it.  While one is active, commands that would change or delete the
files it reads (``rebase``, ``commit``, ``snapshotrebase``, ``qmpbackup
prune``) refuse with the busy exit code before writing anything
(:func:`refuse_if_mounted`); backups, merges and verifies only read those
files or add new ones, and go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from libqmpbackup.errors import LockBusyError, QmpBackupError
from libqmpbackup.store.fsutil import write_atomically
from libqmpbackup.store.statedirs import runtime_dir

log = logging.getLogger(__name__)

SUFFIX = ".mount.json"


@dataclass
class ExposedDisk:
    """One disk of a mount: the raw file the daemon serves, and what it holds."""

    disk: str
    file: str                       # MOUNTPOINT/<disk id>.raw
    chain: str
    point: str
    folder: str                     # the disk folder read
    filesystems: list[dict[str, str]] = field(default_factory=list)   # partition, path, type, error
    loops: list[str] = field(default_factory=list)   # --filesystems: the disk's, then partitions'


@dataclass
class MountRecord:
    mountpoint: str
    root: str                       # the chain folder (real path)
    pid: int = 0
    start: str = ""                 # the daemon's start time in /proc/PID/stat
    log: str = ""
    disks: list[ExposedDisk] = field(default_factory=list)
    created: list[str] = field(default_factory=list)   # files and folders the mount made
    checker: int = 0                # the process hashing files while they are served
    checker_start: str = ""
    damaged: list[str] = field(default_factory=list)   # what it found: the daemon was stopped

    @property
    def chains(self) -> set[str]:
        return {d.chain for d in self.disks}

    def document(self) -> dict[str, Any]:
        return {"mountpoint": self.mountpoint, "folder": self.root, "daemon_pid": self.pid,
                "alive": alive(self), "checking": checking(self), "damaged": self.damaged,
                "disks": [{"disk": d.disk, "file": d.file, "chain": d.chain, "point": d.point,
                           "loops": d.loops, "filesystems": d.filesystems} for d in self.disks]}


def _key(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]


def mounts_dir() -> Path:
    path = runtime_dir() / "mounts"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    return path


def record_path(mountpoint: str) -> Path:
    return mounts_dir() / f"{_key(mountpoint)}{SUFFIX}"


def lock_path(mountpoint: str) -> Path:
    """One mount or umount of a mountpoint at a time (:func:`locks.hold` on it)."""
    return mounts_dir() / f"{_key(mountpoint)}.lock"


def save(record: MountRecord) -> None:
    write_atomically(record_path(record.mountpoint), json.dumps(asdict(record), indent=1))


def _parse(text: str) -> Optional[MountRecord]:
    try:
        data = json.loads(text)
        disks = [ExposedDisk(**d) for d in data.pop("disks")]
        return MountRecord(**data, disks=disks)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def load(mountpoint: str) -> Optional[MountRecord]:
    try:
        text = record_path(mountpoint).read_text()
    except FileNotFoundError:
        return None
    return _parse(text)


def forget(record: MountRecord) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(record.mountpoint).unlink()


def records() -> Iterator[MountRecord]:
    """Every recorded mount of this user, active or left by a daemon that died.

    No usable runtime folder means no mount could have been made: none (list,
    prune and in-place restores must not fail on it).
    """
    try:
        folder = mounts_dir()
    except QmpBackupError as err:
        log.debug("no mount records: %s", err)
        return
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        with contextlib.suppress(OSError):
            record = _parse(path.read_text())
            if record is not None:
                yield record


def process_start(pid: int) -> Optional[str]:
    """PID's start time (field 22 of /proc/PID/stat), None when no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()   # the name in (...) may hold spaces
    if len(fields) <= 19 or fields[0] in ("Z", "X"):   # a zombie serves nothing
        return None
    return fields[19]


def alive(record: MountRecord) -> bool:
    return record.pid > 0 and process_start(record.pid) == record.start


def checking(record: MountRecord) -> bool:
    return record.checker > 0 and process_start(record.checker) == record.checker_start


def active_on(root: Path, chains: Optional[Iterable[str]] = None) -> list[MountRecord]:
    """Live mounts reading the chain folder ROOT (only of CHAINS, when given)."""
    real = os.path.realpath(root)
    wanted = set(chains) if chains is not None else None
    return [r for r in records() if r.root == real and alive(r)
            and (wanted is None or r.chains & wanted)]


def refuse_if_mounted(root: Path, command: str, chains: Optional[Iterable[str]] = None) -> None:
    """LockBusyError (exit 4) when a live mount reads files COMMAND would change or delete."""
    found = active_on(root, chains)
    if found:
        where = ", ".join(f"{r.mountpoint} (daemon pid {r.pid})" for r in found)
        raise LockBusyError(f"{command} would change files of {root} that are mounted at "
                            f"{where}: run qmprestore umount {found[0].mountpoint} first")
