"""Backup chains on disk: file naming, folder layout and the chain metadata.

A backup target folder holds one metadata file, ``qmpbackup.json``, that lists
its chains (normally one; ``auto`` adds a new one when the VM lost the old
chain's bitmap).  Each chain names its dirty bitmap and, per disk, the ordered
list of backup files.  The metadata, not file modification times, is the
truth about order; it is rewritten atomically (temp file, fsync, rename) so a
crash leaves either the old or the new version, never half of one.

Layout::

    DIR/qmpbackup.json
    DIR/.qmpbackup.lock      (while a run holds it, or left by a killed run; not data)
    DIR/<disk id>/FULL-<unix time>-<image name>
    DIR/<disk id>/INC-<unix time>-<image name>     (backing file: the previous backup)
    DIR/<disk id>/COPY-<unix time>-<image name>    (level copy, no chain)
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ChainError, TargetError, UsageError

METADATA_NAME = "qmpbackup.json"
LOCK_NAME = ".qmpbackup.lock"
METADATA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
TOOL_PREFIX = "qmpbackup-"          # reserved: block nodes, jobs and bitmaps of the tool
BITMAP_PREFIX = TOOL_PREFIX
LEVEL_PREFIX = {"full": "FULL", "inc": "INC", "copy": "COPY"}
PREFIX_LEVEL = {prefix: level for level, prefix in LEVEL_PREFIX.items()}
BACKUP_NAME_RE = re.compile(r"^(FULL|INC|COPY)-(\d+)-(.+)$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_uuid(value: str) -> str:
    """Reject chain ids that could escape a folder or break a bitmap name."""
    if not _UUID_RE.match(value) or ".." in value:
        raise UsageError(
            f"invalid --uuid {value!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return value


def new_chain_id() -> str:
    return str(uuidlib.uuid4())


def bitmap_name(chain_id: str) -> str:
    return f"{BITMAP_PREFIX}{chain_id}"


def safe_component(name: str) -> str:
    """Turn a disk id into one safe path component (qdev ids may hold '/' or '[')."""
    cleaned = _UNSAFE_CHARS.sub("_", name).strip(".")
    return cleaned or "disk"


def backup_file_name(level: str, timestamp: int, source_image: str) -> str:
    """FULL-<time>-<image>, always ending in .qcow2 because every target is qcow2."""
    base = safe_component(os.path.basename(source_image) or "disk")
    if not base.endswith(".qcow2"):
        base += ".qcow2"
    return f"{LEVEL_PREFIX[level]}-{timestamp}-{base}"


@dataclass(frozen=True)
class ParsedName:
    level: str
    timestamp: int
    image: str


def parse_backup_name(name: str) -> Optional[ParsedName]:
    match = BACKUP_NAME_RE.match(name)
    if not match:
        return None
    return ParsedName(PREFIX_LEVEL[match.group(1)], int(match.group(2)), match.group(3))


@dataclass
class BackupRecord:
    """One backup file of one disk, as written at backup time."""

    file: str
    level: str
    time: int
    virtual_size: int
    source_image: str
    source_format: str = "qcow2"
    compressed: bool = False
    quiesced: bool = False


@dataclass
class DiskChain:
    backups: list[BackupRecord] = field(default_factory=list)


@dataclass
class Chain:
    uuid: str
    bitmap: str
    created: int
    disks: dict[str, DiskChain] = field(default_factory=dict)

    def disk(self, disk_id: str) -> DiskChain:
        return self.disks.setdefault(disk_id, DiskChain())

    def has_full(self, disk_id: str) -> bool:
        chain = self.disks.get(disk_id)
        return bool(chain and any(b.level == "full" for b in chain.backups))


@dataclass
class ChainStore:
    """The metadata file of one backup folder."""

    root: Path
    chains: list[Chain] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root / METADATA_NAME

    @property
    def current(self) -> Optional[Chain]:
        return self.chains[-1] if self.chains else None

    def find(self, chain_id: str) -> Optional[Chain]:
        return next((c for c in self.chains if c.uuid == chain_id), None)

    @classmethod
    def load(cls, root: Path) -> "ChainStore":
        path = root / METADATA_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(root)
        except (OSError, ValueError) as err:
            raise ChainError(f"cannot read chain metadata {path}: {err}") from err
        try:
            return cls(root, [_chain_from_dict(c) for c in raw["chains"]])
        except (KeyError, TypeError) as err:
            raise ChainError(f"chain metadata {path} is malformed: missing {err}") from err

    def save(self) -> None:
        data = {"version": METADATA_VERSION,
                "chains": [asdict(c) for c in self.chains]}
        write_atomically(self.path, json.dumps(data, indent=2) + "\n")


def _chain_from_dict(raw: dict[str, Any]) -> Chain:
    disks = {disk_id: DiskChain([BackupRecord(**b) for b in d["backups"]])
             for disk_id, d in raw["disks"].items()}
    return Chain(raw["uuid"], raw["bitmap"], raw["created"], disks)


_TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, text: str) -> None:
    """Replace PATH with TEXT so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def month_folder(base: Path, now: Optional[float] = None) -> Path:
    """The --monthly chain folder for the current local month (DIR/YYYY-MM)."""
    return base / time.strftime("%Y-%m", time.localtime(now))


def prepare_root(root: Path) -> list[Path]:
    """Create the target folder (0700: it will hold whole disks) or fail clearly.

    Returns the folders it created, outermost first, so a run that fails
    before writing a backup can remove them again.
    """
    if root.exists() and not root.is_dir():
        raise TargetError(f"target {root} exists and is not a directory")
    missing = [p for p in (root, *root.parents) if not p.exists()][::-1]
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise TargetError(f"cannot create target {root}: {err.strerror}") from err
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise TargetError(f"target {root} is not readable and writable")
    return missing


def is_empty_dir(root: Path) -> bool:
    """True when ROOT holds nothing but (maybe) its lock file."""
    try:
        return not any(p.name != LOCK_NAME for p in root.iterdir())
    except FileNotFoundError:
        return True
    except OSError as err:
        raise TargetError(f"cannot read target {root}: {err.strerror}") from err


def latest_backup_time(root: Path) -> int:
    """The newest time in any backup file name below ROOT (chains and copies alike)."""
    times = [parsed.timestamp for path in root.glob("*/*")
             if (parsed := parse_backup_name(path.name.removesuffix(PARTIAL_SUFFIX)))]
    return max(times, default=0)


def partial_files(root: Path) -> list[Path]:
    """Leftover .partial files below ROOT (one level of disk folders)."""
    return _glob(root, f"*/*{PARTIAL_SUFFIX}")


def stale_temp_files(root: Path) -> list[Path]:
    """Half-written metadata files of a run killed inside :func:`write_atomically`."""
    return _glob(root, f".{METADATA_NAME}.*{_TEMP_SUFFIX}")


def _glob(root: Path, pattern: str) -> list[Path]:
    try:
        return sorted(root.glob(pattern))
    except OSError as err:
        raise TargetError(f"cannot read target {root}: {err.strerror}") from err
