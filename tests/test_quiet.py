"""Quiet when nothing is wrong, one clear line when something is (issue 25).

Each warning once per run; a forgotten --image and abandoned bitmaps are said,
a --quiesce-required that cannot work is refused before anything exists.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import DISKS, backup, restart
from tests.vm import TestVM

pytestmark = pytest.mark.usefixtures("private_lock_dir")


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": warning: " in line]


def test_auto_after_lost_bitmaps_warns_once_for_all_disks(cli, fvm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "b"
    backup(cli, fvm, target, "auto", "--no-progress").ok()
    assert fvm.proc is not None
    os.kill(fvm.proc.pid, signal.SIGKILL)     # a crash: QEMU never stores the bitmaps
    fvm.proc.wait()
    with restart(fvm) as again:
        run = backup(cli, again, target, "auto", "--no-progress", head=["--quiet"]).ok()
    (line,) = warnings(run.err)
    assert all(f"disk {d} has no bitmap" in line for d in DISKS) and "new chain" in line


def test_an_image_left_out_of_an_offline_run_is_warned_about(cli, fvm: TestVM,
                                                             tmp_path: Path) -> None:
    target = tmp_path / "b"
    backup(cli, fvm, target, "full", "--no-progress").ok()
    fvm.stop()
    only_one = ["--image", f"virtio0={fvm.disk('virtio0').path}"]
    run = cli("qmpbackup", *only_one, "--quiet", "backup", "--level", "inc", "--target",
              target, "--no-progress").ok()
    (line,) = warnings(run.err)
    assert "data1, which no --image names" in line
    # leaving it out on purpose: --include says so, and is quiet
    run = cli("qmpbackup", *only_one, "--quiet", "backup", "--level", "inc", "--target",
              target, "--no-progress", "--include", "virtio0").ok()
    assert run.err == ""


def test_quiesce_required_without_an_agent_socket_is_refused_before_anything_exists(
        cli, fvm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "b"
    for socket in (tmp_path / "no-such.qga", tmp_path):
        backup(cli, fvm, target, "full", "--quiesce-required",
               head=["--agent-socket", socket]).failed(2, "--agent-socket", str(socket))
        assert not target.exists()
    assert not [b for d in fvm.cmd("query-block") for b in d.get("inserted", {}).get(
        "dirty-bitmaps", [])]


def test_info_names_bitmaps_of_chains_no_given_folder_holds(cli, fvm: TestVM,
                                                            tmp_path: Path) -> None:
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    backup(cli, fvm, kept, "full", "--no-progress", "--uuid", "kept").ok()
    backup(cli, fvm, gone, "full", "--no-progress", "--uuid", "gone").ok()
    info = ["--socket", fvm.tool_socket, "--quiet", "info", "--show", "bitmaps"]
    assert warnings(cli("qmpbackup", *info, "--target", kept, "--target", gone).ok().err) == []
    shutil.rmtree(gone)
    (line,) = warnings(cli("qmpbackup", *info, "--target", kept).ok().err)
    assert "bitmap qmpbackup-gone on data1, virtio0 belongs to no chain" in line
    assert line.endswith("cleanup --remove-bitmaps --uuid gone")
    assert warnings(cli("qmpbackup", *info).ok().err) == [], "no folder given: no guess"
    cli("qmpbackup", *info, "--target", gone).failed(2, "is not a folder")
