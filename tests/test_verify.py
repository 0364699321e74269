"""Checksums and ``qmprestore verify``: silent damage is found, named and refused.

One VM makes two chains once per module (``main``: a full and two
incrementals of two qcow2 disks; ``other``: a full into another folder, whose
file can be slipped into ``main``); every test damages a copy.  Damage is
done the way it happens: a byte flipped inside a *data* cluster (qemu-img
check and the chain rules cannot see that), a truncated file, a missing
file, another chain's file in its place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import run_backup
from tests.vm import Disk, MiB, TestVM, identical

DISKS = ("virtio0", "data1")


@dataclass
class Folders:
    main: Path
    other: Path
    monthly: Path
    copies: Path
    refs: dict[int, Path] = field(default_factory=dict)   # virtio0 at point 0, 1, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Folders]:
    base = tmp_path_factory.mktemp("verify")
    built = Folders(base / "main", base / "other", base / "monthly", base / "copies")
    disks = [Disk("virtio0", "virtio", "qcow2", 32 * MiB), Disk("data1", "blockdev", "qcow2", 8 * MiB)]
    with TestVM(base / "vm", disks) as vm:
        for point in range(3):
            vm.write("virtio0", 0x70 + point, point * 4 * MiB, 2 * MiB)
            vm.write("data1", 0x80 + point, point * MiB, 256 * 1024)
            built.refs[point] = vm.reference("virtio0", base / f"ref-{point}.raw")
            run_backup(vm, built.main, "full" if point == 0 else "inc")
        run_backup(vm, built.other, "full", "--include", "virtio0")
        run_backup(vm, built.monthly, "auto", "--monthly")
        run_backup(vm, built.copies, "copy", "--include", "virtio0")
    yield built


def names(root: Path, disk: str = "virtio0") -> list[str]:
    meta = json.loads((root / "qmpbackup.json").read_text())
    return [r["file"] for r in meta["chains"][-1]["disks"][disk]["backups"]]


def copy_of(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest, symlinks=True)
    return dest


def verify_json(cli, *argv: object) -> dict:
    result = cli("qmprestore", "verify", "--json", *argv)
    return json.loads(result.out)   # exactly one JSON document on stdout, whatever the outcome


def flip_data_byte(path: Path) -> None:
    """Flip one byte inside a data cluster stored in PATH itself (not in its backing files)."""
    mapping = json.loads(subprocess.run(
        ["qemu-img", "map", "-f", "qcow2", "--output=json", str(path)],
        capture_output=True, text=True, check=True).stdout)
    extent = next(e for e in mapping if e["data"] and e["depth"] == 0 and "offset" in e)
    offset = extent["offset"] + 4096
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_an_intact_folder_verifies(cli, folders: Folders) -> None:
    result = cli("qmprestore", "verify", "--dir", folders.main).ok()
    for name in names(folders.main) + names(folders.main, "data1"):
        assert name in result.out
    assert result.out.count(" ok ") == 6 and "damaged" not in result.out
    document = verify_json(cli, "--dir", folders.main)
    assert document["ok"] is True
    assert document["counts"] == {"ok": 6, "damaged": 0, "missing": 0, "unverifiable": 0,
                                  "extra": 0}
    assert {f["status"] for f in document["files"]} == {"ok"}
    assert all(f["restorable"] for f in document["files"])
    meta = json.loads((folders.main / "qmpbackup.json").read_text())
    digests = [r["digest"] for c in meta["chains"] for d in c["disks"].values() for r in d["backups"]]
    assert all(d.startswith("xxh128x64m:") and len(d) == 11 + 32 for d in digests)
    full = folders.main / "virtio0" / names(folders.main)[0]
    by_hand = subprocess.run(f"split -b 64M --filter='xxhsum -H2' {full} | cut -c1-32 | "
                             "xxhsum -H2", shell=True, capture_output=True, text=True,
                             check=True).stdout.split()[0]
    assert f"xxh128x64m:{by_hand}" in digests, "the README's check with Debian's xxhsum"


def test_copies_are_checksummed_too(cli, folders: Folders, tmp_path: Path) -> None:
    document = verify_json(cli, "--dir", folders.copies)
    assert [(f["level"], f["status"], f["restorable"]) for f in document["files"]] == \
        [("copy", "ok", True)]
    root = copy_of(folders.copies, tmp_path / "copy")
    flip_data_byte(root / "virtio0" / names(root)[0])
    cli("qmprestore", "verify", "--dir", root).failed(11, "checksum mismatch")


def test_no_checksum_records_none_and_restores_identical(cli, tmp_path: Path) -> None:
    target = tmp_path / "backups"
    with TestVM(tmp_path / "vm", [Disk("virtio0", "virtio", "qcow2", 16 * MiB)]) as vm:
        vm.write("virtio0", 0x41, 0, MiB)
        run_backup(vm, target, "full", "--no-checksum")
        vm.write("virtio0", 0x42, 2 * MiB, MiB)
        reference = vm.reference("virtio0", tmp_path / "ref.raw")
        run_backup(vm, target, "inc")
    records = json.loads((target / "qmpbackup.json").read_text())["chains"][0]["disks"]["virtio0"]
    assert [r.get("digest") is not None for r in records["backups"]] == [False, True]  # per run
    document = verify_json(cli, "--dir", target)
    assert [f["status"] for f in document["files"]] == ["unverifiable", "ok"]
    assert document["ok"] is True
    cli("qmprestore", "merge", "--dir", target / "virtio0", "--targetfile",
        tmp_path / "out.qcow2").ok()
    assert identical(tmp_path / "out.qcow2", reference)


def test_verify_selects_by_folder_uuid_and_filter(cli, folders: Folders) -> None:
    months = verify_json(cli, "--dir", folders.monthly)
    assert months["ok"] and len(months["files"]) == 2
    assert all("/" in f["chain"] for f in months["files"]), "chains named by their month folder"
    assert {f["disk"] for f in verify_json(cli, "--dir", folders.main / "data1")["files"]} == {"data1"}
    assert {f["disk"] for f in verify_json(cli, "--dir", folders.main, "--filter", "virt")["files"]} \
        == {"virtio0"}
    assert verify_json(cli, "--dir", folders.main, "--filter", "nothing")["files"] == []
    chain = json.loads((folders.main / "qmpbackup.json").read_text())["chains"][0]["uuid"]
    assert len(verify_json(cli, "--dir", folders.main, "--uuid", chain)["files"]) == 6
    cli("qmprestore", "verify", "--dir", folders.main, "--uuid", "nope").failed(2, "--uuid nope")


DAMAGE = {
    "flipped-byte-in-full": (0, flip_data_byte, "damaged", "checksum mismatch"),
    "flipped-byte-in-inc": (1, flip_data_byte, "damaged", "checksum mismatch"),
    "truncated": (1, truncate, "damaged", ""),
    "missing": (1, Path.unlink, "missing", "not in the folder"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_found_named_and_refused(cli, folders: Folders, tmp_path: Path,
                                          case: str) -> None:
    index, damage, status, fragment = DAMAGE[case]
    root = copy_of(folders.main, tmp_path / "copy")
    bad = root / "virtio0" / names(root)[index]
    damage(bad)

    result = cli("qmprestore", "verify", "--dir", root).failed(11, str(bad), status, fragment)
    assert status in result.out
    document = verify_json(cli, "--dir", root)
    assert document["ok"] is False and document["counts"][status] == 1
    verdict = {f["file"]: f for f in document["files"] if f["disk"] == "virtio0"}
    assert verdict[bad.name]["status"] == status
    later = names(root)[index:]
    assert [verdict[n]["restorable"] for n in names(root)] == [n not in later for n in names(root)]

    # a restore that reads the damaged file refuses and creates nothing ...
    out = tmp_path / "out.qcow2"
    rc = 11 if status == "damaged" and fragment else 6
    restore = cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile", out)
    if case == "truncated":   # qemu-img or the checksum, whichever looks first
        assert restore.rc in (6, 11) and "Traceback" not in restore.err
    else:
        restore.failed(rc, bad.name)
    assert not out.exists()
    for command in (["rebase"], ["commit"], ["snapshotrebase"]):
        assert cli("qmprestore", *command, "--dir", root / "virtio0").rc == restore.rc
    # ... a point before it restores (only the files up to --until are read)
    if index > 0:
        cli("qmprestore", "merge", "--dir", root / "virtio0", "--until", names(root)[index - 1],
            "--targetfile", out).ok()
        assert identical(out, folders.refs[index - 1])


def test_flipped_byte_is_restored_by_skip_check_as_today(cli, folders: Folders,
                                                         tmp_path: Path) -> None:
    root = copy_of(folders.main, tmp_path / "copy")
    flip_data_byte(root / "virtio0" / names(root)[2])
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
        tmp_path / "out.qcow2").failed(11, "checksum mismatch", names(root)[2])
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--skip-check", "--targetfile",
        tmp_path / "out.qcow2").ok()
    assert not identical(tmp_path / "out.qcow2", folders.refs[2]), "the rot is real"


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_merge_verifies_while_it_copies_and_keeps_nothing_of_a_damaged_chain(
        cli, folders: Folders, tmp_path: Path) -> None:
    """Issue 22: merge hashes its sources beside ``qemu-img convert``, not before it.

    A flipped byte in an INC still exits 11, and neither the image nor its
    ``.partial`` (nor the folder merge created for it) stays behind; the
    in-place commands still hash before they write anything.
    """
    root = copy_of(folders.main, tmp_path / "copy")
    flip_data_byte(root / "virtio0" / names(root)[1])
    before = tree_digests(root)
    out = tmp_path / "restore" / "out.qcow2"
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile", out).failed(
        11, "checksum mismatch", names(root)[1])
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))
    assert not (tmp_path / "restore").exists()
    logged = cli("qmprestore", "--debug", "merge", "--dir", root / "virtio0", "--targetfile", out)
    assert logged.rc == 11 and "checksum mismatch" in logged.err
    assert "qemu-img convert" in logged.err, "the copy ran while the sources were hashed"
    assert not out.exists() and not list(tmp_path.rglob("*.partial"))
    for command in ("rebase", "commit", "snapshotrebase"):
        cli("qmprestore", command, "--dir", root / "virtio0").failed(11, "checksum mismatch")
        logged = cli("qmprestore", "--debug", command, "--dir", root / "virtio0")
        assert logged.rc == 11
        assert not any(f"qemu-img {verb}" in logged.err for verb in ("rebase", "commit",
                                                                      "snapshot", "convert"))
    assert tree_digests(root) == before, "nothing was written into the folder"
    intact = tmp_path / "intact.qcow2"
    cli("qmprestore", "merge", "--dir", folders.main / "virtio0", "--targetfile", intact).ok()
    assert identical(intact, folders.refs[2]) and not list(tmp_path.glob(".*.partial"))


def test_a_file_replaced_by_another_chains_file(cli, folders: Folders, tmp_path: Path) -> None:
    """Same name, same size, valid qcow2 without backing file: only the checksum tells."""
    root = copy_of(folders.main, tmp_path / "copy")
    full = root / "virtio0" / names(root)[0]
    shutil.copyfile(folders.other / "virtio0" / names(folders.other)[0], full)
    cli("qmprestore", "verify", "--dir", root).failed(11, str(full), "checksum mismatch")
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--until", names(root)[0],
        "--targetfile", tmp_path / "out.qcow2").failed(11, full.name)


def test_several_bad_files_one_error_line_each(cli, folders: Folders, tmp_path: Path) -> None:
    root = copy_of(folders.main, tmp_path / "copy")
    flip_data_byte(root / "data1" / names(root, "data1")[1])
    (root / "virtio0" / names(root)[2]).unlink()
    shutil.copyfile(root / "virtio0" / names(root)[1], root / "virtio0" / "INC-9999999999-x.qcow2")
    result = cli("qmprestore", "verify", "--dir", root)
    assert result.rc == 11 and "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if ": error: " in line]
    assert len(errors) == 3, result.err
    assert any("checksum mismatch" in e and names(root, "data1")[1] in e for e in errors)
    assert any("missing" in e and names(root)[2] in e for e in errors)
    assert any("extra" in e and "INC-9999999999-x.qcow2" in e for e in errors)


def test_in_place_restores_keep_the_checksums_true(cli, folders: Folders, tmp_path: Path) -> None:
    for command in ("commit", "snapshotrebase"):
        root = copy_of(folders.main, tmp_path / command)
        cli("qmprestore", command, "--dir", root / "virtio0", "--until", names(root)[1]).ok()
        document = verify_json(cli, "--dir", root)
        assert document["ok"] and {f["status"] for f in document["files"]} == {"ok"}, document
        cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
            tmp_path / f"{command}.qcow2").ok()
        assert identical(tmp_path / f"{command}.qcow2", folders.refs[2])


def test_older_metadata_without_checksums_is_unverifiable_not_damaged(
        cli, folders: Folders, tmp_path: Path) -> None:
    root = copy_of(folders.main, tmp_path / "copy")
    meta = json.loads((root / "qmpbackup.json").read_text())
    for chain in meta["chains"]:
        for disk in chain["disks"].values():
            for record in disk["backups"]:
                del record["digest"]
    (root / "qmpbackup.json").write_text(json.dumps(meta))
    result = cli("qmprestore", "verify", "--dir", root).ok()
    assert "unverifiable" in result.out and "no checksum recorded" in result.err
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
        tmp_path / "out.qcow2").ok()
    assert identical(tmp_path / "out.qcow2", folders.refs[2])


def with_whole_file_sha256(root: Path) -> None:
    """Record every digest as versions before the piece digest did: ``sha256:`` of the file."""
    for meta_path in [root / "qmpbackup.json", *root.glob("*/qmpbackup-disk.json")]:
        meta = json.loads(meta_path.read_text())
        for chain in meta["chains"]:
            for disk_id, disk in chain["disks"].items():
                for record in disk["backups"]:
                    plain = subprocess.run(["sha256sum", str(root / disk_id / record["file"])],
                                           capture_output=True, text=True, check=True)
                    record["digest"] = "sha256:" + plain.stdout.split()[0]
        meta_path.write_text(json.dumps(meta))


def test_older_whole_file_sha256_checksums_still_verify(cli, folders: Folders,
                                                        tmp_path: Path) -> None:
    root = copy_of(folders.main, tmp_path / "copy")
    with_whole_file_sha256(root)
    document = verify_json(cli, "--dir", root)
    assert document["ok"] and {f["status"] for f in document["files"]} == {"ok"}, document
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
        tmp_path / "out.qcow2").ok()
    assert identical(tmp_path / "out.qcow2", folders.refs[2])
    flip_data_byte(root / "virtio0" / names(root)[1])
    cli("qmprestore", "verify", "--dir", root).failed(11, names(root)[1], "checksum mismatch",
                                                     "sha256 of the file")
    cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
        tmp_path / "out2.qcow2").failed(11, "checksum mismatch", names(root)[1])


def test_a_symlink_in_place_of_a_backup_file_is_damage_and_never_followed(
        cli, folders: Folders, tmp_path: Path) -> None:
    root = copy_of(folders.main, tmp_path / "copy")
    inc = root / "virtio0" / names(root)[1]
    outside = tmp_path / "outside.qcow2"
    inc.rename(outside)
    inc.symlink_to(outside)   # the same bytes, reached through a link: still refused
    cli("qmprestore", "verify", "--dir", root).failed(11, str(inc), "damaged", "symlink")
    verdict = {f["file"]: f for f in verify_json(cli, "--dir", root)["files"]}
    assert verdict[inc.name]["status"] == "damaged"
    assert not any("checksum" in p for p in verdict[inc.name]["problems"]), "not hashed"


def corrupt_l1_entry(path: Path) -> None:
    """Point the first L2 table half a sector off: qemu-img check counts corruptions."""
    with open(path, "r+b") as handle:
        header = handle.read(48)
        (l1_offset,) = struct.unpack_from(">Q", header, 40)
        handle.seek(l1_offset)
        (entry,) = struct.unpack(">Q", handle.read(8))
        handle.seek(l1_offset)
        handle.write(struct.pack(">Q", entry + 512))


def test_verify_and_the_restore_pre_check_report_the_same_finding(cli, folders: Folders,
                                                                   tmp_path: Path) -> None:
    """One image check for both: the same damage is worded the same way by either."""
    root = copy_of(folders.main, tmp_path / "copy")
    bad = root / "virtio0" / names(root)[1]
    corrupt_l1_entry(bad)
    meta = json.loads((root / "qmpbackup.json").read_text())
    meta["chains"][-1]["disks"]["virtio0"]["backups"][1]["digest"] = None   # only the image
    (root / "qmpbackup.json").write_text(json.dumps(meta))
    document = verify_json(cli, "--dir", root)
    found = next(f["problems"] for f in document["files"] if f["file"] == bad.name)
    assert len(found) == 1 and "corruption" in found[0]
    restore = cli("qmprestore", "merge", "--dir", root / "virtio0", "--targetfile",
                  tmp_path / "out.qcow2").failed(6, "corruption")
    assert found[0] in restore.err.strip().split("): ", 1)[1].split("; ")
