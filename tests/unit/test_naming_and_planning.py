"""Fast tests of the pure helpers: naming, parsing, planning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libqmpbackup.backup.plan import plan_backup, select_disks
from libqmpbackup.errors import ChainError, QemuImgError, TargetError, UsageError
from libqmpbackup.qemu import qemuimg
from libqmpbackup.qemu.devices import DirtyBitmap, disk_id_for, qdev_id
from libqmpbackup.store.layout import month_folder
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore
from libqmpbackup.store.names import (
    backup_file_name,
    bitmap_name,
    parse_backup_name,
    safe_component,
    validate_uuid,
)
from libqmpbackup.units import parse_size
from tests.helpers import read_store, write_store
from tests.unit.helpers import bitmap, disk, opts, store_with_chain


def test_backup_names_round_trip() -> None:
    name = backup_file_name("inc", 1700000000, "/var/lib/vm/disk 1.img")
    assert name == "INC-1700000000-disk_1.img.qcow2"
    parsed = parse_backup_name(name)
    assert parsed is not None and (parsed.level, parsed.timestamp) == ("inc", 1700000000)
    assert backup_file_name("full", 5, "a.qcow2") == "FULL-5-a.qcow2"
    assert parse_backup_name("image") is None
    assert parse_backup_name("FULL-x-a.qcow2") is None


@pytest.mark.parametrize("value", ["../x", "a/b", "", ".hidden", "x" * 65, "a b", "a..b"])
def test_unsafe_uuids_are_refused(value: str) -> None:
    with pytest.raises(UsageError):
        validate_uuid(value)


def test_safe_uuid_and_bitmap_name() -> None:
    assert bitmap_name(validate_uuid("nightly-1")) == "qmpbackup-nightly-1"


def test_safe_component() -> None:
    assert safe_component("/machine/unattached/device[17]") == "_machine_unattached_device_17_"
    assert safe_component("virtio0") == "virtio0"
    assert safe_component("..") == "disk"


def test_month_folder(tmp_path: Path) -> None:
    assert month_folder(tmp_path, 0).parent == tmp_path
    assert len(month_folder(tmp_path).name) == 7


@pytest.mark.parametrize("text,value", [("123", 123), ("64k", 65536), ("50M", 50 << 20),
                                        ("1GiB", 1 << 30), ("2g", 2 << 30)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_size("fast")


def test_disk_ids_prefer_stable_names() -> None:
    assert qdev_id("/machine/peripheral/data1/virtio-backend") == "data1"
    assert qdev_id("/machine/peripheral/ide7") == "ide7"
    assert qdev_id("/machine/unattached/device[3]") == ""
    assert qdev_id("scsi0-disk") == "scsi0-disk"
    assert disk_id_for("virtio0", "/machine/peripheral-anon/device[0]/virtio-backend", "#b1") == "virtio0"
    assert disk_id_for("", "/machine/peripheral/data1/virtio-backend", "fmt") == "data1"
    assert disk_id_for("", "/machine/unattached/device[3]", "fmt") == "fmt"


def test_chain_store_round_trip(tmp_path: Path) -> None:
    store = ChainStore(tmp_path)
    chain = Chain("u1", "qmpbackup-u1", 10)
    chain.disk("virtio0").backups.append(BackupRecord("FULL-10-a.qcow2", "full", 10, 1024, "a.qcow2"))
    store.chains.append(chain)
    write_store(store)
    loaded = read_store(tmp_path)
    assert loaded.current == chain
    assert [p.name for p in tmp_path.iterdir()] == ["qmpbackup.json"], "no temp file left"


def test_chain_store_reports_malformed_metadata(tmp_path: Path) -> None:
    (tmp_path / "qmpbackup.json").write_text("{not json")
    with pytest.raises(ChainError, match="cannot read chain metadata"):
        read_store(tmp_path)
    (tmp_path / "qmpbackup.json").write_text("{}")
    with pytest.raises(ChainError, match="malformed"):
        read_store(tmp_path)


def test_qemu_img_missing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(QemuImgError, match="not found on PATH"):
        qemuimg.run(["--version"])


# -- planning -----------------------------------------------------------------------------

def test_select_skips_raw_unless_included_but_keeps_pflash() -> None:
    disks = [disk("virtio0"), disk("virtio1", "raw"), disk("pflash0", "raw", device="pflash0")]
    assert [d.disk_id for d in select_disks(disks, opts("full"))] == ["virtio0", "pflash0"]
    assert len(select_disks(disks, opts("full", include_raw=True))) == 3
    assert len(select_disks(disks, opts("copy"))) == 3
    assert [d.disk_id for d in select_disks(disks, opts("full", exclude=("virtio0",)))] == ["pflash0"]
    with pytest.raises(UsageError, match="no disk named"):
        select_disks(disks, opts("full", include=("sda",)))


def test_plan_full_creates_chain_and_bitmaps() -> None:
    disks = [disk("virtio0"), disk("pflash0", "raw", device="pflash0")]
    plan = plan_backup(disks, ChainStore(Path("/b")), opts("full", uuid="u"), 100, True)
    assert plan.new_chain and plan.chain is not None and plan.chain.bitmap == "qmpbackup-u"
    assert [d.disk_id for d in plan.bitmaps_to_add] == ["virtio0"]
    job, flash = plan.jobs
    assert (job.sync, job.bitmap, job.bitmap_mode) == ("full", "qmpbackup-u", "on-success")
    assert (flash.sync, flash.bitmap) == ("full", None)
    assert job.partial_path == Path("/b/virtio0/FULL-100-virtio0.qcow2.partial")


def test_plan_full_refuses_non_empty_target() -> None:
    with pytest.raises(TargetError, match="not empty"):
        plan_backup([disk("virtio0")], ChainStore(Path("/b")), opts("full"), 100, False)


def test_plan_inc_chains_onto_previous_and_gives_new_disks_a_full() -> None:
    disks = [disk("virtio0", bitmaps=(bitmap("qmpbackup-c1"),)), disk("virtio1")]
    plan = plan_backup(disks, store_with_chain("virtio0"), opts("inc"), 100, False)
    inc, new = plan.jobs
    assert (inc.level, inc.sync, inc.backing, inc.bitmap) == \
        ("inc", "incremental", "FULL-1-virtio0.qcow2", "qmpbackup-c1")
    assert (new.level, new.bitmap_mode) == ("full", "on-success")
    assert plan.bitmaps_to_add == [disks[1]]


@pytest.mark.parametrize("bitmaps,message", [((), "has no bitmap"),
                                            ((bitmap("qmpbackup-c1", True),), "inconsistent"),
                                            ((bitmap("qmpbackup-other"),), "another chain")])
def test_plan_inc_refuses_unusable_bitmaps(bitmaps: tuple[DirtyBitmap, ...], message: str) -> None:
    with pytest.raises(ChainError, match=message):
        plan_backup([disk("virtio0", bitmaps=bitmaps)], store_with_chain("virtio0"),
                    opts("inc"), 100, False)


def test_plan_auto_decides() -> None:
    healthy = [disk("virtio0", bitmaps=(bitmap("qmpbackup-c1"),))]
    assert plan_backup(healthy, ChainStore(Path("/b")), opts("auto"), 100, True).level == "full"
    assert plan_backup(healthy, store_with_chain("virtio0"), opts("auto"), 100, False).level == "inc"
    broken = [disk("virtio0", bitmaps=(bitmap("qmpbackup-c1", True),))]
    plan = plan_backup(broken, store_with_chain("virtio0"), opts("auto"), 100, False)
    assert plan.level == "full" and plan.new_chain and plan.retire_bitmap == "qmpbackup-c1"
    assert plan.chain is not None and plan.chain.uuid != "c1"


def test_plan_refuses_foreign_uuid_and_copy_into_chain() -> None:
    with pytest.raises(ChainError, match="not --uuid"):
        plan_backup([disk("virtio0")], store_with_chain("virtio0"), opts("inc", uuid="x"), 100, False)
    with pytest.raises(TargetError, match="holds a backup chain"):
        plan_backup([disk("virtio0")], store_with_chain("virtio0"), opts("copy"), 100, False)


def test_plan_diff_backs_onto_the_full_and_needs_the_diff_bitmap() -> None:
    store = store_with_chain("virtio0")
    store.chains[0].disks["virtio0"].backups.append(
        BackupRecord("INC-2-virtio0.qcow2", "inc", 2, 1, "x"))
    both = (bitmap("qmpbackup-c1"), bitmap("qmpbackup-c1+diff"))
    plan = plan_backup([disk("virtio0", bitmaps=both)], store, opts("diff"), 100, False)
    (job,) = plan.jobs
    assert (plan.level, job.level, job.sync, job.backing, job.bitmap) == \
        ("diff", "diff", "incremental", "FULL-1-virtio0.qcow2", "qmpbackup-c1")
    assert job.final_path.name == "DIFF-100-virtio0.qcow2"
    for bitmaps, message in (((bitmap("qmpbackup-c1"),), "has no bitmap qmpbackup-c1\\+diff"),
                             ((bitmap("qmpbackup-c1"), bitmap("qmpbackup-c1+diff", True)),
                              "inconsistent")):
        with pytest.raises(ChainError, match=message):
            plan_backup([disk("virtio0", bitmaps=bitmaps)], store, opts("diff"), 100, False)
    # an incremental does not need the diff bitmap (chains made before --level diff)
    assert plan_backup([disk("virtio0", bitmaps=both[:1])], store, opts("inc"), 100,
                       False).level == "inc"
    with pytest.raises(ChainError, match="no backup chain"):
        plan_backup([disk("virtio0")], ChainStore(Path("/b")), opts("diff"), 100, True)


def test_plan_full_refuses_a_uuid_whose_diff_bitmap_exists() -> None:
    with pytest.raises(ChainError, match="another backup folder"):
        plan_backup([disk("virtio0", bitmaps=(bitmap("qmpbackup-u+diff"),))],
                    ChainStore(Path("/b")), opts("full", uuid="u"), 100, True)


def test_a_run_says_which_disks_did_not_get_the_asked_level() -> None:
    """inc: the disk new to the chain and the raw one get a full, each with the reason."""
    disks = [disk("virtio0", bitmaps=(bitmap("qmpbackup-c1"),)), disk("virtio1"),
             disk("pflash1", "raw", device="pflash1")]
    plan = plan_backup(disks, store_with_chain("virtio0"), opts("inc"), 100, False)
    assert [(j.level, j.note) for j in plan.jobs] == [
        ("inc", ""), ("full", "hot-added"), ("full", "raw: copied in full every run")]
    full = plan_backup(disks, ChainStore(Path("/b")), opts("full"), 100, True)
    assert [(j.level, j.note) for j in full.jobs] == [("full", "")] * 3, "a full is as asked"


def test_a_chain_records_the_disks_its_first_run_left_out(tmp_path: Path) -> None:
    disks = [disk("virtio0"), disk("virtio1"), disk("virtio2")]
    plan = plan_backup(disks[:1], ChainStore(tmp_path), opts("full", exclude=("virtio1",)), 100,
                       True, excluded=["virtio1"])
    assert plan.chain is not None and plan.chain.excluded == ["virtio1"]
    store = ChainStore(tmp_path, [plan.chain])
    plan.chain.disk("virtio0").backups.append(
        BackupRecord("FULL-100-virtio0.qcow2", "full", 100, 1, "x"))
    write_store(store)
    loaded = read_store(tmp_path)
    assert loaded.chains[0].excluded == ["virtio1"]
    with_bitmaps = [disk(d.disk_id, bitmaps=(bitmap(plan.chain.bitmap),)) for d in disks]
    later = plan_backup(with_bitmaps, loaded, opts("inc"), 200, False)
    assert [(j.disk.disk_id, j.level, j.note) for j in later.jobs] == [
        ("virtio0", "inc", ""), ("virtio2", "full", "hot-added")], "virtio1 stays out"
    named = plan_backup(with_bitmaps[1:2], loaded, opts("inc", include=("virtio1",)), 200, False)
    assert [(j.disk.disk_id, j.note) for j in named.jobs] == [("virtio1", "named by --include")]


def test_metadata_of_the_previous_release_loads_and_a_bad_selection_is_refused(
        tmp_path: Path) -> None:
    record = {"file": "FULL-10-a.qcow2", "level": "full", "time": 10, "virtual_size": 1,
              "source_image": "a.qcow2"}
    chain = {"uuid": "u1", "bitmap": "qmpbackup-u1", "created": 10,
             "disks": {"virtio0": {"backups": [record], "folder": "virtio0"}}}
    (tmp_path / "qmpbackup.json").write_text(json.dumps({"version": 1, "chains": [chain]}))
    assert read_store(tmp_path).chains[0].excluded == [], "no list: every disk may join"
    for bad in ("virtio1", [""], [3]):
        (tmp_path / "qmpbackup.json").write_text(json.dumps(
            {"version": 1, "chains": [{**chain, "excluded": bad}]}))
        with pytest.raises(ChainError, match="malformed"):
            read_store(tmp_path)
