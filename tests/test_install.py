"""``make install`` into a temporary prefix: the installed commands back up a real VM.

The install is what production gets: its own venv with a non-editable
``pip install .`` (so the package is imported from the prefix, not from the
checkout), commands linked into BINDIR, man pages, bash/zsh completion, the
systemd units with absolute paths that ``systemd-analyze verify`` accepts.
It is made from a copy of the checkout, which is then removed: the install
must not depend on it.  Needs PyPI (pip installs qemu.qmp and tabulate).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libqmpbackup.store.locks import LOCK_DIR_ENV
from tests.helpers import DISKS, fault_disks
from tests.vm import TestVM

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "__pycache__",
                                 ".pytest_cache", ".mypy_cache", ".ruff_cache", "demo-work")


def make(source: Path, target: str, dirs: dict[str, Path]) -> None:
    proc = subprocess.run(["make", "-C", str(source), target,
                           *(f"{name}={path}" for name, path in dirs.items())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_make_install_gives_working_commands_units_and_docs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("python3", path="/usr/bin:/usr/local/bin") is None:
        pytest.skip("no system python3")
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=IGNORED)
    root = tmp_path / "root"
    dirs = {"PREFIX": root / "opt/qmpbackup", "LOCALDIR": root / "usr/local",
            "UNITDIR": root / "usr/local/lib/systemd/system", "CONFDIR": root / "etc/qmpbackup",
            "PYTHON": Path("/usr/bin/python3")}
    make(source, "install", dirs)
    shutil.rmtree(source)
    bindir, local = root / "usr/local/bin", root / "usr/local"

    where = subprocess.run([str(dirs["PREFIX"] / "bin/python"), "-c",
                            "import libqmpbackup; print(libqmpbackup.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(dirs["PREFIX"])), "not a self-contained install"
    for path in ("share/man/man1/qmpbackup.1", "share/man/man1/qmprestore.1",
                 "share/bash-completion/completions/qmpbackup",
                 "share/zsh/site-functions/_qmprestore"):
        assert (local / path).is_file(), path
    assert (dirs["CONFDIR"] / "example.conf").is_file()

    target = tmp_path / "backup"
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        proc = subprocess.run([str(bindir / "qmpbackup"), "--socket", vm.tool_socket, "--quiet",
                               "backup", "--level", "full", "--target", str(target),
                               "--no-progress"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        # the installed qmpbackup-vm finds the qmpbackup beside it (no PATH needed)
        conf = dirs["CONFDIR"] / "vm1.conf"
        conf.write_text(f"SOCKET={vm.tool_socket}\nTARGET={tmp_path / 'monthly'}\n"
                        "BACKUP_OPTIONS=--monthly\nGLOBAL_OPTIONS=--quiet\n")
        proc = subprocess.run([str(bindir / "qmpbackup-vm"), str(conf)], capture_output=True,
                              text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    listing = subprocess.run([str(bindir / "qmprestore"), "list", "--dir", str(target), "--json"],
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert sorted(d["disk"] for d in json.loads(listing.stdout)["chains"][0]["disks"]) == \
        sorted(DISKS)

    units = dirs["UNITDIR"]
    service = (units / "qmpbackup@.service").read_text()
    assert f"ExecStart={bindir}/qmpbackup-vm {dirs['CONFDIR']}/%i.conf" in service
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(units / "qmpbackup@vm1.service"),
                               str(units / "qmpbackup@vm1.timer")],
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr

    shutil.copytree(REPO, source, ignore=IGNORED)
    make(source, "uninstall", dirs)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert left == ["etc/qmpbackup/vm1.conf"], "uninstall keeps only the admin's VM configs"
    assert not dirs["PREFIX"].exists()
    assert os.access(sys.executable, os.X_OK)
