"""The pure rules of qmprestore: point selection and chain consistency, without QEMU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest

from libqmpbackup.errors import ChainError, TargetError, UsageError
from libqmpbackup.restore import file_steps
from libqmpbackup.restore.merge import output_format
from libqmpbackup.restore.rules import (
    backs_onto,
    disks_in,
    find_point,
    folder_problems,
    image_problems,
    matches,
    needs_rebase,
    record_problems,
    segment,
    select_disk_point,
    select_root_points,
    span,
)
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.journal import Journal
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain
from libqmpbackup.store.names import point_label
from tests.helpers import read_journal

SIZE = 1 << 20


def rec(level: str, time: int, image: str = "disk.qcow2", **kw) -> BackupRecord:
    prefix = {"full": "FULL", "inc": "INC", "diff": "DIFF", "copy": "COPY"}[level]
    return BackupRecord(f"{prefix}-{time}-{image}", level, time, SIZE, f"/vm/{image}", **kw)


def chain(uuid: str, **disks: list[BackupRecord]) -> Chain:
    return Chain(uuid, f"qmpbackup-{uuid}", 0, {d: DiskChain(list(r)) for d, r in disks.items()})


QCOW = [rec("full", 10), rec("inc", 20), rec("inc", 30), rec("inc", 40)]
RAW = [rec("full", t, "raw.img") for t in (10, 20, 30, 40)]


def store(*chains: Chain) -> ChainStore:
    return ChainStore(Path("/b"), list(chains))


# -- naming points -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["INC-20-disk.qcow2", "INC-20-disk", "INC-20"])
def test_until_accepts_file_name_stem_and_prefix(name: str) -> None:
    assert matches("INC-20-disk.qcow2", name)
    assert find_point(QCOW, name) == 1


@pytest.mark.parametrize("name", ["INC-2", "INC-20-", "20", "inc-20", "FULL-20", "INC-20-disk.qcow"])
def test_until_rejects_near_misses(name: str) -> None:
    assert find_point(QCOW, name) is None


def test_label_of_odd_names_is_the_name() -> None:
    assert point_label("INC-20-disk.qcow2") == "INC-20"
    assert point_label("notes.txt") == "notes.txt"


# -- segments ------------------------------------------------------------------------------------

def test_segment_of_a_bitmap_disk_is_full_plus_incs() -> None:
    assert [r.time for r in segment(QCOW, 2)] == [10, 20, 30]
    assert segment(QCOW, 0) == [QCOW[0]]


def test_segment_of_a_raw_disk_is_its_own_full() -> None:
    assert segment(RAW, 2) == [RAW[2]]


def test_segment_starts_at_the_last_full_before_the_point() -> None:
    mixed = [rec("full", 1), rec("inc", 2), rec("full", 3), rec("inc", 4), rec("inc", 5)]
    assert [r.time for r in segment(mixed, 4)] == [3, 4, 5]
    assert [r.time for r in segment(mixed, 1)] == [1, 2]


MIXED = [rec("full", 10), rec("inc", 20), rec("diff", 30), rec("inc", 40), rec("diff", 50),
         rec("inc", 60)]


def test_segment_of_a_diff_is_its_full_and_itself_and_incs_go_back_to_it() -> None:
    assert [r.time for r in segment(MIXED, 2)] == [10, 30]
    assert [r.time for r in segment(MIXED, 3)] == [10, 30, 40]
    assert [r.time for r in segment(MIXED, 5)] == [10, 50, 60]
    assert [r.time for r in segment(MIXED, 1)] == [10, 20]
    assert [r.time for r in span(MIXED, 3)] == [10, 20, 30, 40], "in-place restores take all"
    assert record_problems(MIXED) == []
    assert find_point(MIXED, "DIFF-30") == 2


def test_a_diff_must_back_onto_its_full() -> None:
    folder = Path("/b/virtio0")
    good = {"format": "qcow2", "virtual-size": SIZE, "backing-filename": MIXED[0].file}
    assert image_problems(MIXED[2], MIXED[0], good, folder) == []
    wrong = dict(good, **{"backing-filename": MIXED[1].file})
    assert image_problems(MIXED[2], MIXED[0], wrong, folder) == [
        f"{MIXED[2].file} is backed by {MIXED[1].file}, expected {MIXED[0].file}"]


def test_segment_without_full_is_a_chain_error() -> None:
    with pytest.raises(ChainError, match=r"INC-30-disk\.qcow2 has no FULL backup before it"):
        segment(QCOW[1:], 1)


# -- choosing the chain and point --------------------------------------------------------------

def test_disk_point_defaults_to_the_newest_of_the_newest_chain() -> None:
    old = chain("a", virtio0=QCOW[:2])
    new = chain("b", virtio0=[rec("full", 50), rec("inc", 60)])
    point = select_disk_point(store(old, new), "virtio0", None, None)
    assert (point.chain_id, point.record.time) == ("b", 60)


def test_disk_point_finds_until_in_an_older_chain_and_honours_uuid() -> None:
    old = chain("a", virtio0=QCOW[:2])
    new = chain("b", virtio0=[rec("full", 50), rec("inc", 60)])
    point = select_disk_point(store(old, new), "virtio0", "INC-20", None)
    assert (point.chain_id, point.index, point.label) == ("a", 1, "INC-20")
    assert point.path == Path("/b/virtio0/INC-20-disk.qcow2")
    assert select_disk_point(store(old, new), "virtio0", None, "a").record.time == 20
    with pytest.raises(UsageError, match="no such restore point for disk virtio0"):
        select_disk_point(store(old, new), "virtio0", "INC-60", "a")
    with pytest.raises(UsageError, match="--uuid c: no such chain"):
        select_disk_point(store(old, new), "virtio0", None, "c")


def test_unknown_until_lists_the_newest_points() -> None:
    many = [rec("full", 1)] + [rec("inc", t) for t in range(2, 20)]
    with pytest.raises(UsageError) as err:
        select_disk_point(store(chain("a", d=many)), "d", "INC-99", None)
    assert "INC-19" in str(err.value) and "INC-2," not in str(err.value)
    assert "qmprestore list" in str(err.value)


def test_disk_without_backups_is_a_chain_error() -> None:
    with pytest.raises(ChainError, match="no chain with backups of disk virtio9"):
        select_disk_point(store(chain("a", virtio0=QCOW)), "virtio9", None, None)


def test_root_points_pick_one_run_on_every_disk() -> None:
    points = select_root_points(store(chain("a", virtio0=QCOW, virtio1=RAW)), "INC-30", None)
    assert {p.disk_id: p.record.file for p in points} == {
        "virtio0": "INC-30-disk.qcow2", "virtio1": "FULL-30-raw.img"}
    newest = select_root_points(store(chain("a", virtio0=QCOW, virtio1=RAW[:2])), None, None)
    assert {p.disk_id: p.record.time for p in newest} == {"virtio0": 40, "virtio1": 20}


def test_root_point_missing_on_one_disk_is_refused() -> None:
    with pytest.raises(ChainError, match="disk virtio1 of chain a has no backup from the run of INC-30"):
        select_root_points(store(chain("a", virtio0=QCOW, virtio1=RAW[:2])), "INC-30", None)
    with pytest.raises(UsageError, match="no such restore point in /b"):
        select_root_points(store(chain("a", virtio0=QCOW)), "INC-31", None)


def test_disk_folder_names_map_back_to_disk_ids() -> None:
    s = store(chain("a", **{"/machine/peripheral/d0/virtio-backend": QCOW}), chain("b", virtio0=QCOW))
    assert disks_in(s, "_machine_peripheral_d0_virtio-backend") == [
        "/machine/peripheral/d0/virtio-backend"]
    assert disks_in(s, "nothing") == []


# -- metadata against names ------------------------------------------------------------------

def test_a_good_chain_has_no_record_problems() -> None:
    assert record_problems(QCOW) == [] and record_problems(RAW) == []


def test_record_problems_name_the_file() -> None:
    renamed = [QCOW[0], BackupRecord("INC-21-disk.qcow2", "inc", 20, SIZE, "/vm/disk.qcow2")]
    assert record_problems(renamed) == ["INC-21-disk.qcow2 does not match its metadata "
                                        "(level inc, time 20)"]
    swapped = [QCOW[0], QCOW[2], QCOW[1]]
    assert record_problems(swapped) == ["INC-20-disk.qcow2 is not newer than INC-30-disk.qcow2 "
                                        "before it"]
    assert record_problems(QCOW[1:]) == ["INC-20-disk.qcow2 has no FULL backup before it"]
    assert "no place in a chain" in record_problems([QCOW[0], rec("copy", 20)])[0]
    assert "is not a backup file name" in record_problems(
        [BackupRecord("../FULL-1-x", "full", 1, SIZE, "")])[0]
    assert record_problems([]) == ["the chain metadata lists no backup of this disk"]


# -- metadata against the folder ---------------------------------------------------------------

def test_folder_problems_find_missing_and_unknown_backup_files() -> None:
    chain_files = [r.file for r in QCOW]
    entries = [*chain_files, "image", "COPY-5-disk.qcow2", "notes.txt", "FULL-1-old.qcow2"]
    assert folder_problems(entries, chain_files, [*chain_files, "FULL-1-old.qcow2"]) == []
    entries = [chain_files[0], chain_files[1], chain_files[3], "INC-99-disk.qcow2"]
    assert folder_problems(entries, chain_files, chain_files) == [
        "INC-30-disk.qcow2 is missing (listed in the chain metadata)",
        "INC-99-disk.qcow2 is not in the chain metadata"]


# -- metadata against qemu-img info -------------------------------------------------------------

def info(backing: Optional[str] = None, **extra) -> dict:
    data = {"format": "qcow2", "virtual-size": SIZE, **extra}
    if backing:
        data.update({"backing-filename": backing, "backing-filename-format": "qcow2"})
    return data


def test_image_problems_accept_the_chain_as_written() -> None:
    folder = Path("/b/virtio0")
    assert image_problems(QCOW[0], None, info(), folder) == []
    assert image_problems(QCOW[1], QCOW[0], info(QCOW[0].file), folder) == []
    assert image_problems(QCOW[1], QCOW[0], info(f"/b/virtio0/{QCOW[0].file}"), folder) == []


def test_image_problems_name_what_is_wrong() -> None:
    folder = Path("/b/virtio0")
    assert image_problems(QCOW[0], None, info("x.qcow2"), folder) == [
        "FULL-10-disk.qcow2 is a FULL backup but has backing file x.qcow2"]
    assert image_problems(QCOW[2], QCOW[1], info(QCOW[0].file), folder) == [
        "INC-30-disk.qcow2 is backed by FULL-10-disk.qcow2, expected INC-20-disk.qcow2"]
    assert image_problems(QCOW[2], QCOW[1], info(), folder) == [
        "INC-30-disk.qcow2 has no backing file (expected INC-20-disk.qcow2)"]
    assert "virtual size 5, the metadata says" in image_problems(
        QCOW[0], None, {**info(), "virtual-size": 5}, folder)[0]
    corrupt = info(**{"format-specific": {"type": "qcow2", "data": {"corrupt": True}}})
    assert image_problems(QCOW[0], None, corrupt, folder) == ["FULL-10-disk.qcow2 is marked corrupt"]


def test_backing_names_resolve_relative_to_the_folder() -> None:
    folder = Path("/b/virtio0")
    assert backs_onto(folder, "./FULL-1-x", "FULL-1-x")
    assert backs_onto(folder, "../virtio0/FULL-1-x", "FULL-1-x")
    assert not backs_onto(folder, "/elsewhere/FULL-1-x", "FULL-1-x")


def test_rebase_is_needed_only_for_other_spellings_or_formats() -> None:
    assert not needs_rebase(info("FULL-1-x"), "FULL-1-x")
    assert needs_rebase(info("/b/virtio0/FULL-1-x"), "FULL-1-x")
    assert needs_rebase({"backing-filename": "FULL-1-x"}, "FULL-1-x")


def test_committed_full_keeps_its_name_and_answers_to_its_point() -> None:
    committed = rec("full", 10, holds=30)
    later = [committed, rec("inc", 40)]
    assert committed.point_time == 30 and committed.label == "FULL-30"
    assert record_problems(later) == [], "name and time stay the backup's own"
    for name in ("FULL-10-disk.qcow2", "FULL-10-disk", "FULL-30", "INC-30"):
        assert find_point(later, name) == 0, name
    assert find_point(later, "FULL-10") is None, "the moment it was taken is gone"
    both = store(chain("a", virtio0=later, virtio1=[rec("full", 10, "raw.img"),
                                                    rec("full", 30, "raw.img")]))
    points = select_root_points(both, "INC-30", None)
    assert {p.disk_id: p.record.file for p in points} == {
        "virtio0": "FULL-10-disk.qcow2", "virtio1": "FULL-30-raw.img"}


# -- journal, file steps, formats --------------------------------------------------------------

def test_journal_round_trip_and_damage(tmp_path: Path) -> None:
    assert read_journal(tmp_path) is None
    journal = Journal("commit", "a", "virtio0", "FULL-1-x", "FULL-3-x", "INC-3-x", 3,
                      ["INC-2-x", "INC-3-x"])
    with Folder.open_root(tmp_path) as folder:
        journal.save(folder)
    loaded = read_journal(tmp_path)
    assert loaded == journal and not loaded.applied
    loaded.done = 2
    assert loaded.applied
    assert journal.rerun_command(Path("/b/my disk")) == "qmprestore commit --dir '/b/my disk'"
    (tmp_path / "qmprestore-journal.json").write_text("{")
    with pytest.raises(ChainError, match="cannot read restore journal"):
        read_journal(tmp_path)
    with Folder.open_root(tmp_path) as folder:
        Journal.remove(folder)
    assert read_journal(tmp_path) is None


def test_link_replaces_symlinks_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Folder.open_root(tmp_path) as folder:
        file_steps.link(folder, "image", "A")
        file_steps.link(folder, "image", "B")
        assert os.readlink(tmp_path / "image") == "B"
        file_steps.link(folder, "image", "C", dry_run=True)
        assert capsys.readouterr().out == f"# link {tmp_path / 'image'} -> C\n"
        assert os.readlink(tmp_path / "image") == "B"
        (tmp_path / "image").unlink()
        (tmp_path / "image").write_text("user data")
        with pytest.raises(TargetError, match="not a symlink"):
            file_steps.link(folder, "image", "A")


def test_source_format_falls_back_to_qcow2() -> None:
    from libqmpbackup.restore.rules import RestorePoint

    def point(fmt: str) -> RestorePoint:
        return RestorePoint(Path("/b"), "a", "d", (rec("full", 1, source_format=fmt),), 0)
    assert output_format(point("raw"), "source") == "raw"
    assert output_format(point("qcow2"), "source") == "qcow2"
    assert output_format(point("vmdk"), "source") == "qcow2"
    assert output_format(point("raw"), "qcow2") == "qcow2"


def test_merge_needs_exactly_one_target(cli) -> None:
    assert cli("qmprestore", "merge", "--dir", "/nonexistent").rc == 2
    both = cli("qmprestore", "merge", "--dir", "/x", "--targetfile", "a", "--targetdir", "b")
    assert both.rc == 2 and "not allowed with" in both.err
    assert cli("qmprestore", "merge", "--dir", "/x", "--targetfile", "a",
               "--rate-limit", "fast").rc == 2
    cli("qmprestore", "merge", "--dir", "/x", "--targetfile", "a", "--uuid", "../x").failed(
        2, "invalid --uuid")
