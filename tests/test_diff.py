"""--level diff against real QEMU: INC and DIFF mixed in one chain, every point restorable.

One chain is built per module — FULL, INC, DIFF, INC, DIFF, INC, with the
disks' content taken as reference at each run — and every qmprestore command
restores its points (on copies, where the command changes the folder).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.store.names import DISK_METADATA_NAME
from tests.helpers import (
    DIRTY,
    assert_clean,
    backup,
    chain_with_dirty_data,
    copy_disk,
    digests,
    fault_disks,
    files,
    finished,
    kill_and_let_qemu_finish,
    metadata,
    node_of,
    prefix,
    records,
    recovers,
    snapshot_tags,
    start_backup,
    tool_bitmaps,
)
from tests.vm import Disk, MiB, TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path

DISKS = ("virtio0", "data1")
LEVELS = ("full", "inc", "diff", "inc", "diff", "inc")
WRITES = [   # per run: (disk, pattern, offset, length); each run also rewrites some old data
    [("virtio0", 0x11, 0, 2 * MiB), ("data1", 0x12, 0, 512 * 1024)],
    [("virtio0", 0x21, 4 * MiB, 256 * 1024), ("data1", 0x22, 1 * MiB, 64 * 1024)],
    [("virtio0", 0x31, 6 * MiB, 128 * 1024), ("virtio0", 0x32, 0, 64 * 1024)],
    [("virtio0", 0x41, 4 * MiB, 64 * 1024), ("data1", 0x42, 2 * MiB, 64 * 1024)],
    [("virtio0", 0x51, 8 * MiB, 64 * 1024), ("data1", 0x52, 1 * MiB, 128 * 1024)],
    [("virtio0", 0x61, 6 * MiB, 64 * 1024), ("virtio0", 0x00, 8 * MiB, 64 * 1024)],
]


def diff_disks() -> list[Disk]:
    """Two qcow2 disks (drive and -blockdev) and raw pflash, copied in full at every run."""
    return [Disk("virtio0", "virtio", "qcow2", 16 * MiB),
            Disk("data1", "blockdev", "qcow2", 8 * MiB),
            Disk("pflash0", "pflash", "raw", unit=0),
            Disk("pflash1", "pflash", "raw", 256 * 1024, unit=1)]


@dataclass
class DiffChain:
    root: Path
    refs: dict[tuple[str, int], Path] = field(default_factory=dict)
    bitmaps: dict[str, dict] = field(default_factory=dict)   # tool bitmaps after the last run

    def ref(self, disk: str, point: int) -> Path:
        return self.refs[(disk, point)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffChain]:
    from qmpbackup.cli import main
    base = tmp_path_factory.mktemp("diff")
    built = DiffChain(base / "backup")
    (base / "refs").mkdir()
    with TestVM(base / "vm", diff_disks()) as vm:
        for point, level in enumerate(LEVELS):
            for disk, pattern, offset, length in WRITES[point]:
                vm.write(disk, pattern, offset, length)
            vm.write("pflash1", 0x70 + point, 0, 4096)
            for disk in (*DISKS, "pflash1"):
                built.refs[(disk, point)] = vm.reference(disk, base / "refs" / f"{disk}-{point}.raw")
            assert main(["--socket", vm.tool_socket, "--quiet", "backup", "--level", level,
                         "--target", str(built.root), "--no-progress"]) == 0
        built.bitmaps = tool_bitmaps(vm)
        assert vm.tool_leftovers() == []
    yield built


def info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)


def test_diff_backs_onto_the_full_and_inc_onto_the_diff(chain: DiffChain) -> None:
    for disk in DISKS:
        names = files(chain.root, disk)
        assert [r["level"] for r in records(chain.root, disk)] == list(LEVELS)
        assert [n.split("-")[0] for n in names] == ["FULL", "INC", "DIFF", "INC", "DIFF", "INC"]
        assert info(chain.root / disk / names[2])["backing-filename"] == names[0]
        assert info(chain.root / disk / names[3])["backing-filename"] == names[2]
        assert info(chain.root / disk / names[4])["backing-filename"] == names[0]
        assert info(chain.root / disk / names[5])["backing-filename"] == names[4]
        # restoring a DIFF needs just two files; each holds its point as written
        for point in range(len(LEVELS)):
            assert identical(chain.root / disk / names[point], chain.ref(disk, point)), \
                f"{disk} {names[point]}"
    assert [r["level"] for r in records(chain.root, "pflash1")] == ["full"] * len(LEVELS)
    # the second DIFF holds the changes of every run since the FULL, the INC after it only its own
    names = files(chain.root, "virtio0")
    assert (chain.root / "virtio0" / names[4]).stat().st_size > \
        (chain.root / "virtio0" / names[5]).stat().st_size + 256 * 1024
    chain_bitmap = metadata(chain.root)["chains"][0]["bitmap"]
    diff = [b for n, b in chain.bitmaps.items() if n.startswith(chain_bitmap + "+diff@")]
    assert len(diff) == 2 and all(b["persistent"] and b["recording"] for b in diff)
    assert all(b["count"] > 0 for b in diff), "+diff still holds every change since the FULL"
    assert all(b["count"] == 0 for n, b in chain.bitmaps.items()
               if n.startswith(chain_bitmap + "@")), "the chain bitmap was advanced"


def test_list_shows_the_level(cli, chain: DiffChain) -> None:
    table = cli("qmprestore", "list", "--dir", chain.root).ok().out
    diff_rows = [line for line in table.splitlines() if " diff " in line]
    assert len(diff_rows) == 4 and all("DIFF-" in line for line in diff_rows)


def test_merge_restores_every_point(cli, chain: DiffChain, tmp_path: Path) -> None:
    before = digests(chain.root)
    for disk in DISKS:
        for point, name in enumerate(files(chain.root, disk)):
            out = tmp_path / f"{disk}-{point}.qcow2"
            cli("qmprestore", "merge", "--dir", chain.root / disk, "--until", prefix(name),
                "--targetfile", out).ok()
            assert identical(out, chain.ref(disk, point)), f"{disk} {name}"
    run = prefix(files(chain.root, "virtio0")[4])
    cli("qmprestore", "merge", "--dir", chain.root, "--until", run, "--targetdir",
        tmp_path / "vm").ok()
    for disk in (*DISKS, "pflash1"):
        assert identical(tmp_path / "vm" / f"{disk}.qcow2", chain.ref(disk, 4)), disk
    assert (tmp_path / "vm" / "pflash0.qcow2").exists()
    assert digests(chain.root) == before


def test_rebase_makes_every_point_usable(cli, chain: DiffChain, tmp_path: Path) -> None:
    folder = copy_disk(chain.root, "virtio0", tmp_path / "copy")
    for point, name in enumerate(files(chain.root, "virtio0")):
        cli("qmprestore", "rebase", "--dir", folder, "--until", prefix(name)).ok()
        assert identical(folder / "image", chain.ref("virtio0", point)), name


@pytest.mark.parametrize("point", [2, 3, 4])
def test_commit_up_to_any_point_keeps_the_later_points(cli, chain: DiffChain, tmp_path: Path,
                                                       point: int) -> None:
    names = files(chain.root, "virtio0")
    folder = copy_disk(chain.root, "virtio0", tmp_path / "copy")
    cli("qmprestore", "commit", "--dir", folder, "--until", prefix(names[point])).ok()
    assert identical(folder / "image", chain.ref("virtio0", point))
    left = files(folder.parent, "virtio0")
    assert left == [names[0], *names[point + 1:]], \
        "the FULL keeps its name, the points after it stay, the ones before go"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*left, "image", DISK_METADATA_NAME])
    point_time = names[point].split("-")[1]
    points = [f"FULL-{point_time}", *(prefix(n) for n in left[1:])]
    for later, name in zip(range(point, len(names)), points):
        out = tmp_path / f"{later}.qcow2"
        cli("qmprestore", "merge", "--dir", folder, "--until", name, "--targetfile", out).ok()
        assert identical(out, chain.ref("virtio0", later)), f"{name} after the commit"


def test_snapshotrebase_keeps_every_point(cli, chain: DiffChain, tmp_path: Path) -> None:
    names = files(chain.root, "data1")
    folder = copy_disk(chain.root, "data1", tmp_path / "copy")
    cli("qmprestore", "snapshotrebase", "--dir", folder).ok()
    tags = ["FULL-BACKUP", *[prefix(n) for n in names[1:]]]
    assert snapshot_tags(folder / "image") == tags
    for point, tag in enumerate(tags):
        out = tmp_path / f"{tag}.raw"
        subprocess.run(["qemu-img", "convert", "-l", f"snapshot.name={tag}", "-O", "raw",
                        str(folder / "image"), str(out)], check=True)
        assert identical(out, chain.ref("data1", point)), tag


# -- bitmaps keep every change, whatever happens to a run ----------------------------------

def fault_vm(tmp_path: Path) -> TestVM:
    return TestVM(tmp_path / "img", fault_disks())


def test_sigkill_after_qemu_finished_a_diff_loses_no_change(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with fault_vm(tmp_path) as vm:
        chain_with_dirty_data(cli, vm, root)
        backup(cli, vm, root, "inc").ok()     # the DIFF must also hold what this INC held
        vm.write("virtio0", 0x3E, 0, DIRTY)
        kill_and_let_qemu_finish(vm, start_backup(vm, root, "diff"))
        assert not list(root.glob("*/DIFF-*.qcow2")), "no finished-looking DIFF"
        log = recovers(cli, vm, root, refs, "diff")
        assert "+pending back into" in log
        recovers(cli, vm, root, refs, "inc")
        recovers(cli, vm, root, refs, "diff")
        levels = [r["level"] for r in metadata(root)["chains"][0]["disks"]["virtio0"]["backups"]]
        assert levels == ["full", "inc", "diff", "inc", "diff"]


def test_interrupted_diff_keeps_the_chain_and_both_bitmaps(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with fault_vm(tmp_path) as vm:
        chain_with_dirty_data(cli, vm, root)
        proc = start_backup(vm, root, "diff")
        proc.send_signal(signal.SIGTERM)
        finished(proc, 143, "interrupted by signal 15")
        assert_clean(vm, root)
        recovers(cli, vm, root, refs, "diff")
        recovers(cli, vm, root, refs, "inc")


def test_killed_full_takes_its_diff_bitmap_along(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with fault_vm(tmp_path) as vm:
        vm.write("virtio0", 0x3C, 0, DIRTY)
        proc = start_backup(vm, root, "full")
        proc.kill()
        proc.wait()
        log = recovers(cli, vm, root, refs, "auto")
        assert "never recorded its full backup" in log
        chain_bitmap = metadata(root)["chains"][0]["bitmap"]
        assert sorted({n.split("@")[0] for n in tool_bitmaps(vm)}) == \
            [chain_bitmap, chain_bitmap + "+diff"]
        recovers(cli, vm, root, refs, "diff")


def test_chain_without_diff_bitmap_refuses_diff_but_continues_inc(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with fault_vm(tmp_path) as vm:
        backup(cli, vm, root, "full").ok()
        chain_bitmap = metadata(root)["chains"][0]["bitmap"]
        vm.cmd("block-dirty-bitmap-remove", node=node_of(vm, "virtio0"),
               name=chain_bitmap + "+diff")
        backup(cli, vm, root, "diff").failed(6, "has no bitmap", "+diff",
                                             "a differential backup is impossible")
        assert_clean(vm, root)
        recovers(cli, vm, root, refs, "inc")
        cli("qmpbackup", "--socket", vm.tool_socket, "cleanup", "--remove-bitmaps").ok()
        assert tool_bitmaps(vm) == {}


def test_auto_retires_both_bitmaps_of_an_unusable_chain(cli, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    with fault_vm(tmp_path) as vm:
        backup(cli, vm, root, "full").ok()
        old = metadata(root)["chains"][0]["bitmap"]
        vm.cmd("block-dirty-bitmap-remove", node=node_of(vm, "virtio0"), name=old)
        recovers(cli, vm, root, refs, "auto")
        new = metadata(root)["chains"][-1]["bitmap"]
        assert new != old
        assert sorted({n.split("@")[0] for n in tool_bitmaps(vm)}) == [new, new + "+diff"]
        shutil.rmtree(refs)
        recovers(cli, vm, root, refs, "diff")


def test_diff_in_a_flat_untimestamped_folder(cli, tmp_path: Path) -> None:
    """--no-subdir --no-timestamp: the FULL is named like the image, a DIFF always by its time."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    with fault_vm(tmp_path) as vm:
        expected = []
        for point, level in enumerate(("full", "inc", "diff", "inc")):
            vm.write("virtio0", 0x20 + point, point * MiB, 64 * 1024)
            expected.append(vm.reference("virtio0", refs / f"{point}.raw"))
            backup(cli, vm, root, level, "--include", "virtio0", "--no-subdir",
                   "--no-timestamp").ok()
    names = files(root, "virtio0")
    assert names[0] == "virtio0.qcow2" and names[2].startswith("DIFF-")
    assert info(root / names[2])["backing-filename"] == names[0]
    for point, name in enumerate(names):
        out = tmp_path / f"{point}.qcow2"
        cli("qmprestore", "merge", "--dir", root, "--filter", "virtio0", "--until", name,
            "--targetfile", out).ok()
        assert identical(out, expected[point]), name
