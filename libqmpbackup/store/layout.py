"""The target folder on disk: creating it, and finding what runs left in it."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import stat
import time
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import TargetError, UsageError
from libqmpbackup.store.fsutil import TEMP_SUFFIX, make_private_dirs
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.names import (
    CHAIN_FOLDER,
    DISK_METADATA_NAME,
    INTENT_NAME,
    LOCK_NAME,
    METADATA_NAME,
    PARTIAL_SUFFIX,
    parse_backup_name,
)

log = logging.getLogger(__name__)

MONTH_FOLDER_RE = re.compile(r"^\d{4}-\d{2}$")
"""The names :func:`month_folder` gives."""


def month_folder(base: Path, now: Optional[float] = None) -> Path:
    """The --monthly chain folder for the current local month (DIR/YYYY-MM)."""
    return base / time.strftime("%Y-%m", time.localtime(now))


def month_names(top: Folder) -> list[str]:
    """The month folders of the held folder TOP, by name, oldest first, read through its descriptor.

    Each real ``YYYY-MM`` sub-folder (a symlink is never one) is asked for an
    entry named like the chain metadata, by a look-up relative to TOP that
    opens nothing: the command opens the month once, when it uses it
    (:meth:`~libqmpbackup.store.backup_folder.BackupFolder.below`, which
    refuses a month swapped for a symlink meanwhile).
    """
    return [name for name in sorted(top.subfolder_names())
            if MONTH_FOLDER_RE.match(name) and _has_entry(top, f"{name}/{METADATA_NAME}")]


def _has_entry(top: Folder, relative: str) -> bool:
    """An entry (of any kind, never followed) at RELATIVE below TOP."""
    try:
        os.stat(relative, dir_fd=top.fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def _month_links(top: Folder) -> list[str]:
    return [name for name in top.names() if MONTH_FOLDER_RE.match(name)
            and (info := top.entry(name)) is not None and stat.S_ISLNK(info.st_mode)]


def chain_folder_names(top: Folder, warn: bool = True) -> list[str]:
    """Every folder of the held TOP holding a chain: TOP itself (CHAIN_FOLDER, when it has
    metadata), then its months, by name.

    A folder holds either one or the other since backups refuse to mix them
    (:func:`refuse_mixed`); one that an older release let mix shows both.
    """
    for name in _month_links(top) if warn else []:
        log.warning("%s is a symlink: its chains are neither listed, counted nor pruned",
                    top.path / name)
    own = [CHAIN_FOLDER] if top.entry(METADATA_NAME) is not None else []
    return own + month_names(top)


def refuse_mixed(top: Folder, monthly: bool, plain_chain: bool) -> None:
    """A --monthly run into a folder with a plain chain, or a plain run into a --monthly base.

    TOP: the held --target.  PLAIN_CHAIN: it holds a chain of its own (ours
    or upstream's).  Mixed, the two kinds would hide each other from
    restores of that folder.
    """
    base = top.path
    if monthly and plain_chain:
        raise UsageError(f"{base} holds a backup chain of its own: --monthly chains go into "
                         "their own folder (choose another --target, or drop --monthly)")
    months = [] if monthly or plain_chain else month_names(top)
    if months:
        raise UsageError(f"{base} holds --monthly chains ({', '.join(months)}): "
                         "add --monthly to continue them, or choose another --target")


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


def is_empty_dir(top: Folder) -> bool:
    """True when TOP holds nothing but (maybe) its lock file and empty disk folders.

    An empty folder is what a run killed while undoing its first full may
    leave; it holds no backup, so it must not block the next full.  Read
    through the folder's descriptor; a symlinked disk folder counts as content.
    """
    for name in top.names():
        info = top.entry(name)
        if name == LOCK_NAME or info is None:
            continue
        if not stat.S_ISDIR(info.st_mode):
            return False
        with top.sub(name) as folder:
            if folder.names():
                return False
    return True


def latest_backup_time(top: Folder) -> int:
    """The newest time in any backup file name in or below TOP (chains and copies alike)."""
    names = names_in_and_below(top)
    times = [parsed.timestamp for name in names
             if (parsed := parse_backup_name(posixpath.basename(name).removesuffix(PARTIAL_SUFFIX)))]
    return max(times, default=0)


def existing_names(top: Folder) -> set[str]:
    """Every name in TOP and its disk folders, relative to TOP: names a new file must avoid."""
    return set(names_in_and_below(top))


def partial_files(top: Folder) -> list[str]:
    """Leftover .partial files in TOP (--no-subdir) and its real disk folders, relative to TOP."""
    return [name for name in names_in_and_below(top) if name.endswith(PARTIAL_SUFFIX)]


def stale_temp_files(top: Folder) -> list[str]:
    """Half-written metadata or intent files of a run killed inside :func:`write_atomically`."""
    return [name for name in names_in_and_below(top)
            if name.endswith(TEMP_SUFFIX) and (
                posixpath.basename(name).startswith(f".{DISK_METADATA_NAME}.") if "/" in name
                else name.startswith((f".{METADATA_NAME}.", f".{INTENT_NAME}.")))]


def names_in_and_below(top: Folder) -> list[str]:
    """Names in TOP and, as ``<folder>/<name>``, in its real sub-folders.

    Every sub-folder is opened relative to TOP's descriptor without following
    symlinks (:meth:`Folder.sub`): a symlinked folder is skipped here and
    refused wherever a name below it is to be used.
    """
    names = top.names()
    for sub in top.subfolder_names():
        with top.sub(sub) as folder:
            names += [f"{sub}/{name}" for name in folder.names()]
    return names
