"""A backup folder is untrusted input: no trick in it makes root touch a file outside it.

Every reproduction of issue 15 as a regression test, run as root like CI:
the attacker can write the backup folder (symlinks, a crafted journal or
metadata, hostile qcow2 headers); files outside the folder ("victims") must
keep their content, name and mode, and the tool must exit with a documented
code and one error line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from libqmpbackup.qemu import qemuimg
from libqmpbackup.store import digests
from libqmpbackup.store.locks import LOCK_DIR_ENV
from libqmpbackup.store.names import DISK_METADATA_NAME, JOURNAL_NAME, LOCK_NAME, METADATA_NAME
from tests.helpers import run_backup
from tests.hostile import NOBODY, Victim, as_nobody, blocked_writer
from tests.vm import Disk, MiB, TestVM, file_digest, identical

pytestmark = pytest.mark.usefixtures("private_lock_dir")   # VM locks in tmp_path

DISK = "virtio0"


@dataclass
class Chain:
    root: Path
    refs: list[Path]            # raw content of the disk at each point

    def files(self) -> list[str]:
        meta = json.loads((self.root / "qmpbackup.json").read_text())
        return [r["file"] for r in meta["chains"][-1]["disks"][DISK]["backups"]]

    def copy(self, dest: Path) -> Path:
        """A copy of the chain folder; returns its disk folder."""
        shutil.copytree(self.root, dest, symlinks=True)
        return dest / DISK


def one_disk() -> list[Disk]:
    return [Disk(DISK, "virtio", "qcow2", 8 * MiB)]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    """FULL + 2 INCs of one qcow2 disk, built once; tests work on copies."""
    base = tmp_path_factory.mktemp("sec")
    built = Chain(base / "backup", [])
    old = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = str(base / "locks")
    try:
        with TestVM(base / "vm", one_disk()) as vm:
            for point, level in enumerate(("full", "inc", "inc")):
                vm.write(DISK, 0x41 + point, point * MiB, 512 * 1024)
                built.refs.append(vm.reference(DISK, base / f"ref{point}.raw"))
                run_backup(vm, built.root, level)
    finally:
        if old is None:
            os.environ.pop(LOCK_DIR_ENV, None)
        else:
            os.environ[LOCK_DIR_ENV] = old
    yield built


RESTORE_COMMANDS: list[Callable[[Path, Path], list[object]]] = [
    lambda folder, out: ["merge", "--dir", folder, "--targetfile", out / "restored.qcow2"],
    lambda folder, out: ["rebase", "--dir", folder],
    lambda folder, out: ["commit", "--dir", folder],
    lambda folder, out: ["snapshotrebase", "--dir", folder],
]


def every_restore_command_refuses(cli, folder: Path, out: Path, rc: int, *fragments: str,
                                  extra: tuple[str, ...] = ()) -> None:
    for command in RESTORE_COMMANDS:
        argv = command(folder, out)
        cli("qmprestore", *argv, *extra).failed(rc, *fragments)
    assert not (out / "restored.qcow2").exists()


# -- lock files ---------------------------------------------------------------------------------

def test_lock_file_symlink_planted_by_another_user_is_refused(cli, chain: Chain, tmp_path: Path,
                                                              public_tmp: Path) -> None:
    victim = Victim.make(tmp_path / "root-owned.conf")
    before = victim.state()
    folder = chain.copy(public_tmp / "vm1")
    folder.parent.chmod(0o777)   # a shared folder others can write
    as_nobody("ln", "-s", str(victim.path), str(folder.parent / ".qmpbackup.lock"))
    for command in ("rebase", "commit", "snapshotrebase"):
        cli("qmprestore", command, "--dir", folder).failed(6, ".qmpbackup.lock", "is a symlink")
    assert victim.state() == before
    assert (folder.parent / ".qmpbackup.lock").is_symlink(), "the evidence stays"


def test_foreign_owned_lock_file_is_refused(cli, chain: Chain, tmp_path: Path) -> None:
    folder = chain.copy(tmp_path / "c")
    lock = folder.parent / ".qmpbackup.lock"
    lock.write_text("1 planted\n")
    os.chown(lock, NOBODY, NOBODY)
    cli("qmprestore", "rebase", "--dir", folder).failed(6, "owned by uid 65534")
    assert lock.read_text() == "1 planted\n"


def test_a_hard_link_to_a_host_file_as_lock_file_is_refused_and_never_written(
        cli, chain: Chain, tmp_path: Path) -> None:
    """Issue 20, finding 7: where protected_hardlinks is off a user links a root-owned file there."""
    victim = Victim.make(tmp_path / "root-owned.conf")
    before = victim.state()
    folder = chain.copy(tmp_path / "c")
    os.link(victim.path, folder.parent / LOCK_NAME)
    for command in ("rebase", "commit", "snapshotrebase"):
        cli("qmprestore", command, "--dir", folder).failed(6, LOCK_NAME, "2 hard links")
    assert victim.state() == before
    assert (folder.parent / LOCK_NAME).stat().st_ino == victim.path.stat().st_ino


FOLDER_FILES = [("disk folder", JOURNAL_NAME, ("verify", "merge", "commit")),
                ("disk folder alone", DISK_METADATA_NAME, ("verify", "merge")),
                ("chain folder", METADATA_NAME, ("verify", "merge")),
                ("chain folder", LOCK_NAME, ("rebase", "commit"))]


@pytest.mark.parametrize("where, name, commands", FOLDER_FILES,
                         ids=[name for _, name, _ in FOLDER_FILES])
def test_a_fifo_named_like_a_folder_file_is_refused_without_being_opened(
        cli, chain: Chain, tmp_path: Path, where: str, name: str,
        commands: tuple[str, ...]) -> None:
    """Issue 20, finding 11: opening a FIFO or device at all (O_NONBLOCK or not) is a side effect.

    A writer blocked on the FIFO is let through by the first reader: still
    blocked after each command means no command opened it.
    """
    folder = chain.copy(tmp_path / "c")
    if where == "disk folder alone":      # copied on its own: it has only its own records
        folder = Path(shutil.copytree(folder, tmp_path / "alone", symlinks=True))
    place = folder.parent if where == "chain folder" else folder
    fifo = place / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    with blocked_writer(fifo) as writer:
        for command in commands:
            extra = ("--targetfile", tmp_path / "restored.qcow2") if command == "merge" else ()
            given = place if name == METADATA_NAME else folder
            result = cli("qmprestore", command, "--dir", given, *extra)
            assert writer.still_blocked(), f"qmprestore {command} opened the FIFO {name}"
            if name in (JOURNAL_NAME, LOCK_NAME):
                result.failed(6, name, "a FIFO")
            else:
                # the folder probe (restore/folder.py, stat without opening) takes metadata
                # that is no regular file as absent: not opened, the folder is read as upstream's
                assert "Traceback" not in result.err
    if name in (JOURNAL_NAME, LOCK_NAME):
        assert not (tmp_path / "restored.qcow2").exists()


def test_a_backup_neither_opens_a_fifo_nor_is_blocked_by_lock_dirs_others_planted(
        cli, tmp_path: Path, system_dirs: Path) -> None:
    """Issue 20, findings 6 and 11, as a real backup run sees them (locks in the default place)."""
    # where root's locks used to be: /run/lock/qmpbackup, else /tmp/qmpbackup-0
    for planted in (system_dirs / "lock" / "qmpbackup", system_dirs.parent / "tmp" / "qmpbackup-0"):
        planted.mkdir(mode=0o700)
        os.chown(planted, NOBODY, NOBODY)
    target = tmp_path / "backup"
    with TestVM(tmp_path / "vm", one_disk()) as vm:
        run = ("qmpbackup", "--socket", vm.tool_socket, "backup", "--target", target,
               "--no-progress")
        cli(*run, "--level", "full").ok()
        assert (system_dirs / "qmpbackup").stat().st_uid == 0
        for fifo in (target / DISK / JOURNAL_NAME, target / LOCK_NAME, target / METADATA_NAME):
            kept = fifo.with_name("kept")
            if fifo.exists():
                fifo.rename(kept)
            os.mkfifo(fifo)
            with blocked_writer(fifo) as writer:
                result = cli(*run, "--level", "inc")
                assert writer.still_blocked(), f"the backup opened the FIFO {fifo.name}"
                result.failed(6, fifo.name, "a FIFO")
            fifo.unlink()
            if kept.exists():
                kept.rename(fifo)
        cli(*run, "--level", "inc").ok()


def test_backup_run_refuses_planted_lock_symlink_and_symlinked_folders(
        cli, tmp_path: Path) -> None:
    victim = Victim.make(tmp_path / "victim.conf")
    outside = tmp_path / "outside"
    outside.mkdir()
    stray = Victim.make(outside / "INC-1-x.qcow2.partial")
    before, stray_before = victim.state(), stray.state()
    target = tmp_path / "backup"
    with TestVM(tmp_path / "vm", one_disk()) as vm:
        run_backup(vm, target, "full")

        # leftover cleanup never follows a symlinked folder
        (target / "evil").symlink_to(outside)
        run_backup(vm, target, "inc")
        assert stray.state() == stray_before

        lock = target / ".qmpbackup.lock"
        lock.symlink_to(victim.path)
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
            "--target", target, "--no-progress").failed(6, "is a symlink")
        lock.unlink()

        # a leftover .partial that is a symlink is refused, not followed or silently dropped
        planted = target / DISK / "INC-5-x.qcow2.partial"
        planted.symlink_to(victim.path)
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
            "--target", target, "--no-progress").failed(6, "is a symlink", "refused to remove")
        planted.unlink()

        # the disk folder itself swapped for a symlink: nothing is written through it
        (target / DISK).rename(tmp_path / "moved")
        (target / DISK).symlink_to(outside)
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
            "--target", target, "--no-progress").failed(6, "is a symlink, not a folder")
        # a --monthly base whose month folder is a symlink
        monthly = tmp_path / "monthly"
        monthly.mkdir()
        (monthly / time.strftime("%Y-%m")).symlink_to(outside)
        cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "auto", "--monthly",
            "--target", monthly, "--no-progress").failed(6, "is a symlink, not a folder")
        assert sorted(p.name for p in outside.iterdir()) == [stray.path.name]
        assert vm.tool_leftovers() == []
    assert victim.state() == before and stray.state() == stray_before


# -- the restore journal -------------------------------------------------------------------------

def write_journal(folder: Path, chain_id: str, **fields: object) -> None:
    journal = {"operation": "commit", "chain": chain_id, "disk": DISK, "base": "x",
               "result": "y", "point": "z", "point_time": 1, "steps": [], "snapshots": False,
               "done": 0, **fields}
    (folder / "qmprestore-journal.json").write_text(json.dumps(journal))


def chain_id(folder: Path) -> str:
    return str(json.loads((folder.parent / "qmpbackup.json").read_text())["chains"][-1]["uuid"])


def test_crafted_journal_paths_are_refused(cli, chain: Chain, tmp_path: Path) -> None:
    renamed = Victim.make(tmp_path / "renamed-victim")
    deleted = Victim.make(tmp_path / "deleted-victim")
    before = (renamed.state(), deleted.state())
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    write_journal(folder, chain_id(folder), base=str(renamed.path), result="../renamed",
                  point=names[2], point_time=2,
                  steps=[f"../../{deleted.path.relative_to('/')}"], done=1)
    cli("qmprestore", "commit", "--dir", folder).failed(6, "restore journal",
                                                        "is not a backup file name")
    merge = cli("qmprestore", "merge", "--dir", folder, "--targetfile", tmp_path / "o.qcow2")
    merge.failed(6, "restore journal")
    assert "to finish it" not in merge.err, "a tampered journal is never 'finished'"
    cli("qmprestore", "list", "--dir", folder)   # lists, warns; touches nothing
    assert (renamed.state(), deleted.state()) == before
    assert chain.files() == names


def test_journal_that_does_not_match_the_metadata_is_refused(cli, chain: Chain,
                                                             tmp_path: Path) -> None:
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    before = {n: file_digest(folder / n) for n in names}
    # plausible names, but INC 1 skipped: committing would build a point that never existed
    write_journal(folder, chain_id(folder), base=names[0], result=names[0], point=names[2],
                  point_time=2, steps=[names[2]])
    cli("qmprestore", "commit", "--dir", folder).failed(6, "does not match the chain metadata")
    assert {n: file_digest(folder / n) for n in names} == before


def test_resumed_journal_still_checks_every_image(cli, chain: Chain, tmp_path: Path) -> None:
    """A journal that matches the metadata, over an INC whose backing file is a host file as raw."""
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    victim = backing_outside(folder, names, tmp_path)
    before = victim.state()
    point_time = int(names[2].split("-")[1])
    write_journal(folder, chain_id(folder), base=names[0],
                  result=f"FULL-{point_time}-{names[0].split('-', 2)[2]}", point=names[2],
                  point_time=point_time, steps=names[1:3])
    cli("qmprestore", "commit", "--dir", folder).failed(6, "not a backup file next to it")
    assert victim.state() == before


# -- hostile images ------------------------------------------------------------------------------

def data_file_full(folder: Path, names: list[str], tmp_path: Path) -> Victim:
    """The FULL replaced by a qcow2 whose external raw data file is a host file."""
    victim_path = tmp_path / "host-disk.raw"
    full = folder / names[0]
    full.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={victim_path},data_file_raw=on", str(full), str(8 * MiB)],
                   check=True)
    return Victim.make(victim_path, os.urandom(8 * MiB))


def symlinked_full(folder: Path, names: list[str], tmp_path: Path) -> Victim:
    """The FULL replaced by a symlink to another VM's (perfectly valid) disk."""
    other = tmp_path / "other-vm.qcow2"
    shutil.copyfile(folder / names[0], other)
    (folder / names[0]).unlink()
    (folder / names[0]).symlink_to(other)
    return Victim(other)


def backing_outside(folder: Path, names: list[str], tmp_path: Path) -> Victim:
    """INC 1 backed by a host file, declared raw."""
    victim = Victim.make(tmp_path / "host-file", os.urandom(8 * MiB))
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", str(victim.path),
                    "-F", "raw", str(folder / names[1])], check=True)
    return victim


def sibling_as_raw(folder: Path, names: list[str], tmp_path: Path) -> Victim:
    """INC 1 backed by its right sibling, but declared raw (writes would hit the qcow2 bytes)."""
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", names[0],
                    "-F", "raw", str(folder / names[1])], check=True)
    return Victim(folder / names[0])


@pytest.mark.parametrize("skip_check", [False, True], ids=["checked", "skip-check"])
@pytest.mark.parametrize("damage, fragment", [
    (data_file_full, "external data file"),
    (symlinked_full, "is a symlink"),
    (backing_outside, "not a backup file next to it"),
    (sibling_as_raw, "as qcow2"),
], ids=["data-file", "symlinked-full", "backing-outside", "backing-as-raw"])
def test_hostile_images_are_refused_by_every_restore(cli, chain: Chain, tmp_path: Path,
                                                     damage, fragment: str,
                                                     skip_check: bool) -> None:
    folder = chain.copy(tmp_path / "c")
    victim = damage(folder, chain.files(), tmp_path)
    before = victim.state()
    extra = ("--skip-check",) if skip_check else ()
    every_restore_command_refuses(cli, folder, tmp_path, 6, fragment, extra=extra)
    assert victim.state() == before
    assert not (folder / "qmprestore-journal.json").exists()


# -- names from the metadata and merge's output ---------------------------------------------------

@pytest.mark.parametrize("bad_name", ["../../victim", "/etc/victim", "a/FULL-1-x.qcow2",
                                      "FULL-1-x.qcow2\n", ".."])
def test_skip_check_never_skips_the_name_rule(cli, chain: Chain, tmp_path: Path,
                                              bad_name: str) -> None:
    victim = Victim.make(tmp_path / "victim")
    before = victim.state()
    folder = chain.copy(tmp_path / "c")
    meta_path = folder.parent / "qmpbackup.json"
    meta = json.loads(meta_path.read_text())
    meta["chains"][-1]["disks"][DISK]["backups"][1]["file"] = bad_name
    meta_path.write_text(json.dumps(meta))
    # a newline is refused in any string of the metadata, before names are looked at
    reason = "holds a control character" if "\n" in bad_name else "is not a backup file name"
    every_restore_command_refuses(cli, folder, tmp_path, 6, "qmpbackup.json", reason,
                                  extra=("--skip-check",))
    cli("qmprestore", "list", "--dir", folder).failed(6, reason)
    assert victim.state() == before


def test_merge_never_writes_through_a_planted_partial(cli, chain: Chain, tmp_path: Path) -> None:
    victim = Victim.make(tmp_path / "victim")
    before = victim.state()
    out = tmp_path / "out"
    out.mkdir()
    target = out / "restored.raw"
    (out / "restored.raw.partial").symlink_to(victim.path)
    cli("qmprestore", "merge", "--dir", chain.root / DISK, "--format", "raw",
        "--targetfile", target).ok()
    assert identical(target, chain.refs[-1])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert victim.state() == before
    assert sorted(p.name for p in out.iterdir()) == ["restored.raw", "restored.raw.partial"]


def test_everything_a_restore_creates_is_private(cli, chain: Chain, tmp_path: Path) -> None:
    old = os.umask(0o022)   # the usual umask: the tool must not rely on a stricter one
    try:
        deep = tmp_path / "new" / "deeper" / "out"
        log = tmp_path / "restore.log"
        cli("qmprestore", "--logfile", log, "merge", "--dir", chain.root,
            "--targetdir", deep).ok()
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", tmp_path / "new" / "deeper", deep):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((deep / f"{DISK}.qcow2").stat().st_mode) == 0o600
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert identical(deep / f"{DISK}.qcow2", chain.refs[-1])


def test_logfile_never_follows_a_symlink(cli, chain: Chain, tmp_path: Path) -> None:
    victim = Victim.make(tmp_path / "victim")
    before = victim.state()
    log = tmp_path / "log"
    log.symlink_to(victim.path)
    cli("qmprestore", "--logfile", log, "list", "--dir", chain.root).failed(
        2, "cannot open log file", "is a symlink")
    assert victim.state() == before


# -- malformed metadata ----------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    "[" * 100000 + "]" * 100000,
    '{"chains": [{"uuid": "a", "bitmap": "qmpbackup-a", "created": 1e999, "disks": {}}]}',
    '{"chains": [{"uuid": "a", "bitmap": "qmpbackup-a", "created": '
    + "9" * 30 + ', "disks": {}}]}',
    '{"chains": {"uuid": "a"}}',
    '{"chains": [{"uuid": "a", "bitmap": "qmpbackup-a", "created": 1, "disks": {"virtio0": '
    '{"backups": [{"file": "FULL-1-x.qcow2", "level": "full", "time": true, '
    '"virtual_size": 1}]}}}]}',
    "\xff\xfe",
], ids=["deep-nesting", "huge-float", "huge-int", "wrong-type", "bool-as-int", "not-utf8"])
def test_malformed_metadata_is_a_chain_error_naming_the_file(cli, tmp_path: Path,
                                                             content: str) -> None:
    folder = tmp_path / "backup"
    (folder / DISK).mkdir(parents=True)
    (folder / "qmpbackup.json").write_bytes(content.encode("utf-8", "surrogateescape")
                                            if content != "\xff\xfe" else b"\xff\xfe")
    for argv in (["list", "--dir", folder], ["merge", "--dir", folder / DISK, "--targetfile",
                                            tmp_path / "o.qcow2"], ["commit", "--dir", folder / DISK]):
        cli("qmprestore", *argv).failed(6, str(folder / "qmpbackup.json"))


# -- descriptors, not names: what a restore checked is what qemu-img reads -------------------------

def set_record(folder: Path, index: int, **fields: object) -> None:
    """Change what the metadata records for the disk's INDEX-th backup (the attacker can)."""
    meta_path = folder.parent / "qmpbackup.json"
    meta = json.loads(meta_path.read_text())
    meta["chains"][-1]["disks"][DISK]["backups"][index].update(fields)
    meta_path.write_text(json.dumps(meta))


def backed_by_secret(path: Path, secret: Victim) -> None:
    """A valid qcow2 at PATH (bytes allowed) that reads a root-only host file as its backing."""
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"qcow2", b"-b", bytes(secret.path),
                    b"-F", b"raw", os.fsencode(path), str(8 * MiB).encode()], check=True)


def secret(tmp_path: Path) -> Victim:
    victim = Victim.make(tmp_path / "root-only-secret", b"TOP-SECRET-HOST-DATA" * (MiB // 20 * 8))
    victim.path.chmod(0o600)
    return victim


def test_invalid_utf8_backing_name_never_chooses_a_file(cli, chain: Chain, tmp_path: Path) -> None:
    """Finding 2: qemu-img shows b'\\xffULL-…' as '\\ufffdULL-…', the name of the recorded FULL."""
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    hidden = secret(tmp_path)
    before = hidden.state()
    shown = "\ufffd" + names[0][1:]                  # harmless, recorded (a --no-timestamp FULL)
    (folder / names[0]).rename(folder / shown)
    set_record(folder, 0, file=shown, timestamped=False)
    lookalike = b"\xff" + names[0][1:].encode()      # unrecorded, reads the host file
    backed_by_secret(os.fsencode(folder) + b"/" + lookalike, hidden)
    subprocess.run([b"qemu-img", b"rebase", b"-q", b"-u", b"-f", b"qcow2", b"-b", lookalike,
                    b"-F", b"qcow2", os.fsencode(folder / names[1])], check=True)
    set_record(folder, 1, digest=digests.file_digest(folder / names[1]))
    out = tmp_path / "out.raw"
    cli("qmprestore", "merge", "--dir", folder, "--format", "raw", "--targetfile", out).failed(
        6, "is backed by")
    cli("qmprestore", "merge", "--dir", folder, "--format", "raw", "--targetfile", out,
        "--skip-check").ok()
    assert identical(out, chain.refs[-1]) and b"TOP-SECRET" not in out.read_bytes()
    cli("qmprestore", "snapshotrebase", "--dir", folder, "--skip-check").ok()
    assert identical(folder / shown, chain.refs[-1])
    assert hidden.state() == before


@pytest.mark.parametrize("command", ["merge", "commit"])
def test_a_file_swapped_after_the_check_is_never_read(cli, chain: Chain, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      command: str) -> None:
    """Finding 3: an INC replaced between its checksum and qemu-img's open (an inotify race)."""
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    hidden = secret(tmp_path)
    real = getattr(qemuimg, command if command == "commit" else "convert")

    def swap_then_run(*args: object, **kwargs: object) -> None:
        backed_by_secret(folder / "swapped", hidden)
        (folder / "swapped").rename(folder / names[1])
        real(*args, **kwargs)

    monkeypatch.setattr(qemuimg, real.__name__, swap_then_run)
    out = tmp_path / "out.raw"
    if command == "merge":
        cli("qmprestore", "merge", "--dir", folder, "--format", "raw", "--targetfile", out).ok()
    else:
        cli("qmprestore", "commit", "--dir", folder).ok()
        out = folder / names[0]
    assert identical(out, chain.refs[-1]) and b"TOP-SECRET" not in out.read_bytes()


def test_json_and_protocol_names_in_the_metadata_are_refused(cli, chain: Chain,
                                                             tmp_path: Path) -> None:
    """Finding 4: a no-timestamp FULL named like a JSON block spec (one path component)."""
    victim = Victim.make(tmp_path / "victim", os.urandom(MiB))
    before = victim.state()
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(victim.path)}})
    name = "json:" + spec.replace("/", "\\u002f")
    (folder / names[0]).rename(folder / name)
    set_record(folder, 0, file=name, timestamped=False)
    for argv in (["snapshotrebase", "--skip-check"], ["merge", "--targetfile", tmp_path / "o"],
                 ["list"]):
        cli("qmprestore", argv[0], "--dir", folder, *argv[1:]).failed(
            6, "qmpbackup.json", "QEMU would read as a protocol")
    assert victim.state() == before


def test_merge_into_a_folder_another_user_owns(cli, chain: Chain, tmp_path: Path,
                                               public_tmp: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 5: the output folder's owner swaps the new partial file for a symlink."""
    victim = Victim.make(tmp_path / "root-owned.conf")
    before = victim.state()
    out = public_tmp / "out"
    out.mkdir()
    os.chown(out, NOBODY, NOBODY)
    real_convert = qemuimg.convert

    def swap_then_convert(*args: object, **kwargs: object) -> None:
        for partial in out.glob(".restored.qcow2.*.partial"):
            as_nobody("ln", "-sfn", str(victim.path), str(partial))
        real_convert(*args, **kwargs)   # type: ignore[arg-type]

    monkeypatch.setattr(qemuimg, "convert", swap_then_convert)
    cli("qmprestore", "merge", "--dir", chain.root / DISK, "--targetfile",
        out / "restored.qcow2").failed(6, "not a file the tool wrote")
    assert victim.state() == before
    assert not (out / "restored.qcow2").exists()


def test_commit_never_writes_through_a_hard_link(cli, chain: Chain, tmp_path: Path) -> None:
    """Finding 7: a backup file hard-linked to a host file (protected_hardlinks off, or root's)."""
    folder = chain.copy(tmp_path / "c")
    names = chain.files()
    for linked in (names[0], names[2]):
        victim = Victim(tmp_path / f"host-{linked}")
        os.link(folder / linked, victim.path)
        before = victim.state()
        for command in ("commit", "snapshotrebase"):
            cli("qmprestore", command, "--dir", folder, "--skip-check").failed(6, "hard links")
        assert victim.state() == before
        victim.path.unlink()
