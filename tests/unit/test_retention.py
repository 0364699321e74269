"""The retention rules: which chains a prune keeps, and which files may go."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from libqmpbackup.errors import ChainError, UsageError
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import CHAIN_FOLDER
from libqmpbackup.store.retention import plan_retention
from tests.helpers import read_store, write_store

ROOT = Path("/backup/vm1")


def chain(uuid: str, times: list[int], disks: tuple[str, ...] = ("virtio0",),
          files: Optional[list[str]] = None) -> Chain:
    """A chain with a FULL at times[0] and INCs after it, on every disk of DISKS."""
    result = Chain(uuid=uuid, bitmap=f"qmpbackup-{uuid}", created=times[0])
    for disk in disks:
        for i, t in enumerate(times):
            level = "full" if i == 0 else "inc"
            name = files[i] if files else f"{'FULL' if i == 0 else 'INC'}-{t}-{disk}.qcow2"
            result.disk(disk).backups.append(BackupRecord(
                file=name, level=level, time=t, virtual_size=1, source_image=disk))
    return result


def ids(summaries) -> list[str]:
    return [s.chain.uuid for s in summaries]


def test_the_newest_chains_are_kept_whole_and_the_older_removed_whole() -> None:
    store = ChainStore(ROOT, [chain("a", [10, 11]), chain("b", [20, 21, 22]), chain("c", [30])])
    plan = plan_retention([store], keep=2)
    assert ids(plan.chains) == ["a", "b", "c"]
    assert ids(plan.kept) == ["b", "c"] and ids(plan.removed) == ["a"]
    (change,) = plan.changes
    assert [f.text() for f in change.delete] == ["virtio0/FULL-10-virtio0.qcow2",
                                               "virtio0/INC-11-virtio0.qcow2"]
    assert [c.uuid for c in change.remaining] == ["b", "c"], "metadata order is kept"
    assert not change.emptied


def test_chains_of_month_folders_are_ordered_by_their_newest_backup() -> None:
    # the month folder's chain started first but has the newest backup
    month = ChainStore(ROOT / "2026-10", [chain("m", [5, 50])])
    base = ChainStore(ROOT, [chain("a", [10, 11]), chain("b", [20, 21])])
    plan = plan_retention([base, month], keep=1)
    assert ids(plan.chains) == ["a", "b", "m"] and ids(plan.kept) == ["m"]
    (change,) = plan.changes
    assert change.store is base and change.emptied
    plan = plan_retention([base, month], keep=2)
    assert ids(plan.removed) == ["a"]


def test_newest_backup_of_any_disk_counts() -> None:
    old = chain("old", [10, 11])
    old.disk("data1").backups.append(BackupRecord(
        file="FULL-40-data1.qcow2", level="full", time=40, virtual_size=1, source_image="d"))
    plan = plan_retention([ChainStore(ROOT, [old, chain("new", [30])])], keep=1)
    assert ids(plan.kept) == ["old"]


def test_keeping_at_least_as_many_as_exist_changes_nothing() -> None:
    plan = plan_retention([ChainStore(ROOT, [chain("a", [1]), chain("b", [2])])], keep=5)
    assert ids(plan.kept) == ["a", "b"] and plan.removed == [] and plan.changes == []


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_must_be_at_least_one(keep: int) -> None:
    with pytest.raises(UsageError, match="keep at least 1"):
        plan_retention([ChainStore(ROOT, [chain("a", [1])])], keep=keep)


def test_a_file_a_kept_chain_lists_is_never_deleted() -> None:
    shared = "FULL-10-virtio0.qcow2"
    old = chain("old", [10, 11])
    new = chain("new", [10, 30], files=[shared, "INC-30-virtio0.qcow2"])
    plan = plan_retention([ChainStore(ROOT, [old, new])], keep=1)
    assert plan.changes[0].delete == [ChainFile("virtio0", "INC-11-virtio0.qcow2")]


def test_a_kept_chain_without_its_full_stops_the_prune() -> None:
    broken = chain("new", [30, 31])
    broken.disks["virtio0"].backups.pop(0)
    with pytest.raises(ChainError, match="does not start with a FULL"):
        plan_retention([ChainStore(ROOT, [chain("old", [10]), broken])], keep=1)


@pytest.mark.parametrize("name", ["../../etc/passwd", "FULL-1-../../x", "FULL-1-a/b", "notes.txt",
                                  "FULL-1-x.qcow2.partial", ""])
def test_names_that_could_leave_the_disk_folder_are_refused_when_read(
        name: str, tmp_path: Path) -> None:
    """Names enter a prune only through the metadata reader, which refuses these."""
    write_store(ChainStore(tmp_path, [chain("old", [10], files=[name]), chain("new", [30])]))
    with pytest.raises(ChainError, match=r"not a (backup|plain) file name"):
        read_store(tmp_path)


@pytest.mark.parametrize("entry, parsed", [
    ("virtio0/FULL-1-a.qcow2", ChainFile("virtio0", "FULL-1-a.qcow2")),
    ("virtio0/INC-2-a.qcow2", ChainFile("virtio0", "INC-2-a.qcow2")),
    ("./FULL-1-a.qcow2", ChainFile(CHAIN_FOLDER, "FULL-1-a.qcow2")),
    ("FULL-1-a.qcow2", ChainFile(CHAIN_FOLDER, "FULL-1-a.qcow2")),
    ("../FULL-1-a.qcow2", None),
    ("virtio0/../FULL-1-a.qcow2", None),
    ("virtio0/sub/FULL-1-a.qcow2", None),
    ("/etc/FULL-1-a.qcow2", None),
    ("virtio0/qmpbackup.json", None),
    ("virtio0/FULL-1-a.qcow2.partial", None),
    ("virtio0/json:{}", None),
])
def test_pruning_entries_are_checked_before_any_use(entry: str,
                                                    parsed: Optional[ChainFile]) -> None:
    if parsed is None:
        with pytest.raises(ChainError):
            ChainFile.parse(entry, "pruning entry")
    else:
        assert ChainFile.parse(entry, "pruning entry") == parsed
        assert ChainFile.parse(parsed.pruning_text(), "pruning entry") == parsed


def test_metadata_round_trips_the_pruning_list(tmp_path: Path) -> None:
    store = ChainStore(tmp_path, [chain("a", [1])], [ChainFile("virtio0", "FULL-0-x.qcow2"),
                                                     ChainFile(CHAIN_FOLDER, "FULL-0-y.qcow2")])
    write_store(store)
    assert json.loads((tmp_path / "qmpbackup.json").read_text())["pruning"] == [
        "virtio0/FULL-0-x.qcow2", "./FULL-0-y.qcow2"], "the on-disk spelling is unchanged"
    loaded = read_store(tmp_path)
    assert loaded.pruning == store.pruning and loaded.chains[0].uuid == "a"
    store.pruning = []
    write_store(store)
    assert "pruning" not in (tmp_path / "qmpbackup.json").read_text(), "old readers see no change"


def test_a_removed_chain_never_takes_a_kept_chains_bitmap() -> None:
    """The same id in two folders (copied by hand): its bitmap serves the kept one."""
    old = ChainStore(ROOT / "2026-09", [chain("x", [10]), chain("y", [11])])
    new = ChainStore(ROOT / "2026-10", [chain("x", [30])])
    plan = plan_retention([old, new], keep=1)
    assert plan.removed_chain_ids() == ["x", "y"]
    assert plan.kept_bitmaps() == {"qmpbackup-x"}


def test_points_are_named_by_their_records_not_their_file_names() -> None:
    """A --no-timestamp FULL is named like its image; a committed FULL holds a later point."""
    untimed = chain("u", [10, 11], files=["vm1.qcow2", "INC-11-vm1.qcow2"])
    untimed.disks["virtio0"].backups[0].timestamped = False
    committed = chain("c", [20])
    committed.disks["virtio0"].backups[0].holds = 25
    plan = plan_retention([ChainStore(ROOT, [untimed, committed])], keep=2)
    assert [(s.first_point, s.last_point) for s in plan.chains] == \
        [("FULL-10", "INC-11"), ("FULL-25", "FULL-25")]
