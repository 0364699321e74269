"""Fleecing rules that need no QEMU: option checks, leftover folders, how a failure is named."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from libqmpbackup.backup import fleecing
from libqmpbackup.backup.jobs import BackupJob, backup_action, snapshot_broke
from libqmpbackup.backup.leftovers import clean_fleecing_dir
from libqmpbackup.errors import UsageError
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.store.names import fleecing_folder_pid, fleecing_folder_prefix


def disk(qdev: str = "/machine/peripheral-anon/device[0]/virtio-backend",
         read_only: bool = False) -> BlockDevice:
    return BlockDevice(disk_id="virtio0", device="virtio0", qdev=qdev, node="#block123",
                       driver="qcow2", filename="/vm/a.qcow2", virtual_size=1 << 20,
                       read_only=read_only, removable=False)


def test_folder_names_carry_the_pid() -> None:
    assert fleecing_folder_pid(fleecing_folder_prefix(4242) + "ab_c9") == 4242
    for name in ("qmpbackup-fleecing-x-ab", "qmpbackup-fleecing-12", "other-12-ab",
                 "qmpbackup-fleecing-12-a/b", "qmpbackup-fleecing-12-ab\n"):
        assert fleecing_folder_pid(name) is None, name


def test_options_are_checked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    assert fleecing.check_options(tmp_path, 45, target).folder == tmp_path.resolve()
    with pytest.raises(UsageError, match="use 1 to 3600"):
        fleecing.check_options(tmp_path, 0, target)
    with pytest.raises(UsageError, match="not a writable directory"):
        fleecing.check_options(tmp_path / "missing", 45, target)
    (target / "x").mkdir(parents=True)
    for inside in (target, target / "x"):
        with pytest.raises(UsageError, match="inside the backup target"):
            fleecing.check_options(inside, 45, target)


def test_only_writable_attached_disks_are_fleeced() -> None:
    assert fleecing.needs_fleecing(disk())
    assert not fleecing.needs_fleecing(disk(read_only=True))
    assert not fleecing.needs_fleecing(disk(qdev=""))
    assert fleecing.device_path(disk(qdev="scsi-disk0")) == "/machine/peripheral/scsi-disk0"


def test_stale_folders_of_dead_runs_go_live_ones_stay(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / (fleecing_folder_prefix(dead.pid) + "abc")
    live = tmp_path / (fleecing_folder_prefix(os.getppid()) + "abc")
    mine = tmp_path / (fleecing_folder_prefix(os.getpid()) + "abc")
    other = tmp_path / "unrelated"
    foreign = tmp_path / (fleecing_folder_prefix(dead.pid) + "xyz")
    for folder in (stale, live, mine, other, foreign):
        folder.mkdir()
        (folder / "virtio0.qcow2").write_bytes(b"x")
    kept = [live, mine, other]
    if os.geteuid() == 0:   # another user's look-alike in a shared folder is not ours
        os.chown(foreign, 54321, 54321)
        kept.append(foreign)
    else:
        foreign.rename(stale.with_name(stale.name + "2"))
    clean_fleecing_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)


def test_only_a_refused_snapshot_read_is_a_broken_snapshot(tmp_path: Path) -> None:
    job = BackupJob(disk=disk(), level="inc", sync="incremental",
                    partial_path=tmp_path / "a.partial", final_path=tmp_path / "a")
    job.result, job.source_failed = os.strerror(13), True
    assert not snapshot_broke(job), "not reading a snapshot"
    job.read_from("qmpbackup-fs0-abc", "qmpbackup-snapshot")
    assert snapshot_broke(job)
    job.result = os.strerror(5)
    assert not snapshot_broke(job), "an I/O error of the disk itself"


def test_a_fleecing_job_reads_the_snapshot_with_bounded_workers(tmp_path: Path) -> None:
    job = BackupJob(disk=disk(), level="inc", sync="incremental",
                    partial_path=tmp_path / "a.partial", final_path=tmp_path / "a",
                    bitmap="qmpbackup-c1", bitmap_mode="on-success")
    assert "x-perf" not in backup_action(job)["data"]
    job.read_from("qmpbackup-fs0-abc", "qmpbackup-snapshot", max_workers=8)
    data = backup_action(job)["data"]
    assert data["device"] == "qmpbackup-fs0-abc" and data["bitmap"] == "qmpbackup-snapshot"
    assert "bitmap-mode" not in data and data["x-perf"] == {"max-workers": 8}
