"""contrib/systemd: the unit, rendered with a sample config, backs up a real VM.

systemd itself cannot start units here, so the test does what systemd does
with this unit: replace ``%i``, read the EnvironmentFile, expand ``${VAR}``
(one word) and ``$VAR`` (split at whitespace) in ExecStart, and run the
command.  ``systemd-analyze verify`` checks the units when it is installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libqmpbackup.store.locks import LOCK_DIR_ENV
from tests.helpers import fault_disks
from tests.vm import MiB, TestVM, identical

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "contrib" / "systemd"
CONFIG_DIR = "/etc/qmpbackup/"


def unit_settings(path: Path) -> dict[str, dict[str, str]]:
    """section -> key -> value of a unit file (the subset of the syntax the units use)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current[key.strip()] = value.strip()
    return sections


def environment_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def render_exec_start(instance: str, config_dir: Path) -> list[str]:
    """The argv systemd runs for qmpbackup@INSTANCE.service, configs read from CONFIG_DIR."""
    service = unit_settings(UNITS / "qmpbackup@.service")["Service"]
    env_path = service["EnvironmentFile"].replace("%i", instance)
    assert env_path.startswith(CONFIG_DIR)
    env = environment_file(config_dir / env_path[len(CONFIG_DIR):])
    argv: list[str] = []
    for word in shlex.split(service["ExecStart"].replace("%i", instance)):
        whole = re.fullmatch(r"\$\{(\w+)\}", word)
        split = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv.append(env[whole.group(1)])
        elif split:
            argv.extend(env.get(split.group(1), "").split())
        else:
            assert "$" not in word, f"unexpanded variable in {word!r}"
            argv.append(word)
    return argv


def sample_config(config_dir: Path, instance: str, **values: str) -> None:
    """contrib/systemd/example.conf with VALUES replacing its settings."""
    lines = []
    for line in (UNITS / "example.conf").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    assert not values, f"example.conf lacks {sorted(values)}"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{instance}.conf").write_text("\n".join(lines) + "\n")


def run_unit(argv: list[str]) -> subprocess.CompletedProcess:
    assert argv[0] == "qmpbackup", "ExecStart runs qmpbackup from systemd's PATH"
    return subprocess.run([sys.executable, "-m", "qmpbackup", *argv[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_rendered_unit_backs_up_a_real_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    target, configs = tmp_path / "backup", tmp_path / "etc"
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        sample_config(configs, "vm1", SOCKET=vm.tool_socket, TARGET=str(target))
        argv = render_exec_start("vm1", configs)
        assert argv[:3] == ["qmpbackup", "--socket", vm.tool_socket]
        assert "--quiet" in argv and "--monthly" in argv and "--no-progress" in argv
        for pattern in (0x21, 0x22):   # the daily timer twice: auto makes a FULL, then an INC
            vm.write("virtio0", pattern, pattern * 64 * 1024, 64 * 1024)
            proc = run_unit(argv)
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout == "" and "Traceback" not in proc.stderr
        ref = vm.reference("virtio0", tmp_path / "ref.raw")
        assert vm.tool_leftovers() == []
    (month,) = target.iterdir()
    chain = json.loads((month / "qmpbackup.json").read_text())["chains"][0]
    backups = chain["disks"]["virtio0"]["backups"]
    assert [b["level"] for b in backups] == ["full", "inc"]
    assert identical(month / "virtio0" / backups[-1]["file"], ref)
    assert ref.stat().st_size == 64 * MiB


def test_a_failing_unit_exits_with_the_documented_code(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """What OnFailure= alerting sees: the service's exit code is qmpbackup's."""
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    sample_config(tmp_path / "etc", "gone", SOCKET=str(tmp_path / "no.sock"),
                  TARGET=str(tmp_path / "backup"))
    proc = run_unit(render_exec_start("gone", tmp_path / "etc"))
    assert proc.returncode == 3, proc.stderr
    assert [line for line in proc.stderr.splitlines() if ": error: " in line]


def test_timer_is_daily_persistent_and_randomized() -> None:
    timer = unit_settings(UNITS / "qmpbackup@.timer")
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    assert timer["Timer"]["OnCalendar"].endswith("03:00:00")
    assert timer["Timer"]["Unit"] == "qmpbackup@%i.service"
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert unit_settings(UNITS / "qmpbackup@.service")["Service"]["Type"] == "oneshot"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own check; ExecStart must name an existing binary, so it gets this venv's."""
    installed = Path(sys.executable).parent / "qmpbackup"
    assert installed.exists()
    service = (UNITS / "qmpbackup@.service").read_text()
    (tmp_path / "qmpbackup@.service").write_text(
        service.replace("ExecStart=qmpbackup ", f"ExecStart={installed} "))
    shutil.copy(UNITS / "qmpbackup@.timer", tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "qmpbackup@vm1.service"),
                           str(tmp_path / "qmpbackup@vm1.timer")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
