"""``qmprestore mount`` / ``umount`` on real QEMU: a point's raw view, served by qemu-storage-daemon.

One VM (no guest OS: QEMU writes the patterns) makes a FULL and two INCs of
two disks; every point is mounted and its raw files compared with the disk
as it was at that point and with ``qemu-img convert`` of a ``merge``.
Every test ends with nothing left: no daemon, no FUSE mount, no record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.store import mounts
from tests.test_restore import digests, run_backup
from tests.vm import MiB, Disk, TestVM, identical

WRITES = [[("virtio0", 0x11, 0, 4 * MiB), ("data1", 0x12, 0, 1 * MiB)],
          [("virtio0", 0x21, 2 * MiB, 128 * 1024), ("data1", 0x22, 64 * 1024, 8192)],
          [("virtio0", 0x31, 6 * MiB, 1 * MiB)]]


@dataclass
class Backup:
    root: Path
    vm: TestVM
    refs: dict[tuple[str, int], Path] = field(default_factory=dict)

    def files(self, disk: str) -> list[str]:
        meta = json.loads((self.root / "qmpbackup.json").read_text())
        return [r["file"] for r in meta["chains"][-1]["disks"][disk]["backups"]]


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backup]:
    base = tmp_path_factory.mktemp("mount")
    disks = [Disk("virtio0", "virtio", "qcow2", 16 * MiB), Disk("data1", "blockdev", "qcow2",
                                                               8 * MiB)]
    with TestVM(base / "vm", disks) as vm:
        built = Backup(base / "backup", vm)
        for point, writes in enumerate(WRITES):
            for disk, pattern, offset, length in writes:
                vm.write(disk, pattern, offset, length)
            for disk in ("virtio0", "data1"):
                built.refs[(disk, point)] = vm.reference(disk, base / f"{disk}-{point}.raw")
            run_backup(vm, built.root, "full" if point == 0 else "inc")
        yield built


def leftovers(mountpoint: Path) -> list[str]:
    """What a finished mount may not leave: records, daemons, mounts, files."""
    found = [f"record {r.mountpoint}" for r in mounts.records()]
    found += [f"daemon {pid}" for pid in daemons()]
    with open("/proc/self/mountinfo") as info:
        found += [line for line in info if str(mountpoint) in line]
    if mountpoint.exists():
        found += [str(p) for p in mountpoint.iterdir()]
    return found


def daemons() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"qemu-storage-daemon") and b"fuse" in cmdline \
                    and mounts.process_start(int(entry.name)) is not None:
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    for record in mounts.records():   # a failed test still leaves nothing running
        subprocess.run([sys.executable, "-m", "qmprestore", "umount", record.mountpoint],
                       capture_output=True, check=False)
    for pid in daemons():
        os.kill(pid, signal.SIGKILL)
    assert leftovers(path) == []


def test_every_point_reads_as_the_disk_was_and_the_folder_is_untouched(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    before = digests(backup.root)
    for point in range(len(WRITES)):
        until = backup.files("virtio0")[point]
        shown = json.loads(cli("qmprestore", "mount", "--dir", backup.root, "--until", until,
                               "--json", mountpoint).ok().out)
        assert {d["disk"] for d in shown["disks"]} == {"virtio0", "data1"}
        assert mounts.process_start(shown["daemon_pid"]) is not None
        for disk in ("virtio0", "data1"):
            exposed = mountpoint / f"{disk}.raw"
            assert exposed.read_bytes() == backup.refs[(disk, point)].read_bytes(), (disk, point)
        cli("qmprestore", "umount", mountpoint).ok()
        assert leftovers(mountpoint) == []
    assert digests(backup.root) == before


def test_raw_view_equals_a_merge_and_one_disk_folder_gives_one_file(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    until = backup.files("data1")[1]
    cli("qmprestore", "merge", "--dir", backup.root / "data1", "--until", until,
        "--targetfile", tmp_path / "m.qcow2").ok()
    cli("qmprestore", "mount", "--dir", backup.root / "data1", "--until", until,
        mountpoint).ok()
    assert sorted(p.name for p in mountpoint.iterdir()) == ["data1.raw"]
    subprocess.run(["qemu-img", "convert", "-O", "raw", tmp_path / "m.qcow2",
                    tmp_path / "m.raw"], check=True)
    assert (mountpoint / "data1.raw").read_bytes() == (tmp_path / "m.raw").read_bytes()
    assert identical(mountpoint / "data1.raw", backup.refs[("data1", 1)])
    cli("qmprestore", "umount", mountpoint).ok()
