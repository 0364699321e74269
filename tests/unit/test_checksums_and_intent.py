"""Fast tests of checksums, the intent record and the verify verdicts (no QEMU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from libqmpbackup.backup.leftovers import clean_target
from libqmpbackup.errors import BackupDamaged, ChainError
from libqmpbackup.restore.verify import FileReport, VerifyReport, mark_restorable
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.digests import algorithm_of, check_files, digest_files, file_digest
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.intent import RunIntent, read_intent
from libqmpbackup.store.layout import is_empty_dir, stale_temp_files
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import INTENT_NAME
from tests.helpers import write_store


def test_old_sha256_digests_are_the_plain_hash_of_the_bytes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000   # spans several read chunks
    path = tmp_path / "f"
    path.write_bytes(data)
    assert file_digest(path, "sha256") == "sha256:" + hashlib.sha256(data).hexdigest()
    assert file_digest(path).startswith("xxh128x64m:"), "new backups record the piece digest"
    paths = [tmp_path / f"f{i}" for i in range(5)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 1000)
    assert digest_files(paths) == [file_digest(p) for p in paths], "in order, whatever thread"
    assert digest_files([]) == []


@pytest.mark.parametrize("recorded, algorithm", [
    ("sha256:" + "0" * 64, "sha256"),
    ("sha256x64m:" + "0" * 64, "sha256x64m"),
    ("xxh128x64m:" + "0" * 32, "xxh128x64m"),
    ("xxh128x64m:" + "0" * 64, None),      # XXH3-128 has 32 hex digits
    ("xxh128x64m:" + "F" * 32, None),      # xxhsum prints lower case only
    ("blake2b:" + "a" * 128, "blake2b"),
    ("sha256:" + "0" * 63, None),          # wrong length
    ("sha256x64m:" + "0" * 65, None),
    ("sha256x64m:" + "A" * 64, None),      # sha256sum prints lower case only
    ("sha256:" + "G" * 64, None),          # not hex
    ("md4:" + "0" * 32, None),             # not an algorithm we recompute
    ("sha256", None),
    ("", None),
    (None, None),
    (42, None),                            # the metadata is untrusted
])
def test_only_wellformed_digests_are_recomputed(recorded: object, algorithm: object) -> None:
    assert algorithm_of(recorded) == algorithm   # type: ignore[arg-type]


@pytest.mark.parametrize("algorithm", ["xxh128x64m", "sha256x64m", "sha256"])   # older records
def test_check_files_judges_each_file(tmp_path: Path, algorithm: str) -> None:
    good, bad, gone, old = (tmp_path / n for n in ("good", "bad", "gone", "old"))
    for path in (good, bad, old):
        path.write_bytes(b"backup data")
    recorded = file_digest(good, algorithm)
    bad.write_bytes(b"backup dat\x00")
    results = check_files([(good, recorded), (bad, recorded), (gone, recorded), (old, None)])
    assert [r.status for r in results] == ["ok", "mismatch", "unreadable", "unrecorded"]
    assert "checksum mismatch" in results[1].detail and algorithm in results[1].detail
    assert results[2].detail


def test_backup_damaged_prints_one_line_per_file() -> None:
    err = BackupDamaged(["/b/v/INC-2-a.qcow2: damaged", "/b/v/INC-3-a.qcow2: missing"])
    assert err.exit_code == 11 and err.lines() == ["/b/v/INC-2-a.qcow2: damaged",
                                                   "/b/v/INC-3-a.qcow2: missing"]


def store_with(root: Path, *files: str) -> ChainStore:
    records = [BackupRecord(file=f, level="full" if f.startswith("FULL") else "inc",
                            time=int(f.split("-")[1]), virtual_size=1, source_image="/a")
               for f in files]
    store = ChainStore(root, [Chain("c1", "qmpbackup-c1", 1, {"virtio0": DiskChain(records)})])
    write_store(store)
    return store


@pytest.mark.parametrize("files", [
    ["../x/FULL-1-a.qcow2"], ["virtio0/sub/FULL-1-a.qcow2"], ["qmpbackup.json"],
    ["virtio0/qmpbackup-disk.json"], ["virtio0/INC-2-a.qcow2.partial"], ["/etc/FULL-1-a.qcow2"],
    ["virtio0/..", ".."], ["virtio0/"], ["a\0b"], "virtio0/FULL-1-a.qcow2", [7],
])
def test_a_hostile_intent_record_is_refused(tmp_path: Path, files: object) -> None:
    (tmp_path / INTENT_NAME).write_text(json.dumps({"time": 1, "files": files}))
    with pytest.raises(ChainError, match="malformed"):
        read_intent(Folder.open_root(tmp_path))


def test_clean_target_rolls_back_what_the_intent_names_and_keeps_what_was_recorded(
        tmp_path: Path) -> None:
    store = store_with(tmp_path, "FULL-1-a.qcow2", "INC-2-a.qcow2")
    folder = tmp_path / "virtio0"
    folder.mkdir()
    for name in ("FULL-1-a.qcow2", "INC-2-a.qcow2", "INC-3-a.qcow2"):
        (folder / name).write_text(name)
    (tmp_path / "data1").mkdir()
    (tmp_path / "data1" / "FULL-3-b.qcow2").write_text("")
    intent = RunIntent(time=3, files=[ChainFile("virtio0", "INC-3-a.qcow2"),
                                      ChainFile("data1", "FULL-3-b.qcow2")])
    with Folder.open_root(tmp_path) as top:
        intent.save(top)
        assert intent.unrecorded(store) == intent.files
        (tmp_path / f".{INTENT_NAME}.x1.tmp").write_text("{")
        assert len(stale_temp_files(top)) == 1
    with BackupFolder.open(tmp_path) as chain_folder:
        clean_target(chain_folder)
    assert sorted(p.name for p in folder.iterdir()) == ["FULL-1-a.qcow2", "INC-2-a.qcow2"]
    assert not (tmp_path / "data1").exists(), "a folder left empty goes too"
    with Folder.open_root(tmp_path) as top:
        assert not (tmp_path / INTENT_NAME).exists() and stale_temp_files(top) == []
        # killed after the commit: the record is stale, every file it names stays
        RunIntent(time=2, files=[ChainFile("virtio0", "INC-2-a.qcow2")]).save(top)
    with BackupFolder.open(tmp_path) as chain_folder:
        clean_target(chain_folder)
        assert (folder / "INC-2-a.qcow2").exists() and read_intent(chain_folder.folder) is None


def test_an_empty_disk_folder_does_not_block_a_new_chain(tmp_path: Path) -> None:
    (tmp_path / "virtio0").mkdir()
    with Folder.open_root(tmp_path) as top:
        assert is_empty_dir(top)
        (tmp_path / "virtio0" / "FULL-1-a.qcow2").write_text("")
        assert not is_empty_dir(top)


def report(level: str, status: str, disk: str = "virtio0") -> FileReport:
    return FileReport(chain="c1", disk=disk, path=Path(f"/b/{disk}/{level}"), level=level,
                      time=1, status=status)


def test_a_point_is_restorable_when_its_whole_segment_is_intact() -> None:
    files = [report("full", "ok"), report("inc", "unverifiable"), report("inc", "damaged"),
             report("inc", "ok"), report("full", "ok"), report("inc", "ok"),
             report("inc", "ok", disk="data1"), report("full", "missing", disk="data1")]
    mark_restorable(files)
    assert [f.restorable for f in files] == [True, True, False, False, True, True, False, False]
    verdict = VerifyReport(Path("/b"), files)
    assert [f.status for f in verdict.bad] == ["damaged", "missing"]
    assert verdict.counts()["ok"] == 5
    with pytest.raises(BackupDamaged) as err:
        verdict.raise_if_bad()
    assert len(err.value.lines()) == 2


def test_a_point_is_restorable_when_every_file_it_is_read_from_is_intact() -> None:
    from libqmpbackup.restore.verify import FileReport, mark_restorable

    def report(level: str, status: str) -> FileReport:
        return FileReport(chain="c", disk="d", path=Path(f"/b/{level}"), level=level, time=0,
                          status=status)

    chain = [report("full", "ok"), report("inc", "damaged"), report("diff", "ok"),
             report("inc", "unverifiable"), report("inc", "ok")]
    mark_restorable(chain)
    assert [r.restorable for r in chain] == [True, False, True, True, True], \
        "a DIFF reads through the FULL only, and the INCs after it through the DIFF"
    broken_full = [report("full", "missing"), report("diff", "ok"), report("inc", "ok")]
    mark_restorable(broken_full)
    assert [r.restorable for r in broken_full] == [False, False, False]
