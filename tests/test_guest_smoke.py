"""The test guest works end to end: disk, guest-exec, fsfreeze, clean shutdown.

Every end-to-end test builds on these facts, so when this one fails, look
here before suspecting qmpbackup.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from libqmpbackup.qemu.agent import GuestAgent
from tests.guestvm import GuestImages, GuestVM, make_data_disk

pytestmark = pytest.mark.guest

CONTENT = "qmpbackup guest smoke 0123456789"


def test_guest_boots_writes_and_freezes(guest_images: GuestImages, tmp_path: Path) -> None:
    disk = make_data_disk(tmp_path / "data.qcow2")

    with GuestVM(guest_images, disk, log_dir=tmp_path / "logs") as vm:
        status: Any = vm.qmp.cmd("query-status")
        assert status["status"] == "running"
        blocks: Any = vm.qmp.cmd("query-block")
        devices = [b["device"] for b in blocks]
        assert "virtio0" in devices

        code, out, err = vm.exec(f"echo '{CONTENT}' > /mnt/hello; sync")
        assert (code, err) == (0, ""), out
        assert vm.exec("cat /mnt/hello") == (0, CONTENT + "\n", "")
        assert vm.exec("echo oops >&2; exit 3") == (3, "", "oops\n")

        async def freeze_cycle(ga: GuestAgent) -> tuple[int, str, int, str]:
            frozen = await ga.fsfreeze_freeze()
            status = await ga.fsfreeze_status()
            thawed = await ga.fsfreeze_thaw()
            return frozen, status, thawed, await ga.fsfreeze_status()

        # Only /mnt is a freezable filesystem (the initramfs root is not).
        assert vm.agent_call(freeze_cycle) == (1, "frozen", 1, "thawed")
        fsinfo = vm.agent_call(lambda ga: ga.get_fsinfo())
        assert [(fs["mountpoint"], fs["type"]) for fs in fsinfo] == [("/mnt", "ext4")]

    raw = tmp_path / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /hello", str(raw)], capture_output=True, text=True, check=True
    )
    assert cat.stdout == CONTENT + "\n"
