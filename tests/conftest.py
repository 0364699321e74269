"""Shared fixtures: real QEMU VMs and the CLI run in-process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from libqmpbackup.store import locks, mounts
from tests.guestvm import GuestImages, GuestUnavailable, ensure_guest
from tests.helpers import CliResult, daemons, fault_disks, leftovers
from tests.vm import TestVM, default_disks


def pytest_configure(config: pytest.Config) -> None:
    # mount records and the verification record of tests stay out of the machine's own,
    # one folder per xdist worker: a test that checks no mount record is left must not see
    # the mounts of a test running beside it (the controller sets none: workers would inherit it)
    controller = bool(getattr(config.option, "numprocesses", None)) and \
        "PYTEST_XDIST_WORKER" not in os.environ
    for variable, prefix in (("QMPBACKUP_RUNTIME_DIR", "qmpbackup-test-run-"),
                             ("QMPBACKUP_CACHE_DIR", "qmpbackup-test-cache-")):
        if variable not in os.environ and not controller:
            os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    config.addinivalue_line("markers", "guest: needs the tiny Linux test guest (built on demand)")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run qmpbackup/qmprestore in-process: cli("qmpbackup", "--socket", ...)."""
    import importlib

    def run(program: str, *argv: object) -> CliResult:
        main = importlib.import_module(f"{program}.cli").main
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return CliResult(rc, captured.out, captured.err)
    return run


@pytest.fixture(scope="session")
def guest_images() -> GuestImages:
    """The tiny test guest, built once per machine; a skip only where it cannot be built."""
    try:
        return ensure_guest()
    except GuestUnavailable as err:
        pytest.skip(f"test guest unavailable: {err.reason}")


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A folder another user can reach (pytest's own tmp folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="qmpbackup-public-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[TestVM]:
    """A running VM with the default disk zoo (qcow2 virtio/ide/-blockdev, raw, pflash)."""
    with TestVM(tmp_path / "vm-images", default_disks()) as machine:
        yield machine


@pytest.fixture
def system_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """/run, /run/lock and /tmp as they are on a host, moved below TMP_PATH; no explicit lock dir."""
    run, run_lock, tmp = tmp_path / "run", tmp_path / "run" / "lock", tmp_path / "tmp"
    for folder, mode in ((run, 0o755), (run_lock, 0o1777), (tmp, 0o1777)):
        folder.mkdir()
        folder.chmod(mode)
    monkeypatch.delenv(locks.LOCK_DIR_ENV, raising=False)
    monkeypatch.setattr(locks, "RUN_DIR", run, raising=False)
    monkeypatch.setattr(locks, "RUN_LOCK", run_lock, raising=False)   # the old places
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return run


@pytest.fixture
def fvm(tmp_path: Path) -> Iterator[TestVM]:
    """The fault matrix's VM: one disk big enough for a slow job, one small."""
    with TestVM(tmp_path / "img", fault_disks()) as machine:
        yield machine


@pytest.fixture
def private_lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VM locks of these runs (in-process and subprocesses alike) in the test's folder.

    Killed runs leave their lock files by design; they belong in tmp_path,
    not in the host's /run/lock.  Modules use it with
    ``pytestmark = pytest.mark.usefixtures("private_lock_dir")``.
    """
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty folder to mount on; whatever a test left mounted there is unmounted after it."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    said = [subprocess.run([sys.executable, "-m", "qmprestore", "umount", record.mountpoint],
                           capture_output=True, text=True, check=False).stderr
            for record in mounts.records()]   # a failed test still leaves nothing running
    for pid in daemons(path):
        os.kill(pid, signal.SIGKILL)
    assert leftovers(path) == [], said
