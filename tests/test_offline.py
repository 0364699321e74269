"""Backups of VMs that are shut down (--image), through a real qemu-storage-daemon.

One chain goes on across online → offline → online runs; every point restores
byte-identical, the daemon never outlives qmpbackup, and an image a running
QEMU holds is refused without touching the VM or the target.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

from libqmpbackup.store.locks import LOCK_DIR_ENV
from tests.helpers import (
    DIRTY,
    DISKS,
    REPO,
    SLOW,
    assert_clean,
    fault_disks,
    finished,
    listed,
    metadata,
    restart,
)
from tests.vm import MiB, TestVM, identical, run


@pytest.fixture(autouse=True)
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Locks in the test's folder, and a temp dir of its own to prove the daemon's is removed.

    Short, because the daemon's QMP socket lives in it (108 bytes at most).
    """
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    temp = Path(tempfile.mkdtemp(prefix="qbo"))
    monkeypatch.setenv("TMPDIR", str(temp))           # subprocesses
    monkeypatch.setattr(tempfile, "tempdir", str(temp))   # in-process runs
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def fvm(tmp_path: Path) -> Iterator[TestVM]:
    with TestVM(tmp_path / "img", fault_disks()) as machine:
        yield machine


def image(vm: TestVM, disk: str) -> Path:
    path = vm.disk(disk).path
    assert path is not None
    return path


def image_args(vm: TestVM, *, ids: bool = False) -> list[str]:
    args = []
    for disk in DISKS:
        args += ["--image", f"{disk}={image(vm, disk)}" if ids else str(image(vm, disk))]
    return args


def offline_backup(cli, vm: TestVM, target: Path, level: str, *extra: object, ids: bool = False):
    return cli("qmpbackup", *image_args(vm, ids=ids), "backup", "--level", level,
               "--target", target, "--no-progress", *extra)


def online_backup(cli, vm: TestVM, target: Path, level: str):
    return cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", level,
               "--target", target, "--no-progress")


def offline_write(vm: TestVM, disk: str, pattern: int, offset: int, length: int) -> None:
    """What an admin's tool does to a shut-down VM's image (updates its persistent bitmaps)."""
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}",
         str(image(vm, disk))])


def offline_reference(vm: TestVM, disk: str, out: Path) -> Path:
    run(["qemu-img", "convert", "-O", "raw", str(image(vm, disk)), str(out)])
    return out


def daemons_on(folder: Path) -> list[int]:
    """Pids of qemu-storage-daemon processes with an image below FOLDER."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-storage-daemon") and \
                any(str(folder).encode() in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


def assert_no_daemon(folder: Path, temp: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while daemons_on(folder):
        assert time.monotonic() < deadline, f"qemu-storage-daemon outlived qmpbackup: {daemons_on(folder)}"
        time.sleep(0.05)
    assert not list(temp.glob("qmpbackup-qsd-*")), "the daemon's private folder was left"


def assert_every_point_restores(cli, root: Path, disk: str, refs: list[Path], out: Path) -> None:
    files = listed(root)[disk]
    assert len(files) == len(refs)
    for point, (name, ref) in enumerate(zip(files, refs)):
        restored = out / f"{disk}-{point}.raw"
        cli("qmprestore", "merge", "--dir", root / disk, "--until", name, "--format", "raw",
            "--targetfile", restored).ok()
        assert identical(restored, ref), f"{disk} point {point} ({name}) differs"


def test_chain_goes_on_online_offline_online(cli, fvm: TestVM, tmp_path: Path,
                                             private_dirs: Path) -> None:
    root, refs, out = tmp_path / "backup", tmp_path / "refs", tmp_path / "out"
    refs.mkdir()
    out.mkdir()
    points: dict[str, list[Path]] = {d: [] for d in DISKS}

    def reference(running: Optional[TestVM] = None) -> None:
        for disk in DISKS:
            ref = refs / f"{disk}-{len(points[disk])}.raw"
            points[disk].append(running.reference(disk, ref) if running
                                else offline_reference(fvm, disk, ref))

    fvm.write("virtio0", 0x11, 0, 2 * MiB)
    fvm.write("data1", 0x12, 1 * MiB, 64 * 1024)
    online_backup(cli, fvm, root, "full").ok()
    reference(fvm)
    fvm.stop()   # a clean shutdown stores the chain bitmaps in the images

    for pattern, level in ((0x21, "inc"), (0x22, "auto")):
        offline_write(fvm, "virtio0", pattern, (pattern % 16) * MiB, 128 * 1024)
        offline_write(fvm, "data1", pattern, 3 * MiB, 4096)
        result = offline_backup(cli, fvm, root, level).ok()
        reference()
        assert "level inc" in result.err
        assert_no_daemon(fvm.folder, private_dirs)

    vm = restart(fvm)
    try:
        vm.write("virtio0", 0x31, 20 * MiB, 64 * 1024)
        online_backup(cli, vm, root, "inc").ok()
        reference(vm)
        assert_clean(vm, root)
    finally:
        vm.stop()
    # and offline once more after the VM ran again
    offline_write(fvm, "data1", 0x41, 0, 8192)
    offline_backup(cli, fvm, root, "inc").ok()
    reference()

    chains = metadata(root)["chains"]
    assert len(chains) == 1, "one chain across online and offline runs"
    assert sorted(chains[0]["disks"]) == sorted(DISKS), "offline runs used the online disk ids"
    assert [b["level"] for b in chains[0]["disks"]["virtio0"]["backups"]] == \
        ["full", "inc", "inc", "inc", "inc"]
    # incrementals hold only what changed: 128 KiB written, 64 KiB clusters
    assert (root / "virtio0" / listed(root)["virtio0"][1]).stat().st_size < 1 * MiB
    assert_clean(None, root)
    for disk in DISKS:
        assert_every_point_restores(cli, root, disk, points[disk], out)


def test_offline_chain_with_chosen_ids_info_and_cleanup(cli, tmp_path: Path,
                                                        private_dirs: Path) -> None:
    disks = fault_disks()
    vm = TestVM(tmp_path / "img", disks)
    for disk in disks:
        disk.create(vm.folder)   # never started: images only
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    offline_write(vm, "virtio0", 0x51, 0, 1 * MiB)
    offline_backup(cli, vm, root, "auto", ids=True).ok()
    offline_write(vm, "virtio0", 0x52, 5 * MiB, 64 * 1024)
    offline_backup(cli, vm, root, "auto").ok()     # ids found through the chain metadata
    assert sorted(metadata(root)["chains"][0]["disks"]) == sorted(DISKS)
    top = root / "virtio0" / listed(root)["virtio0"][-1]
    assert identical(top, offline_reference(vm, "virtio0", refs / "virtio0.raw"))

    info = cli("qmpbackup", "--image", f"sys={image(vm, 'virtio0')}", "info").ok()
    assert info.out.split("\n")[2].split()[:3] == ["sys", "img0", "qcow2"]
    bitmap = metadata(root)["chains"][0]["bitmap"]
    shown = cli("qmpbackup", "--image", str(image(vm, "data1")), "info", "--show", "bitmaps").ok()
    assert bitmap in shown.out and " data1 " in shown.out
    removed = cli("qmpbackup", *image_args(vm), "cleanup", "--remove-bitmaps").ok()
    assert sorted(removed.out.splitlines()) == sorted(
        f"removed {d}:{bitmap}{suffix}" for d in DISKS for suffix in ("", "+diff"))
    assert "bitmaps" not in run(["qemu-img", "info", str(image(vm, "virtio0"))]).stdout
    assert_no_daemon(vm.folder, private_dirs)
    # the bitmap is gone: inc refuses, auto starts a new chain in the same folder
    offline_backup(cli, vm, root, "inc").failed(6, "has no bitmap")
    offline_backup(cli, vm, root, "auto").ok()
    assert len(metadata(root)["chains"]) == 2


def test_image_in_use_by_a_running_vm_is_refused(cli, fvm: TestVM, tmp_path: Path,
                                                 private_dirs: Path) -> None:
    root = tmp_path / "backup"
    online_backup(cli, fvm, root / "online", "full").ok()
    before = fvm.bitmaps()
    result = offline_backup(cli, fvm, root / "offline", "auto")
    result.failed(12, str(image(fvm, "virtio0")), "in use by a running QEMU", "--socket")
    assert not (root / "offline").exists(), "nothing written to the target"
    assert fvm.running() and fvm.bitmaps() == before and fvm.tool_leftovers() == []
    assert_no_daemon(fvm.folder, private_dirs)


@pytest.mark.parametrize("clean_cycle", [True, False], ids=["inconsistent", "missing"])
def test_auto_offline_starts_a_new_chain_when_qemu_crashed(cli, fvm: TestVM, tmp_path: Path,
                                                           clean_cycle: bool) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    online_backup(cli, fvm, root, "full").ok()
    vm = restart(fvm) if clean_cycle else fvm
    vm.write("virtio0", 0x61, 0, 64 * 1024)
    vm.kill()
    problem = "is inconsistent" if clean_cycle else "has no bitmap"
    offline_backup(cli, fvm, root, "inc").failed(6, problem)
    result = offline_backup(cli, fvm, root, "auto").ok()
    assert "starting a new chain" in result.err
    chains = metadata(root)["chains"]
    assert len(chains) == 2 and sorted(chains[1]["disks"]) == sorted(DISKS)
    for disk in DISKS:
        top = root / disk / chains[1]["disks"][disk]["backups"][-1]["file"]
        assert identical(top, offline_reference(fvm, disk, refs / f"{disk}.raw"))
    assert_clean(None, root)


def start_offline_backup(vm: TestVM, target: Path, level: str) -> subprocess.Popen:
    """A rate-limited offline backup in its own process, returned once its job is copying."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup", *image_args(vm), "backup", "--level", level,
         "--target", str(target), "--no-progress", "--speed-limit", SLOW],
        cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 20
    while not any(p.stat().st_size > 2 * MiB for p in target.glob("virtio0/*.partial")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no job started: {proc.communicate()[1]}")
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_offline_run_stops_the_daemon_and_loses_no_change(
        cli, fvm: TestVM, tmp_path: Path, private_dirs: Path, signum: int) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    fvm.stop()
    offline_backup(cli, fvm, root, "full").ok()
    offline_write(fvm, "virtio0", 0x71, 0, DIRTY)
    offline_write(fvm, "data1", 0x72, 0, 1 * MiB)
    proc = start_offline_backup(fvm, root, "inc")
    try:
        assert len(daemons_on(fvm.folder)) == 1
        offline_backup(cli, fvm, root, "inc").failed(4, "another backup is running",
                                                     str(image(fvm, "virtio0")))
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)   # Ctrl-C on a terminal: the whole foreground group
        else:
            proc.send_signal(signum)
        if signum == signal.SIGKILL:
            proc.wait(30)
        else:
            finished(proc, 128 + signum, "interrupted")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_no_daemon(fvm.folder, private_dirs)
    if signum != signal.SIGKILL:
        assert_clean(None, root)
    # the next run settles what a killed run left; every change is in its incremental
    offline_write(fvm, "data1", 0x73, 4 * MiB, 64 * 1024)
    recovery = offline_backup(cli, fvm, root, "inc").ok()
    if signum == signal.SIGKILL:
        # the daemon got SIGTERM and stored the run's +pending bitmaps as it closed
        assert "left by an interrupted run" in recovery.err
        assert "+pending back into" in recovery.err, recovery.err
    assert_clean(None, root)
    for disk in DISKS:
        top = root / disk / listed(root)[disk][-1]
        assert identical(top, offline_reference(fvm, disk, refs / f"{disk}.raw")), disk
    info = run(["qemu-img", "info", "--output=json", str(image(fvm, "virtio0"))]).stdout
    assert "+pending" not in info and '"in-use"' not in info


@pytest.mark.parametrize("global_opts,command,fragment", [
    ((), ("backup", "--level", "inc", "--quiesce"), "--quiesce needs a running VM"),
    ((), ("backup", "--level", "inc", "--quiesce-required"), "--quiesce-required needs"),
    ((), ("backup", "--level", "inc", "--fleecing"), "--fleecing needs a running VM"),
    (("--agent-socket", "/nonexistent"), ("info", "--show", "agent"),
     "--agent-socket needs a running VM"),
    (("--socket", "/nonexistent"), ("info",), "not allowed with"),
])
def test_guest_options_are_refused_offline(cli, tmp_path: Path, global_opts: tuple[str, ...],
                                           command: tuple[str, ...], fragment: str) -> None:
    disk = tmp_path / "vm1.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"])
    before = disk.read_bytes()
    target = ("--target", tmp_path / "t") if command[0] == "backup" else ()
    cli("qmpbackup", "--image", disk, *global_opts, *command, *target).failed(2, fragment)
    assert not (tmp_path / "t").exists() and disk.read_bytes() == before


def test_images_the_daemon_cannot_open(cli, tmp_path: Path, private_dirs: Path) -> None:
    raw = tmp_path / "disk.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"])
    cli("qmpbackup", "--image", raw, "info").failed(3, str(raw), "not in qcow2 format")
    cli("qmpbackup", "--image", tmp_path / "nope.qcow2", "info").failed(2, "nope.qcow2")
    assert_no_daemon(tmp_path, private_dirs)
    assert os.listdir(private_dirs) == []


def test_daemon_killed_mid_job_is_reported_and_auto_recovers(cli, fvm: TestVM, tmp_path: Path,
                                                             private_dirs: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    fvm.stop()
    offline_backup(cli, fvm, root, "full").ok()
    offline_write(fvm, "virtio0", 0x81, 0, DIRTY)
    proc = start_offline_backup(fvm, root, "inc")
    try:
        (daemon,) = daemons_on(fvm.folder)
        os.kill(daemon, signal.SIGKILL)
        err = finished(proc, 8, f"qemu-storage-daemon pid {daemon} closed", "nothing was recorded")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "qemu-storage-daemon exited with status -9" in err
    assert_no_daemon(fvm.folder, private_dirs)
    assert_clean(None, root)
    # a SIGKILLed daemon leaves the loaded bitmaps inconsistent, as a crashed VM does
    offline_backup(cli, fvm, root, "inc").failed(6, "is inconsistent")
    offline_backup(cli, fvm, root, "auto").ok()
    for disk in DISKS:
        top = root / disk / listed(root)[disk][-1]
        assert identical(top, offline_reference(fvm, disk, refs / f"{disk}.raw")), disk


def test_prune_with_images_removes_the_pruned_chains_bitmaps(cli, tmp_path: Path,
                                                             private_dirs: Path) -> None:
    disks = fault_disks()
    vm = TestVM(tmp_path / "img", disks)
    for disk in disks:
        disk.create(vm.folder)
    root = tmp_path / "backup"
    offline_backup(cli, vm, root, "full").ok()                 # chain in DIR
    root.rename(tmp_path / "aside")   # backups refuse to mix the kinds; older releases did not
    offline_backup(cli, vm, root, "full", "--monthly").ok()    # newer chain in DIR/YYYY-MM
    for entry in (tmp_path / "aside").iterdir():
        if not (root / entry.name).exists():
            entry.rename(root / entry.name)
    old, new = (metadata(p)["chains"][0]["bitmap"] for p in (root, *root.glob("????-??")))
    result = cli("qmpbackup", *image_args(vm), "prune", "--target", root, "--keep", "1").ok()
    assert sorted(line for line in result.out.splitlines() if line.startswith("removed bitmap")) \
        == sorted(f"removed bitmap {d}:{old}{suffix}" for d in DISKS for suffix in ("", "+diff"))
    for disk in DISKS:
        info = run(["qemu-img", "info", str(image(vm, disk))]).stdout
        assert new in info and old not in info
    assert_no_daemon(vm.folder, private_dirs)
