"""Fast tests of the layout options, copy metadata, disk-folder records and upstream folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

from libqmpbackup.backup.adopt import adopt_upstream
from libqmpbackup.backup.plan import plan_backup, select_disks
from libqmpbackup.errors import ChainError, UsageError
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.restore.folder import open_backup_dir
from libqmpbackup.restore.rules import image_problems, record_problems, select_root_points
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import CHAIN_FOLDER
from libqmpbackup.store.retention import chain_files
from tests.helpers import read_store, write_store
from tests.unit.helpers import bitmap, disk, opts, store_with_chain


def names(plan_jobs: list) -> list[str]:
    return [str(j.final_path) for j in plan_jobs]


def test_no_subdir_and_no_timestamp_name_files_like_upstream() -> None:
    disks = [disk("virtio0"), disk("virtio1")]
    plan = plan_backup(disks, ChainStore(Path("/b")), opts("full", no_subdir=True, no_timestamp=True),
                       7, True)
    assert names(plan.jobs) == ["/b/virtio0.qcow2", "/b/virtio1.qcow2"]
    assert [j.link for j in plan.jobs] == ["FULL-virtio0.qcow2", "FULL-virtio1.qcow2"]
    assert not any(j.timestamped for j in plan.jobs)
    plan = plan_backup(disks, ChainStore(Path("/b")),
                       opts("copy", no_timestamp=True, no_symlink=True), 7, True)
    assert names(plan.jobs) == ["/b/virtio0/virtio0.qcow2", "/b/virtio1/virtio1.qcow2"]
    assert [j.link for j in plan.jobs] == [None, None]


def test_a_taken_plain_name_falls_back_to_the_timestamped_one() -> None:
    plan = plan_backup([disk("virtio0")], ChainStore(Path("/b")), opts("copy", no_timestamp=True),
                       9, False, existing={"virtio0/virtio0.qcow2"})
    assert names(plan.jobs) == ["/b/virtio0/COPY-9-virtio0.qcow2"]
    assert plan.jobs[0].timestamped and plan.jobs[0].link is None


def test_a_chain_keeps_its_folders_without_repeating_the_option() -> None:
    store = store_with_chain("virtio0")
    store.chains[0].disks["virtio0"].folder = ""
    d = disk("virtio0", bitmaps=(bitmap("qmpbackup-c1"),))
    plan = plan_backup([d], store, opts("inc"), 5, False)
    assert names(plan.jobs) == ["/b/INC-5-virtio0.qcow2"]


def test_no_subdir_refuses_images_of_the_same_name() -> None:
    a, b = disk("virtio0"), disk("virtio1")
    b.filename = "/other/virtio0.qcow2"
    with pytest.raises(UsageError, match="virtio0, virtio1 would get the same file names"):
        select_disks([a, b], opts("full", no_subdir=True))
    assert len(select_disks([a, b], opts("full"))) == 2


def test_copies_are_recorded_in_a_chain_without_bitmap() -> None:
    plan = plan_backup([disk("virtio0")], ChainStore(Path("/b")), opts("copy"), 3, True)
    assert plan.chain is not None and plan.chain.is_copies and plan.new_chain
    store = ChainStore(Path("/b"), [plan.chain])
    assert store.current is None, "a copies chain is never continued by inc"
    with pytest.raises(ChainError, match="no backup chain"):
        plan_backup([disk("virtio0")], store, opts("inc"), 4, False)


def test_copy_and_untimestamped_records_pass_the_rules() -> None:
    copies = [BackupRecord("COPY-1-a.qcow2", "copy", 1, 1, "a"), BackupRecord("a.qcow2", "copy", 2, 1, "a",
                                                                               timestamped=False)]
    assert record_problems(copies) == []
    assert copies[1].label == "COPY-2"
    plain_full = [BackupRecord("a.qcow2", "full", 1, 1, "a", timestamped=False),
                  BackupRecord("INC-2-a.qcow2", "inc", 2, 1, "a")]
    assert record_problems(plain_full) == []
    hostile = [BackupRecord("qmpbackup.json", "full", 1, 1, "a", timestamped=False)]
    assert record_problems(hostile) != []


def test_an_upstream_inc_needs_no_backing_file_but_ours_does() -> None:
    full = BackupRecord("FULL-1-a", "full", 1, 0, "a")
    info = {"format": "qcow2", "virtual-size": 5}
    assert image_problems(BackupRecord("INC-2-a", "inc", 2, 0, "a", backed=False), full, info,
                          Path("/b")) == []
    assert "has no backing file" in image_problems(BackupRecord("INC-2-a", "inc", 2, 0, "a"), full,
                                                   info, Path("/b"))[0]


def test_metadata_folders_must_stay_inside_the_backup(tmp_path: Path) -> None:
    raw = {"version": 1, "chains": [{"uuid": "u", "bitmap": "qmpbackup-u", "created": 1,
                                     "disks": {"v": {"folder": "../../etc", "backups": []}}}]}
    (tmp_path / "qmpbackup.json").write_text(json.dumps(raw))
    with pytest.raises(ChainError, match="not a folder name"):
        read_store(tmp_path)


def test_every_disk_folder_gets_its_own_records(tmp_path: Path) -> None:
    (tmp_path / "virtio0").mkdir()
    store = store_with_chain("virtio0", "ide0-hd0")
    store.root = tmp_path
    write_store(store)
    own = read_store(tmp_path / "virtio0", "qmpbackup-disk.json")
    assert list(own.chains[0].disks) == ["virtio0"] and own.chains[0].folder_of("virtio0") == ""
    assert not (tmp_path / "ide0-hd0").exists(), "no folder is created for the records"
    with open_backup_dir(tmp_path / "virtio0") as backup:
        assert backup.selected == "virtio0" and backup.root == tmp_path, "in place: the parent's"
    os.rename(tmp_path / "virtio0", tmp_path.parent / f"{tmp_path.name}-moved")
    with open_backup_dir(tmp_path.parent / f"{tmp_path.name}-moved") as moved:
        assert moved.disk_ids() == ["virtio0"] and moved.single_disk()
        assert moved.selected == CHAIN_FOLDER and moved.metadata_name == "qmpbackup-disk.json"


def upstream_folder(root: Path) -> None:
    """As upstream 0.67 writes it: each folder named after its image file's base name."""
    for folder, files in {"disk1.qcow2": ["FULL-10-disk1.qcow2", "INC-20-disk1.qcow2",
                                          "INC-15-disk1.qcow2"],
                          "disk2.qcow2": ["FULL-10-disk2.qcow2"]}.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(b"")
        (root / f"{folder}.config").write_text(json.dumps(
            {"filename": f"/vm/{folder}", "format": "qcow2", "virtual-size": 1 << 20}))
    (root / "uuid").write_text("testme\n")


def test_an_upstream_folder_reads_as_one_chain_ordered_by_the_times_in_the_names(
        tmp_path: Path) -> None:
    upstream_folder(tmp_path)
    os.symlink("FULL-10-disk1.qcow2", tmp_path / "disk1.qcow2" / "INC-30-disk1.qcow2")
    (tmp_path / "disk1.qcow2" / "INC-40-disk1.qcow2.partial").write_bytes(b"")
    store = read_store(tmp_path, None)
    (chain,) = store.chains
    assert (chain.uuid, chain.bitmap) == ("testme", "qmpbackup-testme")
    assert [r.file for r in chain.disks["disk1.qcow2"].backups] == [
        "FULL-10-disk1.qcow2", "INC-15-disk1.qcow2", "INC-20-disk1.qcow2"], "no link, no .partial"
    assert chain.folder_of("disk2.qcow2") == "disk2.qcow2"
    points = select_root_points(store, "INC-15", None, ["disk1.qcow2"])
    assert [(p.disk_id, p.record.file) for p in points] == [("disk1.qcow2", "INC-15-disk1.qcow2")]
    with open_backup_dir(tmp_path / "disk1.qcow2") as alone:
        assert alone.metadata_name is None and alone.disk_ids() == ["disk1.qcow2"]
        assert alone.root == tmp_path and alone.selected == "disk1.qcow2", "the upstream parent's"


def test_a_hostile_upstream_uuid_is_refused(tmp_path: Path) -> None:
    upstream_folder(tmp_path)
    (tmp_path / "uuid").write_text("../../x")
    with pytest.raises(ChainError, match="no usable chain id"):
        read_store(tmp_path, None)


def test_filter_selects_by_disk_id_or_image_name(tmp_path: Path) -> None:
    upstream_folder(tmp_path)
    with open_backup_dir(tmp_path, "disk2") as backup:
        assert backup.disk_ids() == ["disk2.qcow2"]
    with open_backup_dir(tmp_path, "nothing") as backup:
        assert backup.disk_ids() == []


def adopt(path: Path, disks: list[BlockDevice]) -> ChainStore:
    with BackupFolder.open(path) as folder:
        return adopt_upstream(folder, disks)


def vm_disk(disk_id: str, filename: str, backing: str = "") -> BlockDevice:
    return BlockDevice(disk_id=disk_id, device=disk_id, qdev="", node=f"#{disk_id}",
                       driver="qcow2", filename=filename, virtual_size=1 << 20, read_only=False,
                       removable=False, backing_filename=backing,
                       bitmaps=[bitmap("qmpbackup-testme")])


def test_adoption_matches_upstream_folders_by_image_base_name(tmp_path: Path) -> None:
    """Folder = image base name; under an overlay the backing image's; device names never."""
    upstream_folder(tmp_path)
    disks = [vm_disk("ide0-hd1", "/vm/disk2.qcow2"),
             vm_disk("virtio0", "/vm/snap.qcow2", backing="/vm/disk1.qcow2")]
    (chain,) = adopt(tmp_path, disks).chains
    assert {d: c.folder for d, c in chain.disks.items()} == {
        "virtio0": "disk1.qcow2", "ide0-hd1": "disk2.qcow2"}
    # two disks whose images share a base name: the .config's file name tells them apart
    twins = [vm_disk("a", "/other/disk1.qcow2"), vm_disk("b", "/vm/disk1.qcow2"),
             vm_disk("c", "/vm/disk2.qcow2")]
    (chain,) = adopt(tmp_path, twins).chains
    assert chain.disks["b"].folder == "disk1.qcow2" and "a" not in chain.disks
    # no .config, still ambiguous: the folder keeps its name and the disk starts afresh
    (tmp_path / "disk1.qcow2.config").unlink()
    store = adopt(tmp_path, twins)
    assert set(store.chains[0].disks) == {"disk1.qcow2", "c"}
    assert store.unmatched == ["disk1.qcow2"]
    plan = plan_backup(twins, store, opts("inc"), 100, False)
    assert [(j.disk.disk_id, j.level, j.note) for j in plan.jobs] == [
        ("a", "full", "matches no upstream folder"), ("b", "full", "matches no upstream folder"),
        ("c", "inc", "")], "the run says why it starts a disk afresh"


def test_adoption_falls_back_to_device_names(tmp_path: Path) -> None:
    """A folder renamed after its device by hand still finds its disk."""
    upstream_folder(tmp_path)
    (tmp_path / "disk2.qcow2").rename(tmp_path / "ide0-hd1")
    disks = [vm_disk("ide0-hd1", "/elsewhere/renamed.qcow2"), vm_disk("virtio0", "/vm/disk1.qcow2")]
    (chain,) = adopt(tmp_path, disks).chains
    assert {d: c.folder for d, c in chain.disks.items()} == {
        "virtio0": "disk1.qcow2", "ide0-hd1": "ide0-hd1"}


def test_adoption_of_an_upstream_no_subdir_folder(tmp_path: Path) -> None:
    for name in ("FULL-10-disk1.qcow2", "INC-20-disk1.qcow2", "FULL-10-disk2.qcow2"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "uuid").write_text("testme\n")
    disks = [vm_disk("virtio0", "/vm/disk1.qcow2"), vm_disk("data1", "/vm/disk2.qcow2")]
    (chain,) = adopt(tmp_path, disks).chains
    assert {d: (c.folder, len(c.backups)) for d, c in chain.disks.items()} == {
        "virtio0": ("", 2), "data1": ("", 1)}
    plan = plan_backup(disks, ChainStore(tmp_path, [chain]), opts("inc"), 100, False)
    assert [(j.level, j.final_path.name, j.backing) for j in plan.jobs] == [
        ("inc", "INC-100-disk1.qcow2", None), ("inc", "INC-100-disk2.qcow2", None)]


def test_chain_without_folder_field_still_loads(tmp_path: Path) -> None:
    chain = Chain("u", "qmpbackup-u", 1, {"v": DiskChain([BackupRecord("FULL-1-a", "full", 1, 1, "a")])})
    write_store(ChainStore(tmp_path, [chain]))
    raw = json.loads((tmp_path / "qmpbackup.json").read_text())
    del raw["chains"][0]["disks"]["v"]["folder"]
    (tmp_path / "qmpbackup.json").write_text(json.dumps(raw))
    assert read_store(tmp_path).chains[0].folder_of("v") == "v"


@pytest.mark.parametrize("entry, parsed", [
    ("./FULL-1-a.qcow2", ChainFile(CHAIN_FOLDER, "FULL-1-a.qcow2")),
    ("./virtio0.qcow2", ChainFile(CHAIN_FOLDER, "virtio0.qcow2")),
    ("virtio0/virtio0.qcow2", ChainFile("virtio0", "virtio0.qcow2")),
    ("./qmpbackup.json", None),
    ("virtio0/qmpbackup-disk.json", None),
    ("./../x", None),
    ("../x", None),
])
def test_pruning_entries_of_flat_and_untimestamped_layouts(
        entry: str, parsed: Optional[ChainFile]) -> None:
    if parsed is None:
        with pytest.raises(ChainError):
            ChainFile.parse(entry, "pruning entry")
    else:
        assert ChainFile.parse(entry, "pruning entry") == parsed


def test_prune_lists_files_where_the_chain_keeps_them() -> None:
    flat = Chain(uuid="f", bitmap="qmpbackup-f", created=1, disks={
        "virtio0": DiskChain(backups=[BackupRecord("virtio0.qcow2", "full", 1, 1, "v",
                                                   timestamped=False)], folder="")})
    assert chain_files(flat) == [ChainFile(CHAIN_FOLDER, "virtio0.qcow2")]
    assert chain_files(flat)[0].pruning_text() == "./virtio0.qcow2"


def test_disk_records_are_never_written_through_a_symlinked_folder(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "b"
    root.mkdir()
    os.symlink(outside, root / "virtio0")
    store = store_with_chain("virtio0")
    store.root = root
    write_store(store)
    assert list(outside.iterdir()) == [] and (root / "qmpbackup.json").is_file()
