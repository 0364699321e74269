"""File steps of a restore that honour --dry-run and survive a crash.

Renames and links replace their target atomically and are followed by a
directory fsync, so after a power cut a step has happened or not, never
half.  In a dry run each step is printed as a ``#`` comment between the
qemu-img command lines instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from libqmpbackup.errors import TargetError
from libqmpbackup.fsutil import fsync_dir, replace_symlink

log = logging.getLogger(__name__)


def _announce(text: str, dry_run: bool) -> bool:
    if dry_run:
        print(f"# {text}")
    else:
        log.debug("%s", text)
    return dry_run


def rename(source: Path, target: Path, *, dry_run: bool = False) -> None:
    if _announce(f"rename {source} -> {target}", dry_run):
        return
    try:
        os.replace(source, target)
    except OSError as err:
        raise TargetError(f"cannot rename {source} to {target}: {err.strerror}") from err
    fsync_dir(target.parent)


def remove(path: Path, *, dry_run: bool = False) -> None:
    if _announce(f"remove {path}", dry_run):
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise TargetError(f"cannot remove {path}: {err.strerror}") from err


def link(path: Path, target_name: str, *, dry_run: bool = False) -> None:
    """Point symlink PATH at TARGET_NAME (relative, so the folder can move)."""
    if path.exists() and not path.is_symlink():
        raise TargetError(f"{path} exists and is not a symlink: move it away")
    if _announce(f"link {path} -> {target_name}", dry_run):
        return
    try:
        replace_symlink(path, target_name)
    except OSError as err:
        raise TargetError(f"cannot create symlink {path}: {err.strerror}") from err


def note(text: str, *, dry_run: bool = False) -> None:
    """A step that is not a file operation (metadata update), shown in dry runs."""
    _announce(text, dry_run)
