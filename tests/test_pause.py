"""--pause: the VM is paused while its disks are copied and runs again on every way out.

Each case checks that the VM was paused during the jobs (where the run got
that far), that it runs again afterwards, exit code and error line, no
leftovers in QEMU (nodes, jobs, the pause marker), and recovery by content.
A VM that was not running before the run stays as it was.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.backup.pause import PAUSE_MARKER
from tests.helpers import (
    DIRTY,
    assert_clean,
    assert_top_matches,
    backup,
    chain_with_dirty_data,
    fault_disks,
    finished,
    metadata,
    recovers,
    small_tmpfs,
    start_backup,
    tool_bitmaps,
    wait_until_no_jobs,
)
from tests.vm import MiB, TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path


@pytest.fixture
def pvm(tmp_path: Path) -> Iterator[TestVM]:
    with TestVM(tmp_path / "img", fault_disks()) as machine:
        yield machine


def status(vm: TestVM) -> str:
    return str(vm.cmd("query-status")["status"])


def marker_left(vm: TestVM) -> bool:
    return any(o["name"] == PAUSE_MARKER for o in vm.cmd("qom-list", path="/objects"))


def paused_backup(vm: TestVM, root: Path, level: str = "inc"):
    """A slow --pause backup in its own process, returned once its jobs copy (VM then paused)."""
    proc = start_backup(vm, root, level, "--pause")
    assert status(vm) == "paused", "the VM stands still while its disks are copied"
    assert marker_left(vm), "a marker tells a later run who paused it"
    return proc


def assert_resumed(vm: TestVM, root: Path) -> None:
    assert status(vm) == "running", "the VM runs again"
    assert not marker_left(vm)
    assert_clean(vm, root)


def test_pause_success_resumes_and_the_backup_is_the_disk_at_the_pause(
        cli, pvm: TestVM, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, pvm, root)
    refs.mkdir()
    at_pause = {d: pvm.reference(d, refs / f"{d}-pause.raw") for d in ("virtio0", "data1")}
    proc = paused_backup(pvm, root)
    err = finished(proc, 0)
    assert "paused the VM for the backup" in err and "resumed the VM" in err
    assert_resumed(pvm, root)
    files = metadata(root)["chains"][0]["disks"]
    for disk, ref in at_pause.items():
        assert identical(root / disk / files[disk]["backups"][-1]["file"], ref)
    recovers(cli, pvm, root, refs, "inc", "--pause")
    assert status(pvm) == "running"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_pause_signal_mid_job_resumes(cli, pvm: TestVM, tmp_path: Path, signum: int) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, pvm, root)
    proc = paused_backup(pvm, root)
    proc.send_signal(signum)
    finished(proc, 128 + int(signum), f"interrupted by signal {int(signum)}")
    assert_resumed(pvm, root)
    assert max(b["count"] for b in tool_bitmaps(pvm).values()) >= DIRTY, "no change lost"
    recovers(cli, pvm, root, refs)


def test_pause_qemu_error_mid_job_resumes(cli, pvm: TestVM, tmp_path: Path) -> None:
    """Another QMP client cancels the job: QEMU ends it with an error; the VM runs again."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, pvm, root)
    proc = paused_backup(pvm, root)
    job = next(j["id"] for j in pvm.cmd("query-jobs") if "virtio0" in j["id"])
    pvm.cmd("block-job-cancel", device=job, force=True)   # grouped: the other job ends too
    finished(proc, 7, "backup job failed", "cancelled")
    wait_until_no_jobs(pvm)
    assert_resumed(pvm, root)
    recovers(cli, pvm, root, refs)


def test_pause_transaction_refused_by_qemu_resumes(cli, pvm: TestVM, tmp_path: Path) -> None:
    """A mirror job holds the disk: QEMU refuses the backup transaction while the VM is paused."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    backup(cli, pvm, root, "full").ok()
    pvm.cmd("blockdev-add", driver="null-co", size=64 * MiB, **{"node-name": "sink"})
    pvm.cmd("blockdev-mirror", device="virtio0", target="sink", sync="full",
            **{"job-id": "foreign-mirror"})
    try:
        result = backup(cli, pvm, root, "inc", "--pause").failed(7, "QEMU refused transaction")
        assert "paused the VM for the backup" in result.err and "resumed the VM" in result.err
    finally:
        pvm.cmd("block-job-cancel", device="foreign-mirror", force=True)
        deadline = time.monotonic() + 30
        while pvm.cmd("query-jobs"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pvm.cmd("blockdev-del", **{"node-name": "sink"})
    assert_resumed(pvm, root)
    recovers(cli, pvm, root, refs)


def test_pause_target_failures_resume(cli, pvm: TestVM, tmp_path: Path) -> None:
    """A full target fails the jobs while paused; an unwritable one fails before the pause."""
    refs = tmp_path / "refs"
    with small_tmpfs(tmp_path / "small", "16M") as mount:
        root = mount / "chain"
        backup(cli, pvm, root, "full").ok()
        pvm.write("virtio0", 0x45, 0, 24 * MiB)
        backup(cli, pvm, root, "inc", "--pause").failed(5, "No space left on device")
        assert_resumed(pvm, root)
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        backup(cli, pvm, locked, "full", "--pause").failed(5, "not readable and writable")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert_resumed(pvm, locked)
    root = tmp_path / "backup"
    backup(cli, pvm, root, "full", "--pause").ok()
    assert_top_matches(pvm, root, refs)


@pytest.mark.parametrize("prelaunch", [False, True], ids=["paused", "prelaunch"])
def test_pause_leaves_a_vm_that_was_not_running_as_it_was(cli, tmp_path: Path,
                                                          prelaunch: bool) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with TestVM(tmp_path / "img", fault_disks(), prelaunch=prelaunch) as vm:
        if not prelaunch:
            vm.cmd("stop")
        before = status(vm)
        vm.write("virtio0", 0x51, 0, 1 * MiB)
        result = backup(cli, vm, root, "full", "--pause").ok()
        assert f"the VM is {before} already" in result.err
        assert status(vm) == before and not marker_left(vm)
        vm.write("data1", 0x52, 0, 64 * 1024)
        backup(cli, vm, root, "inc", "--pause").ok()
        assert status(vm) == before
        assert_top_matches(vm, root, refs)


def test_pause_left_by_a_killed_run_is_resumed_by_the_next_run(cli, pvm: TestVM,
                                                               tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, pvm, root)
    proc = paused_backup(pvm, root)
    proc.kill()
    proc.wait()
    time.sleep(0.1)
    assert status(pvm) == "paused", "SIGKILL: nobody resumed it"
    log = recovers(cli, pvm, root, refs)
    assert "resumed the VM: an interrupted qmpbackup run (--pause or --fleecing) had left it " \
        "paused" in log
    assert_resumed(pvm, root)
    # a VM its admin paused is not "left paused by a run": no marker, no resume
    pvm.cmd("stop")
    backup(cli, pvm, root, "inc").ok()
    assert status(pvm) == "paused"


def test_pause_needs_a_running_vm_not_images(cli, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)],
                   check=True)
    cli("qmpbackup", "--image", image, "backup", "-l", "full", "-t", tmp_path / "b",
        "--pause").failed(2, "--pause needs a running VM")
    assert not (tmp_path / "b").exists()
