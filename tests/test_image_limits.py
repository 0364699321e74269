"""qemu-img on folder content runs under limits: an image bomb is damage, not a hang.

A 34 MB qcow2 whose 4 M L1 entries all share one L2 table keeps a plain
``qemu-img check`` busy for most of an hour (finding 8 of issue 20; measured
with QEMU 7.2: a 1/256 slice of it takes 10 s).  With the CPU budget lowered
through the environment, ``verify`` must call it damaged (exit 11) and a
restore must refuse it in one line, both within seconds; pytest-timeout
turns a hang into a failure.  Every assertion names the limit, so a bomb
that stopped being one would fail here rather than pass unnoticed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import pytest

from libqmpbackup import errors
from libqmpbackup.qemu import qemuimg
from tests.hostile_images import write_cluster_bomb, write_error_flood

BOMB = "FULL-100-bomb.qcow2"
DISK = "virtio0"


def bomb_folder(root: Path, write: Callable[[Path], int] = write_cluster_bomb) -> Path:
    """A backup folder whose only chain records the bomb as its FULL (no checksum recorded)."""
    (root / DISK).mkdir(parents=True)
    size = write(root / DISK / BOMB)
    record = {"file": BOMB, "level": "full", "time": 100, "virtual_size": size,
              "source_image": "/vm/bomb.qcow2", "source_format": "qcow2"}
    metadata = {"version": 1, "chains": [{"uuid": "c1", "bitmap": "qmpbackup-c1", "created": 100,
                                          "disks": {DISK: {"backups": [record]}}}]}
    (root / "qmpbackup.json").write_text(json.dumps(metadata))
    return root


@pytest.fixture
def low_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMPBACKUP_QEMU_IMG_CPU_SECONDS", "3")
    monkeypatch.setenv("QMPBACKUP_QEMU_IMG_TIMEOUT", "6")


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("low_limits")
def test_verify_calls_an_image_bomb_damaged(cli, tmp_path: Path) -> None:
    folder = bomb_folder(tmp_path / "bomb")
    started = time.monotonic()
    result = cli("qmprestore", "verify", "--json", "--dir", folder)
    assert time.monotonic() - started < 30
    assert result.rc == 11, result.err
    assert "Traceback" not in result.err
    report = json.loads(result.out)
    (bomb,) = report["files"]
    assert bomb["status"] == "damaged" and not bomb["restorable"]
    assert any("limit" in problem for problem in bomb["problems"]), bomb["problems"]


@pytest.mark.timeout(60)
def test_an_error_flood_is_cut_at_the_output_limit(cli, tmp_path: Path) -> None:
    """Over 100 MB of error lines per second from check never pile up in the tool's memory."""
    folder = bomb_folder(tmp_path / "flood", write_error_flood)
    started = time.monotonic()
    result = cli("qmprestore", "verify", "--json", "--dir", folder)   # the default limits
    assert time.monotonic() - started < 30
    assert result.rc == 11, result.err
    (flood,) = json.loads(result.out)["files"]
    assert flood["status"] == "damaged"
    assert any("MiB of output" in problem for problem in flood["problems"]), flood["problems"]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("low_limits")
def test_restore_refuses_an_image_bomb_in_one_line(cli, tmp_path: Path) -> None:
    folder = bomb_folder(tmp_path / "bomb")
    started = time.monotonic()
    result = cli("qmprestore", "merge", "--dir", folder / DISK, "--targetfile",
                 tmp_path / "restored.qcow2")
    assert time.monotonic() - started < 30
    result.failed(6, BOMB, "limit")
    assert not (tmp_path / "restored.qcow2").exists()


def qemu_img_children() -> list[str]:
    """Processes (zombies too) of this test process that run qemu-img."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as comm:
                name = comm.read().strip()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and name == "qemu-img":
            found.append(f"{entry} {fields[0]}")
    return found


@pytest.mark.timeout(60)
def test_wall_clock_limit_kills_and_reaps_qemu_img(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = bomb_folder(tmp_path)
    monkeypatch.setenv("QMPBACKUP_QEMU_IMG_CPU_SECONDS", "0")    # only the clock can stop it
    monkeypatch.setenv("QMPBACKUP_QEMU_IMG_TIMEOUT", "2")
    started = time.monotonic()
    with pytest.raises(errors.QemuImgError, match="time limit of 2 s") as raised:
        qemuimg.check(folder / DISK / BOMB, fmt="qcow2")
    assert isinstance(raised.value, errors.QemuImgLimitError)
    assert time.monotonic() - started < 15
    assert qemu_img_children() == []


def test_address_space_limit_is_a_limit_error(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "plain.qcow2"
    qemuimg.create(image, 1 << 20)
    assert qemuimg.info(image, fmt="qcow2")["virtual-size"] == 1 << 20
    for tight in (16, 32):   # no room for a thread's stack, for a coroutine stack
        monkeypatch.setenv("QMPBACKUP_QEMU_IMG_MEMORY", f"{tight}M")
        with pytest.raises(errors.QemuImgError, match=f"{tight} MiB of address space") as raised:
            qemuimg.info(image, fmt="qcow2")
        assert isinstance(raised.value, errors.QemuImgLimitError)
