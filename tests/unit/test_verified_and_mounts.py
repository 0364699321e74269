"""Remembered verification and the mount record, on plain files (no QEMU)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from libqmpbackup.errors import LockBusyError, UsageError
from libqmpbackup.restore.mount import daemon_argv
from libqmpbackup.runner import duration
from libqmpbackup.store import mounts, verified
from libqmpbackup.store.mounts import ExposedDisk, MountRecord
from libqmpbackup.store.statedirs import cache_dir
from libqmpbackup.store.verified import Verified


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMPBACKUP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QMPBACKUP_RUNTIME_DIR", str(tmp_path / "run"))


def backup_file(tmp_path: Path, content: bytes = b"x" * 4096) -> tuple[Path, int]:
    path = tmp_path / "FULL-1.qcow2"
    path.write_bytes(content)
    return path, os.open(path, os.O_RDONLY)


def test_a_remembered_file_is_fresh_until_it_changes_or_ages(tmp_path: Path) -> None:
    path, fd = backup_file(tmp_path)
    Verified().remember([(fd, "sha256:aa")])
    record = Verified()              # a later command reads it back
    assert record.fresh(fd, "sha256:aa", 3600)
    assert not record.fresh(fd, "sha256:bb", 3600), "another digest recorded since"
    assert not record.fresh(fd, "sha256:aa", 0), "0 disables"
    assert not record.fresh(fd, None, 3600), "nothing recorded, nothing remembered"
    time.sleep(0.01)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))   # ctime moves
    assert not Verified().fresh(fd, "sha256:aa", 3600), "a changed ctime is a changed file"
    os.close(fd)


def test_a_rewritten_file_with_its_times_set_back_is_not_fresh(tmp_path: Path) -> None:
    path, fd = backup_file(tmp_path)
    Verified().remember([(fd, "sha256:aa")])
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(b"y")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not Verified().fresh(fd, "sha256:aa", 3600)
    os.close(fd)


def test_age_and_a_new_inode_end_freshness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, fd = backup_file(tmp_path)
    Verified().remember([(fd, "sha256:aa")])
    later = time.time() + 7200
    monkeypatch.setattr(verified.time, "time", lambda: later)
    assert not Verified().fresh(fd, "sha256:aa", 3600)
    assert Verified().fresh(fd, "sha256:aa", 3 * 3600)
    monkeypatch.undo()
    copy = tmp_path / "copy"
    copy.write_bytes(path.read_bytes())
    with open(copy, "rb") as other:
        assert not Verified().fresh(other.fileno(), "sha256:aa", 3600)
    os.close(fd)


def test_the_record_lives_in_a_private_folder_and_merges_writers(tmp_path: Path) -> None:
    _, fd1 = backup_file(tmp_path)
    second = tmp_path / "INC-2.qcow2"
    second.write_bytes(b"z")
    Verified().remember([(fd1, "sha256:aa")])
    stale = Verified()   # read before the second writer
    verified.remember_written([(second, "sha256:bb")])
    stale.remember([(fd1, "sha256:aa")])
    assert len(json.loads((cache_dir() / "verified.json").read_text())) == 2
    assert cache_dir().stat().st_mode & 0o777 == 0o700
    assert Verified().fresh(second, "sha256:bb", 60)
    os.close(fd1)


def test_an_unusable_or_garbled_record_only_costs_hashing(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, fd = backup_file(tmp_path)
    (tmp_path / "cache").mkdir(mode=0o700)
    (tmp_path / "cache" / "verified.json").write_text("{not json")
    assert not Verified().fresh(fd, "sha256:aa", 3600)
    Verified().remember([(fd, "sha256:aa")])          # rewritten whole
    assert Verified().fresh(fd, "sha256:aa", 3600)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    monkeypatch.setenv("QMPBACKUP_CACHE_DIR", str(open_dir))
    with pytest.raises(UsageError):
        cache_dir()
    record = Verified()            # others may write there: nothing is believed or written
    assert record.path is None and not record.fresh(fd, "sha256:aa", 3600)
    record.remember([(fd, "sha256:aa")])
    assert list(open_dir.iterdir()) == []
    os.close(fd)


def test_durations() -> None:
    assert [duration(t) for t in ("0", "90", "90m", "24h", "2d", "1.5h")] == [
        0, 90, 5400, 86400, 172800, 5400]
    for bad in ("-1", "h", "1w", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration(bad)


def test_the_daemon_gets_every_layer_by_descriptor_and_no_header_backing() -> None:
    argv = daemon_argv([(["/dev/fd/5", "/dev/fd/6"], "/mnt/virtio0.raw"),
                        (["/dev/fd/7"], "/mnt/data,1.raw")])
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--blockdev"]
    exports = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "--export"]
    assert [b.get("filename") for b in blockdevs if b["driver"] == "file"] == [
        "/dev/fd/5", "/dev/fd/6", "/dev/fd/7"]
    assert all(b["read-only"] for b in blockdevs)
    assert [b["backing"] for b in blockdevs if b["driver"] == "qcow2"] == [None, "d0l0", None]
    assert exports == [
        {"type": "fuse", "id": "d0e", "node-name": "d0l1", "mountpoint": "/mnt/virtio0.raw",
         "writable": False},
        {"type": "fuse", "id": "d1e", "node-name": "d1l0", "mountpoint": "/mnt/data,1.raw",
         "writable": False}]


def test_a_mount_is_active_while_its_daemon_lives(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = MountRecord(mountpoint=str(tmp_path / "mnt"), root=str(tmp_path / "backup"),
                             pid=sleeper.pid, start=mounts.process_start(sleeper.pid) or "",
                             disks=[ExposedDisk("virtio0", "f", "chain-a", "FULL-1", "d")])
        mounts.save(record)
        assert mounts.load(record.mountpoint) == record
        assert mounts.active_on(tmp_path / "backup") == [record]
        assert mounts.active_on(tmp_path / "backup", ["chain-b"]) == []
        with pytest.raises(LockBusyError, match="mnt"):
            mounts.refuse_if_mounted(tmp_path / "backup", "commit")
        mounts.refuse_if_mounted(tmp_path / "other", "commit")
        mounts.save(MountRecord(**{**record.__dict__, "start": "1"}))   # a reused pid
        assert mounts.active_on(tmp_path / "backup") == []
        mounts.save(record)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert mounts.active_on(tmp_path / "backup") == []   # died: umount cleans, nothing refuses
    assert [r.mountpoint for r in mounts.records()] == [record.mountpoint]
    assert mounts.runtime_dir().stat().st_mode & 0o777 == 0o700


def test_an_unusable_runtime_folder_blocks_no_prune_or_list(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("QMPBACKUP_RUNTIME_DIR", str(shared))
    with pytest.raises(UsageError):
        mounts.mounts_dir()          # mount itself refuses to keep state there
    assert list(mounts.records()) == []
    mounts.refuse_if_mounted(tmp_path, "prune")
