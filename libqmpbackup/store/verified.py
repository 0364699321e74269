"""Remembered verification: a file hashed recently and unchanged since is not hashed again by a restore.

Hashing every file of a chain before a restore costs more than the copy
(issue 22), and for ``mount`` it is a pass over the data before the first
byte.  So each successful check (the backup run that wrote the file,
``verify``, a restore's pre-check) is remembered, outside the backup folder
(:func:`statedirs.cache_dir`, e.g. ``/var/cache/qmpbackup/verified.json``,
0700; the folder may be read-only media, and a record in it would be the
folder vouching for itself).  An entry is keyed by the file's device and
inode and holds its size, mtime and ctime (of the open descriptor: the file
that is used, not a name) and the digest it matched, with the time of the
check.  A restore skips hashing a file whose entry matches all of that and
is younger than ``--verified-within``: any write to the file moves its
ctime, which no user can set back.

What it cannot see is rot, which changes no timestamp: that is ``verify``'s
job, which always reads everything and refreshes the entries.  A record
that cannot be read or written only costs the time of hashing again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from libqmpbackup.errors import QmpBackupError
from libqmpbackup.store.fsutil import write_atomically
from libqmpbackup.store.statedirs import cache_dir

log = logging.getLogger(__name__)

RECORD_NAME = "verified.json"
DEFAULT_WITHIN = 24 * 3600.0
FORGET_AFTER = 60 * 24 * 3600.0   # entries older than this are dropped when the record is written

Target = Union[int, Path]   # an open descriptor, or (backup runs) the path just written


def _stat(target: Target) -> os.stat_result:
    return os.fstat(target) if isinstance(target, int) else os.stat(target, follow_symlinks=False)


def identity(target: Target) -> tuple[str, dict[str, int]]:
    """(key, facts) of a file: device:inode, and what any change of it moves."""
    info = _stat(target)
    return (f"{info.st_dev}:{info.st_ino}",
            {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns})


def record_file() -> Optional[Path]:
    """Where the record lives; None (nothing remembered) when no private cache folder is usable."""
    try:
        return cache_dir() / RECORD_NAME
    except QmpBackupError as err:
        log.warning("verification is not remembered: %s", err)
        return None


def _read(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the verification record %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


class Verified:
    """The record, read once per command."""

    def __init__(self, path: Optional[Path] = None, *, load: bool = True) -> None:
        self.path = record_file() if load and path is None else path
        self.entries = _read(self.path)

    def verified_at(self, target: Target, digest: Optional[str]) -> Optional[float]:
        """When the file (unchanged since) last matched DIGEST; None when not remembered."""
        if not digest:
            return None
        try:
            key, facts = identity(target)
        except OSError:
            return None
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or entry.get("digest") != digest:
            return None
        if any(entry.get(name) != value for name, value in facts.items()):
            return None
        checked = entry.get("checked")
        return float(checked) if isinstance(checked, (int, float)) else None

    def fresh(self, target: Target, digest: Optional[str], within: float) -> bool:
        """Verified within WITHIN seconds and unchanged since (WITHIN 0: never)."""
        if within <= 0:
            return False
        checked = self.verified_at(target, digest)
        return checked is not None and 0 <= time.time() - checked <= within

    def remember(self, items: Iterable[tuple[Target, Optional[str]]]) -> None:
        """Record that each (file, digest) matched now; merged with other writers' entries."""
        now = time.time()
        fresh: dict[str, Any] = {}
        for target, digest in items:
            if not digest:
                continue
            with contextlib.suppress(OSError):
                key, facts = identity(target)
                fresh[key] = {**facts, "digest": digest, "checked": now}
        if not fresh or self.path is None:
            return
        try:
            self._merge(fresh, now)
        except OSError as err:
            log.warning("cannot update the verification record %s: %s", self.path, err.strerror)

    def _merge(self, fresh: dict[str, Any], now: float) -> None:
        assert self.path is not None
        lock = os.open(self.path.with_name(RECORD_NAME + ".lock"),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {key: entry for key, entry in _read(self.path).items()
                       if isinstance(entry, dict)
                       and now - float(entry.get("checked", 0)) < FORGET_AFTER}
            entries.update(fresh)
            write_atomically(self.path, json.dumps(entries, separators=(",", ":")))
            self.entries = entries
        finally:
            os.close(lock)


def remember_written(files: Iterable[tuple[Target, Optional[str]]]) -> None:
    """A backup run's files, hashed as they were written and now in place: remembered as verified."""
    Verified().remember(files)
