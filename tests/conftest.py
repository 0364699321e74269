"""Shared fixtures: real QEMU VMs and the CLI run in-process."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.guestvm import GuestImages, GuestUnavailable, ensure_guest
from tests.vm import TestVM, default_disks


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    def ok(self) -> CliResult:
        assert self.rc == 0, f"rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self

    def failed(self, rc: int, *fragments: str) -> CliResult:
        """A clean failure: the documented code, the message, one error line, no traceback."""
        assert self.rc == rc, f"rc={self.rc} (want {rc})\nstderr:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        errors = [line for line in self.err.splitlines() if ": error: " in line]
        assert len(errors) == 1, self.err
        for fragment in fragments:
            assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
        return self


def pytest_configure(config: pytest.Config) -> None:
    # mount records and the verification record of tests stay out of the machine's own
    for variable, prefix in (("QMPBACKUP_RUNTIME_DIR", "qmpbackup-test-run-"),
                             ("QMPBACKUP_CACHE_DIR", "qmpbackup-test-cache-")):
        if variable not in os.environ:
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
