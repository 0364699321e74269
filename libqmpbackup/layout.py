"""The target folder on disk: creating it, and finding what runs left in it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import TargetError
from libqmpbackup.fsutil import TEMP_SUFFIX, make_private_dirs
from libqmpbackup.names import (
    DISK_METADATA_NAME,
    LOCK_NAME,
    METADATA_NAME,
    PARTIAL_SUFFIX,
    parse_backup_name,
)

MONTH_FOLDER_RE = re.compile(r"^\d{4}-\d{2}$")
"""The names :func:`month_folder` gives."""


def month_folder(base: Path, now: Optional[float] = None) -> Path:
    """The --monthly chain folder for the current local month (DIR/YYYY-MM)."""
    return base / time.strftime("%Y-%m", time.localtime(now))


def month_folders(path: Path) -> list[Path]:
    """The chain folders of a --monthly base (sub-folders holding chain metadata)."""
    try:
        return sorted(p for p in path.iterdir() if (p / METADATA_NAME).is_file())
    except OSError as err:
        raise TargetError(f"cannot read {path}: {err.strerror}") from err


def existing_backup_folder(path: Path) -> Path:
    """PATH made absolute, when it names an existing directory (commands that only read or prune)."""
    path = Path(os.path.abspath(path))
    if not path.exists():
        raise TargetError(f"backup folder {path} does not exist")
    if not path.is_dir():
        raise TargetError(f"{path} is not a directory")
    return path


def prepare_root(root: Path) -> list[Path]:
    """Create the target folder (0700: it will hold whole disks) or fail clearly.

    Returns the folders it created, outermost first, so a run that fails
    before writing a backup can remove them again.
    """
    if root.exists() and not root.is_dir():
        raise TargetError(f"target {root} exists and is not a directory")
    try:
        missing = make_private_dirs(root)
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
    """The newest time in any backup file name in or below ROOT (chains and copies alike)."""
    times = [parsed.timestamp for path in [*root.glob("*"), *root.glob("*/*")]
             if (parsed := parse_backup_name(path.name.removesuffix(PARTIAL_SUFFIX)))]
    return max(times, default=0)


def existing_names(root: Path) -> set[str]:
    """Every name in ROOT and its disk folders, relative to ROOT: names a new file must avoid."""
    names: set[str] = set()
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                names.add(entry.name)
                if entry.is_dir(follow_symlinks=False):
                    names.update(os.path.join(entry.name, n) for n in os.listdir(entry.path))
    except OSError as err:
        raise TargetError(f"cannot read target {root}: {err.strerror}") from err
    return names


def partial_files(root: Path) -> list[Path]:
    """Leftover .partial files in ROOT (--no-subdir) and its disk folders."""
    return _glob(root, f"*{PARTIAL_SUFFIX}") + _glob(root, f"*/*{PARTIAL_SUFFIX}")


def stale_temp_files(root: Path) -> list[Path]:
    """Half-written metadata files of a run killed inside :func:`write_atomically`."""
    return (_glob(root, f".{METADATA_NAME}.*{TEMP_SUFFIX}")
            + _glob(root, f"*/.{DISK_METADATA_NAME}.*{TEMP_SUFFIX}"))


def _glob(root: Path, pattern: str) -> list[Path]:
    try:
        return sorted(root.glob(pattern))
    except OSError as err:
        raise TargetError(f"cannot read target {root}: {err.strerror}") from err
