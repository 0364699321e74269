"""``mount --filesystems``: the exposed raw disks on read-only loop devices, their filesystems mounted.

Each ``MOUNTPOINT/<disk id>.raw`` goes onto a loop device (``losetup -r -P``:
read-only, partitions scanned); every partition with a filesystem ``blkid``
recognises is mounted read-only at ``MOUNTPOINT/<disk id>/p<N>/``, a disk
without partition table (a filesystem on the whole disk) at
``MOUNTPOINT/<disk id>/disk/``.  Journals are never replayed: a point of a
running guest is a crash-consistent image, and replaying would need a
write (ext3/ext4 ``ro,noload``, xfs ``ro,norecovery``, others ``ro``).  A
filesystem that cannot be mounted is reported, not fatal.  Everything made
here is written into the mount record first, so ``umount`` undoes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from libqmpbackup.errors import MountError, UsageError
from libqmpbackup.store.mounts import ExposedDisk, MountRecord
from libqmpbackup.store.names import safe_component

TOOLS = ("losetup", "blkid", "mount", "umount")
OPTIONS = {"ext3": "ro,noload", "ext4": "ro,noload", "xfs": "ro,norecovery"}
DEVICE_WAIT = 2.0

Save = Callable[[MountRecord], None]


def require_tools() -> None:
    if os.geteuid() != 0:
        raise UsageError("--filesystems needs root (loop devices and mount)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise MountError(f"--filesystems needs {', '.join(missing)} (Debian: util-linux, mount)")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def _said(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}"
            ).splitlines()[-1]


def partitions(loop: str) -> list[tuple[str, str]]:
    """(partition label ``p<N>``, device) of LOOP, by number; empty for a disk without table."""
    name = os.path.basename(loop)
    found = []
    for entry in Path("/sys/block", name).glob(f"{name}p*"):
        match = re.fullmatch(rf"{re.escape(name)}p(\d+)", entry.name)
        if match:
            found.append((int(match.group(1)), f"p{match.group(1)}", f"/dev/{entry.name}"))
    return [(label, device) for _, label, device in sorted(found)]


def _wait_for(device: str) -> None:
    deadline = time.monotonic() + DEVICE_WAIT
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(0.01)


def fstype(device: str) -> Optional[str]:
    result = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
    return result.stdout.strip() or None if result.returncode == 0 else None


def attach(record: MountRecord, save: Save) -> None:
    for disk in record.disks:
        result = _run(["losetup", "-r", "-P", "-f", "--show", disk.file])
        if result.returncode != 0:
            raise MountError(f"losetup of {disk.file} failed: {_said(result)}")
        disk.loop = result.stdout.strip()
        save(record)
        base = _make_dir(record, os.path.join(record.mountpoint, safe_component(disk.disk)))
        found = partitions(disk.loop) or [("disk", disk.loop)]
        for label, device in found:
            _wait_for(device)
            _mount_one(record, disk, os.path.join(base, label), device, save)


def _make_dir(record: MountRecord, path: str) -> str:
    os.mkdir(path, 0o700)
    record.created.append(path)
    return path


def _mount_one(record: MountRecord, disk: ExposedDisk, path: str, device: str,
               save: Save) -> None:
    kind = fstype(device)
    entry = {"partition": os.path.basename(path), "device": device, "path": path,
             "type": kind or ""}
    disk.filesystems.append(entry)
    if kind is None:
        entry["error"] = "no filesystem found"
        return
    if kind == "swap":
        entry["error"] = "swap space"
        return
    _make_dir(record, path)
    save(record)
    result = _run(["mount", "-t", kind, "-o", OPTIONS.get(kind, "ro"), device, path])
    if result.returncode != 0:
        entry["error"] = _said(result)
    else:
        entry["mounted"] = "yes"
    save(record)


def unmount(path: str, lazy: bool = False) -> list[str]:
    result = _run(["umount", *(["-l"] if lazy else []), path])
    return [] if result.returncode == 0 else [f"cannot unmount {path}: {_said(result)}"]


def _backing_file(loop: str) -> str:
    try:
        return Path("/sys/block", os.path.basename(loop), "loop/backing_file").read_text().strip()
    except OSError:
        return ""


def detach(record: MountRecord, save: Save) -> list[str]:
    """Unmount the filesystems, free the loop devices; what could not be undone, as problems."""
    problems: list[str] = []
    for disk in record.disks:
        for entry in disk.filesystems:
            if entry.get("mounted") and os.path.ismount(entry["path"]):
                problems += unmount(entry["path"])
        if problems or disk.loop is None:
            continue
        if _backing_file(disk.loop) == disk.file:   # never a loop device reused since
            result = _run(["losetup", "-d", disk.loop])
            if result.returncode != 0:
                problems.append(f"cannot detach {disk.loop}: {_said(result)}")
                continue
        disk.loop = None
        save(record)
    return problems
