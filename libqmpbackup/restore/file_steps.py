"""File steps of a restore that honour --dry-run and survive a crash.

Renames and links replace their target atomically and are followed by a
directory fsync, so after a power cut a step has happened or not, never
half.  In a dry run each step is printed as a ``#`` comment between the
qemu-img command lines instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from libqmpbackup.errors import TargetError
from libqmpbackup.store import folder_safety
from libqmpbackup.store.fsutil import fsync_dir

log = logging.getLogger(__name__)


def _announce(text: str, dry_run: bool) -> bool:
    if dry_run:
        print(f"# {text}")
    else:
        log.debug("%s", text)
    return dry_run


def rename(folder: Path, old: str, new: str, *, dry_run: bool = False) -> None:
    """Rename OLD to NEW inside FOLDER (plain names, regular files: see folder_safety)."""
    if _announce(f"rename {folder / old} -> {folder / new}", dry_run):
        return
    folder_safety.rename(folder, old, new)


def remove(folder: Path, name: str, *, dry_run: bool = False) -> None:
    if _announce(f"remove {folder / name}", dry_run):
        return
    folder_safety.remove(folder, name)


def link(folder: Path, name: str, target_name: str, *, dry_run: bool = False) -> None:
    """Point symlink FOLDER/NAME at TARGET_NAME (relative, so the folder can move)."""
    existing = folder_safety.entry(folder, name)
    if existing is not None and not stat.S_ISLNK(existing.st_mode):
        raise TargetError(f"{folder / name} exists and is not a symlink: move it away")
    if _announce(f"link {folder / name} -> {target_name}", dry_run):
        return
    folder_safety.plain_name(target_name, "link target")
    temporary = f".{name}.tmp"
    with folder_safety.opened_folder(folder) as fd:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary, dir_fd=fd)
            os.symlink(target_name, temporary, dir_fd=fd)
            os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as err:
            raise TargetError(f"cannot create symlink {folder / name}: {err.strerror}") from err
    fsync_dir(folder)


def note(text: str, *, dry_run: bool = False) -> None:
    """A step that is not a file operation (metadata update), shown in dry runs."""
    _announce(text, dry_run)
