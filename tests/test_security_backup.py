"""The backup side of issue 20: a run writes the folder only through its own descriptors.

Run as root like CI, against a target folder an unprivileged user can write:
a watcher that swaps the new ``.partial`` for a symlink or a readable file,
a forged intent record naming a file behind a symlinked folder, and an image
whose name is one the tool reserves.  Host files ("victims") must keep their
content, nothing the attacker planted may be published as a backup, and
every recorded backup must still be there.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.helpers import backup
from tests.hostile import NOBODY, Swapper, Victim
from tests.vm import Disk, MiB, TestVM, identical, run

DISK = "virtio0"


pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path


def recorded(target: Path) -> list[Path]:
    """Every file the chain metadata of TARGET records, as a path."""
    meta = json.loads((target / "qmpbackup.json").read_text())
    return [target / disk.get("folder", "") / record["file"]
            for chain in meta["chains"] for disk in chain["disks"].values()
            for record in disk["backups"]]


def user_owned_target(tmp_path: Path) -> Path:
    """A target folder (and its disk folder) that belongs to the unprivileged user."""
    target = tmp_path / "backup"
    (target / DISK).mkdir(parents=True)
    for folder in (target, target / DISK):
        os.chown(folder, NOBODY, NOBODY)
    return target


# -- finding 3: the new .partial swapped right after it was created ----------------------------

def swapped_in(swap: str, victim: Victim) -> Callable[[Path], None]:
    """What the user puts where the new .partial was: a symlink to a host file, or their file."""
    def replace(path: Path) -> None:
        if swap == "symlink":
            path.symlink_to(victim.path)
        else:                     # a file the user can read, to receive the guest's disk
            path.touch(mode=0o644)
            os.chown(path, NOBODY, NOBODY)
            os.link(path, path.with_name(path.name + ".copy.stolen"))   # kept by the user
    return replace


def assert_nothing_leaked_or_published(target: Path) -> None:
    for entry in os.scandir(target / DISK):
        info = entry.stat(follow_symlinks=False)
        if info.st_uid != 0 or info.st_mode & 0o044:
            assert info.st_size == 0 or entry.is_symlink(), f"{entry.name} got the disk"
        assert entry.name.endswith((".partial", ".stolen")), f"{entry.name} was published"
    assert not (target / "qmpbackup.json").exists() or recorded(target) == []


def assert_swap_refused(swapper: Any, victim: Any, before: Any, target: Path,
                        result: Any) -> None:
    """The swap happened, and the run refused it: nothing written, leaked or published."""
    assert swapper.swapped, "the watcher never saw the .partial"
    assert victim.state() == before
    assert_nothing_leaked_or_published(target)
    result.failed(6, "was replaced")


@pytest.mark.parametrize("swap", ["symlink", "readable file"])
def test_partial_swapped_after_creation_is_neither_written_nor_published(
        cli, tmp_path: Path, swap: str) -> None:
    victim = Victim.make(tmp_path / "victim.conf")
    before = victim.state()
    target = user_owned_target(tmp_path)
    with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm:
        vm.write(DISK, 0x5A, 0, MiB)
        with Swapper(target / DISK, swapped_in(swap, victim)) as swapper:
            result = backup(cli, vm, target, "full")
        assert_swap_refused(swapper, victim, before, target, result)
        assert vm.tool_leftovers() == [], "no node, job or fdset stays in QEMU"


@pytest.mark.parametrize("swap", ["symlink", "readable file"])
def test_offline_partial_swap_is_neither_written_nor_published(
        cli, tmp_path: Path, swap: str) -> None:
    """--image: the private qemu-storage-daemon, too, writes only the file the run created."""
    victim = Victim.make(tmp_path / "victim.conf")
    before = victim.state()
    target = user_owned_target(tmp_path)
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(image)])
    with Swapper(target / DISK, swapped_in(swap, victim)) as swapper:
        result = cli("qmpbackup", "--image", f"{DISK}={image}", "backup", "--level", "full",
                     "--target", target, "--no-progress")
    assert_swap_refused(swapper, victim, before, target, result)


# -- finding 1: the intent record names a file behind a symlinked folder -----------------------

def test_forged_intent_through_a_symlinked_folder_deletes_nothing_outside(
        cli, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = Victim.make(outside / "FULL-1-host.qcow2")
    before = victim.state()
    target = tmp_path / "backup"
    with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm:
        backup(cli, vm, target, "full").ok()
        (target / "evil").symlink_to(outside)
        (target / "qmpbackup-intent.json").write_text(
            json.dumps({"time": 1, "files": ["evil/FULL-1-host.qcow2"]}))
        result = backup(cli, vm, target, "inc")
        assert victim.state() == before
        result.failed(6, "evil", "is a symlink, not a folder")
        assert vm.tool_leftovers() == []
    assert all(path.is_file() for path in recorded(target))


# -- issue 20 "likely data loss": an image named like the intent record ------------------------

def test_image_named_like_the_intent_record_keeps_the_full_it_recorded(
        cli, tmp_path: Path) -> None:
    images = tmp_path / "vm"
    images.mkdir()
    disk = Disk(DISK, "virtio", "qcow2", 8 * MiB, path=images / "qmpbackup-intent.json")
    target = tmp_path / "backup"
    with TestVM(images, [disk]) as vm:
        vm.write(DISK, 0x61, 0, MiB)
        reference = vm.reference(DISK, tmp_path / "ref.raw")
        backup(cli, vm, target, "full", "--no-subdir", "--no-timestamp").ok()
    files = recorded(target)
    assert len(files) == 1 and files[0].name != "qmpbackup-intent.json"
    assert files[0].is_file(), f"the recorded FULL {files[0].name} is gone"
    assert identical(files[0], reference)


# -- QMP over tcp: carries no descriptors, so QEMU gets names only in private folders ---------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tcp_qmp_writes_only_into_folders_no_other_user_can_change(cli, tmp_path: Path) -> None:
    address = f"tcp:127.0.0.1:{free_port()}"
    shared = user_owned_target(tmp_path)
    private = tmp_path / "private"
    with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)],
                extra_args=("-qmp", f"{address},server=on,wait=off")) as vm:
        vm.write(DISK, 0x71, 0, MiB)
        reference = vm.reference(DISK, tmp_path / "ref.raw")
        for target in (shared, shared / "sub"):
            cli("qmpbackup", "--socket", address, "backup", "--level", "full", "--target",
                target, "--no-progress").failed(5, "owned by uid 65534", "tcp:")
        assert sorted(os.listdir(shared)) == [DISK] and os.listdir(shared / DISK) == []
        cli("qmpbackup", "--socket", address, "backup", "--level", "full", "--target",
            private, "--no-progress").ok()
        assert vm.tool_leftovers() == []
    (full,) = recorded(private)
    assert identical(full, reference)
