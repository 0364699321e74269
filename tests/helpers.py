"""What the test modules share: running the tool, reading a backup folder, the fault checks.

One place for these helpers: no test module imports another (each would also
import that module's tests and fixtures).  Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest

from libqmpbackup.store import mounts
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.intent import RunIntent, read_intent
from libqmpbackup.store.journal import Journal
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import METADATA_NAME
from qmpbackup.cli import main as qmpbackup_main
from tests.guestvm import GuestVM
from tests.vm import Disk, MiB, TestVM, file_digest, identical

REPO = Path(__file__).resolve().parents[1]
SLOW = "16M"
DIRTY = 48 * MiB


def fault_disks() -> list[Disk]:
    """One disk big enough for a slow job, one small: every run is a grouped two-disk run."""
    return [Disk("virtio0", "virtio", "qcow2", 64 * MiB),
            Disk("data1", "blockdev", "qcow2", 8 * MiB)]


DISKS = ("virtio0", "data1")


def restart(vm: TestVM) -> TestVM:
    """The same images in a new QEMU process (a still running old one is stopped cleanly).

    The new VM is started already; ``with restart(vm) as again`` does not
    start it a second time (a second QEMU on the same images fails their
    write locks: that was the "write lock" flake of earlier runs).
    """
    vm.stop()
    return TestVM(vm.folder, vm.disks, extra_args=vm.extra_args).start()


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    def ok(self) -> CliResult:
        assert self.rc == 0, f"rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self

    def failed(self, rc: int, *fragments: str) -> CliResult:
        """A clean failure: the documented code, the message, one error line, no traceback."""
        assert self.rc == rc, f"rc={self.rc} (want {rc})\nstderr:\n{self.err}"
        assert "Traceback" not in self.err, self.err
        errors = [line for line in self.err.splitlines() if ": error: " in line]
        assert len(errors) == 1, self.err
        for fragment in fragments:
            assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
        return self


# -- running the tool ---------------------------------------------------------------------

def backup(cli, vm: Any, target: Path, level: str, *extra: object,
           head: Sequence[object] = ()) -> CliResult:
    """``qmpbackup backup`` in-process (the ``cli`` fixture); HEAD: options before the command."""
    return cli("qmpbackup", "--socket", vm.tool_socket, *head, "backup", "--level", level,
               "--target", target, "--no-progress", *extra)


def run_backup(vm: TestVM, target: Path, level: str, *extra: str) -> None:
    rc = qmpbackup_main(["--socket", vm.tool_socket, "--quiet", "backup", "--level", level,
                         "--target", str(target), "--no-progress", *extra])
    assert rc == 0, f"backup {level} into {target} failed"


def start_backup(vm: Any, target: Path, level: str, *extra: str) -> subprocess.Popen:
    """A rate-limited backup in its own process, returned once its jobs are copying.

    VM: anything with ``tool_socket`` and ``cmd(command, **arguments)``.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, "backup",
         "--level", level, "--target", str(target), "--no-progress", "--speed-limit", SLOW,
         *extra], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not any(j["id"].startswith("qmpbackup-") and j.get("current-progress", 0) > 0
                  for j in vm.cmd("query-jobs")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no job started: {proc.communicate()[1]}")
        time.sleep(0.02)
    return proc


def finished(proc: subprocess.Popen, rc: int, *fragments: str) -> str:
    """The process ended with RC, one error line holding FRAGMENTS, no traceback."""
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, f"rc={proc.returncode} (want {rc})\n{err}"
    assert "Traceback" not in err, err
    if rc:
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1, err
        for fragment in fragments:
            assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return err


def wait_until_no_jobs(vm: TestVM, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while vm.cmd("query-jobs"):
        assert time.monotonic() < deadline, vm.cmd("query-jobs")
        time.sleep(0.05)


def kill_and_let_qemu_finish(vm: TestVM, proc: subprocess.Popen) -> None:
    """SIGKILL the tool mid-job; QEMU then finishes its jobs (at full speed) on its own."""
    proc.kill()
    proc.wait()
    for job in vm.cmd("query-jobs"):
        if job["status"] == "running":
            try:
                vm.cmd("block-job-set-speed", device=job["id"], speed=0)
            except RuntimeError as err:   # it finished copying between the two commands
                assert "cannot accept command verb" in str(err), err
    wait_until_no_jobs(vm)


# -- reading a backup folder --------------------------------------------------------------

def metadata(root: Path, name: str = "qmpbackup.json") -> dict:
    """The folder's chain metadata (or a disk folder's NAME); none yet: no chains."""
    path = root / name
    return json.loads(path.read_text()) if path.exists() else {"chains": []}


def listed(root: Path) -> dict[str, list[str]]:
    """disk -> backup files the metadata lists, over all chains, in order."""
    files: dict[str, list[str]] = {}
    for chain in metadata(root)["chains"]:
        for disk, history in chain["disks"].items():
            files.setdefault(disk, []).extend(b["file"] for b in history["backups"])
    return files


def backups(root: Path, disk: str, prefix: str = "") -> list[Path]:
    """The backup files of a disk folder (not its qmpbackup-disk.json), oldest first."""
    found = [p for p in (root / disk).glob(f"{prefix}*")
             if p.name.split("-")[0] in ("FULL", "INC", "COPY")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def records(root: Path, disk: str, chain: int = -1) -> list[dict]:
    return metadata(root)["chains"][chain]["disks"][disk]["backups"]


def files(root: Path, disk: str, chain: int = -1) -> list[str]:
    return [r["file"] for r in records(root, disk, chain)]


def prefix(name: str) -> str:
    """FULL-<time> / INC-<time> of a backup file name."""
    return "-".join(name.split("-")[:2])


def digests(folder: Path) -> dict[str, tuple]:
    """Content and timestamps of every file below FOLDER: what 'unchanged' means."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            st = path.stat()
            out[str(path)] = (file_digest(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def copy_disk(root: Path, disk: str, dest: Path) -> Path:
    """A copy of the chain metadata and one disk folder; returns the copied disk folder."""
    dest.mkdir(parents=True)
    shutil.copy2(root / "qmpbackup.json", dest / "qmpbackup.json")
    shutil.copytree(root / disk, dest / disk, symlinks=True)
    return dest / disk


def snapshot_tags(image: Path) -> list[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     capture_output=True, text=True, check=True).stdout)
    return [s["name"] for s in info.get("snapshots", [])]


# -- QEMU's state and what every fault case checks ----------------------------------------

def node_of(vm: TestVM, device: str) -> str:
    return next(b["inserted"]["node-name"] for b in vm.cmd("query-block") if b["device"] == device)


def tool_bitmaps(vm: TestVM) -> dict[str, dict]:
    """name@node -> bitmap, for qmpbackup's bitmaps."""
    return {f"{b['name']}@{node}": b for node, bl in vm.bitmaps().items() for b in bl
            if b["name"].startswith("qmpbackup-")}


def assert_clean(vm: Optional[TestVM], root: Path) -> None:
    """No leftovers in QEMU, and no file that looks finished without being in the chain."""
    if vm is not None:
        assert vm.tool_leftovers() == []
        auxiliary = [n for n in tool_bitmaps(vm) if "+pending@" in n or "+new@" in n]
        assert not auxiliary, tool_bitmaps(vm)
    if not root.exists():
        return
    assert not list(root.glob("*/*.partial"))
    known = listed(root)
    for folder in (p for p in root.iterdir() if p.is_dir()):
        expected = known.get(folder.name, [])
        expected += ["qmpbackup-disk.json"] if expected else []
        assert sorted(p.name for p in folder.iterdir()) == sorted(expected), \
            f"{folder} holds files the chain metadata does not list"


def write_round(vm: TestVM, pattern: int) -> None:
    vm.write("virtio0", pattern, (pattern % 32) * MiB, 256 * 1024)
    vm.write("data1", pattern, (pattern % 4) * MiB, 64 * 1024)


def assert_top_matches(vm: TestVM, root: Path, refs: Path, disks=DISKS) -> None:
    """The newest backup of each disk, read through its backing chain, equals the disk now."""
    refs.mkdir(exist_ok=True)
    files = listed(root)
    for disk in disks:
        top = root / disk / files[disk][-1]
        ref = vm.reference(disk, refs / f"{disk}-{time.monotonic_ns()}.raw")
        assert identical(top, ref), f"{disk}: {top.name} differs from the disk"


def recovers(cli, vm: TestVM, root: Path, refs: Path, level: str = "inc", *extra: object) -> str:
    """More writes, the next backup, content compare; returns the run's log."""
    write_round(vm, 0x6D)
    result = backup(cli, vm, root, level, *extra).ok()
    assert_clean(vm, root)
    assert_top_matches(vm, root, refs)
    return result.err


def chain_with_dirty_data(cli, vm: TestVM, root: Path) -> None:
    """A committed full, then enough new data that the next job lasts a few seconds."""
    backup(cli, vm, root, "full").ok()
    vm.write("virtio0", 0x3C, 0, DIRTY)
    vm.write("data1", 0x3D, 0, 2 * MiB)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- docs/json.md -------------------------------------------------------------------------

DOCS = (REPO / "docs" / "json.md").read_text()


def documented() -> dict[str, set[str]]:
    """Section heading ('qmpbackup backup', 'Errors (every command)', ...) -> key paths."""
    sections = {}
    for section in DOCS.split("\n## ")[1:]:
        heading, _, body = section.partition("\n")
        sections[heading.strip()] = set(re.findall(r"^\| `([^`]+)` \|", body, re.MULTILINE))
    return sections


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path of a document, arrays as ``[]``: {"a": [{"b": 1}]} -> {a, a[].b}."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths |= {path} | key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, prefix + "[]")
    return paths


# -- the tiny real guest -------------------------------------------------------------------

Cli = Callable[..., CliResult]


def agent_options(vm: GuestVM, agent: Optional[str]) -> list[object]:
    """AGENT is the agent socket ("qga" for the real one, None for none)."""
    return [] if agent is None else ["--agent-socket", vm.qga_socket if agent == "qga" else agent]


def guest_backup(cli: Cli, vm: GuestVM, level: str, target: Path, *options: str,
                 agent: Optional[str] = "qga", debug: bool = False) -> CliResult:
    """The shared :func:`tests.helpers.backup` with the guest's agent socket (and --debug)."""
    return backup(cli, vm, target, level, *options,
                  head=[*agent_options(vm, agent), *(["--debug"] if debug else [])])


def recorded(target: Path) -> list[dict[str, Any]]:
    """The backup records of the guest disk in the target's chain metadata."""
    meta = json.loads((target / "qmpbackup.json").read_text())
    return meta["chains"][-1]["disks"]["virtio0"]["backups"]


def run(*argv: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)


def restore_point(backup_file: Path, out: Path) -> Path:
    """The guest disk at BACKUP_FILE's point in time, as a raw image, restored by qmprestore."""
    from qmprestore.cli import main as qmprestore_main
    rc = qmprestore_main(["--quiet", "merge", "--dir", str(backup_file.parent), "--until",
                          backup_file.name, "--format", "raw", "--targetfile", str(out)])
    assert rc == 0, f"qmprestore merge --until {backup_file.name} failed with {rc}"
    return out


# --- qmprestore mount -----------------------------------------------------------------

def leftovers(mountpoint: Path) -> list[str]:
    """What a finished mount may not leave: records, daemons, mounts, files."""
    found = [f"record {r.mountpoint}" for r in mounts.records()]
    found += [f"process {pid}" for pid in daemons(mountpoint)]
    with open("/proc/self/mountinfo") as info:
        found += [line for line in info if str(mountpoint) in line]
    if mountpoint.exists():
        found += [str(p) for p in mountpoint.iterdir()]
    return found


def daemons(mountpoint: Optional[Path] = None) -> list[int]:
    """Mount daemons and checkers alive (those of MOUNTPOINT: not another test's beside it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ours = ((cmdline.startswith(b"qemu-storage-daemon") and b"fuse" in cmdline)
                    or b"libqmpbackup.restore.mount_check" in cmdline)
            if mountpoint is not None and os.fsencode(str(mountpoint)) not in cmdline:
                continue
            if ours and mounts.process_start(int(entry.name)) is not None:
                pids.append(int(entry.name))
    return pids


def partitioned_disk(folder: Path) -> Path:
    """A qcow2 disk with an MBR: p1 ext4 holding /hello, p2 swap, p3 nothing."""
    raw = folder / "disk.raw"
    with open(raw, "wb") as disk:
        disk.truncate(40 * MiB)
        table = b""
        for start, size, kind in ((2048, 16384, 0x83), (18432, 8192, 0x82), (26624, 8192, 0x83)):
            table += bytes([0, 0, 0, 0, kind, 0, 0, 0]) + start.to_bytes(4, "little") \
                + size.to_bytes(4, "little")
        disk.seek(0x1BE)
        disk.write(table + b"\0" * 16 + b"\x55\xaa")
    content = folder / "content"
    content.mkdir()
    (content / "hello").write_text("hello from p1\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", content, "-E", f"offset={2048 * 512}", raw,
                    "8M"], check=True)
    swap = folder / "swap"
    swap.write_bytes(b"\0" * 4 * MiB)
    subprocess.run(["mkswap", swap], check=True, capture_output=True)
    with open(raw, "r+b") as disk:
        disk.seek(18432 * 512)
        disk.write(swap.read_bytes())
    image = folder / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, image], check=True)
    return image


# -- reading a folder's records, as every command does (one BackupFolder) ---------------------

def read_store(path: Path, name: Optional[str] = METADATA_NAME) -> ChainStore:
    """The chain metadata NAME in PATH (None: an upstream folder, read from its names)."""
    with BackupFolder.open(path, name) as folder:
        return folder.store


def write_store(store: ChainStore) -> None:
    """STORE written into its folder the way a command commits it (through a BackupFolder)."""
    with BackupFolder.open(store.root) as folder:
        folder.replace_store(store)
        folder.save()


def read_journal(path: Path) -> Optional[Journal]:
    """The restore journal of the disk folder PATH."""
    with Folder.open_root(path) as folder:
        return Journal.read(folder)


def read_intent_at(path: Path) -> Optional[RunIntent]:
    """The intent record in the chain folder PATH."""
    with Folder.open_root(path) as folder:
        return read_intent(folder)
