"""Installing the way pip expects today, as a user without root, and what a restore loads."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_restore_never_loads_the_qmp_client() -> None:
    """qmprestore works on files only: QEMU's QMP library must stay out of its process."""
    probe = "import sys, qmprestore.cli; print('qemu.qmp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, cwd=REPO).stdout
    assert out.strip() == "False"


def test_a_user_without_root_installs_with_pip_and_gets_working_commands(public_tmp: Path) -> None:
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None or os.geteuid() != 0:
        pytest.skip("needs root (to drop to another user) and a system python3")
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    home = public_tmp / "home"
    source = home / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache", ".mypy_cache",
        ".ruff_cache", "demo-work"))
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
    as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    env = {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*as_user, *argv], env=env, cwd=home, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"
        return done

    run(python, "-m", "venv", str(home / "venv"))
    installed = run(str(home / "venv/bin/pip"), "install", "--disable-pip-version-check",
                    "-q", str(source))
    assert "setup.py install" not in installed.stderr, "pip fell back to the legacy path"
    for command in ("qmpbackup", "qmprestore"):
        assert run(str(home / "venv/bin" / command), "--version").stdout.strip()
    assert run(str(home / "venv/bin/qmprestore"), "list", "--help").stdout
    typed = run(str(home / "venv/bin/python"), "-c",
                "import importlib.resources as r; print(r.files('libqmpbackup').joinpath('py.typed')"
                ".is_file())")
    assert typed.stdout.strip() == "True"
