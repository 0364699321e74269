"""The import rules each subpackage's docstring states, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "libqmpbackup"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


FORBIDDEN = {
    # restores work on files only: no QMP client, no backup run
    "restore": ("libqmpbackup.backup", "libqmpbackup.qemu.qmp", "libqmpbackup.qemu.agent",
                "qemu.qmp"),
    # the backup side never depends on how restores read folders, and never calls back into
    # the runner: a run returns what it recorded
    "backup": ("libqmpbackup.restore", "libqmpbackup.runner"),
    # talking to QEMU knows nothing of runs or restores
    "qemu": ("libqmpbackup.backup", "libqmpbackup.restore"),
    # the backup folder serves both sides and never loads the QMP client
    "store": ("libqmpbackup.backup", "libqmpbackup.restore", "libqmpbackup.qemu.qmp",
              "libqmpbackup.qemu.agent", "qemu.qmp"),
}


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_subpackages_keep_their_import_rules(subpackage: str) -> None:
    broken = {f"{path.relative_to(PACKAGE.parent)} imports {name}"
              for path in sorted((PACKAGE / subpackage).glob("*.py"))
              for name in imported_modules(path)
              if name.startswith(FORBIDDEN[subpackage])}
    assert not broken


def test_shared_modules_import_no_side() -> None:
    """The top-level modules serve both sides, so neither side's package may leak into them."""
    broken = {f"{path.name} imports {name}" for path in sorted(PACKAGE.glob("*.py"))
              for name in imported_modules(path)
              if name.startswith(("libqmpbackup.backup", "libqmpbackup.restore", "qemu.qmp",
                                  "libqmpbackup.qemu.qmp"))}
    assert not broken


MAX_MODULE_LINES = 400


def test_every_module_stays_readable_in_one_sitting() -> None:
    """Modules <= 400 lines: past that a module does more than one thing (split it by concern)."""
    long = {f"{path.relative_to(PACKAGE.parent)}: {lines} lines"
            for path in sorted(PACKAGE.rglob("*.py"))
            if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long
