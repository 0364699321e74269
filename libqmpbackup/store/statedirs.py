"""Private directories outside every backup folder: the state of mounts, the verification record.

Neither may live in the backup folder (a mount and a restore never write
into it, and the folder may be read-only media), and neither may live where
another user could plant files: a record of "verified" files or a mount
record someone else wrote would be believed.  So each is a 0700 directory
owned by the running user; anything else is refused.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import UsageError
from libqmpbackup.store.fsutil import make_private_dirs


def _own_private(path: Path) -> bool:
    info = path.lstat()
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def private_dir(env: str, for_root: Path, user_base_env: str, user_default: Path,
                sub: str) -> Path:
    """The directory ENV names, else FOR_ROOT (root) or $USER_BASE_ENV/SUB (others).

    Users without the base variable get USER_DEFAULT/SUB.  Created 0700 with
    its missing parents; refused (exit 2, naming ENV) when not ours alone.
    """
    explicit = os.environ.get(env)
    if explicit:
        path = Path(explicit)
    elif os.geteuid() == 0:
        path = for_root
    else:
        base: Optional[str] = os.environ.get(user_base_env)
        path = Path(base) / sub if base else user_default / sub
    try:
        make_private_dirs(path)
        if _own_private(path):
            return path
    except OSError as err:
        raise UsageError(f"cannot use {path} ({err.strerror}); set {env}") from err
    raise UsageError(f"{path} is not a directory owned by this user and writable only by it; "
                     f"set {env}")


def runtime_dir() -> Path:
    """State of running things (mounts): gone at reboot, as they are."""
    return private_dir("QMPBACKUP_RUNTIME_DIR", Path("/run/qmpbackup"), "XDG_RUNTIME_DIR",
                       Path(tempfile.gettempdir()) / f"qmpbackup-{os.geteuid()}", "qmpbackup")


def cache_dir() -> Path:
    """What may be lost any time without harm (the verification record)."""
    return private_dir("QMPBACKUP_CACHE_DIR", Path("/var/cache/qmpbackup"), "XDG_CACHE_HOME",
                       Path.home() / ".cache", "qmpbackup")
