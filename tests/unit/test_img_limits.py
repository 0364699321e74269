"""The qemu-img budgets: defaults, environment overrides and how a data call's time scales."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from libqmpbackup.errors import UsageError
from libqmpbackup.qemu import img_limits


def test_defaults_fit_the_kind_of_call(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (img_limits.ENV_CPU_SECONDS, img_limits.ENV_TIMEOUT,
                 img_limits.ENV_DATA_TIMEOUT, img_limits.ENV_MEMORY):
        monkeypatch.delenv(name, raising=False)
    inspection = img_limits.inspection()
    assert (inspection.cpu_seconds, inspection.timeout, inspection.memory) == (
        img_limits.CPU_SECONDS, img_limits.TIMEOUT, img_limits.MEMORY)
    data = img_limits.data(40 << 30)
    assert data.cpu_seconds == 0, "moving data may take CPU for as long as it takes"
    assert data.timeout == img_limits.DATA_TIMEOUT + (40 << 30) / img_limits.DATA_MIN_RATE
    assert img_limits.data(1 << 30, rate_limit=1 << 20).timeout == img_limits.DATA_TIMEOUT + 1024


def test_environment_overrides_and_switches_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(img_limits.ENV_CPU_SECONDS, "0")
    monkeypatch.setenv(img_limits.ENV_TIMEOUT, "7")
    monkeypatch.setenv(img_limits.ENV_MEMORY, "512M")
    monkeypatch.setenv(img_limits.ENV_DATA_TIMEOUT, "0")
    inspection = img_limits.inspection()
    assert (inspection.cpu_seconds, inspection.timeout, inspection.memory) == (0, 7, 512 << 20)
    assert img_limits.data(1 << 40).timeout == 0, "0: no time limit"


@pytest.mark.parametrize("value", ["-1", "ten", "1.5", "4X"])
def test_a_bad_override_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(img_limits.ENV_MEMORY, value)
    monkeypatch.setenv(img_limits.ENV_CPU_SECONDS, value)
    with pytest.raises(UsageError, match="QMPBACKUP_QEMU_IMG_"):
        img_limits.inspection()


def test_which_limit_ended_a_run() -> None:
    budget = img_limits.Budget("inspection", 3, 10, 1 << 30)
    assert "3 CPU seconds" in (budget.exceeded(-signal.SIGXCPU, "") or "")
    assert "1024 MiB" in (budget.exceeded(1, "qemu-img: Cannot allocate memory") or "")
    assert budget.exceeded(1, "qemu-img: Could not open 'x': No such file") is None
    assert budget.exceeded(2, "") is None
    assert budget.exceeded(-signal.SIGABRT, "qemu-img: ../block/qcow2.c:9: assertion failed") is None
    assert "1024 MiB" in (budget.exceeded(-signal.SIGABRT, "qemu_memalign: failed to allocate "
                                          "2097152 bytes at alignment 4096") or "")
    assert img_limits.Budget("data", 0, 0, 0).exceeded(-signal.SIGKILL, "") is None


def test_data_budget_counts_stored_bytes_only(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as out:
        out.truncate(1 << 40)       # a terabyte of holes buys no time
    full = tmp_path / "full"
    full.write_bytes(b"x" * (1 << 20))
    chain = f'json:{{"file": {{"filename": "{full}"}}, "backing": {{"file": {{"filename": "{sparse}"}}}}}}'
    assert img_limits.input_bytes([str(sparse)]) < 1 << 20
    assert img_limits.input_bytes(["convert", chain, "relative"]) >= 1 << 20
    fd = os.open(full, os.O_RDONLY)
    try:
        assert img_limits.input_bytes([f"/dev/fd/{fd}", str(full)], pass_fds=[fd]) == 2 << 20
    finally:
        os.close(fd)
