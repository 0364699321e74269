"""Offline backups without QEMU: --image parsing, disk ids, the daemon's command line and errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libqmpbackup.backup.image_disks import (
    ImageSpec,
    daemon_images,
    parse_image_spec,
    recorded_disk_ids,
)
from libqmpbackup.errors import ConnectError, ImageInUseError, UsageError
from libqmpbackup.qemu.storage_daemon import DaemonImage, command_line, startup_error
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain


@pytest.mark.parametrize("text,spec", [
    ("/var/lib/vm/vm1.qcow2", ImageSpec("/var/lib/vm/vm1.qcow2")),
    ("virtio0=/var/lib/vm/vm1.qcow2", ImageSpec("/var/lib/vm/vm1.qcow2", "virtio0")),
    ("sys=rel/a=b.qcow2", ImageSpec("rel/a=b.qcow2", "sys")),
    ("/srv/a=b.qcow2", ImageSpec("/srv/a=b.qcow2")),
    ("./a=b.qcow2", ImageSpec("./a=b.qcow2")),
])
def test_image_spec(text: str, spec: ImageSpec) -> None:
    assert parse_image_spec(text) == spec


@pytest.mark.parametrize("text", ["a b=/x", "..=/x", "=/x", "x=", "-x=/y"])
def test_bad_image_specs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_image_spec(text)


def _store(root: Path, disks: dict[str, tuple[str, int]]) -> ChainStore:
    chain = Chain(uuid="c1", bitmap="qmpbackup-c1", created=1, disks={
        disk_id: DiskChain([BackupRecord(file=f"FULL-{t}-x.qcow2", level="full", time=t,
                                         virtual_size=1, source_image=source)])
        for disk_id, (source, t) in disks.items()})
    return ChainStore(root, [chain])


def test_disk_ids_given_recorded_or_file_name(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("vm1.qcow2", "data.qcow2", "other.img"):
        (images / name).write_bytes(b"")
    os.symlink(images / "vm1.qcow2", tmp_path / "link.qcow2")
    store = _store(tmp_path, {"virtio0": (str(tmp_path / "link.qcow2"), 10),
                              "stale": (str(images / "vm1.qcow2"), 5),
                              "ide0-hd0": ("data.qcow2", 10)})    # relative: never matched
    specs = [ImageSpec(str(images / "vm1.qcow2")),
             ImageSpec(str(images / "data.qcow2")),
             ImageSpec(str(images / "other.img"), "extra")]
    assert daemon_images(specs, [store]) == [
        DaemonImage("virtio0", str(images / "vm1.qcow2")),
        DaemonImage("data", str(images / "data.qcow2")),
        DaemonImage("extra", str(images / "other.img")),
    ]


def test_newest_chain_wins_and_garbage_metadata_is_ignored(tmp_path: Path) -> None:
    image = tmp_path / "vm1.qcow2"
    image.write_bytes(b"")
    old = _store(tmp_path, {"old": (str(image), 1)})
    new = _store(tmp_path, {"new": (str(image), 2)})
    garbage = _store(tmp_path, {"bad": (str(image), 3)})
    garbage.chains[0].disks["bad"].backups[0].source_image = 42  # type: ignore[assignment]
    garbage.chains[0].disks["bad"].backups[0].time = "x"         # type: ignore[assignment]
    assert recorded_disk_ids([ChainStore(tmp_path, [*old.chains, *new.chains]), garbage]) == {
        str(image): "new"}
    forged = _store(tmp_path, {"evil\nqmpbackup: error: forged": (str(image), 9)})
    assert recorded_disk_ids([forged]) == {}


def test_image_problems_are_usage_errors(tmp_path: Path) -> None:
    image = tmp_path / "vm1.qcow2"
    image.write_bytes(b"")
    with pytest.raises(UsageError, match="No such file"):
        daemon_images([ImageSpec(str(tmp_path / "missing.qcow2"))])
    with pytest.raises(UsageError, match="not an image file"):
        daemon_images([ImageSpec(str(tmp_path))])
    with pytest.raises(UsageError, match="given twice"):
        daemon_images([ImageSpec(str(image)), ImageSpec(str(image), "x")])
    (tmp_path / "vm1.raw").write_bytes(b"")
    with pytest.raises(UsageError, match="same disk id vm1"):
        daemon_images([ImageSpec(str(image)), ImageSpec(str(tmp_path / "vm1.raw"))])


def test_daemon_command_line_survives_commas() -> None:
    argv = command_line([DaemonImage("a", "/srv/a,b.qcow2")], "/tmp/x,y/qmp.sock")
    assert argv[0] == "qemu-storage-daemon"
    blockdevs = [json.loads(argv[i + 1]) for i, arg in enumerate(argv) if arg == "--blockdev"]
    assert blockdevs == [{"driver": "file", "filename": "/srv/a,b.qcow2", "node-name": "img0-file"},
                         {"driver": "qcow2", "file": "img0-file", "node-name": "img0"}]
    assert "socket,id=qmp0,path=/tmp/x,,y/qmp.sock,server=on,wait=off" in argv
    lvm = command_line([DaemonImage("a", "/dev/vg/vm1", block_device=True)], "/s")
    assert json.loads(lvm[2])["driver"] == "host_device"
    # images before the monitor: the socket appears only once they are open
    assert argv.index("--chardev") > max(i for i, a in enumerate(argv) if a == "--blockdev")


IMAGES = [DaemonImage("virtio0", "/img/vm1.qcow2"), DaemonImage("data1", "/img/data.qcow2")]


def test_startup_errors_name_the_image() -> None:
    locked = ('qemu-storage-daemon: --blockdev {"driver": "qcow2", "file": "img1-file", '
              '"node-name": "img1"}: Failed to get "write" lock\n'
              "Is another process using the image [/img/data.qcow2]?\n")
    error = startup_error(locked, IMAGES)
    assert isinstance(error, ImageInUseError) and error.exit_code == 12
    assert "/img/data.qcow2" in str(error) and "--socket" in str(error)
    raw = ('qemu-storage-daemon: --blockdev {"driver": "qcow2", "file": "img0-file", '
           '"node-name": "img0"}: Image is not in qcow2 format\n')
    error = startup_error(raw, IMAGES)
    assert type(error) is ConnectError and "/img/vm1.qcow2" in str(error)
    assert "qcow2 images" in str(error)
    assert "went wrong" in str(startup_error("qemu-storage-daemon: went wrong\n", IMAGES))
