"""contrib/systemd: the unit, rendered with a sample config, backs up a real VM.

systemd itself cannot start units here, so the test does what systemd does
with this unit: replace ``%i`` in ExecStart and run it.  ExecStart is
contrib/qmpbackup-vm (installed in /usr/local/bin by ``make install``) with the
VM's config file, run here from the checkout with this venv's qmpbackup.
``systemd-analyze verify`` checks the units when it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from libqmpbackup.store.locks import LOCK_DIR_ENV
from tests.helpers import DISKS, fault_disks
from tests.vm import MiB, TestVM, identical

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "contrib" / "systemd"
CONFIG_DIR = "/etc/qmpbackup/"
SCRIPT = REPO / "contrib" / "qmpbackup-vm"
INSTALLED_SCRIPT = "/usr/local/bin/qmpbackup-vm"


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


def render_exec_start(instance: str, config_dir: Path) -> list[str]:
    """The argv systemd runs for qmpbackup@INSTANCE.service: the checkout's script, configs in CONFIG_DIR."""
    service = unit_settings(UNITS / "qmpbackup@.service")["Service"]
    script, conf = shlex.split(service["ExecStart"].replace("%i", instance))
    assert script == INSTALLED_SCRIPT and conf.startswith(CONFIG_DIR)
    return [str(SCRIPT), str(config_dir / conf[len(CONFIG_DIR):])]


def sample_config(config_dir: Path, instance: str, **values: str) -> None:
    """contrib/systemd/example.conf with VALUES replacing its settings."""
    lines = []
    for line in (UNITS / "example.conf").read_text().splitlines():
        key = line.partition("=")[0]
        lines.append(f"{key}={values.pop(key)}" if key in values else line)
    assert not values, f"example.conf lacks {sorted(values)}"
    config_dir.mkdir(exist_ok=True)
    (config_dir / f"{instance}.conf").write_text("\n".join(lines) + "\n")


def run_unit(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QMPBACKUP": str(Path(sys.executable).parent / "qmpbackup")}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_rendered_unit_backs_up_a_real_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    target, configs = tmp_path / "backup", tmp_path / "etc"
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        # IMAGES too: the offline try meets the running VM's image lock (exit 12), silently
        images = " ".join(f"{d}={vm.disk(d).path}" for d in DISKS)
        prom = tmp_path / "qmpbackup.prom"
        sample_config(configs, "vm1", SOCKET=vm.tool_socket, TARGET=str(target), IMAGES=images,
                      METRICS_FILE=str(prom))
        argv = render_exec_start("vm1", configs)
        for pattern in (0x21, 0x22):   # the daily timer twice: auto makes a FULL, then an INC
            vm.write("virtio0", pattern, pattern * 64 * 1024, 64 * 1024)
            proc = run_unit(argv)
            assert proc.returncode == 0, proc.stderr
            assert (proc.stdout, proc.stderr) == ("", ""), "a normal night prints nothing"
            codes = re.findall(r'^qmpbackup_last_exit_code\{disk="(\w+)",.*\} (\d+)$',
                               prom.read_text(), re.MULTILINE)
            assert sorted(codes) == sorted((d, "0") for d in DISKS), "the live run's, not exit 12"
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


def test_a_shut_down_vm_is_backed_up_through_its_images_silently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    target = tmp_path / "backup"
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        vm.write("virtio0", 0x31, 0, 64 * 1024)
        vm.stop()
        images = " ".join(f"{d}={vm.disk(d).path}" for d in DISKS)
        sample_config(tmp_path / "etc", "off", SOCKET=str(tmp_path / "no.sock"),
                      TARGET=str(target), IMAGES=images)
        proc = run_unit(render_exec_start("off", tmp_path / "etc"))
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout, proc.stderr) == ("", "")
    (month,) = target.iterdir()
    chain = json.loads((month / "qmpbackup.json").read_text())["chains"][0]
    assert sorted(chain["disks"]) == sorted(DISKS)


def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.conf").write_text("TARGET=/backup/x\nSOCKET=/run/x.qmp\nLEVLE=auto\n")
    proc = run_unit([str(SCRIPT), str(tmp_path / "bad.conf")])
    assert proc.returncode == 2
    assert proc.stderr == f"qmpbackup-vm: error: {tmp_path / 'bad.conf'}: unknown setting LEVLE\n"


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
    """systemd's own check; ExecStart must name an existing program, so it gets the checkout's."""
    service = (UNITS / "qmpbackup@.service").read_text()
    assert f"ExecStart={INSTALLED_SCRIPT} " in service
    assert "\n#OnFailure=qmpbackup-failed@%n.service\n" in service
    # checked with the OnFailure= example enabled, and the alert unit it names
    (tmp_path / "qmpbackup@.service").write_text(
        service.replace(f"ExecStart={INSTALLED_SCRIPT} ", f"ExecStart={SCRIPT} ")
        .replace("#OnFailure=", "OnFailure="))
    shutil.copy(UNITS / "qmpbackup@.timer", tmp_path)
    shutil.copy(UNITS / "qmpbackup-failed@.service", tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "qmpbackup@vm1.service"),
                           str(tmp_path / "qmpbackup@vm1.timer"),
                           str(tmp_path / "qmpbackup-failed@qmpbackup@vm1.service.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
