"""``qmprestore mount --filesystems`` of a real guest's ext4: each point shows exactly its files.

The tiny guest writes files on its data disk (ext4 on the whole disk, no
partition table) between quiesced backups; every point is mounted with
``--filesystems`` and read like a user would: ``ls`` and ``cat`` below
``MOUNTPOINT/virtio0/disk/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

from qmpbackup.cli import main as qmpbackup_main
from tests.guestvm import GuestImages, GuestVM, make_data_disk
from tests.helpers import digests, leftovers

pytestmark = pytest.mark.guest

#: what the guest writes before each point, and the files (name -> content) each point holds
STEPS = ["echo one > /mnt/a; mkdir /mnt/d; echo deep > /mnt/d/x",
         "echo two > /mnt/b; echo changed > /mnt/a; rm /mnt/d/x",
         "rm /mnt/b; echo three > /mnt/c"]
EXPECTED = [{"a": "one\n", "d/x": "deep\n"},
            {"a": "changed\n", "b": "two\n"},
            {"a": "changed\n", "c": "three\n"}]


@pytest.fixture(scope="module")
def guest_backup(guest_images: GuestImages,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("mount-guest")
    target = work / "backup"
    with GuestVM(guest_images, make_data_disk(work / "data.qcow2"), log_dir=work / "logs") as vm:
        for number, step in enumerate(STEPS):
            code, _, err = vm.exec(f"{step}; sync")
            assert code == 0, err
            rc = qmpbackup_main(["--socket", vm.tool_socket, "--agent-socket", vm.qga_socket,
                                 "--quiet", "backup", "--level", "full" if number == 0 else "inc",
                                 "--target", str(target), "--no-progress", "--quiesce"])
            assert rc == 0
    yield target


def files_below(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and "lost+found" not in p.parts}


def test_each_point_shows_exactly_its_files(cli, guest_backup: Path,
                                            mountpoint: Path) -> None:
    before = digests(guest_backup)
    points = [r["file"] for r in json.loads((guest_backup / "qmpbackup.json").read_text())
              ["chains"][-1]["disks"]["virtio0"]["backups"]]
    for point, expected in zip(points, EXPECTED):
        shown = json.loads(cli("qmprestore", "mount", "--dir", guest_backup, "--until", point,
                               "--filesystems", "--json", mountpoint).ok().out)
        [disk] = shown["disks"]
        assert disk["loops"][0].startswith("/dev/loop")
        assert [(f["partition"], f["type"], f.get("mounted")) for f in disk["filesystems"]] == [
            ("disk", "ext4", "yes")]
        assert files_below(mountpoint / "virtio0" / "disk") == expected, point
        cli("qmprestore", "umount", mountpoint).ok()
        assert leftovers(mountpoint) == []
    assert digests(guest_backup) == before
