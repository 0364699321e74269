"""qmprestore against chains made by qmpbackup from a real QEMU VM, proven by content.

The chains are built once per module (a VM, twelve backup runs) and every
test that changes a folder works on a copy, so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from libqmpbackup.errors import QemuImgError
from libqmpbackup.qemu import qemuimg
from tests.helpers import (
    copy_disk,
    digests,
    files,
    metadata,
    node_of,
    prefix,
    records,
    run_backup,
    snapshot_tags,
)
from tests.vm import Disk, MiB, TestVM, default_disks, file_digest, identical

QCOW2 = ("virtio0", "data1")
RAW = ("virtio1", "pflash0", "pflash1")
DISKS = QCOW2 + RAW


WRITES = {   # guest writes before each backup run: (disk, pattern, offset, length)
    0: [("virtio0", 0x11, 0, 4 * MiB), ("data1", 0x12, 0, 1 * MiB),
        ("virtio1", 0x13, 0, 1 * MiB), ("pflash1", 0x14, 0, 4096)],
    1: [("virtio0", 0x21, 2 * MiB, 128 * 1024), ("virtio0", 0x00, 3 * MiB, 64 * 1024),
        ("data1", 0x22, 64 * 1024, 8192), ("virtio1", 0x23, 2 * MiB, 64 * 1024),
        ("pflash1", 0x24, 8192, 4096)],
    2: [("virtio0", 0x31, 4 * MiB, 8 * MiB), ("data1", 0x32, 2 * MiB, 2 * MiB)],
    3: [("virtio0", 0x41, 6 * MiB, 64 * 1024), ("data1", 0x42, 0, 64 * 1024),
        ("virtio1", 0x43, 3 * MiB, 1 * MiB)],
}


def vm_disks() -> list[Disk]:
    """The default zoo without the ide disk: two qcow2 disks, a raw disk, two pflash."""
    return [d for d in default_disks() if d.name != "ide0-hd0"]


@dataclass
class Chains:
    """The folders built once, and the reference copy of every disk at every backup run."""

    main: Path                          # full + 3 incs, --include-raw, all disks
    compressed: Path                    # virtio0, --compress, full + inc
    monthly: Path                       # virtio0, --monthly base folder, full + inc
    multi: Path                         # virtio0, two chains in one folder
    refs: dict[tuple[str, int], Path] = field(default_factory=dict)   # (disk, point) -> raw

    def ref(self, disk: str, point: int) -> Path:
        return self.refs[(disk, point)]


def rate_limited_backup_with_writes_during_the_job(vm: TestVM, target: Path) -> None:
    """An incremental at 2 MiB/s; the guest writes while it runs (those go to the next one)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup", "--level",
         "inc", "--include-raw", "--no-progress", "--target", str(target),
         "--speed-limit", "2M"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not vm.cmd("query-jobs"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    vm.write("virtio0", 0x3A, 1 * MiB, 64 * 1024)      # inside the region being copied
    vm.write("virtio0", 0x3B, 30 * MiB, 64 * 1024)
    vm.write("data1", 0x3C, 7 * MiB, 64 * 1024)
    vm.write("pflash1", 0x3D, 0, 4096)
    assert vm.cmd("query-jobs"), "the writes must land while the job runs"
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chains]:
    base = tmp_path_factory.mktemp("chains")
    refs_dir = base / "refs"
    refs_dir.mkdir()
    built = Chains(base / "main", base / "compressed", base / "monthly", base / "multi")
    with TestVM(base / "vm", vm_disks()) as vm:
        def reference(point: int) -> None:
            for disk in DISKS:
                built.refs[(disk, point)] = vm.reference(disk, refs_dir / f"{disk}-{point}.raw")

        def write(point: int) -> None:
            for disk, pattern, offset, length in WRITES[point]:
                vm.write(disk, pattern, offset, length)

        for point in (0, 1):
            write(point)
            reference(point)
            level = "full" if point == 0 else "inc"
            run_backup(vm, built.main, level, "--include-raw")
            run_backup(vm, built.compressed, level, "--compress", "--include", "virtio0")
            run_backup(vm, built.monthly, "auto", "--monthly", "--include", "virtio0")
            run_backup(vm, built.multi, "auto", "--include", "virtio0")
        # the multi folder's chain loses its bitmap: auto starts a second chain there
        vm.cmd("block-dirty-bitmap-remove", node=node_of(vm, "virtio0"),
               name=metadata(built.multi)["chains"][0]["bitmap"])
        # point 2 is taken by a rate-limited job while the guest writes
        write(2)
        reference(2)
        run_backup(vm, built.multi, "auto", "--include", "virtio0")
        rate_limited_backup_with_writes_during_the_job(vm, built.main)
        write(3)
        reference(3)
        run_backup(vm, built.main, "inc", "--include-raw")
        run_backup(vm, built.multi, "auto", "--include", "virtio0")
    assert [r["level"] for r in records(built.main, "virtio0")] == ["full", "inc", "inc", "inc"]
    assert len(metadata(built.multi)["chains"]) == 2
    yield built


def point_file(chains: Chains, disk: str, point: int) -> str:
    return files(chains.main, disk)[point]


def until_forms(name: str, point: int) -> str:
    """Exercise every spelling --until accepts: file name, without extension, prefix."""
    return (name, os.path.splitext(name)[0], prefix(name))[point % 3]


# -- merge: every point of every disk, backup untouched ---------------------------------------

def test_merge_restores_every_point_of_every_disk(cli, chains: Chains, tmp_path: Path) -> None:
    before = digests(chains.main)
    for disk in DISKS:
        for point in range(4):
            out = tmp_path / f"{disk}-{point}.qcow2"
            name = point_file(chains, disk, point)
            cli("qmprestore", "merge", "--dir", chains.main / disk, "--until",
                until_forms(name, point), "--targetfile", out).ok()
            assert identical(out, chains.ref(disk, point)), f"{disk} at {name}"
    newest = tmp_path / "newest.raw"
    cli("qmprestore", "merge", "--dir", chains.main / "virtio0", "--format", "raw",
        "--targetfile", newest, "--rate-limit", "64M").ok()
    assert newest.stat().st_size == 32 * MiB and identical(newest, chains.ref("virtio0", 3))
    assert digests(chains.main) == before, "merge changed the backup folder"
    assert not list(tmp_path.glob("*.partial"))


def test_merge_creates_missing_target_folders_private(cli, chains: Chains, tmp_path: Path) -> None:
    """`--targetfile /tmp/restore/disk1.qcow2` works when /tmp/restore does not exist yet."""
    out = tmp_path / "restore" / "deeper" / "disk1.qcow2"
    cli("qmprestore", "merge", "--dir", chains.main / "virtio0", "--targetfile", out).ok()
    assert identical(out, chains.ref("virtio0", 3))
    for folder in (tmp_path / "restore", out.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    outdir = tmp_path / "vm" / "disks"
    cli("qmprestore", "merge", "--dir", chains.main, "--targetdir", outdir).ok()
    assert outdir.parent.stat().st_mode & 0o777 == 0o700
    assert identical(outdir / "virtio0.qcow2", chains.ref("virtio0", 3))
    dry = tmp_path / "dry" / "x.qcow2"
    text = cli("qmprestore", "merge", "--dir", chains.main / "virtio0", "--dry-run",
               "--targetfile", dry).ok().out
    assert f"# create folder {dry.parent}" in text and not dry.parent.exists()
    gone = tmp_path / "gone" / "x.qcow2"
    cli("qmprestore", "merge", "--dir", chains.main / "virtio0", "--until", "INC-1",
        "--targetfile", gone).failed(2, "no such restore point")
    assert not gone.parent.exists(), "a refused merge creates no folder"


def test_merge_targetdir_restores_every_disk_of_a_run(cli, chains: Chains, tmp_path: Path) -> None:
    before = digests(chains.main)
    run2 = prefix(point_file(chains, "virtio0", 2))
    cli("qmprestore", "merge", "--dir", chains.main, "--until", run2,
        "--targetdir", tmp_path / "at2").ok()
    assert sorted(p.name for p in (tmp_path / "at2").iterdir()) == sorted(f"{d}.qcow2" for d in DISKS)
    for disk in DISKS:
        assert identical(tmp_path / "at2" / f"{disk}.qcow2", chains.ref(disk, 2)), disk
    cli("qmprestore", "merge", "--dir", chains.main, "--format", "source",
        "--targetdir", tmp_path / "newest").ok()
    for disk in DISKS:
        ext = "qcow2" if disk in QCOW2 else "raw"
        assert identical(tmp_path / "newest" / f"{disk}.{ext}", chains.ref(disk, 3)), disk
    assert digests(chains.main) == before


# -- in-place operations on copies ----------------------------------------------------------

def test_rebase_links_image_to_each_point_and_never_a_later_file(
        cli, chains: Chains, tmp_path: Path) -> None:
    for disk in ("virtio0", "data1", "virtio1", "pflash1"):
        folder = copy_disk(chains.main, disk, tmp_path / disk)
        names = files(folder.parent, disk)
        for point in (2, 0, 3, 1):
            later = {n: file_digest(folder / n) for n in names[point + 1:]}
            cli("qmprestore", "rebase", "--dir", folder, "--until",
                until_forms(names[point], point)).ok()
            assert os.readlink(folder / "image") == names[point]
            assert identical(folder / "image", chains.ref(disk, point)), f"{disk} at {point}"
            assert {n: file_digest(folder / n) for n in names[point + 1:]} == later


def forget_checksums(root: Path) -> None:
    """Metadata as written before qmpbackup recorded checksums."""
    meta = metadata(root)
    for chain in meta["chains"]:
        for disk in chain["disks"].values():
            for record in disk["backups"]:
                del record["digest"]
    (root / "qmpbackup.json").write_text(json.dumps(meta))


def test_rebase_rewrites_backing_names_as_relative(cli, chains: Chains, tmp_path: Path) -> None:
    """Absolute backing names (an older chain, no checksums): rebase repairs and checksums them."""
    folder = copy_disk(chains.main, "virtio0", tmp_path / "c")
    forget_checksums(folder.parent)
    names = files(folder.parent, "virtio0")
    subprocess.run(["qemu-img", "rebase", "-u", "-b", str(folder / names[1]), "-F", "qcow2",
                    str(folder / names[2])], check=True)
    cli("qmprestore", "rebase", "--dir", folder).ok()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(folder / names[2])],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == names[1]
    assert identical(folder / "image", chains.ref("virtio0", 3))
    statuses = [f["status"] for f in json.loads(
        cli("qmprestore", "verify", "--dir", folder, "--json").ok().out)["files"]]
    assert statuses == ["unverifiable", "unverifiable", "ok", "unverifiable"], \
        "the header it rewrote got a checksum; the others stay verifiable by qemu-img only"


def test_commit_makes_the_full_hold_each_point(cli, chains: Chains, tmp_path: Path) -> None:
    for disk in QCOW2:
        for point in range(4):
            folder = copy_disk(chains.main, disk, tmp_path / f"{disk}-{point}")
            names = files(folder.parent, disk)
            cli("qmprestore", "commit", "--dir", folder, "--until",
                until_forms(names[point], point), "--rate-limit", "512M").ok()
            full = folder / names[0]   # the FULL keeps its name, as upstream documents
            assert identical(full, chains.ref(disk, point)), f"{disk} committed to {point}"
            held = records(folder.parent, disk)[0]
            assert (held["time"], held["holds"]) == (
                (records(chains.main, disk)[0]["time"], None) if point == 0
                else (records(chains.main, disk)[0]["time"], records(chains.main, disk)[point]["time"]))
            if point:      # the committed point is still named as it was
                out = tmp_path / f"{disk}-{point}-again.qcow2"
                cli("qmprestore", "merge", "--dir", folder, "--until", prefix(names[point]),
                    "--targetfile", out).ok()
                assert identical(out, chains.ref(disk, point))
            assert os.readlink(folder / "image") == full.name
            left = files(folder.parent, disk)
            assert left == [full.name, *names[point + 1:]], "applied INCs leave chain and folder"
            assert sorted(p.name for p in folder.iterdir()) == sorted(
                [*left, "image", "qmpbackup-disk.json"])
            for later in range(point + 1, 4):     # later points still restore exactly
                out = tmp_path / f"{disk}-{point}-{later}.qcow2"
                cli("qmprestore", "merge", "--dir", folder, "--until", prefix(names[later]),
                    "--targetfile", out).ok()
                assert identical(out, chains.ref(disk, later))
    raw = copy_disk(chains.main, "virtio1", tmp_path / "raw")
    cli("qmprestore", "commit", "--dir", raw, "--until", prefix(files(raw.parent, "virtio1")[1])).ok()
    assert identical(raw / "image", chains.ref("virtio1", 1))


@pytest.mark.parametrize("command", ["commit", "snapshotrebase"])
def test_commit_in_a_live_backup_folder_keeps_the_chain_going(cli, tmp_path: Path,
                                                              command: str) -> None:
    """After commit the engine appends to the consolidated chain, and every point still restores."""
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    with TestVM(tmp_path / "img", [Disk("virtio0", "virtio", "qcow2", 8 * MiB)]) as vm:
        expected = []
        for point, pattern in enumerate((0x51, 0x52, 0x53, 0x54)):
            vm.write("virtio0", pattern, point * MiB, 128 * 1024)
            expected.append(vm.reference("virtio0", refs / f"{point}.raw"))
            if point == 3:
                # consolidate up to the first incremental while the VM runs
                first = files(target, "virtio0")[0]
                cli("qmprestore", command, "--dir", target / "virtio0", "--until",
                    prefix(files(target, "virtio0")[1])).ok()
                assert files(target, "virtio0")[0] == first, "the FULL keeps its name"
            run_backup(vm, target, "full" if point == 0 else "inc")
    names = files(target, "virtio0")
    assert [n.split("-")[0] for n in names] == ["FULL", "INC", "INC"]
    for point, name in zip((1, 2, 3), names):
        out = tmp_path / f"{name}.qcow2"
        cli("qmprestore", "merge", "--dir", target / "virtio0", "--until", name,
            "--targetfile", out).ok()
        assert identical(out, expected[point]), name


def test_snapshotrebase_keeps_every_point_as_a_snapshot(cli, chains: Chains, tmp_path: Path) -> None:
    for disk in QCOW2:
        folder = copy_disk(chains.main, disk, tmp_path / disk)
        names = files(folder.parent, disk)
        cli("qmprestore", "snapshotrebase", "--dir", folder).ok()
        image = folder / "image"
        assert identical(image, chains.ref(disk, 3))
        tags = ["FULL-BACKUP", *[prefix(n) for n in names[1:]]]
        assert os.readlink(image) == names[0], "the FULL keeps its original name"
        # upstream's documented next step: qemu-img snapshot -l on FULL-<original time>-…
        listing = subprocess.run(["qemu-img", "snapshot", "-l", str(folder / names[0])],
                                 capture_output=True, text=True, check=True).stdout
        assert all(tag in listing for tag in tags)
        assert snapshot_tags(image) == tags
        for point, tag in enumerate(tags):
            out = tmp_path / f"{disk}-{tag}.raw"
            subprocess.run(["qemu-img", "convert", "-l", f"snapshot.name={tag}", "-O", "raw",
                            str(image), str(out)], check=True)
            assert identical(out, chains.ref(disk, point)), f"{disk} snapshot {tag}"
        applied = tmp_path / f"{disk}-applied.qcow2"
        shutil.copyfile(image, applied)
        subprocess.run(["qemu-img", "snapshot", "-a", tags[1], str(applied)], check=True)
        assert identical(applied, chains.ref(disk, 1))


# -- every kind of chain the engine writes --------------------------------------------------

def test_compressed_chain(cli, chains: Chains, tmp_path: Path) -> None:
    assert records(chains.compressed, "virtio0")[0]["compressed"] is True
    for point in range(2):
        out = tmp_path / f"{point}.qcow2"
        cli("qmprestore", "merge", "--dir", chains.compressed / "virtio0", "--until",
            files(chains.compressed, "virtio0")[point], "--targetfile", out).ok()
        assert identical(out, chains.ref("virtio0", point))
    folder = copy_disk(chains.compressed, "virtio0", tmp_path / "copy")
    cli("qmprestore", "commit", "--dir", folder).ok()
    assert identical(folder / "image", chains.ref("virtio0", 1))


def test_monthly_folders(cli, chains: Chains, tmp_path: Path) -> None:
    (month,) = [p for p in chains.monthly.iterdir()]
    listing = cli("qmprestore", "list", "--dir", chains.monthly).ok().out
    assert f"{month.name}/" in listing
    for name in files(month, "virtio0"):
        assert name in listing
    for point in range(2):
        out = tmp_path / f"{point}.qcow2"
        cli("qmprestore", "merge", "--dir", month / "virtio0", "--until",
            prefix(files(month, "virtio0")[point]), "--targetfile", out).ok()
        assert identical(out, chains.ref("virtio0", point))
    cli("qmprestore", "merge", "--dir", chains.monthly, "--targetdir", tmp_path / "x").failed(
        2, "one chain folder per month", month.name)


def test_several_chains_in_one_folder(cli, chains: Chains, tmp_path: Path) -> None:
    folder = chains.multi / "virtio0"
    first, second = metadata(chains.multi)["chains"]
    old, new = files(chains.multi, "virtio0", 0), files(chains.multi, "virtio0", 1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(old + new + ["qmpbackup-disk.json"])
    expected = {old[0]: 0, old[1]: 1, new[0]: 2, new[1]: 3}
    for name, point in expected.items():
        out = tmp_path / f"{name}.qcow2"
        cli("qmprestore", "merge", "--dir", folder, "--until", name, "--targetfile", out).ok()
        assert identical(out, chains.ref("virtio0", point)), name
    cli("qmprestore", "merge", "--dir", folder, "--targetfile", tmp_path / "newest.qcow2").ok()
    assert identical(tmp_path / "newest.qcow2", chains.ref("virtio0", 3))
    cli("qmprestore", "merge", "--dir", folder, "--uuid", first["uuid"],
        "--targetfile", tmp_path / "first.qcow2").ok()
    assert identical(tmp_path / "first.qcow2", chains.ref("virtio0", 1))
    listing = cli("qmprestore", "list", "--dir", chains.multi).ok().out
    assert first["uuid"] in listing and second["uuid"] in listing
    copy = copy_disk(chains.multi, "virtio0", tmp_path / "copy")
    cli("qmprestore", "commit", "--dir", copy).ok()
    assert identical(copy / "image", chains.ref("virtio0", 3))
    cli("qmprestore", "merge", "--dir", copy, "--until", old[1],
        "--targetfile", tmp_path / "old-after-commit.qcow2").ok()
    assert identical(tmp_path / "old-after-commit.qcow2", chains.ref("virtio0", 1))


def test_list_shows_every_point(cli, chains: Chains) -> None:
    out = cli("qmprestore", "list", "--dir", chains.main).ok().out
    header = out.splitlines()[0]
    for column in ("chain", "disk", "restore point", "time", "level", "size", "virtual size"):
        assert column in header
    uuid = metadata(chains.main)["chains"][0]["uuid"]
    for disk in DISKS:
        for name in files(chains.main, disk):
            row = next(line for line in out.splitlines() if name in line)
            assert uuid in row and disk in row and prefix(name) in row
            assert str((chains.main / disk / name).stat().st_size) in row
    inc = next(line for line in out.splitlines() if f"{files(chains.main, 'virtio0')[1]}" in line)
    assert " inc " in inc and str(32 * MiB) in inc
    one = cli("qmprestore", "list", "--dir", chains.main / "data1").ok().out
    assert "data1" in one and "virtio0" not in one


# -- dry run and interruption ----------------------------------------------------------------

def test_dry_run_prints_steps_and_changes_nothing(cli, chains: Chains, tmp_path: Path) -> None:
    folder = copy_disk(chains.main, "virtio0", tmp_path / "c")
    before = digests(folder.parent)
    out = cli("qmprestore", "commit", "--dir", folder, "--dry-run", "--rate-limit", "1M").ok().out
    assert "qemu-img commit -q -f qcow2 -d -b" in out and "-r 1048576" in out
    assert "# update" in out and "# remove" in out and "# rename" not in out
    out = cli("qmprestore", "snapshotrebase", "--dir", folder, "--dry-run").ok().out
    assert out.count("qemu-img snapshot -q --image-opts -c") == 4 and out.count("qemu-img commit") == 3
    out = cli("qmprestore", "rebase", "--dir", folder, "--dry-run").ok().out
    assert "# link" in out
    out = cli("qmprestore", "merge", "--dir", folder, "--dry-run",
              "--targetfile", tmp_path / "x.qcow2").ok().out
    assert out.startswith("qemu-img convert") and not (tmp_path / "x.qcow2").exists()
    assert digests(folder.parent) == before


def test_interrupted_snapshotrebase_refuses_other_commands_then_finishes(
        cli, chains: Chains, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from libqmpbackup.errors import Interrupted
    folder = copy_disk(chains.main, "virtio0", tmp_path / "c")
    names = files(folder.parent, "virtio0")
    real_commit = qemuimg.commit
    calls = []

    def commit_then_die(*args, **kwargs):
        calls.append(args)
        real_commit(*args, **kwargs)       # the data lands, the journal is not updated
        if len(calls) == 2:
            raise Interrupted(15)
    monkeypatch.setattr(qemuimg, "commit", commit_then_die)
    cli("qmprestore", "snapshotrebase", "--dir", folder).failed(143, "signal 15")
    monkeypatch.undo()
    assert (folder / "qmprestore-journal.json").exists()
    cli("qmprestore", "merge", "--dir", folder, "--targetfile", tmp_path / "x.qcow2").failed(
        6, "unfinished qmprestore snapshotrebase", "qmprestore snapshotrebase --dir")
    cli("qmprestore", "commit", "--dir", folder).failed(6, "unfinished qmprestore snapshotrebase")
    cli("qmprestore", "snapshotrebase", "--dir", folder).ok()
    assert not (folder / "qmprestore-journal.json").exists()
    image = folder / "image"
    tags = ["FULL-BACKUP", *[prefix(n) for n in names[1:]]]
    assert snapshot_tags(image) == tags, "no duplicate snapshot after the re-run"
    for point, tag in enumerate(tags):
        out = tmp_path / f"{tag}.raw"
        subprocess.run(["qemu-img", "convert", "-l", f"snapshot.name={tag}", "-O", "raw",
                        str(image), str(out)], check=True)
        assert identical(out, chains.ref("virtio0", point)), tag
    assert identical(image, chains.ref("virtio0", 3))


def sigterm_once_started(argv: list[str], started: Callable[[], bool]) -> str:
    """Run ``qmprestore ARGV`` (rate-limited), SIGTERM it once STARTED() holds; its stderr (exit 143)."""
    proc = subprocess.Popen([sys.executable, "-m", "qmprestore", *argv, "--rate-limit", "2M"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not started():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    return err


def test_sigterm_during_commit_then_rerun(chains: Chains, tmp_path: Path) -> None:
    folder = copy_disk(chains.main, "virtio0", tmp_path / "c")
    err = sigterm_once_started(["commit", "--dir", str(folder)],
                               lambda: (folder / "qmprestore-journal.json").exists())
    assert "Traceback" not in err and "qmprestore commit --dir" in err
    cli_rerun = subprocess.run([sys.executable, "-m", "qmprestore", "commit", "--dir", str(folder)],
                               capture_output=True, text=True)
    assert cli_rerun.returncode == 0, cli_rerun.stderr
    assert identical(folder / "image", chains.ref("virtio0", 3))
    assert not (folder / "qmprestore-journal.json").exists()


def test_sigterm_during_merge_leaves_nothing(chains: Chains, tmp_path: Path) -> None:
    """The checksums run in a thread beside qemu-img: a signal stops both, no partial stays."""
    out = tmp_path / "out" / "image.qcow2"
    err = sigterm_once_started(
        ["merge", "--dir", str(chains.main / "virtio0"), "--targetfile", str(out)],
        lambda: bool(list(out.parent.glob(".*.partial"))))
    assert "Traceback" not in err
    assert not out.exists() and not out.parent.exists(), "no image, no partial, no new folder"


# -- refusals: documented exit code, one line, folder unchanged ------------------------------

def broken_copy(chains: Chains, tmp_path: Path, damage) -> Path:
    folder = copy_disk(chains.main, "virtio0", tmp_path / "broken")
    damage(folder, files(folder.parent, "virtio0"))
    return folder


def drop_full_from_metadata(folder: Path, names: list[str]) -> None:
    meta = metadata(folder.parent)
    meta["chains"][0]["disks"]["virtio0"]["backups"].pop(0)
    (folder.parent / "qmpbackup.json").write_text(json.dumps(meta))
    (folder / names[0]).unlink()


def flip_header(folder: Path, names: list[str]) -> None:
    with open(folder / names[1], "r+b") as handle:
        handle.write(b"\xff\xff\xff\xff")


def rebase_past_middle(folder: Path, names: list[str]) -> None:
    subprocess.run(["qemu-img", "rebase", "-u", "-b", names[1], "-F", "qcow2",
                    str(folder / names[3])], check=True)


@pytest.mark.parametrize("damage, rc, message", [
    (lambda f, n: (f / n[2]).unlink(), 6, "is missing"),
    (drop_full_from_metadata, 6, "has no FULL backup before it"),
    (flip_header, 6, "is not in qcow2 format"),
    (rebase_past_middle, 6, "is backed by"),
    (lambda f, n: shutil.copyfile(f / n[3], f / "INC-9999999999-virtio0.qcow2"), 6,
     "INC-9999999999-virtio0.qcow2 is not in the chain metadata"),
], ids=["missing-middle-inc", "inc-without-full", "corrupted-header",
        "wrong-backing", "extra-file"])
def test_inconsistent_chains_are_refused(cli, chains: Chains, tmp_path: Path,
                                         damage, rc: int, message: str) -> None:
    folder = broken_copy(chains, tmp_path, damage)
    before = digests(folder.parent)
    for command in (["merge", "--targetfile", tmp_path / "out.qcow2"], ["commit"],
                    ["snapshotrebase"], ["rebase"]):
        cli("qmprestore", command[0], "--dir", folder, *command[1:]).failed(rc, message)
    assert digests(folder.parent) == before
    assert not (tmp_path / "out.qcow2").exists()


def test_skip_check_restores_past_metadata_problems(cli, chains: Chains, tmp_path: Path) -> None:
    def extra(folder: Path, names: list[str]) -> None:
        shutil.copyfile(folder / names[3], folder / "INC-9999999999-virtio0.qcow2")
    folder = broken_copy(chains, tmp_path, extra)
    cli("qmprestore", "merge", "--dir", folder, "--skip-check",
        "--targetfile", tmp_path / "out.qcow2").ok()
    assert identical(tmp_path / "out.qcow2", chains.ref("virtio0", 3))


def test_a_partial_file_is_ignored_with_a_warning(cli, chains: Chains, tmp_path: Path) -> None:
    """A .partial is a running or killed backup's: never a point, and no reason to refuse."""
    folder = broken_copy(chains, tmp_path, lambda f, n: (f / (n[3] + ".partial")).write_text(""))
    before = digests(folder.parent)
    result = cli("qmprestore", "merge", "--dir", folder,
                 "--targetfile", tmp_path / "out.qcow2").ok()
    assert "ignoring INC-" in result.err and ".partial" in result.err
    assert identical(tmp_path / "out.qcow2", chains.ref("virtio0", 3))
    assert digests(folder.parent) == before
    cli("qmprestore", "rebase", "--dir", folder).ok()
    assert identical(folder / "image", chains.ref("virtio0", 3))


def test_usage_and_environment_errors(cli, chains: Chains, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_disk(chains.main, "virtio0", tmp_path / "c")
    before = digests(folder.parent)
    cli("qmprestore", "merge", "--dir", folder, "--until", "INC-1", "--targetfile",
        tmp_path / "x.qcow2").failed(2, "no such restore point", prefix(files(folder.parent, "virtio0")[3]))
    cli("qmprestore", "commit", "--dir", folder, "--until", "nonsense").failed(2, "'nonsense'")
    cli("qmprestore", "merge", "--dir", tmp_path / "nope", "--targetfile",
        tmp_path / "x.qcow2").failed(5, "does not exist")
    (tmp_path / "a-file").write_text("")
    cli("qmprestore", "merge", "--dir", folder, "--targetfile",
        tmp_path / "a-file" / "x.qcow2").failed(5, "exists and is not a directory", "--targetfile")
    cli("qmprestore", "list", "--dir", tmp_path / "nope").failed(5, "does not exist")
    cli("qmprestore", "commit", "--dir", folder.parent).failed(2, "works on one disk", "virtio0")
    cli("qmprestore", "merge", "--dir", folder.parent, "--targetfile", tmp_path / "x").failed(
        2, "--targetdir")
    (tmp_path / "exists.qcow2").write_text("precious")
    cli("qmprestore", "merge", "--dir", folder, "--targetfile", tmp_path / "exists.qcow2").failed(
        5, "already exists")
    assert (tmp_path / "exists.qcow2").read_text() == "precious"
    cli("qmprestore", "merge", "--dir", folder, "--uuid", "nope",
        "--targetfile", tmp_path / "x.qcow2").failed(2, "--uuid nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    cli("qmprestore", "rebase", "--dir", empty).failed(6, "neither a backup folder")
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    monkeypatch.setenv("PATH", str(no_tools))
    for command in (["merge", "--targetfile", tmp_path / "x.qcow2"], ["commit"], ["rebase"]):
        cli("qmprestore", command[0], "--dir", folder, *command[1:]).failed(
            9, "qemu-img not found on PATH")
    monkeypatch.undo()
    assert digests(folder.parent) == before
    assert not (tmp_path / "x.qcow2").exists()


def test_help_of_every_command_shows_examples(cli) -> None:
    for command in ("list", "verify", "merge", "rebase", "commit", "snapshotrebase"):
        result = cli("qmprestore", command, "--help")
        assert result.rc == 0 and "examples:" in result.out and "qmprestore " + command in result.out


def test_backup_and_in_place_restore_exclude_each_other(cli, chains: Chains, tmp_path: Path) -> None:
    """A backup never extends a chain an in-place restore is rewriting, and vice versa."""
    from libqmpbackup.store.handles import Folder
    from libqmpbackup.store.journal import Journal
    from libqmpbackup.store.locks import chain_lock
    folder = copy_disk(chains.main, "virtio0", tmp_path / "copy")
    before = digests(folder)
    with chain_lock(folder.parent):   # what a running backup holds
        cli("qmprestore", "commit", "--dir", folder).failed(4, "another backup is running")
        cli("qmprestore", "rebase", "--dir", folder).failed(4, "another backup is running")
    assert digests(folder) == before
    names = files(folder.parent, "virtio0")
    with Folder.open_root(folder) as held:
        Journal(operation="commit", chain=metadata(folder.parent)["chains"][0]["uuid"],
                disk="virtio0", base=names[0], result=names[0], point=names[1], point_time=1,
                steps=names[1:2]).save(held)
    with TestVM(tmp_path / "img", [Disk("virtio0", "virtio", "qcow2", 32 * MiB)]) as vm:
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "auto",
            "--include", "virtio0", "--target", folder.parent).failed(
                6, "unfinished qmprestore commit", "qmprestore commit --dir")
        assert vm.tool_leftovers() == []


def test_qemu_img_failure_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError) as err:
        qemuimg.info(tmp_path / "missing file.qcow2")
    assert "qemu-img info --output=json" in str(err.value)
    assert "'" in str(err.value), "file names are quoted like a shell would"
    assert "No such file" in str(err.value)
