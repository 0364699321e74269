"""Filesystem primitives that make a write survive a crash or power cut."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from libqmpbackup.store.handles import TEMP_SUFFIX, Folder

__all__ = ["TEMP_SUFFIX", "fsync_dir", "make_private_dirs", "replace_symlink", "write_atomically"]


def write_atomically(path: Path, text: str,
                     before_replace: Optional[Callable[[], None]] = None,
                     mode: Optional[int] = None) -> None:
    """Replace PATH with TEXT atomically, in the folder PATH's parent names (the caller's path).

    Folder content is written with :meth:`Folder.write_atomically` on a
    folder the caller holds; this is for paths the admin gave.  MODE: the
    new file's permissions instead of 0600.
    """
    with Folder.open_root(path.parent) as folder:
        folder.write_atomically(path.name, text, before_replace, mode=0o600 if mode is None else mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dirs(path: Path) -> list[Path]:
    """Create PATH and every missing parent with mode 0700; return those created, outermost first.

    ``mkdir(parents=True)`` gives the parents the umask's mode (0755), so a
    backup or restore below a new path would be listable by everyone.
    """
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)][::-1]
    created = []
    for folder in missing:
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(folder, 0o700)   # mkdir's mode is masked by the umask
        created.append(folder)
    return created


def replace_symlink(path: Path, target_name: str) -> None:
    """Point symlink PATH at TARGET_NAME in one step (a temporary link renamed over it)."""
    temporary = path.with_name(f".{path.name}{TEMP_SUFFIX}")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    os.symlink(target_name, temporary)
    os.replace(temporary, path)
    fsync_dir(path.parent)
