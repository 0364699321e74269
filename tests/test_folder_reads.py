"""Each command opens its backup folder once and reads each of its records once (issue 20).

Counted in-process, on the two doors every command goes through: every
record (metadata, intent record, restore journal, a disk folder's records)
is read by ``folder_safety.read_json``, and every folder the admin named is
opened by ``Folder.open_root``; both are wrapped here to count calls per
folder.  Reading a record twice is where a second reader could see
another file than the first; opening the folder twice by name is where a
swapped folder could slip in.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from libqmpbackup.store import folder_safety
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import month_folder
from libqmpbackup.store.metadata import Chain, ChainStore
from libqmpbackup.store.names import INTENT_NAME, JOURNAL_NAME, METADATA_NAME
from tests.helpers import backup, write_round, write_store
from tests.vm import TestVM

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path


@dataclass
class Reads:
    records: Counter[tuple[Path, str]] = field(default_factory=Counter)
    opened: Counter[Path] = field(default_factory=Counter)

    def clear(self) -> None:
        self.records.clear()
        self.opened.clear()

    def twice(self) -> dict[Any, int]:
        return {key: n for key, n in [*self.records.items(), *self.opened.items()] if n > 1}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    counts = Reads()
    read_json = folder_safety.read_json
    open_root = Folder.open_root.__func__   # type: ignore[attr-defined]

    def counting_read(folder: Folder, name: str, what: str) -> Any:
        counts.records[(folder.path, name)] += 1
        return read_json(folder, name, what)

    def counting_open(cls: type[Folder], path: Path) -> Folder:
        counts.opened[Path(os.path.abspath(path))] += 1
        return open_root(cls, path)   # type: ignore[no-any-return]

    monkeypatch.setattr(folder_safety, "read_json", counting_read)
    monkeypatch.setattr(Folder, "open_root", classmethod(counting_open))
    return counts


def test_a_backup_run_and_a_prune_open_the_folder_once_and_read_each_record_once(
        cli: Any, vm: TestVM, tmp_path: Path, reads: Reads) -> None:
    target = tmp_path / "b"
    for level, pattern in (("full", 1), ("inc", 2), ("auto", 3)):
        write_round(vm, pattern)
        reads.clear()
        backup(cli, vm, target, level).ok()
        assert reads.records[(target, METADATA_NAME)] == 1, level
        assert reads.records[(target, INTENT_NAME)] == 1, level
        if level != "full":     # a disk folder exists: its journal is looked for once
            assert reads.records[(target / "virtio0", JOURNAL_NAME)] == 1, level
        assert reads.opened[target] == 1, level
        assert not {key: n for key, n in reads.twice().items() if _in(target, key)}, level
    cli("qmpbackup", "--socket", vm.tool_socket, "cleanup", "--remove-bitmaps").ok()
    backup(cli, vm, target, "auto").ok()     # the bitmap is gone: a second chain, to prune
    for extra in (("--dry-run",), ()):
        reads.clear()
        cli("qmpbackup", "prune", "--target", target, "--keep", 1, *extra).ok()
        assert reads.opened[target] == 1, extra
        assert reads.records[(target, METADATA_NAME)] == 1, extra
        assert not {key: n for key, n in reads.twice().items() if _in(target, key)}, extra


def test_a_monthly_run_that_starts_a_month_opens_the_target_once(
        cli: Any, vm: TestVM, tmp_path: Path, reads: Reads) -> None:
    """Retiring the previous month's bitmap reads that month through the held --target."""
    target = tmp_path / "b"
    backup(cli, vm, target, "full", "--monthly").ok()
    previous = target / "2000-01"
    month_folder(target).rename(previous)   # the month is over
    write_round(vm, 4)
    reads.clear()
    err = backup(cli, vm, target, "auto", "--monthly").ok().err
    assert "of the previous month's chain (" in err
    assert reads.opened[target] == 1
    assert reads.records[(previous, METADATA_NAME)] == 1
    assert not {key: n for key, n in reads.twice().items() if _in(target, key)}


def test_records_read_before_the_lock_are_read_again_only_when_another_command_committed(
        tmp_path: Path, reads: Reads) -> None:
    write_store(ChainStore(tmp_path, [Chain("a", "qmpbackup-a", 1)]))
    with BackupFolder.open(tmp_path) as folder:
        assert [c.uuid for c in folder.store.chains] == ["a"]
        with folder.locked():
            assert [c.uuid for c in folder.store.chains] == ["a"]
        assert reads.records[(tmp_path, METADATA_NAME)] == 1, "unchanged: not read again"
        write_store(ChainStore(tmp_path, [Chain("a", "qmpbackup-a", 1), Chain("b", "qmpbackup-b", 2)]))
        with folder.locked():
            assert [c.uuid for c in folder.store.chains] == ["a", "b"], "a commit in between"
        assert reads.records[(tmp_path, METADATA_NAME)] == 2


def _in(root: Path, key: Any) -> bool:
    path = key[0] if isinstance(key, tuple) else key
    return path == root or root in path.parents


def test_each_restore_command_opens_the_chain_folder_once_and_reads_each_record_once(
        cli: Any, vm: TestVM, tmp_path: Path, mountpoint: Path, reads: Reads) -> None:
    target, out = tmp_path / "b", tmp_path / "out"
    for level, pattern in (("full", 1), ("inc", 2), ("inc", 3)):
        write_round(vm, pattern)
        backup(cli, vm, target, level).ok()
    out.mkdir()
    disk = target / "virtio0"
    for argv in (("list", "--dir", target), ("list", "--json", "--dir", disk),
                 ("verify", "--dir", target), ("verify", "--dir", disk),
                 ("merge", "--dir", disk, "--targetfile", out / "one.qcow2"),
                 ("merge", "--dir", target, "--targetdir", out / "all"),
                 ("mount", "--dir", target, mountpoint),
                 ("rebase", "--dir", disk), ("commit", "--dir", disk, "--dry-run"),
                 ("commit", "--dir", disk), ("snapshotrebase", "--dir", disk)):
        reads.clear()
        cli("qmprestore", *argv).ok()
        if argv[0] == "mount":
            cli("qmprestore", "umount", mountpoint).ok()
        assert reads.opened[target] == 1, argv
        assert reads.records[(target, METADATA_NAME)] == 1, argv
        assert not {key: n for key, n in reads.twice().items() if _in(target, key)}, argv
    assert reads.records[(disk, JOURNAL_NAME)] == 1, "snapshotrebase: read once, then written"
