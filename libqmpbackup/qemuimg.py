"""The single way qmpbackup runs qemu-img.

Every call goes through :func:`run`: an argv list (never a shell, so file
names with spaces or quotes are safe), stderr captured, and a failure turned
into :class:`QemuImgError` naming the command and qemu-img's own message.
Keeping one wrapper means dry-run, logging and error wording are the same
for backup and restore.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import QemuImgError

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
BACKUP_CLUSTER_SIZE = 65536


def command_line(args: Sequence[str]) -> str:
    """A copy-pasteable rendering of a qemu-img call, for logs and --dry-run."""
    return shlex.join([QEMU_IMG, *[str(a) for a in args]])


def binary() -> str:
    """Locate qemu-img up front so a missing binary is one clear error, not ENOENT later."""
    found = shutil.which(QEMU_IMG)
    if not found:
        raise QemuImgError(
            f"{QEMU_IMG} not found on PATH (install the qemu-utils package)")
    return found


def run(args: Sequence[str], *, dry_run: bool = False) -> str:
    """Run qemu-img with ARGS and return its stdout; raise with its stderr."""
    argv = [binary(), *[str(a) for a in args]]
    cmd = command_line(args)
    if dry_run:
        print(cmd)
        return ""
    log.debug("running: %s", cmd)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
    except OSError as err:
        raise QemuImgError(f"cannot run {cmd}: {err}") from err
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise QemuImgError(f"{cmd}: {message}")
    return proc.stdout


def create(path: Path, size: int, *, backing: Optional[str] = None,
           backing_format: str = "qcow2") -> None:
    """Create a qcow2 backup target of exactly SIZE bytes.

    The size must match the source disk exactly or blockdev-backup refuses
    the target; 64 KiB clusters keep incremental backups small.
    """
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o",
                       f"cluster_size={BACKUP_CLUSTER_SIZE}"]
    if backing is not None:
        args += ["-b", backing, "-F", backing_format]
    args += [str(path), str(size)]
    run(args)
    os.chmod(path, 0o600)


def info(path: Path, *, force_share: bool = False,
         backing_chain: bool = False) -> Any:
    """qemu-img info as parsed JSON (a list of images with backing_chain)."""
    args = ["info", "--output=json"]
    if force_share:
        args.append("-U")
    if backing_chain:
        args.append("--backing-chain")
    args.append(str(path))
    out = run(args)
    try:
        return json.loads(out)
    except ValueError as err:
        raise QemuImgError(f"{command_line(args)}: unparsable output") from err


def check(path: Path) -> None:
    """Fail when qemu-img check finds corruption or leaks in PATH."""
    run(["check", "-q", str(path)])
