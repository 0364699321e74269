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
from tests.helpers import digests, leftovers, partitioned_disk, run_backup
from tests.vm import Disk, MiB, TestVM, identical

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


def chain_ids(root: Path) -> list[str]:
    return [c["uuid"] for c in json.loads((root / "qmpbackup.json").read_text())["chains"]]


def test_changing_commands_refuse_a_mounted_chain_reading_ones_go_on(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", backup.root, copy], check=True)
    first = chain_ids(copy)[0]
    bitmap = json.loads((copy / "qmpbackup.json").read_text())["chains"][0]["bitmap"]
    for node, bitmaps in backup.vm.bitmaps().items():   # the chain loses its bitmap: auto
        if any(b["name"] == bitmap for b in bitmaps):    # starts a second one
            backup.vm.cmd("block-dirty-bitmap-remove", node=node, name=bitmap)
    run_backup(backup.vm, copy, "auto")           # prune --keep 1 deletes the first chain now
    cli("qmprestore", "mount", "--dir", copy, "--uuid", first, mountpoint).ok()
    before = digests(copy)
    for command in ("rebase", "commit", "snapshotrebase"):
        cli("qmprestore", command, "--dir", copy / "virtio0", "--uuid", first).failed(
            4, str(mountpoint), "qmprestore umount")
    cli("qmpbackup", "prune", "--target", copy, "--keep", "1").failed(4, str(mountpoint))
    assert digests(copy) == before
    listed = cli("qmprestore", "list", "--dir", copy).ok().out
    assert f"mounted at {mountpoint}" in listed
    document = json.loads(cli("qmprestore", "list", "--dir", copy, "--json").ok().out)
    assert [m["mountpoint"] for m in document["mounts"]] == [str(mountpoint)]
    cli("qmprestore", "verify", "--dir", copy).ok()
    cli("qmprestore", "merge", "--dir", copy / "data1", "--uuid", first,
        "--targetfile", tmp_path / "out.qcow2").ok()
    run_backup(backup.vm, copy, "inc")           # backups only add files
    cli("qmprestore", "umount", mountpoint).ok()
    assert "mounted at" not in cli("qmprestore", "list", "--dir", copy).ok().out
    cli("qmpbackup", "prune", "--target", copy, "--keep", "1").ok()
    assert chain_ids(copy) != [first] and first not in chain_ids(copy)


def test_bad_input_is_one_line_and_leaves_nothing(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cli("qmprestore", "mount", "--dir", backup.root, tmp_path / "missing").failed(
        5, "not an existing folder")
    (mountpoint / "x").write_text("")
    cli("qmprestore", "mount", "--dir", backup.root, mountpoint).failed(5, "not empty")
    (mountpoint / "x").unlink()
    cli("qmprestore", "mount", "--dir", backup.root, "--until", "INC-1", mountpoint).failed(
        2, "no such restore point")
    cli("qmprestore", "umount", mountpoint).failed(2, "not mounted by qmprestore")
    inside = backup.root / "data1" / "mnt"
    inside.mkdir()
    try:
        cli("qmprestore", "mount", "--dir", backup.root, inside).failed(5, "inside the backup")
    finally:
        inside.rmdir()
    cli("qmprestore", "mount", "--dir", backup.root, mountpoint).ok()
    cli("qmprestore", "mount", "--dir", backup.root, mountpoint).failed(4, "already mounted")
    cli("qmprestore", "umount", mountpoint).ok()
    with monkeypatch.context() as patched:
        patched.setenv("PATH", str(tmp_path))
        cli("qmprestore", "mount", "--dir", backup.root, mountpoint).failed(
            15, "qemu-storage-daemon is not installed")
    with monkeypatch.context() as patched:
        patched.setattr("libqmpbackup.restore.mount.FUSE_DEVICE", tmp_path / "fuse")
        cli("qmprestore", "mount", "--dir", backup.root, mountpoint).failed(15, "is missing")
    with monkeypatch.context() as patched:
        patched.setattr(os, "geteuid", lambda: 1000)
        cli("qmprestore", "mount", "--dir", backup.root, "--filesystems", mountpoint).failed(
            2, "--filesystems needs root")
    assert leftovers(mountpoint) == []


def damaged_copy(backup: Backup, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", backup.root, copy], check=True)
    last = copy / "data1" / backup.files("data1")[1]
    with open(last, "r+b") as handle:    # data, not the header: only the checksum sees it
        handle.seek(os.path.getsize(last) - 4096)
        handle.write(b"\xff" * 16)
    return copy, backup.files("data1")[1]


def test_check_first_refuses_a_damaged_chain_before_anything_is_mounted(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    copy, point = damaged_copy(backup, tmp_path)
    cli("qmprestore", "mount", "--dir", copy, "--until", point, "--check-first",
        mountpoint).failed(11, "checksum mismatch")
    assert leftovers(mountpoint) == []


def test_damage_found_while_mounted_ends_the_mount_loudly(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    copy, point = damaged_copy(backup, tmp_path)
    shown = json.loads(cli("qmprestore", "mount", "--dir", copy, "--until", point, "--json",
                           mountpoint).ok().out)
    wait_for(lambda: mounts.process_start(shown["daemon_pid"]) is None)
    with pytest.raises(OSError):
        (mountpoint / "data1.raw").read_bytes()
    assert "ENDED, DAMAGED" in cli("qmprestore", "list", "--dir", copy).ok().out
    cli("qmprestore", "umount", mountpoint).failed(11, "checksum mismatch", point)
    assert leftovers(mountpoint) == []


def test_files_hashed_while_mounted_are_remembered(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", backup.root, copy], check=True)     # new inodes: not remembered
    err = cli("qmprestore", "mount", "--dir", copy / "data1", mountpoint).ok().err
    assert "hashing them while mounted" in err
    wait_for(lambda: not any(mounts.checking(r) for r in mounts.records()))
    assert mounts.alive(mounts.load(str(mountpoint)))
    cli("qmprestore", "umount", mountpoint).ok()
    err = cli("qmprestore", "mount", "--dir", copy / "data1", mountpoint).ok().err
    assert "not hashed again" in err and "while mounted" not in err
    cli("qmprestore", "umount", mountpoint).ok()


def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def foreground(backup: Backup, mountpoint: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "qmprestore", "mount", "--dir", backup.root,
                             "--foreground", mountpoint], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("daemon pid"):
            return proc, int(line.split()[2].rstrip(";"))
    raise AssertionError(f"foreground mount ended: {proc.wait()}")


def test_foreground_ends_on_sigterm_and_a_sigkill_leaves_what_umount_cleans(
        cli, backup: Backup, mountpoint: Path) -> None:
    proc, _ = foreground(backup, mountpoint)
    assert (mountpoint / "virtio0.raw").stat().st_size == 16 * MiB
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert leftovers(mountpoint) == []
    proc, daemon = foreground(backup, mountpoint)
    proc.kill()
    proc.wait()
    wait_for(lambda: mounts.process_start(daemon) is None)   # it died with the tool
    cli("qmprestore", "umount", mountpoint).ok()
    assert leftovers(mountpoint) == []


def test_umount_cleans_up_after_a_daemon_that_died(cli, backup: Backup, mountpoint: Path) -> None:
    shown = json.loads(cli("qmprestore", "mount", "--dir", backup.root, "--json",
                           mountpoint).ok().out)
    os.kill(shown["daemon_pid"], signal.SIGKILL)
    wait_for(lambda: mounts.process_start(shown["daemon_pid"]) is None)
    assert "the daemon died, run qmprestore umount" in cli("qmprestore", "list", "--dir",
                                                       backup.root).ok().out
    cli("qmprestore", "umount", mountpoint).ok()
    assert leftovers(mountpoint) == []


def test_filesystems_of_every_partition_and_what_is_not_mounted(
        cli, mountpoint: Path, tmp_path: Path) -> None:
    image = partitioned_disk(tmp_path)
    cli("qmpbackup", "--image", f"disk0={image}", "backup", "--level", "full", "--target",
        tmp_path / "backup", "--no-progress").ok()
    shown = json.loads(cli("qmprestore", "mount", "--dir", tmp_path / "backup", "--filesystems",
                           "--json", mountpoint).ok().out)
    found = {f["partition"]: (f["type"], f.get("mounted"), f.get("error"))
             for f in shown["disks"][0]["filesystems"]}
    assert found == {"p1": ("ext4", "yes", None), "p2": ("swap", None, "swap space"),
                     "p3": ("", None, "no filesystem found")}
    assert (mountpoint / "disk0" / "p1" / "hello").read_text() == "hello from p1\n"
    text = cli("qmprestore", "umount", mountpoint).ok()
    assert text.rc == 0 and leftovers(mountpoint) == []


def test_remembered_verification_skips_unchanged_files_only(
        cli, backup: Backup, mountpoint: Path, tmp_path: Path) -> None:
    skipped = "verified within 86400 s and unchanged: not hashed again"
    # the backup run remembered what it wrote: no pass over the data before the first byte
    assert skipped in cli("qmprestore", "mount", "--dir", backup.root / "data1",
                          mountpoint).ok().err
    cli("qmprestore", "umount", mountpoint).ok()
    assert "not hashed again" not in cli("qmprestore", "merge", "--dir", backup.root / "data1",
                                         "--verified-within", "0", "--targetfile",
                                         tmp_path / "a.qcow2").ok().err
    shown = json.loads(cli("qmprestore", "verify", "--dir", backup.root, "--json").ok().out)
    assert all(f["last_verified"] and f["last_verified"] > time.time() - 600
               for f in shown["files"])
    assert "never" not in cli("qmprestore", "verify", "--dir", backup.root).ok().out
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", backup.root, copy], check=True)
    first = cli("qmprestore", "merge", "--dir", copy / "data1", "--targetfile",
                tmp_path / "b.qcow2").ok().err
    assert "not hashed again" not in first           # a copy is other files
    last = copy / "data1" / backup.files("data1")[-1]
    with open(last, "r+b") as handle:                # rot after a remembered check...
        handle.seek(os.path.getsize(last) - 4096)
        handle.write(b"\xff" * 16)
    cli("qmprestore", "mount", "--dir", copy / "data1", "--check-first", mountpoint).failed(
        11, "checksum mismatch")                     # ...is a changed file: hashed and refused
    assert leftovers(mountpoint) == []


def test_umount_finds_a_daemon_whose_pid_was_never_recorded(
        cli, backup: Backup, mountpoint: Path) -> None:
    """The tool killed right after starting the daemon: the record has no pid yet."""
    cli("qmprestore", "mount", "--dir", backup.root / "data1", mountpoint).ok()
    record = mounts.load(str(mountpoint))
    assert record is not None and mounts.alive(record)
    daemon = record.pid
    record.pid, record.start = 0, ""
    mounts.save(record)
    cli("qmprestore", "umount", mountpoint).ok()
    assert mounts.process_start(daemon) is None and leftovers(mountpoint) == []
