"""How full copies move data: copy offload, sparse (sync=top) copies, overlays; proven by content."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.backup import offload
from libqmpbackup.qemu import capabilities
from tests.helpers import backup, backups
from tests.vm import Disk, MiB, TestVM, identical, run

SHM = Path("/dev/shm")


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def qemu_io(vm: TestVM, disk: str, command: str) -> None:
    assert vm.hmp(f'qemu-io {vm.disk(disk).qemu_io_id} "{command}"') == ""


def restored(cli, root: Path, disk: str, out: Path):
    return cli("qmprestore", "merge", "--dir", root / disk, "--targetfile", out, "--format", "raw")


@pytest.fixture
def sparse_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A 64 MiB qcow2 disk of which only scattered 1 MiB extents hold data."""
    with TestVM(tmp_path / "vm-images", [Disk("virtio0", "virtio", "qcow2", 64 * MiB)]) as machine:
        for index, offset in enumerate((3, 17, 40, 63)):
            machine.write("virtio0", 0x21 + index, offset * MiB, 1 * MiB)
        yield machine


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when the test's own folder is elsewhere: another filesystem."""
    if not SHM.is_dir() or SHM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test folder")
    folder = Path(tempfile.mkdtemp(prefix="qmpbackup-test-", dir=SHM))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_offload_to_another_filesystem_gives_identical_backups(cli, sparse_vm: TestVM,
                                                               tmp_path: Path,
                                                               other_fs: Path) -> None:
    """copy_file_range cannot cross filesystems; QEMU's block-copy falls back by itself."""
    vm, target = sparse_vm, other_fs / "backup"
    backup(cli, vm, target, "full", "--copy-offload", "on").ok()
    assert identical(backups(target, "virtio0")[-1], vm.reference("virtio0", tmp_path / "a.raw"))
    qemu_io(vm, "virtio0", "write -P 0x77 5M 192k")
    backup(cli, vm, target, "inc", "--copy-offload", "on").ok()
    assert identical(backups(target, "virtio0")[-1], vm.reference("virtio0", tmp_path / "b.raw"))
    assert vm.tool_leftovers() == []


def test_qemu_refusing_offload_falls_back_in_the_same_run(cli, sparse_vm: TestVM, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # QEMU 7.2 refuses max-workers 0: the same refusal a future QEMU could give use-copy-range
    monkeypatch.setattr(offload, "X_PERF", {"use-copy-range": True, "max-workers": 0})
    monkeypatch.setattr(offload, "AUTO_MIN_BYTES", 0)   # auto offloads this small disk too
    vm, target = sparse_vm, tmp_path / "backup"
    result = backup(cli, vm, target, "full").ok()
    assert "QEMU refused copy offload" in result.err and "max-workers" in result.err
    assert identical(backups(target, "virtio0")[-1], vm.reference("virtio0", tmp_path / "a.raw"))
    chain = json.loads((target / "qmpbackup.json").read_text())["chains"][0]
    names = [b["name"] for bl in vm.bitmaps().values() for b in bl]
    assert chain["bitmap"] in names   # plus its +diff companion, no +pending/+new left
    assert all(n in (chain["bitmap"], chain["bitmap"] + "+diff") for n in names), names
    assert vm.tool_leftovers() == []


def test_refused_offload_with_on_fails_and_leaves_nothing(cli, sparse_vm: TestVM, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "X_PERF", {"use-copy-range": True, "max-workers": 0})
    vm, target = sparse_vm, tmp_path / "backup"
    backup(cli, vm, target, "full", "--copy-offload", "on").failed(7, "max-workers")
    assert not target.exists() or not any(target.rglob("*.qcow2*"))
    assert all(not bl for bl in vm.bitmaps().values()), "the new chain's bitmap is gone again"
    assert vm.tool_leftovers() == []


def test_on_with_compress_is_a_usage_error(cli, sparse_vm: TestVM, tmp_path: Path) -> None:
    backup(cli, sparse_vm, tmp_path / "b", "full", "--copy-offload", "on",
           "--compress").failed(2, "--compress")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_sparse_disk_full_holds_only_its_data_and_restores_identical(
        cli, sparse_vm: TestVM, tmp_path: Path, mode: str) -> None:
    vm, target = sparse_vm, tmp_path / "backup"
    backup(cli, vm, target, "full", "--copy-offload", mode).ok()
    full = backups(target, "virtio0")[-1]
    assert allocated(full) < 6 * MiB, "4 MiB of data in a 64 MiB disk: holes are not copied"
    assert identical(full, vm.reference("virtio0", tmp_path / "a.raw"))

    # zeroed and discarded ranges, over data and over holes, then an incremental
    qemu_io(vm, "virtio0", "write -z 3M 512k")
    qemu_io(vm, "virtio0", "discard 17M 1M")
    qemu_io(vm, "virtio0", "write -z 30M 1M")
    qemu_io(vm, "virtio0", "write -P 0x66 50M 64k")
    backup(cli, vm, target, "inc", "--copy-offload", mode).ok()
    reference = vm.reference("virtio0", tmp_path / "b.raw")
    assert identical(backups(target, "virtio0")[-1], reference)
    restored(cli, target, "virtio0", tmp_path / "restored.raw").ok()
    assert identical(tmp_path / "restored.raw", reference)

    # a new chain's full of the changed disk: the discarded range is not data any more
    backup(cli, vm, tmp_path / "again", "full", "--copy-offload", mode).ok()
    assert identical(backups(tmp_path / "again", "virtio0")[-1], reference)


def test_overlay_disk_full_contains_its_backing_files_data(cli, tmp_path: Path) -> None:
    """Unallocated in an overlay means "as in the backing file": those clusters must be copied."""
    images = tmp_path / "vm-images"
    images.mkdir()
    base, overlay = images / "base.qcow2", images / "overlay.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(32 * MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 8M", "-c", "write -P 0x32 20M 1M",
         str(base)])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2",
         str(overlay)])
    with TestVM(images, [Disk("virtio0", "virtio", "qcow2", 32 * MiB, path=overlay)]) as vm:
        vm.write("virtio0", 0x33, 1 * MiB, 1 * MiB)   # over base data
        target = tmp_path / "backup"
        backup(cli, vm, target, "full").ok()
        full = backups(target, "virtio0")[-1]
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(full)],
                                         capture_output=True, text=True, check=True).stdout)
        assert "backing-filename" not in info, "a FULL stands alone"
        assert identical(full, vm.reference("virtio0", tmp_path / "a.raw"))
        vm.write("virtio0", 0x34, 20 * MiB, 64 * 1024)
        qemu_io(vm, "virtio0", "write -z 4M 1M")
        backup(cli, vm, target, "inc").ok()
        reference = vm.reference("virtio0", tmp_path / "b.raw")
        restored(cli, target, "virtio0", tmp_path / "restored.raw").ok()
        assert identical(tmp_path / "restored.raw", reference)
        assert vm.tool_leftovers() == []


def test_on_without_x_perf_in_the_schema_fails_before_anything_exists(
        cli, sparse_vm: TestVM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU older than 6.0 (simulated: its schema read as lacking x-perf)."""
    monkeypatch.setattr(capabilities, "KNOWN_X_PERF", {})   # ask the schema, whatever the release
    monkeypatch.setattr(capabilities, "from_schema", lambda schema: capabilities.Capabilities())
    vm, target = sparse_vm, tmp_path / "backup"
    backup(cli, vm, target, "full", "--copy-offload", "on").failed(2, "x-perf")
    assert not target.exists() or not any(target.rglob("*.qcow2*"))
    assert all(not bl for bl in vm.bitmaps().values())
    assert vm.tool_leftovers() == []
    # auto carries on with QEMU's default copy path
    backup(cli, vm, target, "full").ok()
    assert identical(backups(target, "virtio0")[-1], vm.reference("virtio0", tmp_path / "a.raw"))


def known_release(vm: TestVM) -> tuple[int, int]:
    """The VM's QEMU (major, minor); the test is skipped for a release the table lacks."""
    version = vm.cmd("query-version")["qemu"]
    release = (version["major"], version["minor"])
    if release not in capabilities.KNOWN_X_PERF:
        pytest.skip(f"QEMU {release} is not in the table: runs ask its schema")
    return release


def test_known_release_table_agrees_with_the_running_qemus_schema(tmp_path: Path) -> None:
    """KNOWN_X_PERF spares QEMU its schema query: it must say what the schema says."""
    with TestVM(tmp_path / "vm", [Disk("virtio0", "virtio", "qcow2", 1 * MiB)],
                prelaunch=True) as vm:
        release = known_release(vm)
        from_schema = capabilities.from_schema(vm.cmd("query-qmp-schema"))
    assert from_schema.x_perf_members == capabilities.KNOWN_X_PERF[release]


def test_a_known_release_is_not_asked_for_its_schema(cli, sparse_vm: TestVM,
                                                     tmp_path: Path) -> None:
    vm, target = sparse_vm, tmp_path / "backup"
    release = known_release(vm)
    result = backup(cli, vm, target, "full", "--copy-offload", "on", "--debug").ok()
    assert "query-qmp-schema" not in result.err
    assert f"known for QEMU {release[0]}.{release[1]}" in result.err
    assert identical(backups(target, "virtio0")[-1], vm.reference("virtio0", tmp_path / "a.raw"))
