"""Fast tests of the failure-handling helpers: locks, auxiliary bitmaps, shutdown action, leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libqmpbackup.backup.bitmaps import (
    RunBitmaps,
    chain_bitmap_of,
    recovery_steps,
    split_auxiliary,
    tool_bitmaps,
)
from libqmpbackup.backup.leftovers import clean_target
from libqmpbackup.backup.shutdown_guard import configured_shutdown_action
from libqmpbackup.errors import ChainError, LockBusyError, UsageError
from libqmpbackup.qemu.devices import BlockDevice, DirtyBitmap, below_filters
from libqmpbackup.store import locks
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.fsutil import write_atomically
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import is_empty_dir, partial_files, prepare_root, stale_temp_files
from libqmpbackup.store.names import LOCK_NAME
from tests.hostile import NOBODY, blocked_writer

CHAIN = "qmpbackup-c1"


def bitmap(name: str, *, inconsistent: bool = False, granularity: int = 65536) -> DirtyBitmap:
    return DirtyBitmap(name=name, node="n0", recording=True, persistent=True, busy=False,
                       inconsistent=inconsistent, dirty_bytes=0, granularity=granularity)


def disk(*bitmaps: DirtyBitmap, disk_id: str = "virtio0") -> BlockDevice:
    return BlockDevice(disk_id=disk_id, device=disk_id, qdev="", node="n0", driver="qcow2",
                       filename="/img/a.qcow2", virtual_size=1 << 20, read_only=False,
                       removable=False, qcow2_compat="1.1", bitmaps=list(bitmaps))


# -- auxiliary bitmaps --------------------------------------------------------------------

def test_auxiliary_names() -> None:
    assert split_auxiliary(f"{CHAIN}+pending") == (CHAIN, "+pending")
    assert split_auxiliary(f"{CHAIN}+new") == (CHAIN, "+new")
    assert split_auxiliary(CHAIN) is None
    assert split_auxiliary("foreign+pending") is None, "only qmpbackup's own"
    assert split_auxiliary("qmpbackup-+pending") is None, "no chain id, no chain"
    assert chain_bitmap_of(f"{CHAIN}+pending") == CHAIN == chain_bitmap_of(CHAIN)


def test_tool_bitmaps_of_one_chain_include_its_auxiliaries() -> None:
    d = disk(bitmap(CHAIN), bitmap(f"{CHAIN}+pending"), bitmap("qmpbackup-c2"),
             bitmap("qmpbackup-c2+new"), bitmap("foreign"))
    assert tool_bitmaps(d, "c1") == [CHAIN, f"{CHAIN}+pending"]
    assert len(tool_bitmaps(d)) == 4


def actions(kind: str, steps: list) -> list:
    return [a["data"] for step in steps for a in step.actions if a["type"] == kind]


def test_pending_is_merged_back_into_a_usable_chain_bitmap() -> None:
    steps = recovery_steps([disk(bitmap(CHAIN), bitmap(f"{CHAIN}+pending"))])
    assert actions("block-dirty-bitmap-merge", steps) == [
        {"node": "n0", "target": CHAIN, "bitmaps": [f"{CHAIN}+pending"]}]
    assert actions("block-dirty-bitmap-remove", steps) == [{"node": "n0", "name": f"{CHAIN}+pending"}]
    assert "merged" in steps[0].message


@pytest.mark.parametrize("bitmaps, why", [
    ((bitmap(f"{CHAIN}+pending"),), "missing"),
    ((bitmap(CHAIN, inconsistent=True), bitmap(f"{CHAIN}+pending", inconsistent=True)),
     "its chain bitmap is inconsistent"),
    ((bitmap(CHAIN), bitmap(f"{CHAIN}+pending", inconsistent=True)), "it is inconsistent"),
])
def test_pending_without_a_usable_chain_bitmap_is_just_removed(bitmaps, why: str) -> None:
    steps = recovery_steps([disk(*bitmaps)])
    assert not actions("block-dirty-bitmap-merge", steps)
    assert actions("block-dirty-bitmap-remove", steps) == [{"node": "n0", "name": f"{CHAIN}+pending"}]
    assert why in steps[0].message


def test_new_marker_removes_the_uncommitted_chain_bitmap() -> None:
    steps = recovery_steps([disk(bitmap(CHAIN), bitmap(f"{CHAIN}+new"), bitmap("qmpbackup-c2"))])
    assert actions("block-dirty-bitmap-remove", steps) == [
        {"node": "n0", "name": CHAIN}, {"node": "n0", "name": f"{CHAIN}+new"}]
    assert recovery_steps([disk(bitmap(CHAIN), bitmap("qmpbackup-c2"))]) == []


def test_run_bitmaps_prepare_in_one_transaction() -> None:
    kept = disk(bitmap(CHAIN, granularity=131072))
    added = disk(disk_id="hot1")
    run = RunBitmaps(CHAIN, kept=[kept], added=[added])
    assert [(a["type"], a["data"].get("name", a["data"].get("target"))) for a in
            run.prepare_actions()] == [
        ("block-dirty-bitmap-add", f"{CHAIN}+pending"),
        ("block-dirty-bitmap-merge", f"{CHAIN}+pending"),
        ("block-dirty-bitmap-add", CHAIN),
        ("block-dirty-bitmap-add", f"{CHAIN}+diff"),
        ("block-dirty-bitmap-add", f"{CHAIN}+new")]
    pending, _, chain, diff, marker = (a["data"] for a in run.prepare_actions())
    assert pending["granularity"] == 131072 and pending["persistent"]
    assert "disabled" not in pending, "+pending keeps recording guest writes"
    assert marker["disabled"] and marker["persistent"] and chain["persistent"]
    assert diff["persistent"] and "disabled" not in diff, "+diff records every write"


def test_a_diff_run_fills_the_chain_bitmap_after_pending_copied_it() -> None:
    kept = disk(bitmap(CHAIN), bitmap(f"{CHAIN}+diff"))
    run = RunBitmaps(CHAIN, kept=[kept], differential=[kept])
    assert [(a["type"], a["data"].get("name", a["data"].get("target")), a["data"].get("bitmaps"))
            for a in run.prepare_actions()] == [
        ("block-dirty-bitmap-add", f"{CHAIN}+pending", None),
        ("block-dirty-bitmap-merge", f"{CHAIN}+pending", [CHAIN]),
        ("block-dirty-bitmap-merge", CHAIN, [f"{CHAIN}+diff"])]


def test_diff_bitmap_is_never_settled_as_a_leftover_but_goes_with_an_uncommitted_chain() -> None:
    assert recovery_steps([disk(bitmap(CHAIN), bitmap(f"{CHAIN}+diff"))]) == []
    steps = recovery_steps([disk(bitmap(CHAIN), bitmap(f"{CHAIN}+diff"), bitmap(f"{CHAIN}+new"))])
    assert actions("block-dirty-bitmap-remove", steps) == [
        {"node": "n0", "name": CHAIN}, {"node": "n0", "name": f"{CHAIN}+diff"},
        {"node": "n0", "name": f"{CHAIN}+new"}]
    assert tool_bitmaps(disk(bitmap(CHAIN), bitmap(f"{CHAIN}+diff"), bitmap("qmpbackup-c2")),
                        "c1") == [CHAIN, f"{CHAIN}+diff"]


# -- shutdown action ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, action", [
    (["qemu"], "poweroff"),
    (["qemu", "-no-shutdown"], "pause"),
    (["qemu", "--no-shutdown"], "pause"),
    (["qemu", "-action", "reboot=shutdown,shutdown=pause"], "pause"),
    (["qemu", "-no-shutdown", "-action", "shutdown=poweroff"], "poweroff"),
    (["qemu", "-action", "panic=pause"], "poweroff"),
    (["qemu", "-action"], "poweroff"),
])
def test_configured_shutdown_action(argv: list[str], action: str) -> None:
    assert configured_shutdown_action(argv) == action


# -- locks --------------------------------------------------------------------------------

def test_second_holder_is_refused_and_lock_file_goes_with_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with locks.hold(path, "thing", "owner"):
        assert path.read_text() == f"{os.getpid()} owner\n"
        with pytest.raises(LockBusyError, match=rf"another backup is running on thing \(pid {os.getpid()}\)"):
            with locks.hold(path, "thing", "owner"):
                pass
    assert not path.exists()
    with locks.hold(path, "thing", "owner"):
        pass


def test_lock_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'999999 old'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert path.exists(), "a killed holder leaves its file"
    with locks.hold(path, "thing", "owner"):
        assert path.read_text().startswith(f"{os.getpid()} ")


def test_vm_lock_is_keyed_by_the_real_socket_path(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir(mode=0o700)
    real = tmp_path / "vm.sock"
    real.touch()
    (tmp_path / "alias.sock").symlink_to(real)
    assert locks.vm_lock_keys(str(real)) == locks.vm_lock_keys(str(tmp_path / "alias.sock"))
    assert locks.vm_lock_path(locks.vm_lock_keys(str(real))[0]).parent == tmp_path / "locks"
    with locks.vm_lock(str(real)):
        with pytest.raises(LockBusyError, match="another backup is running on VM socket"):
            with locks.vm_lock(str(tmp_path / "alias.sock")):
                pass
    assert locks.vm_lock_keys("tcp:127.0.0.1:4444") == ["tcp:127.0.0.1:4444"]
    assert "tcp:127.0.0.1:4444" in locks.vm_lock_keys("tcp:localhost:4444"), \
        "two spellings of one address share a lock"
    with locks.vm_lock("tcp:localhost:4444"):
        with pytest.raises(LockBusyError):
            with locks.vm_lock("tcp:127.0.0.1:4444"):
                pass


def test_lock_dir_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(shared))
    with pytest.raises(UsageError, match="is writable by other users: refused"):
        locks.lock_dir()
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "new"))
    assert locks.lock_dir() == tmp_path / "new"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_default_lock_dir_is_the_same_with_or_without_a_session(
        system_dirs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cron at 3 a.m. has no XDG_RUNTIME_DIR: root's lock must not depend on it."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    without = locks.lock_dir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
    assert locks.lock_dir() == without == system_dirs / "qmpbackup"


# -- target folder ------------------------------------------------------------------------

def test_prepare_root_reports_what_it_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    assert prepare_root(root) == [tmp_path / "a", root]
    assert prepare_root(root) == []
    assert root.stat().st_mode & 0o777 == 0o700


def test_lock_file_does_not_make_a_folder_non_empty(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("1 x\n")
    with Folder.open_root(tmp_path) as top:
        assert is_empty_dir(top)
        (tmp_path / "other").write_text("")
        assert not is_empty_dir(top)


def test_clean_target_removes_partials_and_metadata_temp_files(tmp_path: Path) -> None:
    (tmp_path / "virtio0").mkdir()
    partial = tmp_path / "virtio0" / "INC-2-a.qcow2.partial"
    partial.write_text("")
    kept = tmp_path / "virtio0" / "FULL-1-a.qcow2"
    kept.write_text("")
    temp = tmp_path / ".qmpbackup.json.abc123.tmp"
    temp.write_text("{")
    write_atomically(tmp_path / "qmpbackup.json", "{}\n")
    with Folder.open_root(tmp_path) as top:
        assert partial_files(top) == [f"virtio0/{partial.name}"]
        assert stale_temp_files(top) == [temp.name]
    with BackupFolder.open(tmp_path) as chain_folder:
        clean_target(chain_folder)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["FULL-1-a.qcow2", "qmpbackup.json",
                                                           "virtio0"]


# -- discovery under a running job's filter -----------------------------------------------

def test_disk_under_a_copy_before_write_filter() -> None:
    inner = {"filename": "/img/a.qcow2", "format": "qcow2", "virtual-size": 1 << 20}
    inserted = {"node-name": "#block9", "drv": "copy-before-write",
                "image": {"filename": "/img/a.qcow2", "format": "copy-before-write",
                          "backing-image": inner}}
    nodes = {n["node-name"]: n for n in [
        {"node-name": "#block9", "drv": "copy-before-write", "image": inserted["image"]},
        {"node-name": "#block1", "drv": "qcow2", "image": {**inner, "format-specific": {}}},
        {"node-name": "#block0", "drv": "file", "image": {"filename": "/img/a.qcow2",
                                                         "format": "file"}},
    ]}
    node, driver, image = below_filters(inserted, nodes)
    assert (node, driver) == ("#block1", "qcow2") and "format-specific" in image
    plain = {"node-name": "#block1", "drv": "qcow2", "image": inner}
    assert below_filters(plain, nodes)[:2] == ("#block1", "qcow2")


def test_a_lock_file_that_is_no_regular_file_is_a_usage_error_for_vms_and_a_chain_error_in_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "locks").mkdir(mode=0o700)
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))
    locks.vm_lock_path("/some/socket").mkdir()
    with pytest.raises(UsageError, match="is a directory, not a regular file"), \
            locks.vm_lock("/some/socket"):
        pass
    (tmp_path / "chain" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(ChainError, match="is a directory, not a regular file"), \
            locks.chain_lock(tmp_path / "chain"):
        pass


# -- issue 20: lock directories nobody else can plant (finding 6), lock files nobody else can
# -- aim at a host file (finding 7) or a device / FIFO (finding 11) ----------------------------

def planted_by_nobody(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)


def test_lock_dirs_another_user_planted_at_the_old_places_do_not_block_root(
        system_dirs: Path) -> None:
    planted_by_nobody(system_dirs / "lock" / "qmpbackup")
    planted_by_nobody(system_dirs.parent / "tmp" / f"qmpbackup-{os.geteuid()}")
    with locks.vm_lock("/some/socket"):
        pass
    assert locks.lock_dir() == system_dirs / "qmpbackup"
    info = (system_dirs / "qmpbackup").lstat()
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o700)


@pytest.mark.parametrize("how", ["owned by uid 65534", "writable by other users", "a symlink"])
def test_a_run_qmpbackup_not_roots_alone_is_refused_in_one_line(system_dirs: Path,
                                                                how: str) -> None:
    folder = system_dirs / "qmpbackup"
    if how == "a symlink":
        (system_dirs / "elsewhere").mkdir(mode=0o700)
        folder.symlink_to(system_dirs / "elsewhere")
    elif "uid" in how:
        planted_by_nobody(folder)
    else:
        folder.mkdir()
        folder.chmod(0o770)
    with pytest.raises(UsageError, match=f"lock directory {folder} .*{how}.*: refused") as err:
        locks.lock_dir()
    assert "\n" not in str(err.value)


def test_non_root_users_lock_in_their_own_runtime_directory(tmp_path: Path,
                                                           public_tmp: Path) -> None:
    """As an unprivileged user: $XDG_RUNTIME_DIR when it is theirs, else a clear refusal."""
    theirs, foreign = public_tmp / "xdg", public_tmp / "foreign"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    foreign.mkdir(mode=0o700)
    code = "from libqmpbackup.store.locks import lock_dir; print(lock_dir())"
    env = {k: v for k, v in os.environ.items() if k != locks.LOCK_DIR_ENV}

    def as_nobody(runtime: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                               "--clear-groups", sys.executable, "-c", code],
                              env={**env, "XDG_RUNTIME_DIR": str(runtime),
                                   "PYTHONPATH": str(Path(locks.__file__).parents[2])},
                              capture_output=True, text=True, check=False)
    found = as_nobody(theirs)
    assert found.stdout.strip() == str(theirs / "qmpbackup"), found.stderr
    assert (theirs / "qmpbackup").stat().st_uid == NOBODY
    refused = as_nobody(foreign)
    assert refused.returncode != 0 and "no private runtime directory" in refused.stderr


def test_a_hard_link_to_a_host_file_as_chain_lock_is_refused_and_never_written(
        tmp_path: Path) -> None:
    host_file = tmp_path / "root-owned.conf"
    host_file.write_text("precious host data\n")
    chain = tmp_path / "chain"
    chain.mkdir()
    os.link(host_file, chain / LOCK_NAME)    # what a user can do where protected_hardlinks is off
    with pytest.raises(ChainError, match="2 hard links"), locks.chain_lock(chain):
        pass
    assert host_file.read_text() == "precious host data\n"
    assert (chain / LOCK_NAME).stat().st_ino == host_file.stat().st_ino, "the evidence stays"


def test_a_fifo_as_lock_file_is_refused_without_being_opened(tmp_path: Path) -> None:
    chain = tmp_path / "chain"
    chain.mkdir()
    os.mkfifo(chain / LOCK_NAME)
    with blocked_writer(chain / LOCK_NAME) as writer:
        with pytest.raises(ChainError) as err, locks.chain_lock(chain):
            pass
        assert writer.still_blocked(), "the tool opened the FIFO"
    assert "is a FIFO, not a regular file" in str(err.value)
