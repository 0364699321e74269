"""The whole product on a real Linux guest: live backups of a filesystem that is being written.

The guest keeps writing (a ``dd`` + ``sync`` loop) while full and
incremental backups run, with and without ``--quiesce``; before each backup
it writes a file whose content the test knows.  Every backup point is then
restored and checked the way a user would rely on it: ``e2fsck`` and the
known files read back with ``debugfs``.

What a point may look like depends on quiesce, and the assertions say so:

* quiesced: ext4's freeze flushes the journal into place and clears the
  ``needs_recovery`` flag, so the restored image must be a cleanly frozen
  filesystem — no ``needs_recovery``, ``e2fsck -fn`` with nothing at all to
  report — and the known files are read from it as restored;
* not quiesced: the image is what a power cut at the job start would have
  left: ``needs_recovery`` is set (a mounted ext4 always has it on disk)
  and ``e2fsck -fn`` may find the block bitmaps out of date.  The honest
  promise is crash consistency: after the journal replay a mount would do
  (``e2fsck -E journal_only``), ``e2fsck -fn`` must pass and every file the
  guest had synced before the point must read back.  (e2fsck still reports
  stale free block/inode counters then; it does not count them as errors,
  and neither do we.)

All tests share one guest per xdist worker (module fixture, ~2.5 s boot
under TCG); each uses its own backup folder and chain.  The agent socket
serves one client at a time, so the harness talks to the agent only
between tool runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from libqmpbackup.qemu import agent as agent_module
from libqmpbackup.qemu.agent import GuestAgent
from tests.guestvm import GuestImages, GuestVM, GuestVMError, make_data_disk
from tests.helpers import (
    Cli,
    CliResult,
    agent_options,
    guest_backup,
    recorded,
    restore_point,
    run,
)

pytestmark = pytest.mark.guest

log = logging.getLogger(__name__)


#: The guest's writer: random data into eight rotating files, an iteration
#: counter (renamed into place, so a reader never sees it empty), a sync,
#: again — until the stop file appears.
CHURN_LOOP = (
    "mkdir -p /mnt/churn; i=0; "
    "while [ ! -e /mnt/churn/stop ]; do "
    "dd if=/dev/urandom of=/mnt/churn/f$((i % 8)) bs=64k count=8 2>/dev/null; "
    "echo $i > /mnt/churn/count.new; mv /mnt/churn/count.new /mnt/churn/count; "
    "sync; i=$((i + 1)); done; "
    "touch /mnt/churn/stopped"
)
#: Agent timeout for the tests with a silent agent socket (5 s by default).
SHORT_AGENT_TIMEOUT = 1.0


@dataclass
class Guest:
    vm: GuestVM
    #: Host side of a virtio-serial port that no process in the guest reads:
    #: what a VM with the agent chardev but without qemu-ga looks like.
    silent_socket: str


@pytest.fixture(scope="module")
def guest(guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    work = tmp_path_factory.mktemp("e2e-guest")
    # Unix socket paths must stay short: not under pytest's tmp dir.
    sockdir = tempfile.mkdtemp(prefix="qbs", dir="/tmp")
    silent = os.path.join(sockdir, "silent.sock")
    extra = ["-chardev", f"socket,id=silent0,path={silent},server=on,wait=off",
             "-device", "virtserialport,bus=vser0.0,chardev=silent0,name=org.qmpbackup.silent.0"]
    try:
        with GuestVM(guest_images, make_data_disk(work / "data.qcow2"),
                     log_dir=work / "logs", extra_args=extra) as vm:
            yield Guest(vm, silent)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# --- running the tool ---------------------------------------------------------------

def qmpbackup(cli: Cli, vm: GuestVM, *argv: object, agent: Optional[str] = "qga") -> CliResult:
    """Run qmpbackup against the guest, with its agent socket unless AGENT says otherwise."""
    return cli("qmpbackup", "--socket", vm.tool_socket, *agent_options(vm, agent), *argv)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def freeze_status(vm: GuestVM) -> str:
    return vm.agent_call(lambda ga: ga.fsfreeze_status())


# --- reading the --debug log ------------------------------------------------------------

_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+): (?P<msg>.*)$")
_AGENT_EVENTS = {"guest-fsfreeze-freeze": "freeze", "guest-fsfreeze-thaw": "thaw"}


def log_records(err: str) -> list[tuple[str, str, str]]:
    """(level, logger, message) of each --debug record; QMP messages span several lines."""
    records: list[list[str]] = []
    for line in err.splitlines():
        match = _RECORD.match(line)
        if match:
            records.append([match["level"], match["logger"], match["msg"]])
        elif records:
            records[-1][2] += "\n" + line
    return [(level, logger, msg) for level, logger, msg in records]


def quiesce_events(err: str) -> list[str]:
    """Freeze, thaw and the backup transaction, in the order the tool sent and got them.

    Agent traffic is logged by ``libqmpbackup.qemu.agent`` ("agent <- command",
    "agent -> reply"), QMP traffic by qemu.qmp ("--> request", "<-- reply").
    """
    events: list[str] = []
    pending = ""
    transaction_id = None
    for _level, logger, msg in log_records(err):
        if logger == "libqmpbackup.qemu.agent" and msg.startswith("agent <- {"):
            pending = _AGENT_EVENTS.get(json.loads(msg[len("agent <- "):])["execute"], "")
            if pending:
                events.append(pending)
        elif logger == "libqmpbackup.qemu.agent" and msg.startswith("agent -> {") and pending:
            events.append(f"{pending}: {json.loads(msg[len('agent -> '):]).get('return')}")
            pending = ""
        elif logger.startswith("qemu.qmp") and msg.startswith("--> "):
            request = json.loads(msg[4:])
            actions = request.get("arguments", {}).get("actions", [])
            if request.get("execute") == "transaction" and any(
                    a["type"] == "blockdev-backup" for a in actions):
                transaction_id = request["id"]
                events.append("transaction")
            elif request.get("execute") in ("stop", "cont"):   # --pause
                events.append(request["execute"])
        elif logger.startswith("qemu.qmp") and msg.startswith("<-- ") and transaction_id:
            reply = json.loads(msg[4:])
            if reply.get("id") == transaction_id:
                events.append("transaction: " + ("accepted" if "return" in reply else "refused"))
    return events


QUIESCED_START = ["freeze", "freeze: 1", "transaction", "transaction: accepted", "thaw", "thaw: 1"]


# --- the guest's side ---------------------------------------------------------------

@contextlib.contextmanager
def churning(vm: GuestVM) -> Iterator[Callable[[], int]]:
    """Keep the guest writing for the length of the block; yields a reader of its iteration count."""
    vm.exec("rm -f /mnt/churn/stop /mnt/churn/stopped /mnt/churn/count")
    code, _, err = vm.exec(f"sh -c '{CHURN_LOOP}' </dev/null >/dev/null 2>&1 &")
    assert code == 0, err

    def iterations() -> int:
        out = vm.exec("cat /mnt/churn/count 2>/dev/null || echo -1").stdout
        return int(out)

    try:
        yield iterations
    finally:
        # Stop it by a file, not by kill: a killed loop can leave a dd
        # running that keeps /mnt busy for the next test.
        try:
            vm.exec("touch /mnt/churn/stop; while [ ! -e /mnt/churn/stopped ]; do sleep 0.05; done")
        except GuestVMError as err:
            log.warning("could not stop the guest writer: %s", err)


def known_content(point: int) -> str:
    """About 200 kB that only this point holds, so a file from another point cannot pass for it."""
    line = f"point {point}: written before backup {point}\n"
    size = 200_000 + 4096 * point
    return (line * (size // len(line) + 1))[:size]


def write_known(vm: GuestVM, known: str, point: int, sync: bool) -> None:
    """KNOWN/pN for this point, and KNOWN/latest overwritten with the same content.

    KNOWN is a folder of the test's own: the guest outlives the test.
    """
    line = known_content(point).splitlines()[0]
    size = len(known_content(point))
    path = f"/mnt{known}/p{point}"
    cmd = (f"mkdir -p /mnt{known} && yes '{line}' | head -c {size} > {path} "
           f"&& cp {path} /mnt{known}/latest")
    code, _, err = vm.exec(cmd + ("; sync" if sync else ""))
    assert code == 0, err


# --- the host's side: restore and check ---------------------------------------------------

def fs_features(image: Path) -> set[str]:
    done = run("dumpe2fs", "-h", image)
    for line in done.stdout.splitlines():
        if line.startswith("Filesystem features:"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError(f"dumpe2fs -h {image} printed no features:\n{done.stdout}{done.stderr}")


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return run("e2fsck", "-fn", image)


def replay_journal(image: Path, copy: Path) -> Path:
    """COPY of IMAGE after the journal replay that mounting it would do."""
    shutil.copyfile(image, copy)
    done = run("e2fsck", "-E", "journal_only", "-y", copy)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return copy


def guest_file(image: Path, path: str) -> Optional[str]:
    """Content of PATH inside the ext4 IMAGE, or None if it does not exist."""
    done = run("debugfs", "-R", f"cat {path}", image)
    if "File not found" in done.stderr:
        return None
    assert "Filesystem not open" not in done.stderr, done.stderr
    return done.stdout


def check_point(backup_file: Path, known: str, point: int, quiesced: bool, points: int,
                work: Path) -> None:
    """Restore one point and hold it to what its quiesce state promises (module docstring)."""
    raw = restore_point(backup_file, work / f"point{point}.raw")
    features = fs_features(raw)
    if quiesced:
        assert "needs_recovery" not in features, f"point {point}: not a frozen filesystem"
        checked = fsck(raw)
        assert checked.returncode == 0 and "Fix?" not in checked.stdout, checked.stdout
        readable = raw
    else:
        assert "needs_recovery" in features, f"point {point}: a live ext4 without freeze"
        readable = replay_journal(raw, work / f"point{point}-replayed.raw")
        checked = fsck(readable)
        assert checked.returncode == 0, checked.stdout
    for earlier in range(point + 1):
        assert guest_file(readable, f"{known}/p{earlier}") == known_content(earlier), \
            f"point {point}: {known}/p{earlier}"
    for later in range(point + 1, points):
        assert guest_file(readable, f"{known}/p{later}") is None, \
            f"point {point} holds {known}/p{later}, written after it"
    assert guest_file(readable, f"{known}/latest") == known_content(point)


# --- the tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("quiesce", [
    pytest.param((False, True, False), id="full-plain,inc-quiesced,inc-plain"),
    pytest.param((True, False, True), id="full-quiesced,inc-plain,inc-quiesced"),
])
def test_live_backup_points_restore_consistent(guest: Guest, cli: Cli, tmp_path: Path,
                                               quiesce: tuple[bool, ...]) -> None:
    """Full + incrementals of a guest that keeps writing; every point restores as promised.

    For quiesced runs the debug log must show freeze, then the transaction
    accepted, then thaw — and the guest thawed afterwards.  Runs without
    --quiesce must not touch the agent at all.  Files for quiesced points
    are written without sync: the freeze has to flush them.
    """
    vm = guest.vm
    target = tmp_path / "backup"
    known = f"/known-{tmp_path.name}"
    with churning(vm) as iterations:
        start = iterations()
        for point, quiesced in enumerate(quiesce):
            write_known(vm, known, point, sync=not quiesced)
            result = guest_backup(cli, vm, "full" if point == 0 else "inc", target,
                            *(["--quiesce"] if quiesced else []), debug=True).ok()
            events = quiesce_events(result.err)
            if quiesced:
                assert events == QUIESCED_START
                assert freeze_status(vm) == "thawed"
            else:
                assert events == ["transaction", "transaction: accepted"]
                assert "libqmpbackup.qemu.agent" not in result.err
        assert iterations() > start, "the guest stopped writing during the backups"
    records = recorded(target)
    assert [r["quiesced"] for r in records] == list(quiesce)
    assert [r["level"] for r in records] == ["full"] + ["inc"] * (len(quiesce) - 1)
    for point, (record, quiesced) in enumerate(zip(records, quiesce)):
        check_point(target / "virtio0" / record["file"], known, point, quiesced, len(quiesce),
                    tmp_path)


def test_fleecing_quiesced_points_restore_clean(guest: Guest, cli: Cli, tmp_path: Path) -> None:
    """--fleecing --quiesce: the freeze covers the switch onto the filters (the point in time)."""
    vm = guest.vm
    target, fleece = tmp_path / "backup", tmp_path / "fleece"
    fleece.mkdir()
    known = f"/known-{tmp_path.name}"
    with churning(vm) as iterations:
        start = iterations()
        for point in range(2):
            write_known(vm, known, point, sync=False)
            result = guest_backup(cli, vm, "full" if point == 0 else "inc", target, "--quiesce",
                            "--fleecing", "--fleecing-dir", str(fleece), debug=True).ok()
            err = result.err
            assert err.index("guest-fsfreeze-freeze") < err.index('"qom-set"') \
                < err.index("guest-fsfreeze-thaw"), "devices switched while the guest is frozen"
            assert freeze_status(vm) == "thawed"
        assert iterations() > start, "the guest stopped writing during the backups"
    assert list(fleece.iterdir()) == []
    records = recorded(target)
    assert [r["quiesced"] for r in records] == [True, True]
    for point, record in enumerate(records):
        check_point(target / "virtio0" / record["file"], known, point, True, 2, tmp_path)


def test_pause_with_quiesce_freezes_before_the_pause_and_thaws_after_it(
        guest: Guest, cli: Cli, tmp_path: Path) -> None:
    """A paused guest's agent cannot answer: freeze, stop, copy, cont, thaw — and a clean point."""
    vm = guest.vm
    target = tmp_path / "backup"
    known = f"/known-{tmp_path.name}"
    write_known(vm, known, 0, sync=False)
    result = guest_backup(cli, vm, "full", target, "--quiesce", "--pause", debug=True).ok()
    assert quiesce_events(result.err) == [
        "freeze", "freeze: 1", "stop", "transaction", "transaction: accepted", "cont",
        "thaw", "thaw: 1"]
    assert freeze_status(vm) == "thawed"
    assert vm.qmp.cmd("query-status")["status"] == "running"
    assert vm.exec("echo alive > /mnt/after-paused-backup", timeout=5).exitcode == 0
    records = recorded(target)
    assert [r["quiesced"] for r in records] == [True]
    check_point(target / "virtio0" / records[0]["file"], known, 0, True, 1, tmp_path)


@contextlib.contextmanager
def mirror_running(vm: GuestVM) -> Iterator[None]:
    """Another block job on the guest disk, as a storage migration would run.

    A running mirror puts QEMU's op blockers on its source, so QEMU really
    refuses our backup transaction — after the tool has planned and frozen.
    """
    block = next(b for b in vm.qmp.cmd("query-block") if b["device"] == "virtio0")
    size = block["inserted"]["image"]["virtual-size"]
    vm.qmp.cmd("blockdev-add", **{"driver": "null-co", "node-name": "e2e-sink", "size": size})
    vm.qmp.cmd("blockdev-mirror", **{"job-id": "e2e-mirror", "device": "virtio0",
                                     "target": "e2e-sink", "sync": "full"})
    try:
        yield
    finally:
        vm.qmp.cmd("block-job-cancel", device="e2e-mirror", force=True)
        deadline = time.monotonic() + 30
        while any(j["id"] == "e2e-mirror" for j in vm.qmp.cmd("query-jobs")):
            assert time.monotonic() < deadline, "the harness mirror did not end"
            time.sleep(0.05)
        vm.qmp.cmd("blockdev-del", **{"node-name": "e2e-sink"})


def test_transaction_refused_after_freeze_thaws_and_keeps_chain(guest: Guest, cli: Cli,
                                                                 tmp_path: Path) -> None:
    """QEMU refuses the transaction while the guest is frozen: exit 7, guest thawed, chain intact."""
    vm = guest.vm
    target = tmp_path / "backup"
    guest_backup(cli, vm, "full", target).ok()
    with mirror_running(vm):
        result = guest_backup(cli, vm, "inc", target, "--quiesce", debug=True)
        assert result.rc == 7, result.err
        errors = [(logger, msg) for level, logger, msg in log_records(result.err) if level == "ERROR"]
        assert len(errors) == 1 and "in use by block job: mirror" in errors[0][1], errors
        assert errors[0][1].startswith("QEMU refused transaction: ")
        assert quiesce_events(result.err) == [
            "freeze", "freeze: 1", "transaction", "transaction: refused", "thaw", "thaw: 1"]
        assert freeze_status(vm) == "thawed"
        assert vm.exec("echo alive > /mnt/after-refused-backup", timeout=5).exitcode == 0
    assert len(recorded(target)) == 1
    assert not [p for p in files_in(target) if p.name.endswith(".partial")]
    # Nothing of the chain was spent: the next incremental works (and the
    # old spelling --quisce still means --quiesce).
    guest_backup(cli, vm, "inc", target, "--quisce").ok()
    assert [r["quiesced"] for r in recorded(target)] == [False, True]


def test_signal_during_freeze_thaws(guest: Guest, cli: Cli, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lands while the freeze call is still in progress: exit 143 and the guest thawed.

    The hook only picks the moment: the real freeze runs, then the process
    sends itself SIGTERM, which the tool turns into cancellation inside the
    freeze call (where no ``__aexit__`` would run).
    """
    real_freeze = GuestAgent.fsfreeze_freeze

    async def freeze_then_sigterm(self: GuestAgent, timeout: Optional[float] = None) -> int:
        count = await real_freeze(self, timeout)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(5)  # cancelled here
        return count

    monkeypatch.setattr(GuestAgent, "fsfreeze_freeze", freeze_then_sigterm)
    target = tmp_path / "backup"
    guest_backup(cli, guest.vm, "full", target, "--quiesce").failed(
        143, "interrupted by signal 15")
    monkeypatch.undo()
    assert freeze_status(guest.vm) == "thawed"
    assert files_in(target) == []


@pytest.mark.parametrize("kind, required_rc, reason", [
    pytest.param("missing", 3, "cannot connect to guest agent socket", id="socket-missing"),
    pytest.param("silent", 10, f"did not answer guest-sync-delimited within {SHORT_AGENT_TIMEOUT:g} s",
                 id="agent-silent"),
])
def test_unreachable_agent(guest: Guest, cli: Cli, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch,
                           kind: str, required_rc: int, reason: str) -> None:
    """No agent behind the socket: --quiesce warns and backs up unquiesced, --quiesce-required fails.

    "missing" is a VM started without the agent chardev (exit 3, like any
    socket that cannot be opened); "silent" a chardev without qemu-ga in
    the guest (exit 10: the agent does not answer).
    """
    monkeypatch.setattr(agent_module, "DEFAULT_TIMEOUT", SHORT_AGENT_TIMEOUT)
    socket = guest.silent_socket if kind == "silent" else str(tmp_path / "no-agent.sock")
    vm = guest.vm

    warned = guest_backup(cli, vm, "full", tmp_path / "warned", "--quiesce", agent=socket).ok()
    assert "qmpbackup: warning: backing up without filesystem quiesce: " in warned.err
    assert reason in warned.err
    assert [r["quiesced"] for r in recorded(tmp_path / "warned")] == [False]

    strict = tmp_path / "strict"
    guest_backup(cli, vm, "full", strict, "--quiesce-required", agent=socket).failed(
        required_rc, "--quiesce-required: cannot freeze the guest filesystems: ", reason)
    assert files_in(strict) == []

    qmpbackup(cli, vm, "info", "--show", "agent", agent=socket).failed(required_rc, reason)


def test_quiesce_without_agent_socket(guest: Guest, cli: Cli, tmp_path: Path) -> None:
    """--quiesce alone warns; --quiesce-required alone is a usage error before anything exists."""
    warned = guest_backup(cli, guest.vm, "full", tmp_path / "warned", "--quiesce", agent=None).ok()
    assert "warning: backing up without filesystem quiesce: no --agent-socket given" in warned.err
    assert [r["quiesced"] for r in recorded(tmp_path / "warned")] == [False]
    guest_backup(cli, guest.vm, "full", tmp_path / "strict", "--quiesce-required", agent=None).failed(
        2, "--quiesce-required needs --agent-socket")
    assert not (tmp_path / "strict").exists()


def test_guest_frozen_by_someone_else_stays_frozen(guest: Guest, cli: Cli, tmp_path: Path) -> None:
    """We neither freeze nor thaw a guest someone else froze: warn (or fail if required), leave it frozen."""
    vm = guest.vm
    assert vm.agent_call(lambda ga: ga.fsfreeze_freeze()) == 1
    try:
        info = qmpbackup(cli, vm, "info", "--show", "agent").ok()
        assert info.out.startswith("guest agent: answering, filesystems frozen\n")

        warned = guest_backup(cli, vm, "full", tmp_path / "warned", "--quiesce").ok()
        assert "already frozen by someone else" in warned.err
        assert [r["quiesced"] for r in recorded(tmp_path / "warned")] == [False]
        assert freeze_status(vm) == "frozen"

        guest_backup(cli, vm, "full", tmp_path / "strict", "--quiesce-required").failed(
            10, "--quiesce-required: ", "already frozen by someone else")
        assert freeze_status(vm) == "frozen"
    finally:
        vm.agent_call(lambda ga: ga.fsfreeze_thaw())
    assert freeze_status(vm) == "thawed"


def test_info_shows_agent_and_filesystems(guest: Guest, cli: Cli) -> None:
    result = qmpbackup(cli, guest.vm, "info", "--show", "agent").ok()
    lines = result.out.splitlines()
    assert lines[0] == "guest agent: answering, filesystems thawed"
    assert [line.split()[:2] for line in lines[3:]] == [["/mnt", "ext4"]], result.out


def test_nothing_freezable_is_not_quiesced(guest: Guest, cli: Cli, tmp_path: Path) -> None:
    """With /mnt unmounted the agent freezes 0 filesystems: that is no quiesce, and says so."""
    vm = guest.vm
    assert vm.exec("umount /mnt").exitcode == 0
    try:
        info = qmpbackup(cli, vm, "info", "--show", "agent").ok()
        assert "no filesystem the agent could freeze" in info.out
        warned = guest_backup(cli, vm, "full", tmp_path / "backup", "--quiesce").ok()
        assert "found no filesystem to freeze" in warned.err
        assert [r["quiesced"] for r in recorded(tmp_path / "backup")] == [False]
        assert freeze_status(vm) == "thawed"
    finally:
        assert vm.exec("mount -t ext4 /dev/vda /mnt").exitcode == 0
