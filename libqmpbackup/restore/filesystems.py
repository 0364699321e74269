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

TOOLS = ("losetup", "partx", "blkid", "mount", "umount")
SECTOR = 512
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


def partitions(loop: str) -> list[tuple[str, int, int]]:
    """(label ``p<N>``, start, size in bytes) of each partition on LOOP; empty without a table.

    Read with ``partx`` rather than from the kernel's partition devices:
    where partition scanning is unavailable (some containers) the table is
    still read, and each partition gets a loop device of its own.
    """
    result = _run(["partx", "-g", "-o", "NR,START,SECTORS", loop])
    found = []
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        fields = line.split()
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            found.append((f"p{fields[0]}", int(fields[1]) * SECTOR, int(fields[2]) * SECTOR))
    return found


def _partition_device(record: MountRecord, disk: ExposedDisk, loop: str, label: str,
                      start: int, size: int, save: Save) -> str:
    """The kernel's LOOPpN when it scanned the table, else a loop device on just that range."""
    name = f"{os.path.basename(loop)}{label}"
    if Path("/sys/block", os.path.basename(loop), name).exists():
        _wait_for(f"/dev/{name}")
        return f"/dev/{name}"
    return _loop(record, disk, save, "-o", str(start), "--sizelimit", str(size))


def _loop(record: MountRecord, disk: ExposedDisk, save: Save, *options: str) -> str:
    """A new read-only loop device on the exposed file, recorded before anything else happens."""
    result = _run(["losetup", "-r", "-f", "--show", *options, disk.file])
    if result.returncode != 0:
        raise MountError(f"losetup of {disk.file} failed: {_said(result)}")
    device = result.stdout.strip()
    disk.loops.append(device)
    save(record)
    return device


def _wait_for(device: str) -> None:
    """devtmpfs makes the node of a scanned partition a moment after the scan."""
    deadline = time.monotonic() + DEVICE_WAIT
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(0.01)


def fstype(device: str) -> Optional[str]:
    result = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
    return result.stdout.strip() or None if result.returncode == 0 else None


def attach(record: MountRecord, save: Save) -> None:
    for disk in record.disks:
        loop = _loop(record, disk, save, "-P")
        base = _make_dir(record, os.path.join(record.mountpoint, safe_component(disk.disk)))
        found = partitions(loop)
        if not found:   # a filesystem on the whole disk
            _mount_one(record, disk, os.path.join(base, "disk"), loop, save)
        for label, start, size in found:
            device = _partition_device(record, disk, loop, label, start, size, save)
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


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted(path: str) -> bool:
    """PATH is a mount point, by /proc/self/mountinfo: asking the file itself may fail or
    answer from a cache when its FUSE daemon is dead (``Transport endpoint is not connected``)."""
    try:
        with open("/proc/self/mountinfo") as info:
            return any(_unescape(line.split()[4]) == path for line in info)
    except (OSError, IndexError):
        return os.path.ismount(path)


def unmount(path: str, lazy: bool = False) -> list[str]:
    """LAZY: a FUSE file whose daemon died; a user's FUSE mount goes through fusermount3."""
    if lazy and os.geteuid() != 0 and shutil.which("fusermount3"):
        result = _run(["fusermount3", "-u", "-z", path])
    else:
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
            if entry.get("mounted") and mounted(entry["path"]):
                problems += unmount(entry["path"])
        if problems:
            continue
        for loop in reversed(disk.loops):
            if _backing_file(loop) == disk.file:   # never a loop device reused since
                result = _run(["losetup", "-d", loop])
                if result.returncode != 0:
                    problems.append(f"cannot detach {loop}: {_said(result)}")
                    continue
            disk.loops.remove(loop)
            save(record)
    return problems
