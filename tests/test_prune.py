"""qmpbackup prune: whole chains go, whole chains stay, proven by restoring every kept point.

The first part builds chain folders by hand (metadata and small files, no
QEMU) for the folder rules: what goes, dry run, symlinks, locks, an
interrupted prune.  The second part prunes chains a real VM wrote and
restores every kept point with qmprestore, compared with ``qemu-img compare``
against the disk at backup time; then the next ``auto`` must continue the
newest chain with an incremental.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from libqmpbackup.errors import Interrupted
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.journal import Journal
from libqmpbackup.store.locks import chain_lock
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore
from libqmpbackup.store.names import point_label
from tests.helpers import documented, finished, key_paths, read_store, start_backup, write_store
from tests.vm import Disk, MiB, TestVM, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path


def prune(cli, target: Path, keep: object, *extra: object, socket: str = ""):
    return cli("qmpbackup", *(("--socket", socket) if socket else ()), "prune",
               "--target", target, "--keep", keep, *extra)


def tree(folder: Path) -> dict[str, object]:
    """Every entry below FOLDER with its bytes and times: what 'no byte changed' means."""
    out: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            out[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            out[str(path)] = ("dir", st.st_mtime_ns, st.st_mode)
        else:
            out[str(path)] = (path.read_bytes(), st.st_mtime_ns, st.st_mode)
    out["."] = folder.lstat().st_mtime_ns
    return out


def contents(folder: Path) -> dict[str, object]:
    """Like :func:`tree` without folders (whose times a refused run's lock file touches)."""
    return {k: v for k, v in tree(folder).items() if k != "." and not Path(k).is_dir()}


def files_below(folder: Path) -> set[Path]:
    """Backup files and chain metadata (each disk folder's own copy of its records aside)."""
    return {p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
            and p.name != "qmpbackup-disk.json"}


# -- chain folders made by hand ----------------------------------------------------------------

def hand_made(root: Path, chains: dict[str, list[int]], disks: tuple[str, ...] = ("virtio0",)) -> ChainStore:
    """A chain folder whose chains have a FULL and INCs at the given times (files of a few bytes)."""
    store = ChainStore(root)
    for uuid, times in chains.items():
        chain = Chain(uuid=uuid, bitmap=f"qmpbackup-{uuid}", created=times[0])
        for disk in disks:
            (root / disk).mkdir(parents=True, exist_ok=True)
            for i, t in enumerate(times):
                name = f"{'FULL' if i == 0 else 'INC'}-{t}-{disk}.qcow2"
                (root / disk / name).write_bytes(b"x" * (1000 + t))
                chain.disk(disk).backups.append(BackupRecord(
                    file=name, level="full" if i == 0 else "inc", time=t, virtual_size=1,
                    source_image=f"/vm/{disk}.qcow2"))
        store.chains.append(chain)
    write_store(store)
    return store


def chain_files(root: Path, *times: int, disks: tuple[str, ...] = ("virtio0",)) -> set[Path]:
    return {root / d / f"{'FULL' if i == 0 else 'INC'}-{t}-{d}.qcow2"
            for d in disks for i, t in enumerate(times)}


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """DIR with three chains (a, b, c) and two month folders (m1 oldest of all, m2 newest)."""
    base = tmp_path / "backup"
    hand_made(base, {"a": [100, 101], "b": [200, 201, 202], "c": [300, 301]}, ("virtio0", "data1"))
    hand_made(base / "2026-09", {"m1": [50, 51]})
    hand_made(base / "2026-10", {"m2": [400]})
    return base


def test_the_newest_chains_stay_whole_and_the_others_go_whole(cli, folders: Path) -> None:
    doomed = (chain_files(folders, 100, 101, disks=("virtio0", "data1"))
              | chain_files(folders, 200, 201, 202, disks=("virtio0", "data1"))
              | chain_files(folders / "2026-09", 50, 51))
    kept = files_below(folders) - doomed
    out = prune(cli, folders, 2).ok().out
    assert files_below(folders) == kept - {folders / "2026-09" / "qmpbackup.json"}
    assert not (folders / "2026-09").exists(), "an emptied month folder goes"
    assert [c.uuid for c in read_store(folders).chains] == ["c"]
    assert read_store(folders).pruning == []
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[2:] if line.endswith(
        ("kept", "removed"))}
    assert rows == {"2026-09/m1": "removed", "a": "removed", "b": "removed", "c": "kept",
                    "2026-10/m2": "kept"}
    freed = sum(1000 + int(p.name.split("-")[1]) for p in doomed)
    assert out.splitlines()[-1] == f"removed {len(doomed)} file(s), {freed} bytes freed"
    assert not list(folders.rglob(".qmpbackup.lock"))
    # nothing left to prune: a second run removes nothing
    again = json.loads(prune(cli, folders, 2, "--json").ok().out)
    assert again["removed_files"] == [] and again["bytes_freed"] == 0


def test_dry_run_changes_no_byte_and_names_exactly_what_goes(cli, folders: Path) -> None:
    before = tree(folders)
    dry = prune(cli, folders, 3, "--dry-run").ok().out
    assert tree(folders) == before, "not even a lock file"
    listed = {Path(line.split(" ", 2)[2]) for line in dry.splitlines() if line.startswith("would remove /")}
    assert listed == (chain_files(folders, 100, 101, disks=("virtio0", "data1"))
                      | chain_files(folders / "2026-09", 50, 51))
    assert dry.splitlines()[-1].startswith("dry run, nothing changed: would remove 6 file(s)")
    document = json.loads(prune(cli, folders, 3, "--dry-run", "--json").ok().out)
    assert tree(folders) == before
    assert document["dry_run"] is True and {Path(p) for p in document["removed_files"]} == listed
    remaining = files_below(folders)
    prune(cli, folders, 3).ok()
    assert remaining - files_below(folders) == listed | {folders / "2026-09" / "qmpbackup.json"}


def test_json_is_one_document_with_the_documented_keys(cli, folders: Path) -> None:
    result = prune(cli, folders, 4, "--json").ok()
    document = json.loads(result.out)   # exactly one document: json.loads refuses trailing text
    assert set(document) == {"target", "keep", "dry_run", "chains", "removed_files",
                             "leftover_files", "removed_bitmaps", "bytes_freed"}
    assert document["target"] == str(folders) and document["keep"] == 4
    first = document["chains"][0]
    assert set(first) == {"id", "folder", "first_point", "first_time", "last_point", "last_time",
                          "files", "size", "status"}
    assert (first["id"], first["folder"], first["status"]) == ("m1", str(folders / "2026-09"), "removed")
    assert (first["first_point"], first["last_point"], first["last_time"]) == ("FULL-50", "INC-51", 51)
    assert first["size"] == 1050 + 1051
    assert [c["status"] for c in document["chains"]] == ["removed"] + ["kept"] * 4
    assert document["bytes_freed"] == first["size"]
    assert sorted(document["removed_files"]) == sorted(first["files"])
    undocumented = key_paths(document) - documented()["qmpbackup prune"]
    assert not undocumented, f"not documented in docs/json.md: {sorted(undocumented)}"


def test_symlinks_are_never_followed(cli, folders: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "FULL-100-virtio0.qcow2"
    precious.write_bytes(b"not a backup")
    linked_file = folders / "virtio0" / "FULL-100-virtio0.qcow2"
    linked_file.unlink()
    linked_file.symlink_to(precious)
    month_disk = folders / "2026-09" / "virtio0"
    shutil.move(str(month_disk), str(outside / "virtio0"))
    month_disk.symlink_to(outside / "virtio0")
    before = tree(outside)
    result = prune(cli, folders, 2).ok()
    assert tree(outside) == before, "nothing outside the disk folders is touched"
    assert linked_file.is_symlink() and month_disk.is_symlink()
    assert f"{linked_file} is not a plain file: left alone" in result.err
    assert f"{month_disk} is not a directory" in result.err
    assert not (folders / "virtio0" / "INC-101-virtio0.qcow2").exists()


def test_a_forged_pruning_entry_through_a_symlinked_folder_deletes_nothing_outside(
        cli, folders: Path, tmp_path: Path) -> None:
    """``pruning`` naming ``evil/<file>`` with ``evil`` a symlink out of the folder (a regression test)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "FULL-1-victim.qcow2"
    victim.write_bytes(b"precious host data")
    (folders / "evil").symlink_to(outside)
    meta = json.loads((folders / "qmpbackup.json").read_text())
    meta["pruning"] = ["evil/FULL-1-victim.qcow2", "./FULL-1-victim.qcow2"]
    (folders / "qmpbackup.json").write_text(json.dumps(meta))
    result = prune(cli, folders, 5).ok()
    assert victim.read_bytes() == b"precious host data"
    assert f"{folders / 'evil'} is not a directory" in result.err
    assert read_store(folders).pruning == []


def test_a_month_folder_swapped_for_a_symlink_during_the_prune_leads_nowhere(
        cli, folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files go from the folder that was looked at, held open, never from a name looked up again."""
    from libqmpbackup.store import prune as prune_module
    decoy = tmp_path / "decoy"
    doomed = ("FULL-50-virtio0.qcow2", "INC-51-virtio0.qcow2")
    (decoy / "virtio0").mkdir(parents=True)
    for name in doomed:
        (decoy / "virtio0" / name).write_bytes(b"precious host data")
    month = folders / "2026-09"
    real_plan = prune_module.plan_retention

    def swap_then_plan(*args: Any, **kwargs: Any) -> Any:
        # the attacker's watcher, perfectly timed: the month folder was checked and read
        month.rename(tmp_path / "moved")
        month.symlink_to(decoy)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(prune_module, "plan_retention", swap_then_plan)
    result = prune(cli, folders, 2)
    assert "Traceback" not in result.err
    assert {p.name: p.read_bytes() for p in (decoy / "virtio0").iterdir()} == {
        name: b"precious host data" for name in doomed}
    assert not any((tmp_path / "moved" / "virtio0" / name).exists() for name in doomed), \
        "the files of the pruned chain went from the folder that was held open"
    assert not (decoy / "qmpbackup.json").exists(), \
        "the metadata went to the folder that was held open, not through the symlink"


def test_metadata_naming_a_file_outside_its_disk_folder_stops_the_prune(cli, folders: Path,
                                                                         tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    meta = json.loads((folders / "qmpbackup.json").read_text())
    meta["chains"][0]["disks"]["virtio0"]["backups"][0]["file"] = "FULL-1-../../victim"
    (folders / "qmpbackup.json").write_text(json.dumps(meta))
    before = contents(folders)
    prune(cli, folders, 1).failed(6, "not a backup file name")
    assert victim.exists() and contents(folders) == before


def test_a_killed_prune_leaves_only_listed_files_and_the_next_prune_removes_them(
        cli, folders: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from libqmpbackup.store import prune as prune_module
    real_delete = prune_module._delete
    calls: list[str] = []

    def killed_after_one(chain_folder: Any, file: Any) -> bool:
        if calls:
            raise Interrupted(signal.SIGTERM)
        calls.append(file.name)
        return real_delete(chain_folder, file)

    monkeypatch.setattr(prune_module, "_delete", killed_after_one)
    prune(cli, folders, 3).failed(143, "interrupted by signal 15")
    stores = [read_store(folders), read_store(folders / "2026-09")]
    assert [c.uuid for c in stores[0].chains] == ["b", "c"], "the metadata went first"
    assert stores[1].chains == [] and len(stores[1].pruning) == 2
    assert len(stores[0].pruning) == 4
    listed = cli("qmprestore", "list", "--dir", folders).ok()
    assert "4 file(s) of pruned chains are not deleted yet" in listed.err
    listing = listed.out
    assert "FULL-100" not in listing and not any(
        line.split()[0] == "a" for line in listing.splitlines()[2:])
    left = {f.path(s.root) for s in stores for f in s.pruning} & files_below(folders)
    assert len(left) == 5, "one file was deleted before the kill"
    monkeypatch.setattr(prune_module, "_delete", real_delete)
    document = json.loads(prune(cli, folders, 3, "--json").ok().out)
    assert {Path(p) for p in document["leftover_files"]} == left
    assert document["removed_files"] == [] and document["bytes_freed"] > 0
    assert not left & files_below(folders)
    assert "pruning" not in json.loads((folders / "qmpbackup.json").read_text())
    assert not (folders / "2026-09").exists()


def test_prune_is_refused_while_any_chain_folder_is_locked(cli, folders: Path) -> None:
    before = contents(folders)
    with chain_lock(folders / "2026-10"):   # what a running --monthly backup holds
        prune(cli, folders, 1).failed(4, "another backup is running on target",
                                      str(folders / "2026-10"))
        assert [p.parent.name for p in folders.rglob(".qmpbackup.lock")] == ["2026-10"]
    assert contents(folders) == before


def test_an_unfinished_in_place_restore_is_refused(cli, folders: Path) -> None:
    Journal(operation="commit", chain="b", disk="virtio0", base="FULL-200-virtio0.qcow2",
            result="FULL-200-virtio0.qcow2", point="INC-201-virtio0.qcow2", point_time=201,
            steps=["INC-201-virtio0.qcow2"]).save(Folder.open_root(folders / "virtio0"))
    files = files_below(folders)
    prune(cli, folders, 1).failed(6, "unfinished qmprestore commit")
    assert files_below(folders) == files


def listed_chains(cli, folder: Path) -> list[str]:
    return [c["chain"] for c in json.loads(cli("qmprestore", "list", "--dir", folder,
                                                "--json").ok().out)["chains"]]


def pruned_view(cli, folder: Path) -> list[str]:
    return sorted(c["id"] for c in json.loads(prune(cli, folder, 1, "--dry-run",
                                                    "--json").ok().out)["chains"])


def test_list_and_prune_see_the_same_chains_of_a_folder(cli, folders: Path, tmp_path: Path) -> None:
    """One answer to 'which chains does this folder hold' (store.layout.chain_folder_names)."""
    # a folder an older release let hold a chain of its own and month chains: both are seen
    assert sorted(listed_chains(cli, folders)) == pruned_view(cli, folders) == [
        "a", "b", "c", "m1", "m2"]
    # only YYYY-MM folders are months: a chain folder copied below another is not one
    base = tmp_path / "monthly"
    hand_made(base / "2026-09", {"m1": [50, 51]})
    hand_made(base / "old-copy", {"x": [10]})
    assert listed_chains(cli, base) == pruned_view(cli, base) == ["m1"]


def test_prune_removes_the_links_of_the_untimestamped_files_it_deletes(cli, tmp_path: Path) -> None:
    """--no-subdir --no-timestamp: FULL-<image> beside the image-named FULL goes with it."""
    root = tmp_path / "flat"
    root.mkdir()
    store = ChainStore(root)
    for uuid, when, name in (("old", 10, "virtio0.qcow2"), ("new", 20, "FULL-20-virtio0.qcow2")):
        (root / name).write_bytes(b"x")
        chain = Chain(uuid, f"qmpbackup-{uuid}", when)
        chain.disk("virtio0").folder = ""
        chain.disk("virtio0").backups.append(BackupRecord(
            name, "full", when, 1, "/vm/virtio0.qcow2", timestamped=uuid == "new"))
        store.chains.append(chain)
    write_store(store)
    os.symlink("virtio0.qcow2", root / "FULL-virtio0.qcow2")
    os.symlink("FULL-20-virtio0.qcow2", root / "COPY-virtio0.qcow2")   # not what a run made
    prune(cli, root, 1).ok()
    assert not os.path.lexists(root / "virtio0.qcow2")
    assert not os.path.lexists(root / "FULL-virtio0.qcow2"), "no dead link left"
    assert os.readlink(root / "COPY-virtio0.qcow2") == "FULL-20-virtio0.qcow2", "not ours: kept"


def test_usage_and_folder_errors(cli, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    prune(cli, tmp_path / "empty", 0).failed(2, "keep at least 1")
    prune(cli, tmp_path / "empty", -3).failed(2, "keep at least 1")
    prune(cli, tmp_path / "empty", "two").failed(2, "invalid int value")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"], "nothing created"
    prune(cli, tmp_path / "missing", 1).failed(5, "does not exist")
    prune(cli, tmp_path / "empty", 1).failed(6, "holds no backup chain")
    cli("qmpbackup", "backup", "--level", "full", "--target", tmp_path / "b").failed(
        2, "backup needs --socket")
    cli("qmpbackup", "cleanup", "--remove-bitmaps").failed(2, "cleanup needs --socket")
    cli("qmpbackup", "info").failed(2, "info needs --socket")
    assert not (tmp_path / "b").exists()


# -- chains written by a real VM -------------------------------------------------------------

DISKS = ("virtio0", "data1")


def vm_disks() -> list[Disk]:
    return [Disk("virtio0", "virtio", "qcow2", 32 * MiB), Disk("data1", "blockdev", "qcow2", 8 * MiB)]


def lose_bitmap(vm: TestVM, chain_id: str) -> None:
    """What a QEMU crash does to a chain: `auto` must then start a new chain."""
    for node, bitmaps in vm.bitmaps().items():
        for bitmap in bitmaps:
            if bitmap["name"] == f"qmpbackup-{chain_id}":
                vm.cmd("block-dirty-bitmap-remove", node=node, name=bitmap["name"])


@dataclass
class Recorder:
    """Backup runs and the disks as they were at each one: (chain id, point) -> disk -> raw."""

    cli: Any
    vm: TestVM
    refs_dir: Path
    refs: dict[tuple[str, str], dict[str, Path]] = field(default_factory=dict)
    last_err: str = ""

    def backup(self, target: Path, level: str, *extra: object) -> tuple[str, str]:
        result = self.cli("qmpbackup", "--socket", self.vm.tool_socket, "backup",
                          "--level", level, "--target", target, "--no-progress", *extra).ok()
        root = target / time.strftime("%Y-%m") if "--monthly" in extra else target
        chain = read_store(root).chains[-1]
        label = point_label(chain.disks["virtio0"].backups[-1].file)
        folder = self.refs_dir / f"{chain.uuid}-{label}"
        folder.mkdir(parents=True)
        self.refs[(chain.uuid, label)] = {d: self.vm.reference(d, folder / f"{d}.raw") for d in DISKS}
        self.last_err = result.err
        return chain.uuid, label

    def lose_bitmap(self, chain_id: str) -> None:
        lose_bitmap(self.vm, chain_id)

    def assert_restores(self, chain_folder: Path, chain_id: str, out: Path) -> None:
        """Every point of the chain (per the test's records) restores byte-identical."""
        points = [label for (cid, label) in self.refs if cid == chain_id]
        assert points
        for label in points:
            target = out / f"{chain_id}-{label}"
            self.cli("qmprestore", "merge", "--dir", chain_folder, "--uuid", chain_id,
                     "--until", label, "--targetdir", target).ok()
            for disk in DISKS:
                assert identical(target / f"{disk}.qcow2", self.refs[(chain_id, label)][disk]), \
                    f"{chain_id} {label} {disk}"


@pytest.fixture
def recorder(cli, tmp_path: Path) -> Iterator[Recorder]:
    with TestVM(tmp_path / "img", vm_disks()) as vm:
        yield Recorder(cli, vm, tmp_path / "refs")


def test_three_chains_in_one_folder_keep_two(cli, recorder: Recorder, tmp_path: Path) -> None:
    vm, root = recorder.vm, tmp_path / "backup"
    chain_ids = []
    for round_ in range(3):
        vm.write("virtio0", 0x10 + round_, round_ * MiB, 256 * 1024)
        vm.write("data1", 0x20 + round_, round_ * 64 * 1024, 64 * 1024)
        chain_id, _ = recorder.backup(root, "auto")
        vm.write("virtio0", 0x30 + round_, 8 * MiB + round_ * MiB, 64 * 1024)
        recorder.backup(root, "inc")
        chain_ids.append(chain_id)
        if round_ < 2:
            recorder.lose_bitmap(chain_id)
    assert [c.uuid for c in read_store(root).chains] == chain_ids
    pruned = set(files_below(root / "virtio0")) - {root / "virtio0" / r.file
                                                   for c in read_store(root).chains[1:]
                                                   for r in c.disks["virtio0"].backups}
    assert len(pruned) == 2

    before = tree(root)
    prune(cli, root, 2, "--dry-run").ok()
    assert tree(root) == before

    out = prune(cli, root, 2).ok().out
    assert f"{chain_ids[0]}" in out and "removed 4 file(s)" in out
    assert [c.uuid for c in read_store(root).chains] == chain_ids[1:]
    assert not pruned & files_below(root)
    listing = cli("qmprestore", "list", "--dir", root).ok().out
    assert chain_ids[0] not in listing and chain_ids[1] in listing and chain_ids[2] in listing
    for chain_id in chain_ids[1:]:
        recorder.assert_restores(root, chain_id, tmp_path / "restored")

    vm.write("virtio0", 0x41, 20 * MiB, 64 * 1024)
    newest, label = recorder.backup(root, "auto")
    assert newest == chain_ids[2] and label.startswith("INC-")
    assert f"auto: continuing chain {chain_ids[2]}" in recorder.last_err
    recorder.assert_restores(root, newest, tmp_path / "restored-after")
    assert vm.tool_leftovers() == []


def test_month_folders_and_the_vm_bitmaps_of_pruned_chains(cli, recorder: Recorder,
                                                            tmp_path: Path) -> None:
    """Chains in DIR and in month folders count together; --socket drops pruned chains' bitmaps."""
    vm, base = recorder.vm, tmp_path / "backup"
    old_in_base, _ = recorder.backup(base, "full")           # a chain in DIR itself, the oldest
    recorder.lose_bitmap(old_in_base)
    aside = tmp_path / "aside"   # backups refuse to mix the two kinds now; older releases did not
    base.rename(aside)
    month = time.strftime("%Y-%m")
    chain_ids = []
    for round_, past in enumerate(("2001-01", "2001-02", None)):
        vm.write("virtio0", 0x50 + round_, round_ * MiB, 128 * 1024)
        chain_id, _ = recorder.backup(base, "auto", "--monthly")
        vm.write("data1", 0x60 + round_, 0, 64 * 1024)
        recorder.backup(base, "auto", "--monthly")
        chain_ids.append(chain_id)
        if past:   # this month's chain becomes an older month's: the next auto starts a new one
            (base / month).rename(base / past)
    for entry in aside.iterdir():
        if not (base / entry.name).exists():
            entry.rename(base / entry.name)
    bitmaps = {b["name"] for bl in vm.bitmaps().values() for b in bl}
    # --monthly: each month's first chain retired the previous month's bitmap, so only the
    # newest chain's is left; the oldest month's is put back, as on a VM an older qmpbackup
    # version backed up, so that prune has a pruned chain's bitmap to drop
    assert {f"qmpbackup-{c}" for c in chain_ids} & bitmaps == {f"qmpbackup-{chain_ids[2]}"}
    for node, names in vm.bitmaps().items():
        if any(b["name"] == f"qmpbackup-{chain_ids[2]}" for b in names):
            vm.cmd("block-dirty-bitmap-add", node=node, name=f"qmpbackup-{chain_ids[0]}",
                   persistent=True)
    bitmaps = {b["name"] for bl in vm.bitmaps().values() for b in bl}

    before = tree(base)
    dry = json.loads(prune(cli, base, 2, "--json", "--dry-run", socket=vm.tool_socket).ok().out)
    assert tree(base) == before
    assert {b["name"] for bl in vm.bitmaps().values() for b in bl} == bitmaps
    document = json.loads(prune(cli, base, 2, "--json", socket=vm.tool_socket).ok().out)
    assert dry["removed_bitmaps"] == document["removed_bitmaps"]
    assert dry["removed_files"] == document["removed_files"] and dry["dry_run"] is True
    status = {c["id"]: c["status"] for c in document["chains"]}
    assert status == {old_in_base: "removed", chain_ids[0]: "removed", chain_ids[1]: "kept",
                      chain_ids[2]: "kept"}
    # the removed chains' bitmaps: chain_ids[0]'s (put back above), and the +diff old_in_base
    # kept without its chain bitmap
    assert sorted(document["removed_bitmaps"]) == sorted(
        [f"{d}:qmpbackup-{chain_ids[0]}" for d in DISKS]
        + [f"{d}:qmpbackup-{old_in_base}+diff" for d in DISKS])
    bitmaps = {b["name"] for bl in vm.bitmaps().values() for b in bl}
    assert not {f"qmpbackup-{chain_ids[0]}", f"qmpbackup-{chain_ids[0]}+diff"} & bitmaps
    assert {f"qmpbackup-{chain_ids[2]}", f"qmpbackup-{chain_ids[2]}+diff"} <= bitmaps, \
        "the live chain keeps its bitmaps"
    assert sorted(p.name for p in base.iterdir()) == ["2001-02", month], \
        "DIR lost its own chain, its metadata and disk folders; the emptied month folder went"
    listing = cli("qmprestore", "list", "--dir", base).ok().out
    assert old_in_base not in listing and chain_ids[0] not in listing
    recorder.assert_restores(base / "2001-02", chain_ids[1], tmp_path / "restored")
    recorder.assert_restores(base / month, chain_ids[2], tmp_path / "restored")

    vm.write("virtio0", 0x70, 4 * MiB, 64 * 1024)
    newest, label = recorder.backup(base, "auto", "--monthly")
    assert newest == chain_ids[2] and label.startswith("INC-")
    recorder.assert_restores(base / month, newest, tmp_path / "restored-after")
    assert vm.tool_leftovers() == []


def test_prune_leaves_no_dead_link_in_a_no_timestamp_folder(cli, recorder: Recorder,
                                                             tmp_path: Path) -> None:
    base = tmp_path / "plain"
    first, _ = recorder.backup(base, "full", "--no-timestamp")
    assert os.readlink(base / "virtio0" / "FULL-virtio0.qcow2") == "virtio0.qcow2"
    recorder.lose_bitmap(first)
    newest, _ = recorder.backup(base, "auto")
    recorder.backup(base, "auto")
    prune(cli, base, 1).ok()
    dead = [p for p in base.rglob("*") if p.is_symlink() and not p.exists()]
    assert dead == [], f"dead links after prune: {dead}"
    assert not (base / "virtio0" / "virtio0.qcow2").exists()
    assert [c.uuid for c in read_store(base).chains] == [newest]
    recorder.assert_restores(base, newest, tmp_path / "out")


def test_a_backup_run_finishes_an_interrupted_prune(cli, recorder: Recorder, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from libqmpbackup.store import prune as prune_module
    vm, root = recorder.vm, tmp_path / "backup"
    old, _ = recorder.backup(root, "full")
    recorder.lose_bitmap(old)
    vm.write("virtio0", 0x71, 0, 64 * 1024)
    new, _ = recorder.backup(root, "auto")

    def killed(chain_folder: Any, file: Any) -> bool:
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(prune_module, "_delete", killed)
    prune(cli, root, 1).failed(143, "interrupted")
    monkeypatch.undo()
    leftovers = [f.path(root) for f in read_store(root).pruning]
    assert len(leftovers) == 2 and all(p.exists() for p in leftovers)
    recorder.assert_restores(root, new, tmp_path / "restored")   # the leftovers disturb no restore

    vm.write("virtio0", 0x72, 2 * MiB, 64 * 1024)
    chain_id, label = recorder.backup(root, "auto")
    assert (chain_id, label[:4]) == (new, "INC-")
    assert f"finishing a prune that was interrupted in {root}" in recorder.last_err
    assert not any(p.exists() for p in leftovers)
    assert read_store(root).pruning == []
    recorder.assert_restores(root, new, tmp_path / "restored-after")


def test_prune_while_a_backup_runs_is_refused(cli, tmp_path: Path) -> None:
    root = tmp_path / "backup"
    with TestVM(tmp_path / "img", [Disk("virtio0", "virtio", "qcow2", 64 * MiB)]) as vm:
        def backup(level: str) -> None:
            cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", level,
                "--target", root, "--no-progress").ok()
        backup("full")
        first = read_store(root).chains[0].uuid
        lose_bitmap(vm, first)
        backup("auto")
        vm.write("virtio0", 0x7A, 0, 48 * MiB)
        files = files_below(root)
        proc = start_backup(vm, root, "inc")
        prune(cli, root, 1).failed(4, "another backup is running on target", str(root))
        assert files_below(root) >= files, "nothing deleted"
        finished(proc, 0)
        assert len(read_store(root).chains) == 2
        prune(cli, root, 1).ok()
        (kept,) = read_store(root).chains
        assert kept.uuid != first
