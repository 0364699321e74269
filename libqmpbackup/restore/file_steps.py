"""File steps of a restore that honour --dry-run and survive a crash.

Every step works in a disk folder the command holds open (a
:class:`~libqmpbackup.store.handles.Folder`), relative to its descriptor:
renames and links replace their target atomically and are followed by a
directory fsync, so after a power cut a step has happened or not, never
half.  In a dry run each step is printed as a ``#`` comment between the
qemu-img command lines instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

from libqmpbackup.errors import TargetError
from libqmpbackup.store.handles import Folder, plain_name

log = logging.getLogger(__name__)


def _announce(text: str, dry_run: bool) -> bool:
    if dry_run:
        print(f"# {text}")
    else:
        log.debug("%s", text)
    return dry_run


def rename(folder: Folder, old: str, new: str, *, dry_run: bool = False) -> None:
    """Rename OLD to NEW inside FOLDER (plain names, regular files: see :meth:`Folder.rename`)."""
    if _announce(f"rename {folder.path / old} -> {folder.path / new}", dry_run):
        return
    folder.rename(old, new)


def remove(folder: Folder, name: str, *, dry_run: bool = False) -> None:
    if _announce(f"remove {folder.path / name}", dry_run):
        return
    folder.remove(name)


def link(folder: Folder, name: str, target_name: str, *, dry_run: bool = False) -> None:
    """Point symlink FOLDER/NAME at TARGET_NAME (relative, so the folder can move)."""
    existing = folder.entry(name)
    if existing is not None and not stat.S_ISLNK(existing.st_mode):
        raise TargetError(f"{folder.path / name} exists and is not a symlink: move it away")
    if _announce(f"link {folder.path / name} -> {target_name}", dry_run):
        return
    plain_name(target_name, "link target")
    temporary = f".{name}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=folder.fd)
        os.symlink(target_name, temporary, dir_fd=folder.fd)
        os.rename(temporary, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    except OSError as err:
        raise TargetError(f"cannot create symlink {folder.path / name}: {err.strerror}") from err
    folder.fsync()


def note(text: str, *, dry_run: bool = False) -> None:
    """A step that is not a file operation (metadata update), shown in dry runs."""
    _announce(text, dry_run)
