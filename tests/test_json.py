"""--json against real QEMU: one document on stdout, keys exactly as docs/json.md lists them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from tests.guestvm import GuestImages, GuestVM, make_data_disk
from tests.helpers import REPO, documented, fault_disks, key_paths, partitioned_disk
from tests.vm import MiB, TestVM, identical


def document(result) -> dict:
    """The one JSON document on stdout: nothing before or after it."""
    return json.loads(result.out)


class Seen:
    """Key paths of real documents per docs section: none undocumented, every documented one seen.

    Each test checks the sections it produces (tests may run on different
    xdist workers, so nothing is gathered across tests).
    """

    def __init__(self) -> None:
        self.paths: dict[str, set[str]] = defaultdict(set)

    def add(self, section: str, doc: dict) -> dict:
        assert section in documented(), f"docs/json.md has no section {section!r}"
        undocumented = key_paths(doc) - documented()[section]
        assert not undocumented, f"{section}: keys missing from docs/json.md: {sorted(undocumented)}"
        self.paths[section] |= key_paths(doc)
        return doc

    def covered(self) -> None:
        for section, keys in self.paths.items():
            assert sorted(documented()[section] - keys) == [], \
                f"{section}: documented in docs/json.md, never in real output"


@pytest.fixture
def seen() -> Iterator[Seen]:
    checked = Seen()
    yield checked
    checked.covered()


def json_backup(cli, vm: TestVM, target: Path, level: str, *extra: object):
    return cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--json", "--level", level,
               "--target", target, "--no-progress", *extra)


def test_backup_info_list_merge_documents(cli, tmp_path: Path, seen: Seen) -> None:
    root, refs = tmp_path / "backup", tmp_path / "refs"
    refs.mkdir()
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        vm.write("virtio0", 0x11, 0, 2 * MiB)
        full = seen.add("qmpbackup backup", document(json_backup(cli, vm, root, "full").ok()))
        assert (full["level"], full["reason"], full["target"]) == ("full", "--level full", str(root))
        assert [f["disk"] for f in full["files"]] == ["virtio0", "data1"]
        for entry in full["files"]:
            assert Path(entry["file"]).is_file() and entry["file_size"] == \
                Path(entry["file"]).stat().st_size
            assert entry["level"] == "full" and entry["time"] == full["time"]
            assert entry["duration"] >= 0
        vm.write("virtio0", 0x12, 4 * MiB, 128 * 1024)
        inc = seen.add("qmpbackup backup", document(json_backup(cli, vm, root, "auto").ok()))
        assert (inc["level"], inc["chain"]) == ("inc", full["chain"])
        assert inc["reason"].startswith("auto: continuing chain")
        assert inc["files"][0]["bytes_written"] == 128 * 1024
        assert inc["files"][1]["bytes_written"] == 0
        vm.write("data1", 0x13, 0, 64 * 1024)
        diff = seen.add("qmpbackup backup", document(json_backup(cli, vm, root, "diff").ok()))
        assert [f["level"] for f in diff["files"]] == ["diff", "diff"]
        assert [f["bytes_written"] for f in diff["files"]] == [128 * 1024, 64 * 1024], \
            "a DIFF holds every change since the FULL, also those of the INC before it"
        ref = vm.reference("virtio0", refs / "virtio0.raw")

        for show in ("blockdev", "bitmaps"):
            result = cli("qmpbackup", "--socket", vm.tool_socket, "info", "--show", show,
                         "--json").ok()
            doc = seen.add(f"qmpbackup info --show {show}", document(result))
            assert doc["show"] == show
        assert len(doc["bitmaps"]) == 4   # chain bitmap and +diff on both disks

    listing = seen.add("qmprestore list",
                       document(cli("qmprestore", "list", "--dir", root, "--json").ok()))
    (chain,) = listing["chains"]
    assert chain["chain"] == full["chain"]
    points = chain["disks"][0]["points"]
    assert [p["level"] for p in points] == ["full", "inc", "diff"]
    assert points[-1]["file"] == diff["files"][0]["file"]

    out = tmp_path / "restored.qcow2"
    merged = seen.add("qmprestore merge", document(cli(
        "qmprestore", "merge", "--dir", root / "virtio0", "--until", points[-1]["point"],
        "--targetfile", out, "--json").ok()))
    assert [i["image"] for i in merged["images"]] == [str(out)] and identical(out, ref)
    dry = seen.add("qmprestore merge", document(cli(
        "qmprestore", "merge", "--dir", root, "--targetdir", tmp_path / "all", "--dry-run",
        "--json").ok()))
    assert dry["dry_run"] and len(dry["images"]) == 2
    assert not (tmp_path / "all").exists()
    verified = seen.add("qmprestore verify", document(
        cli("qmprestore", "verify", "--dir", root, "--json").ok()))
    assert verified["ok"] and verified["counts"]["ok"] == 6
    Path(points[-1]["file"]).unlink()
    damaged = seen.add("qmprestore verify", document(
        cli("qmprestore", "verify", "--dir", root, "--json").failed(11, points[-1]["point"])))
    assert damaged["counts"]["missing"] == 1 and damaged["error"]["code"] == 11
    pruned = seen.add("qmpbackup prune", document(cli(
        "qmpbackup", "prune", "--target", root, "--keep", "1", "--dry-run", "--json").ok()))
    assert [c["last_point"] for c in pruned["chains"]] == [points[-1]["point"]]


FAILURES = [
    (("qmprestore", "list", "--dir", "{tmp}/missing", "--json"), 5, "does not exist"),
    (("qmprestore", "merge", "--dir", "{tmp}", "--json"), 2, "--targetfile"),
    (("qmpbackup", "--socket", "{tmp}/no.sock", "info", "--json"), 3, "no.sock"),
    (("qmpbackup", "--socket", "{tmp}/no.sock", "backup", "--level", "inc", "--target",
      "{tmp}/b", "--json"), 3, "no.sock"),
]


def test_failures_give_the_error_document(cli, tmp_path: Path, seen: Seen) -> None:
    for argv, code, fragment in FAILURES:
        program, *rest = (a.replace("{tmp}", str(tmp_path)) for a in argv)
        result = cli(program, *rest).failed(code, fragment)
        doc = seen.add("Errors (every command)", document(result))
        assert doc["error"]["code"] == code and fragment in doc["error"]["message"]
        assert "\n" not in doc["error"]["message"]
    assert not (tmp_path / "b").exists()


def test_every_section_is_produced_by_a_test() -> None:
    produced = {"qmpbackup backup", "qmpbackup info --show blockdev",
                "qmpbackup info --show bitmaps", "qmpbackup info --show agent",
                "qmpbackup prune", "qmprestore list", "qmprestore merge", "qmprestore verify",
                "qmprestore mount", "Errors (every command)"}
    assert set(documented()) == produced


def test_stdout_is_only_the_document_in_a_real_process(tmp_path: Path) -> None:
    """As a script sees it: a separate process, logs on stderr, one parseable stdout."""
    with TestVM(tmp_path / "img", fault_disks()) as vm:
        proc = subprocess.run(
            [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup", "--level",
             "full", "--target", str(tmp_path / "b"), "--json"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["level"] == "full"
    assert "full backup done" in proc.stderr
    dry = subprocess.run(
        [sys.executable, "-m", "qmprestore", "merge", "--dir", str(tmp_path / "b" / "virtio0"),
         "--targetfile", str(tmp_path / "x.qcow2"), "--dry-run", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True
    assert "qemu-img convert" in dry.stderr, "dry-run steps go to stderr under --json"


@pytest.mark.guest
def test_agent_document(cli, guest_images: GuestImages, tmp_path: Path, seen: Seen) -> None:
    disk = make_data_disk(tmp_path / "data.qcow2")
    with GuestVM(guest_images, disk, log_dir=tmp_path / "logs") as vm:
        result = cli("qmpbackup", "--socket", vm.tool_socket, "--agent-socket", vm.qga_socket,
                     "info", "--show", "agent", "--json").ok()
    doc = seen.add("qmpbackup info --show agent", document(result))
    assert doc["agent"]["status"] == "thawed"
    assert [fs["mountpoint"] for fs in doc["agent"]["filesystems"]] == ["/mnt"]


def test_mount_document(cli, tmp_path: Path, mountpoint: Path, seen: Seen) -> None:
    """Every key of mount --json, --filesystems included (a partition mounted, two not)."""
    image = partitioned_disk(tmp_path)
    cli("qmpbackup", "--image", f"disk0={image}", "backup", "--level", "full", "--target",
        tmp_path / "backup", "--no-progress").ok()
    doc = seen.add("qmprestore mount", document(cli(
        "qmprestore", "mount", "--dir", tmp_path / "backup", "--filesystems", "--json",
        mountpoint).ok()))
    assert doc["command"] == "mount" and doc["alive"] and doc["disks"][0]["loops"]
    cli("qmprestore", "umount", mountpoint).ok()
