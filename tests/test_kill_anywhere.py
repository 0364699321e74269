"""A backup run SIGKILLed at any step boundary: the folder restores at once, the next run repairs it.

Each case stops a real ``qmpbackup`` process at a named step (the test-only
wrapper :mod:`tests.paused_run`), kills it with SIGKILL, and then proves by
content that (a) ``qmprestore merge`` restores every disk right away — to the
last recorded point, or to the killed run's point once its metadata commit
happened — and ``qmprestore verify`` passes, and (b) the next ordinary run
cleans up without any manual step and its backup holds every change.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libqmpbackup.backup.run_steps import STEPS
from libqmpbackup.store.names import INTENT_NAME
from tests.helpers import DISKS, REPO, assert_clean, backup, listed, recovers, write_round
from tests.vm import TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path

RECORDED_FROM = STEPS.index("committed")


def paused_backup(vm: TestVM, root: Path, step: str, ready: Path, level: str = "inc",
                  signame: str = "") -> subprocess.Popen:
    """A qmpbackup process that has reached STEP (and is held there unless SIGNAME is given)."""
    own = [step, str(ready)] + ([signame] if signame else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.paused_run", *own, "--", "--socket", vm.tool_socket,
         "backup", "--level", level, "--target", str(root), "--no-progress"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not reached: {proc.communicate()[1]}")
        time.sleep(0.01)
    return proc


def killed(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step(cli, fvm: TestVM, tmp_path: Path, step: str) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    backup(cli, fvm, root, "full").ok()
    recorded = {d: fvm.reference(d, refs / f"{d}-full.raw") for d in DISKS}
    write_round(fvm, 0x5A)
    killed_point = {d: fvm.reference(d, refs / f"{d}-inc.raw") for d in DISKS}
    killed(paused_backup(fvm, root, step, tmp_path / "ready"))

    committed = len(listed(root)["virtio0"]) == 2
    assert committed == (STEPS.index(step) >= RECORDED_FROM), "the metadata commit is the line"
    expected = killed_point if committed else recorded
    for disk in DISKS:   # (a) restorable at once, no hand work
        out = tmp_path / f"{disk}-restored.qcow2"
        cli("qmprestore", "merge", "--dir", root / disk, "--targetfile", out).ok()
        assert identical(out, expected[disk]), f"{disk} after a kill at {step}"
    cli("qmprestore", "verify", "--dir", root).ok()

    log = recovers(cli, fvm, root, refs)   # (b) the next run repairs; content proves no loss
    assert not (root / INTENT_NAME).exists()
    if STEPS.index(step) >= STEPS.index("renamed") and not committed:
        assert "never recorded it: its changes go into this backup" in log
    cli("qmprestore", "verify", "--dir", root).ok()


def test_sigkill_of_a_first_full_after_the_rename(cli, fvm: TestVM, tmp_path: Path) -> None:
    """Nothing was ever recorded: the next auto run starts the chain in the same folder."""
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    at_kill = fvm.reference("virtio0", refs / "virtio0-kill.raw")
    killed(paused_backup(fvm, root, "renamed", tmp_path / "ready", level="full"))
    assert (root / INTENT_NAME).exists() and list(root.glob("*/FULL-*.qcow2"))
    # No metadata: qmprestore either refuses (nothing recorded) or reads the complete,
    # renamed FULL by its name like an upstream folder; it never restores anything else.
    out = tmp_path / "out.qcow2"
    result = cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile", out)
    if result.rc == 0:
        assert identical(out, at_kill)
    else:
        result.failed(6)
    recovers(cli, fvm, root, refs, "auto")
    assert not (root / INTENT_NAME).exists()


@pytest.mark.parametrize("step, rc", [("jobs-done", 143), ("commit-written", 0), ("committed", 0)])
def test_sigterm_after_the_commit_does_not_fail_the_run(cli, fvm: TestVM, tmp_path: Path,
                                                        step: str, rc: int) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    backup(cli, fvm, root, "full").ok()
    write_round(fvm, 0x5B)
    proc = paused_backup(fvm, root, step, tmp_path / "ready", signame="TERM")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, err
    assert "Traceback" not in err
    assert_clean(fvm, root)
    assert not (root / INTENT_NAME).exists()
    if rc:
        assert len(listed(root)["virtio0"]) == 1, "interrupted before the commit: discarded"
        assert "interrupted by signal 15" in err
    else:
        assert len(listed(root)["virtio0"]) == 2
        assert "received SIGTERM after the backup was recorded" in err
        assert ": error: " not in err
    recovers(cli, fvm, root, refs)
