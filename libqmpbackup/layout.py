"""The target folder on disk: creating it, and finding what runs left in it."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import TargetError
from libqmpbackup.fsutil import TEMP_SUFFIX, make_private_dirs
from libqmpbackup.names import LOCK_NAME, METADATA_NAME, PARTIAL_SUFFIX, parse_backup_name

MONTH_FOLDER_RE = re.compile(r"^\d{4}-\d{2}$")
"""The names :func:`month_folder` gives."""


def month_folder(base: Path, now: Optional[float] = None) -> Path:
    """The --monthly chain folder for the current local month (DIR/YYYY-MM)."""
    return base / time.strftime("%Y-%m", time.localtime(now))


def month_folders(path: Path) -> list[Path]:
    """The chain folders of a --monthly base (real sub-folders holding chain metadata)."""
    return [p for p in disk_folders(path) if (p / METADATA_NAME).is_file()]


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
        created = make_private_dirs(root)
    except OSError as err:
        raise TargetError(f"cannot create target {root}: {err.strerror}") from err
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise TargetError(f"target {root} is not readable and writable")
    return created


def is_empty_dir(root: Path) -> bool:
    """True when ROOT holds nothing but (maybe) its lock file."""
    try:
        return not any(p.name != LOCK_NAME for p in root.iterdir())
    except FileNotFoundError:
        return True
    except OSError as err:
        raise TargetError(f"cannot read target {root}: {err.strerror}") from err


def disk_folders(root: Path) -> list[Path]:
    """The real sub-folders of ROOT; a symlink is never followed (it could lead anywhere)."""
    try:
        with os.scandir(root) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir(follow_symlinks=False))
    except OSError as err:
        raise TargetError(f"cannot read folder {root}: {err.strerror}") from err


def _names(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as err:
        raise TargetError(f"cannot read folder {folder}: {err.strerror}") from err


def latest_backup_time(root: Path) -> int:
    """The newest time in any backup file name below ROOT (chains and copies alike)."""
    times = [parsed.timestamp for folder in disk_folders(root) for name in _names(folder)
             if (parsed := parse_backup_name(name.removesuffix(PARTIAL_SUFFIX)))]
    return max(times, default=0)


def partial_files(root: Path) -> list[Path]:
    """Leftover .partial files below ROOT (one level of real disk folders)."""
    return [folder / name for folder in disk_folders(root) for name in _names(folder)
            if name.endswith(PARTIAL_SUFFIX)]


def stale_temp_files(root: Path) -> list[Path]:
    """Half-written metadata files of a run killed inside :func:`write_atomically`."""
    return [root / name for name in _names(root)
            if name.startswith(f".{METADATA_NAME}.") and name.endswith(TEMP_SUFFIX)]
