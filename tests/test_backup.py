"""qmpbackup against real QEMU: every level and option, proven by content."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import backup, backups, metadata, node_of
from tests.vm import Disk, MiB, TestVM, identical

QCOW2_DISKS = ("virtio0", "ide0-hd0", "data1")


def assert_chain_top_matches(vm: TestVM, root: Path, refs: Path, disks=QCOW2_DISKS) -> None:
    """The newest image of each disk (read through its backing chain) equals the disk now."""
    for disk in disks:
        ref = vm.reference(disk, refs / f"{disk}.raw")
        top = backups(root, disk)[-1]
        assert identical(top, ref), f"{disk}: {top.name} differs from the VM disk"


# The content tests run with QEMU's copy offload forced on and off; every other
# test runs with the default (auto: on for full copies where QEMU offers it).
OFFLOAD = pytest.mark.parametrize("offload", [("--copy-offload", "on"), ("--copy-offload", "off")],
                                  ids=["offload-on", "offload-off"])


@OFFLOAD
def test_full_then_incrementals_hold_each_point(cli, vm: TestVM, tmp_path: Path,
        offload: tuple[str, str]) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    vm.write("virtio0", 0x11, 0, 4 * MiB)
    vm.write("ide0-hd0", 0x12, 1 * MiB, 64 * 1024)
    vm.write("data1", 0x13, 0, 1 * MiB)
    vm.write("pflash1", 0x14, 0, 4096)
    backup(cli, vm, target, "full", *offload).ok()
    assert_chain_top_matches(vm, target, refs, (*QCOW2_DISKS, "pflash0", "pflash1"))
    assert not (target / "virtio1").exists(), "raw disk is skipped without --include-raw"

    for round_, pattern in enumerate((0x21, 0x22, 0x23)):
        vm.write("virtio0", pattern, (round_ + 5) * MiB, 128 * 1024)
        vm.write("data1", pattern, round_ * 64 * 1024, 8192)
        vm.write("pflash1", pattern, 8192, 4096)
        backup(cli, vm, target, "inc", *offload).ok()
        assert_chain_top_matches(vm, target, refs, (*QCOW2_DISKS, "pflash1"))

    inc = backups(target, "virtio0", "INC")
    assert len(inc) == 3
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(inc[-1])],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == inc[-2].name, "INC backs onto its predecessor by relative name"
    assert info["virtual-size"] == 32 * MiB
    # a small change makes a small incremental (64 KiB clusters)
    assert inc[0].stat().st_size < 2 * MiB
    # pflash (raw) is copied in full at every level, ide disk with no change stays tiny
    assert len(backups(target, "pflash1", "FULL")) == 4
    meta = metadata(target)
    chain = meta["chains"][0]
    assert [b["level"] for b in chain["disks"]["virtio0"]["backups"]] == ["full", "inc", "inc", "inc"]
    recorded = [b["file"] for b in chain["disks"]["virtio0"]["backups"]]
    assert recorded == [p.name for p in backups(target, "virtio0")]
    # bitmap cleared by the last successful inc
    node_bitmaps = vm.bitmaps()
    named = [b for bl in node_bitmaps.values() for b in bl if b["name"] == chain["bitmap"]]
    assert len(named) == 3 and all(b["count"] == 0 and b["persistent"] for b in named)
    assert vm.tool_leftovers() == []
    assert (target / "virtio0").stat().st_mode & 0o777 == 0o700
    assert inc[0].stat().st_mode & 0o777 == 0o600


def test_writes_during_a_rate_limited_job_go_to_the_next_incremental(
        vm: TestVM, tmp_path: Path, cli) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    backup(cli, vm, target, "full", "--include", "virtio0").ok()
    vm.write("virtio0", 0x31, 0, 24 * MiB)
    at_start = vm.reference("virtio0", refs / "start.raw")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
         "--include", "virtio0", "--target", str(target), "--speed-limit", "4M"],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not vm.cmd("query-jobs"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    vm.write("virtio0", 0x32, 2 * MiB, 1 * MiB)   # inside the region being copied
    vm.write("virtio0", 0x33, 30 * MiB, 64 * 1024)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    inc1 = backups(target, "virtio0", "INC")[-1]
    assert identical(inc1, at_start), "the backup is the disk at job start"
    backup(cli, vm, target, "inc", "--include", "virtio0").ok()
    assert identical(backups(target, "virtio0", "INC")[-1], vm.reference("virtio0", refs / "end.raw"))


def test_auto_starts_a_chain_then_continues_it(cli, vm: TestVM, tmp_path: Path) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    first = backup(cli, vm, target, "auto").ok()
    assert "auto: the target holds no chain yet" in first.err
    vm.write("virtio0", 0x41, 3 * MiB, 64 * 1024)
    second = backup(cli, vm, target, "auto").ok()
    assert "auto: continuing chain" in second.err
    assert [p.name.split("-")[0] for p in backups(target, "virtio0")] == ["FULL", "INC"]
    assert_chain_top_matches(vm, target, refs)


@OFFLOAD
def test_copy_needs_no_bitmap_and_covers_raw_disks(cli, vm: TestVM, tmp_path: Path,
        offload: tuple[str, str]) -> None:
    target, refs = tmp_path / "copy", tmp_path / "refs"
    refs.mkdir()
    vm.write("virtio1", 0x51, 0, 1 * MiB)
    vm.write("virtio0", 0x52, 0, 1 * MiB)
    backup(cli, vm, target, "copy", *offload).ok()
    for disk in ("virtio0", "virtio1", "ide0-hd0", "data1", "pflash0", "pflash1"):
        copies = backups(target, disk, "COPY")
        assert len(copies) == 1, disk
        assert identical(copies[0], vm.reference(disk, refs / f"{disk}.raw")), disk
    (copies_chain,) = metadata(target)["chains"]
    assert (copies_chain["uuid"], copies_chain["bitmap"]) == ("copies", ""), "copies: no bitmap"
    assert all(not bl for bl in vm.bitmaps().values()), "copy adds no bitmap"
    vm.write("virtio0", 0x53, 0, 1 * MiB)
    backup(cli, vm, target, "copy", *offload, "--include", "virtio0").ok()
    assert len(backups(target, "virtio0", "COPY")) == 2, "a second copy never overwrites the first"
    # copies are restore points like any other: listed, and merged by name or as a whole run
    listing = cli("qmprestore", "list", "--dir", target).ok().out
    assert listing.count("COPY-") == 7 * 2, listing
    first = backups(target, "virtio0", "COPY")[0].name
    out = tmp_path / "restored"
    cli("qmprestore", "merge", "--dir", target, "--until", "-".join(first.split("-")[:2]),
        "--targetdir", out).ok()
    for disk in ("virtio0", "virtio1", "ide0-hd0", "data1", "pflash0", "pflash1"):
        assert identical(out / f"{disk}.qcow2", refs / f"{disk}.raw"), disk
    newest = tmp_path / "newest.qcow2"
    cli("qmprestore", "merge", "--dir", target / "virtio0", "--targetfile", newest).ok()
    assert identical(newest, vm.reference("virtio0", refs / "virtio0-now.raw"))


@OFFLOAD
def test_include_raw_copies_raw_disks_in_full_at_every_level(cli, vm: TestVM, tmp_path: Path,
        offload: tuple[str, str]) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    vm.write("virtio1", 0x61, 0, 512 * 1024)
    backup(cli, vm, target, "full", *offload, "--include-raw").ok()
    vm.write("virtio1", 0x62, 1 * MiB, 512 * 1024)
    backup(cli, vm, target, "inc", *offload, "--include-raw").ok()
    fulls = backups(target, "virtio1", "FULL")
    assert len(fulls) == 2 and not backups(target, "virtio1", "INC")
    assert identical(fulls[-1], vm.reference("virtio1", refs / "raw.raw"))


def test_include_and_exclude_select_disks_by_any_name(cli, vm: TestVM, tmp_path: Path) -> None:
    only = tmp_path / "only"
    backup(cli, vm, only, "full", "--include", "virtio0,data1-fmt").ok()
    assert sorted(p.name for p in only.iterdir() if p.is_dir()) == ["data1", "virtio0"]
    without = tmp_path / "without"
    backup(cli, vm, without, "copy", "--exclude", "ide0-hd0,pflash0").ok()
    assert sorted(p.name for p in without.iterdir() if p.is_dir()) == [
        "data1", "pflash1", "virtio0", "virtio1"]
    backup(cli, vm, tmp_path / "x", "full", "--include", "nosuchdisk").failed(2, "nosuchdisk")
    both = backup(cli, vm, tmp_path / "y", "full", "--include", "a", "--exclude", "b")
    assert both.rc == 2 and "not allowed with" in both.err


def test_a_disk_left_out_when_the_chain_started_stays_out(cli, vm: TestVM, tmp_path: Path) -> None:
    """--exclude at the first run holds for the chain; only --include brings the disk in."""
    root, refs = tmp_path / "b", tmp_path / "refs"
    refs.mkdir()

    def run(target: Path, level: str, *extra: str) -> dict[str, tuple[str, str]]:
        done = json.loads(backup(cli, vm, target, level, "--json", *extra).ok().out)
        return {f["disk"]: (f["level"], f["note"]) for f in done["files"]}

    backup(cli, vm, root, "full", "--exclude", "ide0-hd0").ok()
    assert metadata(root)["chains"][0]["excluded"] == ["ide0-hd0"]
    vm.write("virtio0", 0x41, 0, 64 * 1024)
    assert "ide0-hd0" not in run(root, "auto") and not (root / "ide0-hd0").exists()
    assert run(root, "inc", "--include", "ide0-hd0") == {
        "ide0-hd0": ("full", "named by --include")}
    vm.write("ide0-hd0", 0x42, 0, 64 * 1024)
    assert run(root, "inc")["ide0-hd0"] == ("inc", ""), "once in the chain, it stays"
    assert_chain_top_matches(vm, root, refs)
    # a chain written by the previous release records no selection: every disk joins, as before
    old = tmp_path / "old"
    backup(cli, vm, old, "full", "--exclude", "ide0-hd0", "--uuid", "old1").ok()
    data = json.loads((old / "qmpbackup.json").read_text())
    del data["chains"][0]["excluded"]
    (old / "qmpbackup.json").write_text(json.dumps(data))
    assert run(old, "inc")["ide0-hd0"] == ("full", "hot-added")


def test_uuid_names_the_chain_and_its_bitmap(cli, vm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "backup"
    backup(cli, vm, target, "full", "--uuid", "nightly-1", "--include", "virtio0").ok()
    assert metadata(target)["chains"][0]["uuid"] == "nightly-1"
    names = [b["name"] for bl in vm.bitmaps().values() for b in bl]
    assert names == ["qmpbackup-nightly-1", "qmpbackup-nightly-1+diff"]
    backup(cli, vm, target, "inc", "--uuid", "other", "--include", "virtio0").failed(6, "other")
    backup(cli, vm, target, "inc", "--uuid", "nightly-1", "--include", "virtio0").ok()
    backup(cli, vm, tmp_path / "bad", "full", "--uuid", "../etc").failed(2, "invalid --uuid")
    assert not (tmp_path / "bad").exists()


def test_monthly_keeps_chains_in_month_folders(cli, vm: TestVM, tmp_path: Path) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    backup(cli, vm, target, "auto", "--monthly").ok()
    vm.write("virtio0", 0x71, 0, 64 * 1024)
    backup(cli, vm, target, "auto", "--monthly").ok()
    month = time.strftime("%Y-%m")
    assert [p.name for p in target.iterdir()] == [month]
    assert_chain_top_matches(vm, target / month, refs)


def test_compress_writes_compressed_clusters_with_same_content(cli, vm: TestVM, tmp_path: Path) -> None:
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    vm.write("virtio0", 0x00, 0, 8 * MiB)
    vm.write("virtio0", 0x5A, 8 * MiB, 8 * MiB)
    backup(cli, vm, target, "full", "--compress", "--include", "virtio0").ok()
    full = backups(target, "virtio0")[-1]
    assert full.stat().st_size < 2 * MiB, "8 MiB of a repeated byte compresses well"
    vm.write("virtio0", 0x5B, 20 * MiB, 1 * MiB)
    backup(cli, vm, target, "inc", "--compress", "--include", "virtio0").ok()
    assert_chain_top_matches(vm, target, refs, ("virtio0",))
    assert metadata(target)["chains"][0]["disks"]["virtio0"]["backups"][0]["compressed"] is True


def test_backup_works_in_prelaunch_and_paused(cli, tmp_path: Path) -> None:
    disks = [Disk("virtio0", "virtio", "qcow2", 16 * MiB)]
    with TestVM(tmp_path / "img", disks, prelaunch=True) as vm:
        assert vm.cmd("query-status")["status"] == "prelaunch"
        vm.write("virtio0", 0x81, 0, 1 * MiB)
        target, refs = tmp_path / "backup", tmp_path / "refs"
        refs.mkdir()
        backup(cli, vm, target, "full").ok()
        vm.write("virtio0", 0x82, 2 * MiB, 64 * 1024)
        backup(cli, vm, target, "inc").ok()
        assert_chain_top_matches(vm, target, refs, ("virtio0",))
        vm.cmd("cont")
        vm.cmd("stop")
        assert vm.cmd("query-status")["status"] == "paused"
        vm.write("virtio0", 0x83, 3 * MiB, 64 * 1024)
        backup(cli, vm, target, "inc").ok()
        assert_chain_top_matches(vm, target, refs, ("virtio0",))


def test_info_tables(cli, vm: TestVM, tmp_path: Path) -> None:
    disks = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show", "blockdev").ok().out
    for name in ("virtio0", "ide0-hd0", "virtio1", "pflash0", "pflash1", "data1", "data1-fmt"):
        assert name in disks
    assert "33554432" in disks
    backup(cli, vm, tmp_path / "b", "full", "--uuid", "tab", "--include", "virtio0").ok()
    backup(cli, vm, tmp_path / "c", "full", "--uuid", "tab2", "--include", "virtio0").ok()
    disks = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show", "blockdev").ok().out
    rows = {line.split()[0]: line for line in disks.splitlines()[2:]}
    assert rows["virtio0"].rstrip().endswith("qmpbackup-tab, qmpbackup-tab2"), rows["virtio0"]
    assert rows["ide0-hd0"].rstrip().endswith(" -"), "a disk of no chain says so"
    vm.write("virtio0", 0x91, 0, 128 * 1024)
    table = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show", "bitmaps").ok().out
    row = next(line for line in table.splitlines() if "qmpbackup-tab" in line)
    assert "virtio0" in row and row.split()[-1] == str(128 * 1024)


def test_cleanup_removes_tool_bitmaps(cli, vm: TestVM, tmp_path: Path) -> None:
    backup(cli, vm, tmp_path / "a", "full", "--uuid", "one").ok()
    backup(cli, vm, tmp_path / "b", "full", "--uuid", "two", "--include", "virtio0").ok()
    vm.cmd("block-dirty-bitmap-add", node=node_of(vm, "virtio0"), name="foreign")
    out = cli("qmpbackup", "--socket", vm.tool_socket, "cleanup", "--remove-bitmap",
              "--uuid", "two").ok().out
    assert out.split("\n") == ["removed virtio0:qmpbackup-two",
                                "removed virtio0:qmpbackup-two+diff", ""]
    cli("qmpbackup", "--socket", vm.tool_socket, "cleanup", "--remove-bitmaps").ok()
    names = sorted(b["name"] for bl in vm.bitmaps().values() for b in bl)
    assert names == ["foreign"], "only qmpbackup's bitmaps are removed"


# -- errors: one line, documented exit code, nothing created ---------------------------------

def test_missing_socket_and_not_a_socket(cli, tmp_path: Path) -> None:
    cli("qmpbackup", "--socket", tmp_path / "nope.sock", "info").failed(3, "does not exist")
    (tmp_path / "file").write_text("x")
    cli("qmpbackup", "--socket", tmp_path / "file", "info").failed(3, "not a socket")


def test_busy_socket_times_out_with_a_clear_message(cli, vm: TestVM) -> None:
    from harness.qemu_vm import harness_qmp
    holder = harness_qmp(vm.tool_socket)
    holder.connect()
    try:
        started = time.monotonic()
        cli("qmpbackup", "--socket", vm.tool_socket, "info").failed(3, "did not greet")
        assert time.monotonic() - started < 15
    finally:
        holder.close()


def test_full_refuses_a_non_empty_target(cli, vm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "backup"
    target.mkdir()
    (target / "something").write_text("x")
    backup(cli, vm, target, "full").failed(5, "not empty", "holds no chain of qmpbackup")
    result = backup(cli, vm, target, "auto").failed(5, "not empty", "an empty or new folder")
    assert "--level inc" not in result.err, "no advice that cannot work"
    assert sorted(p.name for p in target.iterdir()) == ["something"]
    assert all(not bl for bl in vm.bitmaps().values())
    chain = tmp_path / "chain"
    backup(cli, vm, chain, "full", "--include", "virtio0", "--uuid", "c1").ok()
    backup(cli, vm, chain, "full", "--include", "virtio0").failed(
        5, "not empty", "--level inc or auto to continue chain c1")


def test_inc_without_chain_or_bitmap_fails_clearly(cli, vm: TestVM, tmp_path: Path) -> None:
    target = tmp_path / "backup"
    backup(cli, vm, target, "inc").failed(6, "no backup chain")
    backup(cli, vm, target, "full", "--include", "virtio0").ok()
    bitmap = metadata(target)["chains"][0]["bitmap"]
    vm.cmd("block-dirty-bitmap-remove", node=node_of(vm, "virtio0"), name=bitmap)
    backup(cli, vm, target, "inc", "--include", "virtio0").failed(6, "has no bitmap")
    assert len(backups(target, "virtio0")) == 1


def test_stray_partial_is_removed_as_a_leftover(cli, vm: TestVM, tmp_path: Path) -> None:
    """With the chain lock held no other run can own a .partial: it is a killed run's."""
    target, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    backup(cli, vm, target, "full", "--include", "virtio0").ok()
    stray = target / "virtio0" / "INC-1-virtio0.qcow2.partial"
    stray.write_text("")
    vm.write("virtio0", 0xA1, 0, 64 * 1024)
    result = backup(cli, vm, target, "inc", "--include", "virtio0").ok()
    assert f"removed {stray}, left by an interrupted run" in result.err
    assert not stray.exists()
    assert_chain_top_matches(vm, target, refs, ("virtio0",))


def test_target_that_is_a_file(cli, vm: TestVM, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    backup(cli, vm, tmp_path / "file", "full").failed(5, "not a directory")


def test_console_script_runs_a_backup(vm: TestVM, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("qmpbackup")
    if not script.exists():
        pytest.skip("qmpbackup console script not installed in this environment")
    help_text = subprocess.run([str(script), "backup", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "examples:" in help_text
    proc = subprocess.run([str(script), "--socket", vm.tool_socket, "backup", "--level", "full",
                           "--include", "virtio0", "--target", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert backups(tmp_path / "b", "virtio0")


def test_tcp_socket_empty_cdrom_and_debug_traffic(cli, tmp_path: Path) -> None:
    import socket as socketlib
    with socketlib.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    disks = [Disk("virtio0", "virtio", "qcow2", 8 * MiB)]
    extra = ("-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off",
             "-drive", "if=ide,index=3,media=cdrom")
    with TestVM(tmp_path / "img", disks, extra_args=extra):
        result = cli("qmpbackup", "--socket", f"tcp:127.0.0.1:{port}", "--debug",
                     "backup", "--level", "full", "--target", tmp_path / "b", "--no-progress").ok()
        assert '"execute": "transaction"' in result.err, "--debug shows the QMP traffic"
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["qmpbackup.json", "virtio0"]
    cli("qmpbackup", "--socket", "tcp:nohost", "info").failed(2, "tcp:HOST:PORT")


def test_quiet_and_logfile(cli, vm: TestVM, tmp_path: Path) -> None:
    log = tmp_path / "backup.log"
    result = cli("qmpbackup", "--socket", vm.tool_socket, "--quiet", "--logfile", log,
                 "backup", "--level", "full", "--target", tmp_path / "b", "--include", "virtio0")
    assert result.ok().err == ""
    text = log.read_text()
    assert "full backup done" in text and "INFO" in text


def test_progress_is_logged_when_not_on_a_terminal(cli, vm: TestVM, tmp_path: Path) -> None:
    vm.write("virtio0", 0x7A, 0, 24 * MiB)
    result = cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "copy",
                 "--include", "virtio0", "--speed-limit", "8M", "--progress-interval", "0.2",
                 "--target", tmp_path / "c").ok()
    lines = [line for line in result.err.splitlines() if "progress: virtio0" in line]
    assert len(lines) >= 3 and "%" in lines[0] and "MiB/s" in lines[0]
    quiet = cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "copy",
                "--include", "virtio0", "--speed-limit", "8M", "--target", tmp_path / "d").ok()
    assert "progress:" not in quiet.err, "10 s by default: a 3 s job logs no progress line"
    for bad in ("0", "-1", "soon"):
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "copy",
            "--progress-interval", bad, "--target", tmp_path / "e").failed(2, "--progress-interval")
    assert not (tmp_path / "e").exists()


def test_progress_on_a_terminal_is_a_live_line_per_disk(vm: TestVM, tmp_path: Path) -> None:
    import os
    import pty
    vm.write("virtio0", 0x7B, 0, 24 * MiB)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup", "--level",
         "copy", "--include", "virtio0", "--speed-limit", "8M", "--target", str(tmp_path / "c")],
        stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(30) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "\rvirtio0 " in text and "%" in text and "MiB/s" in text


def test_two_runs_on_two_sockets_of_one_vm_exclude_each_other(cli, tmp_path: Path) -> None:
    """A run must never take a live run on another QMP socket of the same VM for leftovers."""
    third = str(tmp_path / "third.sock")
    disks = [Disk("virtio0", "virtio", "qcow2", 64 * MiB)]
    with TestVM(tmp_path / "img", disks,
                extra_args=("-qmp", f"unix:{third},server=on,wait=off")) as vm:
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "full",
            "--target", tmp_path / "a", "--no-progress").ok()
        vm.write("virtio0", 0x5C, 0, 32 * MiB)
        proc = subprocess.Popen(
            [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup", "--level",
             "inc", "--speed-limit", "4M", "--target", str(tmp_path / "a")],
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while not vm.cmd("query-jobs"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        cli("qmpbackup", "--socket", third, "backup", "--level", "copy", "--target",
            tmp_path / "b", "--no-progress").failed(4, "another backup is running", "QEMU process")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert identical(backups(tmp_path / "a", "virtio0")[-1],
                         vm.reference("virtio0", tmp_path / "ref.raw"))


def test_a_refused_discovery_query_is_its_own_error_not_a_failed_job(cli, tmp_path: Path) -> None:
    """A VM still in --preconfig refuses the tool's qom-list: exit 14, not 7 "job failed"."""
    disks = [Disk("virtio0", "virtio", "qcow2", 8 * MiB)]
    with TestVM(tmp_path / "vm-images", disks, extra_args=("--preconfig",)) as early:
        result = backup(cli, early, tmp_path / "backup", "full").failed(14, "QEMU refused qom-list")
    assert "job" not in result.err
    assert not (tmp_path / "backup").exists() or not any((tmp_path / "backup").iterdir())
