"""Command lines written for upstream qmpbackup 0.67 run here, proven by content.

Short options, logging options after the command, the target-node options
(--blockdev-disable-cache, --blockdev-aio), --remove-delay, and --monthly
retiring the previous month's bitmap once a new month's chain is recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.backup.jobs import aio_modes_of
from libqmpbackup.store.layout import month_folder
from tests.helpers import assert_clean, finished, metadata, start_backup, tool_bitmaps
from tests.vm import Disk, MiB, TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path

DISKS = ("virtio0", "data1")


def disks() -> list[Disk]:
    return [Disk("virtio0", "virtio", "qcow2", 64 * MiB), Disk("data1", "blockdev", "qcow2", 8 * MiB)]


@pytest.fixture
def uvm(tmp_path: Path) -> Iterator[TestVM]:
    with TestVM(tmp_path / "img", disks()) as machine:
        yield machine


def top_matches(vm: TestVM, root: Path, refs: Path) -> None:
    """The newest backup of each disk (read through its backing chain) equals the disk now."""
    refs.mkdir(exist_ok=True)
    chain = metadata(root)["chains"][-1]
    for disk in DISKS:
        top = root / disk / chain["disks"][disk]["backups"][-1]["file"]
        assert identical(top, vm.reference(disk, refs / f"{disk}-{time.monotonic_ns()}.raw")), top


def test_upstream_command_lines_with_short_options(cli, uvm: TestVM, tmp_path: Path) -> None:
    """`backup -l full -t DIR --uuid testme` from upstream's README, then -l inc, -i and -e."""
    root, refs, log = tmp_path / "backup", tmp_path / "refs", tmp_path / "run.log"
    sock = uvm.tool_socket
    uvm.write("virtio0", 0x11, 0, 1 * MiB)
    cli("qmpbackup", "--socket", sock, "backup", "-l", "full", "-t", root, "--uuid", "testme",
        "--no-progress").ok()
    assert metadata(root)["chains"][0]["bitmap"] == "qmpbackup-testme"
    uvm.write("virtio0", 0x12, 2 * MiB, 64 * 1024)
    uvm.write("data1", 0x13, 0, 64 * 1024)
    # logging options after the command, as upstream crontabs have them
    quiet = cli("qmpbackup", "--socket", sock, "backup", "-l", "inc", "-t", root, "--quiet",
                "-L", log, "--no-progress").ok()
    assert quiet.err == "" and "inc backup done" in log.read_text()
    top_matches(uvm, root, refs)
    debug = cli("qmpbackup", "--socket", sock, "info", "--show", "bitmaps", "--debug").ok()
    assert "DEBUG" in debug.err
    kept = cli("qmpbackup", "--socket", sock, "--quiet", "info", "--show", "bitmaps").ok()
    assert kept.err == "", "--quiet before the command survives the command's own options"
    cli("qmpbackup", "--socket", sock, "backup", "-l", "copy", "-i", "virtio0",
        "-t", tmp_path / "only", "--quiet").ok()
    assert [p.name for p in (tmp_path / "only").iterdir() if p.is_dir()] == ["virtio0"]
    cli("qmpbackup", "--socket", sock, "backup", "-l", "copy", "-e", "virtio0",
        "-t", tmp_path / "but", "--quiet").ok()
    assert [p.name for p in (tmp_path / "but").iterdir() if p.is_dir()] == ["data1"]
    listed = cli("qmprestore", "list", "--dir", root, "--quiet", "-L", tmp_path / "r.log").ok()
    assert listed.err == "" and "INC-" in listed.out
    cli("qmpbackup", "--socket", sock, "backup", "-l", "full", "-t", tmp_path / "x",
        "-i", "a", "-e", "b").failed(2, "not allowed with")


def test_target_io_options_reach_the_backup_nodes(cli, uvm: TestVM, tmp_path: Path) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    uvm.write("virtio0", 0x21, 0, 48 * MiB)
    proc = start_backup(uvm, root, "full", "--blockdev-disable-cache", "--blockdev-aio",
                        "threads", "--remove-delay", "5")
    targets = [n for n in uvm.cmd("query-named-block-nodes", flat=True)
               if n["node-name"].startswith("qmpbackup-t")]
    assert len(targets) == 2 and all(n["cache"]["direct"] for n in targets), targets
    err = finished(proc, 0)
    assert "--remove-delay is not needed and is ignored" in err
    assert_clean(uvm, root)
    top_matches(uvm, root, refs)
    schema = uvm.cmd("query-qmp-schema")
    if "io_uring" not in aio_modes_of(schema):
        cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", "inc", "-t", root,
            "--blockdev-aio", "io_uring").failed(2, "built without it")
        return
    uvm.write("data1", 0x22, 1 * MiB, 64 * 1024)
    cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", "inc", "-t", root,
        "--blockdev-aio", "io_uring", "--blockdev-disable-cache", "--no-progress").ok()
    assert_clean(uvm, root)
    top_matches(uvm, root, refs)


def test_io_uring_is_recognised_only_where_qemu_has_it() -> None:
    with_uring = [{"name": "1", "meta-type": "enum", "values": ["threads", "native", "io_uring"]}]
    without = [{"name": "1", "meta-type": "enum", "values": ["threads", "native"]},
               {"name": "2", "meta-type": "enum", "values": ["io_uring"]}]
    assert "io_uring" in aio_modes_of(with_uring)
    assert "io_uring" not in aio_modes_of(without)
    assert aio_modes_of([]) == {"threads"}


def test_monthly_new_chain_retires_the_previous_months_bitmap(cli, uvm: TestVM,
                                                             tmp_path: Path) -> None:
    """One bitmap per VM for --monthly chains, not one more each month, and nothing lost."""
    base, refs = tmp_path / "monthly", tmp_path / "refs"
    other = tmp_path / "other"

    def monthly(level: str = "auto") -> str:
        return cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", level, "-t", base,
                   "--monthly", "--no-progress").ok().err

    cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", "full", "-t", other,
        "--uuid", "other", "--no-progress").ok()
    monthly()
    uvm.write("virtio0", 0x31, 0, 64 * 1024)
    monthly()
    current = month_folder(base)
    last = metadata(current)["chains"][0]
    # the month is over: the folder becomes last month's
    previous = base / "2000-01"
    current.rename(previous)
    uvm.write("virtio0", 0x32, 4 * MiB, 64 * 1024)
    log = monthly()
    assert "auto: the target holds no chain yet" in log
    new = metadata(current)["chains"][0]
    assert (f"removed bitmap {last['bitmap']} of the previous month's chain ({previous})"
            in log)
    names = {n.split("@")[0] for n in tool_bitmaps(uvm)}
    assert names == {new["bitmap"], new["bitmap"] + "+diff", "qmpbackup-other",
                     "qmpbackup-other+diff"}, "only last month's bitmaps went"
    assert_clean(uvm, current)
    top_matches(uvm, current, refs)
    # last month's chain still restores, and this month's continues
    out = tmp_path / "old.qcow2"
    cli("qmprestore", "merge", "--dir", previous / "virtio0", "--targetfile", out).ok()
    older = previous / "virtio0" / last["disks"]["virtio0"]["backups"][-1]["file"]
    assert identical(out, older)
    uvm.write("data1", 0x33, 0, 64 * 1024)
    assert "removed bitmap" not in monthly("inc")
    top_matches(uvm, current, refs)
    assert {n.split("@")[0] for n in tool_bitmaps(uvm)} == names


def test_monthly_failed_new_chain_keeps_the_previous_months_bitmap(cli, uvm: TestVM,
                                                                  tmp_path: Path) -> None:
    base = tmp_path / "monthly"
    cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", "auto", "-t", base,
        "--monthly", "--no-progress").ok()
    current = month_folder(base)
    last = metadata(current)["chains"][0]["bitmap"]
    current.rename(base / "2000-01")
    current.mkdir(mode=0o700)
    (current / "notes.txt").write_text("not a chain")
    cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", "auto", "-t", base,
        "--monthly", "--no-progress").failed(5, "not empty")
    assert {n.split("@")[0] for n in tool_bitmaps(uvm)} == {last, last + "+diff"}, \
        "the old chain stays live"


def test_monthly_and_plain_chains_never_share_a_folder(cli, uvm: TestVM, tmp_path: Path) -> None:
    """Mixed, one kind would hide the other from list, verify and merge of that folder."""
    plain, months = tmp_path / "plain", tmp_path / "months"

    def run(target: Path, level: str, *extra: str):
        return cli("qmpbackup", "--socket", uvm.tool_socket, "backup", "-l", level, "-t", target,
                   "--no-progress", *extra)

    run(plain, "full").ok()
    before = sorted(p.name for p in plain.rglob("*"))
    run(plain, "auto", "--monthly").failed(2, "holds a backup chain of its own", "--monthly")
    assert sorted(p.name for p in plain.rglob("*")) == before, "nothing created"
    run(months, "auto", "--monthly").ok()
    for level in ("inc", "auto", "full"):
        run(months, level).failed(2, "holds --monthly chains", month_folder(months).name,
                                  "add --monthly")
    assert sorted(p.name for p in months.iterdir()) == [month_folder(months).name]
    assert_clean(uvm, month_folder(months))
    assert [c["chain"] for c in json.loads(cli("qmprestore", "list", "--dir", months,
                                                "--json").ok().out)["chains"]] == [
        metadata(month_folder(months))["chains"][0]["uuid"]]
