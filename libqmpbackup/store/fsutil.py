"""Filesystem primitives that make a write survive a crash or power cut."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

TEMP_SUFFIX = ".tmp"


def write_atomically(path: Path, text: str,
                     before_replace: Optional[Callable[[], None]] = None,
                     mode: Optional[int] = None) -> None:
    """Replace PATH with TEXT so that readers see the old or the new file, never a mix.

    BEFORE_REPLACE runs when the new text is safely on disk but not yet in
    place (the tests stop a run there, to prove a kill at that instant).
    MODE: the new file's permissions instead of mkstemp's 0600.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace()
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
