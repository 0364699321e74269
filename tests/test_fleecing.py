"""--fleecing against real QEMU: same guarantees as plain backups, and a stalled
fleecing storage costs the guest at most --cbw-timeout, never the backup's chain.

The fault helpers (rate-limited subprocess runs, leftovers checks, recovery by
content) are those of test_faults.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from harness.slowfs import SlowFS
from tests.helpers import (
    DIRTY,
    DISKS,
    assert_clean,
    backup,
    chain_with_dirty_data,
    fault_disks,
    finished,
    listed,
    metadata,
    recovers,
    small_tmpfs,
    start_backup,
    tool_bitmaps,
)
from tests.vm import MiB, TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path

QCOW2_DISKS = ("virtio0", "ide0-hd0", "data1")


@pytest.fixture
def fvm(tmp_path: Path) -> Iterator[TestVM]:
    with TestVM(tmp_path / "img", fault_disks()) as machine:
        yield machine


@pytest.fixture
def fleece_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fleece"
    folder.mkdir()
    return folder


def top_matches(vm: TestVM, root: Path, refs: Path, disks: tuple[str, ...]) -> None:
    refs.mkdir(exist_ok=True)
    files = listed(root)
    for disk in disks:
        ref = vm.reference(disk, refs / f"{disk}-{time.monotonic_ns()}.raw")
        assert identical(root / disk / files[disk][-1], ref), f"{disk} differs"


def info_nodes(cli, vm: TestVM) -> dict[str, str]:
    """disk -> node as ``info --show blockdev`` shows them."""
    out = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show", "blockdev").ok().out
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {row[0]: row[1] for row in rows if not set(row[0]) <= {"-"}}


def on_original_nodes(vm: TestVM) -> None:
    """No device is left on a filter of ours, and nothing of ours is left in QEMU."""
    assert vm.tool_leftovers() == []
    for block in vm.cmd("query-block"):
        inserted = block.get("inserted")
        if inserted:
            assert inserted["drv"] != "copy-before-write", block


def test_fleecing_full_and_incrementals_hold_each_point(cli, vm: TestVM, tmp_path: Path,
                                                        fleece_dir: Path) -> None:
    """The whole disk zoo (virtio, ide, -blockdev, pflash): every point restores identical."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    fleecing = ("--fleecing", "--fleecing-dir", fleece_dir)
    vm.write("virtio0", 0x11, 0, 4 * MiB)
    vm.write("data1", 0x13, 0, 1 * MiB)
    vm.write("pflash1", 0x14, 0, 4096)
    log = backup(cli, vm, root, "full", *fleecing).ok().err
    assert "fleecing virtio0, ide0-hd0, pflash1, data1 through" in log
    assert "VM paused for" in log and "to switch 4 disk(s)" in log
    top_matches(vm, root, refs, (*QCOW2_DISKS, "pflash0", "pflash1"))
    for pattern in (0x21, 0x22):
        vm.write("virtio0", pattern, (pattern - 0x1C) * MiB, 128 * 1024)
        vm.write("data1", pattern, pattern * 4096, 8192)
        backup(cli, vm, root, "inc", *fleecing).ok()
        top_matches(vm, root, refs, (*QCOW2_DISKS, "pflash1"))
    chain = metadata(root)["chains"][0]
    assert [b["level"] for b in chain["disks"]["virtio0"]["backups"]] == ["full", "inc", "inc"]
    inc = root / "virtio0" / chain["disks"]["virtio0"]["backups"][-1]["file"]
    assert inc.stat().st_size < 2 * MiB, "the incremental holds only the dirty clusters"
    counts = [b["count"] for name, b in tool_bitmaps(vm).items() if "+" not in name]
    assert counts == [0, 0, 0], "each chain bitmap holds the writes since the switch: none"
    on_original_nodes(vm)
    assert list(fleece_dir.iterdir()) == [], "fleecing images are gone"
    nodes = info_nodes(cli, vm)
    assert "virtio0" in nodes and not [n for n in nodes.values() if n.startswith("qmpbackup-")]

    restored = tmp_path / "restored.raw"
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--format", "raw",
        "--targetfile", restored).ok()
    assert identical(restored, vm.reference("virtio0", refs / "virtio0-end.raw"))


def test_writes_during_a_rate_limited_fleecing_job(cli, fvm: TestVM, tmp_path: Path,
                                                   fleece_dir: Path) -> None:
    """The backup is the disks at the switch; what the guest writes meanwhile is in the next inc."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    chain_with_dirty_data(cli, fvm, root)
    at_start = {d: fvm.reference(d, refs / f"{d}-start.raw") for d in DISKS}
    proc = start_backup(fvm, root, "inc", "--fleecing", "--fleecing-dir", str(fleece_dir))
    fvm.write("virtio0", 0x41, 40 * MiB, 2 * MiB)     # not copied yet: saved to the fleecing image
    fvm.write("virtio0", 0x42, 56 * MiB, 64 * 1024)   # outside the incremental's clusters
    fvm.write("data1", 0x43, 1 * MiB, 64 * 1024)
    assert fvm.cmd("query-jobs"), "the job was still copying during those writes"
    finished(proc, 0)
    for disk in DISKS:
        assert identical(root / disk / listed(root)[disk][-1], at_start[disk]), disk
    assert_clean(fvm, root)
    on_original_nodes(fvm)
    recovers(cli, fvm, root, refs, "inc", "--fleecing", "--fleecing-dir", fleece_dir)


def timed_write(vm: TestVM, offset: int) -> float:
    started = time.monotonic()
    vm.write("virtio0", 0x5A, offset, 64 * 1024)
    return time.monotonic() - started


@pytest.fixture
def booted_fvm(tmp_path: Path) -> Iterator[TestVM]:
    """fvm once the firmware is done with the disks (see TestVM.wait_for_firmware)."""
    with TestVM(tmp_path / "img", fault_disks(), firmware_log=True) as machine:
        machine.wait_for_firmware()
        yield machine


def test_stalled_fleecing_storage_breaks_the_snapshot_not_the_guest(
        cli, booted_fvm: TestVM, tmp_path: Path) -> None:
    """Fleecing storage hangs past --cbw-timeout: the guest write completes, exit 13, nothing lost."""
    if SlowFS.unavailable():
        pytest.skip(f"slow test filesystem: {SlowFS.unavailable()}")
    fvm = booted_fvm
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, fvm, root)
    before = metadata(root)
    with SlowFS(tmp_path / "slowfs") as slow:
        proc = start_backup(fvm, root, "inc", "--fleecing", "--fleecing-dir", str(slow.mount),
                            "--cbw-timeout", "1")
        slow.stall()
        resumer = threading.Timer(4, slow.resume)   # the tool's cleanup closes the image
        resumer.start()
        try:
            waited = timed_write(fvm, 44 * MiB)
        finally:
            resumer.cancel()
            slow.resume()
        finished(proc, 13, "fleecing snapshot of virtio0", "broke", "--cbw-timeout",
                 "nothing recorded")
        assert 0.9 < waited < 3, f"the guest waited {waited:.1f} s (cbw-timeout 1 s)"
        assert list(slow.backing.iterdir()) == []
    assert metadata(root) == before
    assert_clean(fvm, root)
    on_original_nodes(fvm)
    assert min(b["count"] for b in tool_bitmaps(fvm).values()) >= 2 * MiB
    recovers(cli, fvm, root, refs, "inc")


def test_full_fleecing_storage_breaks_the_snapshot_not_the_guest(
        cli, fvm: TestVM, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, fvm, root)
    before = metadata(root)
    with small_tmpfs(tmp_path / "small", "1M") as small:
        proc = start_backup(fvm, root, "inc", "--fleecing", "--fleecing-dir", str(small))
        for offset in range(4, 44, 2):     # more old data than 1 MiB can hold
            started = time.monotonic()
            fvm.write("virtio0", 0x5B, offset * MiB, 1 * MiB)
            assert time.monotonic() - started < 2
        finished(proc, 13, "fleecing snapshot", "too slow or full")
        assert list(small.iterdir()) == []
    assert metadata(root) == before
    assert_clean(fvm, root)
    on_original_nodes(fvm)
    recovers(cli, fvm, root, refs, "inc", "--fleecing", "--fleecing-dir", tmp_path)


@pytest.mark.parametrize("signum, rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_fleecing_job_switches_back_and_keeps_every_change(
        cli, fvm: TestVM, tmp_path: Path, fleece_dir: Path, signum: int, rc: int) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, fvm, root)
    proc = start_backup(fvm, root, "inc", "--fleecing", "--fleecing-dir", str(fleece_dir))
    fvm.write("virtio0", 0x61, 40 * MiB, 64 * 1024)
    proc.send_signal(signum)
    finished(proc, rc, "interrupted by signal")
    assert fvm.running(), "the VM runs on"
    assert_clean(fvm, root)
    on_original_nodes(fvm)
    assert list(fleece_dir.iterdir()) == []
    assert max(b["count"] for b in tool_bitmaps(fvm).values()) >= DIRTY
    recovers(cli, fvm, root, refs, "inc", "--fleecing", "--fleecing-dir", fleece_dir)


def test_sigkill_mid_fleecing_job_next_run_switches_back(cli, fvm: TestVM, tmp_path: Path,
                                                         fleece_dir: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    chain_with_dirty_data(cli, fvm, root)
    proc = start_backup(fvm, root, "inc", "--fleecing", "--fleecing-dir", str(fleece_dir))
    proc.kill()
    proc.wait()
    tops = [b["inserted"]["drv"] for b in fvm.cmd("query-block") if b.get("inserted")]
    assert "copy-before-write" in tops, "the killed run left the devices on its filters"
    fvm.write("virtio0", 0x71, 40 * MiB, 64 * 1024)   # the guest goes on meanwhile
    nodes = info_nodes(cli, fvm)
    assert nodes["data1"] == "data1-fmt", "info shows the disk's own node, not the filter"
    assert not [n for n in nodes.values() if n.startswith("qmpbackup-")], nodes
    stale = fleece_dir / "qmpbackup-fleecing-999999999-abc_1"
    stale.mkdir()
    (stale / "virtio0.qcow2").write_bytes(b"x")
    log = recovers(cli, fvm, root, refs, "inc", "--fleecing", "--fleecing-dir", fleece_dir)
    assert "switched virtio0 back from fleecing filter qmpbackup-fc" in log
    assert "removed block node qmpbackup-fs" in log
    assert f"removed {stale}, left by an interrupted run" in log
    on_original_nodes(fvm)
    assert list(fleece_dir.iterdir()) == []


def test_vm_paused_by_a_killed_run_is_resumed(cli, fvm: TestVM, tmp_path: Path) -> None:
    """A run killed inside the switch window left the VM paused and its marker node."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    backup(cli, fvm, root, "full").ok()
    fvm.cmd("object-add", **{"qom-type": "secret", "id": "qmpbackup-paused", "data": "x"})
    fvm.cmd("stop")
    log = recovers(cli, fvm, root, refs, "inc", "--fleecing", "--fleecing-dir", tmp_path)
    assert "resumed the VM: an interrupted qmpbackup run" in log
    assert fvm.running()


def test_a_vm_paused_by_its_user_stays_paused(cli, fvm: TestVM, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    fvm.cmd("stop")
    log = backup(cli, fvm, root, "full", "--fleecing", "--fleecing-dir", tmp_path).ok().err
    assert "VM paused for" not in log
    assert not fvm.running()
    top_matches(fvm, root, refs, DISKS)


@pytest.mark.parametrize("argv, fragment", [
    (("--cbw-timeout", "5"), "--cbw-timeout only applies with --fleecing"),
    (("--fleecing-dir", "/"), "--fleecing-dir only applies with --fleecing"),
    (("--fleecing", "--cbw-timeout", "0"), "--cbw-timeout 0: use 1 to 3600"),
    (("--fleecing", "--fleecing-dir", "/nonexistent"), "is not a writable directory"),
    (("--fleecing", "--cbw-timeout", "soon"), "invalid int value"),
])
def test_bad_fleecing_options_create_nothing(cli, fvm: TestVM, tmp_path: Path,
                                             argv: tuple[str, ...], fragment: str) -> None:
    target = tmp_path / "b"
    backup(cli, fvm, target, "full", *argv).failed(2, fragment)
    assert not target.exists()
    assert tool_bitmaps(fvm) == {}


def test_fleecing_dir_on_the_target_is_refused(cli, fvm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "b"
    (target / "scratch").mkdir(parents=True)
    backup(cli, fvm, target, "full", "--fleecing", "--fleecing-dir", target / "scratch").failed(
        2, "is inside the backup target")
    assert os.listdir(target) == ["scratch"]


def test_fleecing_copy_level_and_raw_disks(cli, vm: TestVM, tmp_path: Path) -> None:
    root, refs = tmp_path / "copy", tmp_path / "refs"
    refs.mkdir()
    vm.write("virtio1", 0x7A, 0, 1 * MiB)
    backup(cli, vm, root, "copy", "--fleecing", "--fleecing-dir", tmp_path).ok()
    for disk in ("virtio0", "virtio1", "pflash1"):
        copy = next((root / disk).glob("COPY-*"))
        assert identical(copy, vm.reference(disk, refs / f"{disk}.raw")), disk
    assert tool_bitmaps(vm) == {}
    on_original_nodes(vm)


def test_fleecing_differential_holds_every_change_since_the_full(cli, fvm: TestVM,
                                                                 tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    fleecing = ("--fleecing", "--fleecing-dir", tmp_path)
    backup(cli, fvm, root, "full", *fleecing).ok()
    fvm.write("virtio0", 0x81, 1 * MiB, 256 * 1024)
    backup(cli, fvm, root, "inc", *fleecing).ok()
    fvm.write("virtio0", 0x82, 9 * MiB, 128 * 1024)
    fvm.write("data1", 0x83, 2 * MiB, 64 * 1024)
    backup(cli, fvm, root, "diff", *fleecing).ok()
    assert [b["level"] for b in metadata(root)["chains"][0]["disks"]["virtio0"]["backups"]] \
        == ["full", "inc", "diff"]
    top_matches(fvm, root, refs, DISKS)
    fvm.write("virtio0", 0x84, 20 * MiB, 64 * 1024)
    backup(cli, fvm, root, "inc", *fleecing).ok()
    top_matches(fvm, root, refs, DISKS)
    on_original_nodes(fvm)
