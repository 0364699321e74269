"""Encrypted chains (--encrypt-key-file) on a real QEMU VM, proven by raw bytes and restores.

The guest writes a recognisable pattern before each run: no backup file may
hold it in clear, ``qemu-img info`` must call every file encrypted, and every
point must restore byte-identical with the key.  The key itself must appear
in no child's argv and no --debug log.  Disks are small and the LUKS
iteration time low (the default for genkey keys), so the module stays fast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from libqmpbackup.qemu import img_limits
from tests.helpers import REPO, files, metadata, run_backup
from tests.vm import Disk, MiB, TestVM, identical

DISK = "virtio0"
PATTERNS = (0x5A, 0xC3, 0x7E, 0x96)   # one per run: full, inc, inc, diff


def pattern_bytes(pattern: int) -> bytes:
    return bytes([pattern]) * 4096


def info(path: Path) -> dict:
    return json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     check=True, capture_output=True, text=True).stdout)


def dirty_bitmaps(vm: TestVM) -> list[tuple[str, int]]:
    """Each dirty bitmap of the VM with the bytes it marks changed."""
    return sorted((b["name"], b["count"]) for device in vm.cmd("query-block")
                  for b in device.get("inserted", {}).get("dirty-bitmaps", []))


@pytest.fixture(scope="module")
def enc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A VM and its encrypted chain: full, inc, inc, diff, with the guest's disk at each point."""
    base = tmp_path_factory.mktemp("encrypt")
    key = base / "key"
    from qmpbackup.cli import main as qmpbackup
    assert qmpbackup(["--quiet", "genkey", str(key)]) == 0
    root = base / "backup"
    refs: list[Path] = []
    argvs: list[list[str]] = []
    real_run = img_limits.run

    def recording_run(argv, *args, **kwargs):   # type: ignore[no-untyped-def]
        argvs.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    with TestVM(base / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm, \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(img_limits, "run", recording_run)
        for index, (level, pattern) in enumerate(zip(("full", "inc", "inc", "diff"), PATTERNS)):
            vm.write(DISK, pattern, index * MiB, 256 * 1024)
            run_backup(vm, root, level, "--encrypt-key-file", str(key))
            refs.append(vm.reference(DISK, base / f"ref{index}.raw"))
        yield {"vm": vm, "root": root, "key": key, "refs": refs, "argvs": argvs, "base": base}


def test_no_pattern_in_any_file_and_every_file_encrypted(enc: dict) -> None:
    folder = enc["root"] / DISK
    names = files(enc["root"], DISK)
    assert len(names) == 4
    assert metadata(enc["root"])["chains"][-1]["encrypted"] is True
    for name in names:
        raw = (folder / name).read_bytes()
        for pattern in PATTERNS:
            assert pattern_bytes(pattern) not in raw, f"{name} holds pattern {pattern:#x} in clear"
        details = info(folder / name)
        assert details["encrypted"] is True
        assert details["format-specific"]["data"]["encrypt"]["format"] == "luks"


def test_the_key_is_in_no_argv_and_no_debug_log(cli, enc: dict, tmp_path: Path) -> None:
    secret = enc["key"].read_text().strip()
    assert enc["argvs"], "qemu-img was never run"
    assert any("--object" in argv for argv in enc["argvs"])
    for argv in enc["argvs"]:
        assert secret not in " ".join(argv)
    vm = enc["vm"]
    vm.write(DISK, 0x33, 5 * MiB, 64 * 1024)
    result = cli("qmpbackup", "--socket", vm.tool_socket, "--debug", "backup", "--level", "full",
                 "--no-progress", "--target", tmp_path / "other", "--encrypt-key-file",
                 enc["key"], "--json").ok()
    assert "object-add" in result.err and "/proc/self/fd/" in result.err
    assert secret not in result.err and secret not in result.out
    assert vm.tool_leftovers() == []
    assert secret_objects(vm) == []


@pytest.mark.parametrize("point", range(4))
def test_every_point_restores_identical_with_the_key(cli, enc: dict, tmp_path: Path,
                                                     point: int) -> None:
    name = files(enc["root"], DISK)[point]
    out = tmp_path / "out.qcow2"
    cli("qmprestore", "merge", "--dir", enc["root"] / DISK, "--until", name, "--key-file",
        enc["key"], "--targetfile", out).ok()
    assert info(out).get("encrypted") is not True   # a plain image by default
    assert identical(out, enc["refs"][point])


def test_merge_encrypt_output_keeps_it_encrypted(cli, enc: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    cli("qmprestore", "merge", "--dir", enc["root"] / DISK, "--key-file", enc["key"],
        "--encrypt-output", "--targetfile", out).ok()
    assert info(out)["encrypted"] is True
    for pattern in PATTERNS:
        assert pattern_bytes(pattern) not in out.read_bytes()
    plain = tmp_path / "plain.raw"
    subprocess.run(["qemu-img", "convert", "--object", f"secret,id=s0,file={enc['key']}",
                    "--image-opts", f"driver=qcow2,file.filename={out},encrypt.key-secret=s0",
                    "-O", "raw", str(plain)], check=True)
    assert identical(plain, enc["refs"][-1])


def test_mount_serves_an_encrypted_point_with_the_key_from_a_descriptor(
        cli, enc: dict, mountpoint: Path) -> None:
    """mount --key-file: the daemon decrypts every layer; the key is in no argv; no key: exit 2."""
    cli("qmprestore", "mount", "--dir", enc["root"], mountpoint).failed(2, "--key-file")
    assert list(mountpoint.iterdir()) == []
    until = files(enc["root"], DISK)[2]
    shown = json.loads(cli("qmprestore", "mount", "--dir", enc["root"], "--until", until,
                           "--key-file", enc["key"], "--json", mountpoint).ok().out)
    argv = Path(f"/proc/{shown['daemon_pid']}/cmdline").read_bytes()
    assert enc["key"].read_bytes().strip() not in argv and b"secret,id=qmpbackup-key" in argv
    assert identical(mountpoint / f"{DISK}.raw", enc["refs"][2])
    cli("qmprestore", "umount", mountpoint).ok()


def test_restores_without_or_with_a_wrong_key_are_refused(cli, enc: dict, tmp_path: Path) -> None:
    out = tmp_path / "out.qcow2"
    result = cli("qmprestore", "merge", "--dir", enc["root"] / DISK, "--targetfile", out)
    assert result.rc == 2 and "encrypted" in result.err and "--key-file" in result.err
    assert len(result.err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong"
    wrong.write_text("not the key\n")
    wrong.chmod(0o600)
    result = cli("qmprestore", "merge", "--dir", enc["root"] / DISK, "--key-file", wrong,
                 "--targetfile", out)
    assert result.rc == 2 and "is not the key" in result.err, result.err
    assert not out.exists()


def test_verify_without_the_key_checks_what_it_can_and_says_so(cli, enc: dict) -> None:
    result = cli("qmprestore", "verify", "--dir", enc["root"]).ok()
    assert "not qemu-img check" in result.err
    assert "damaged" not in result.out
    cli("qmprestore", "verify", "--dir", enc["root"], "--key-file", enc["key"]).ok()


def test_list_shows_the_chain_encrypted(cli, enc: dict) -> None:
    assert "(encrypted)" in cli("qmprestore", "list", "--dir", enc["root"]).ok().out
    document = json.loads(cli("qmprestore", "list", "--dir", enc["root"], "--json").ok().out)
    assert document["chains"][0]["encrypted"] is True


@pytest.mark.parametrize("operation", ["commit", "snapshotrebase"])
def test_in_place_restores_with_the_key(cli, enc: dict, tmp_path: Path, operation: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(enc["root"], copy, symlinks=True)
    inc = files(enc["root"], DISK)[2]   # FULL + 2 INC: the DIFF is a later point
    cli("qmprestore", "rebase", "--dir", copy / DISK, "--until", inc, "--key-file",
        enc["key"]).ok()
    result = cli("qmprestore", operation, "--dir", copy / DISK, "--until", inc)
    assert result.rc == 2 and "encrypted" in result.err
    cli("qmprestore", operation, "--dir", copy / DISK, "--until", inc, "--key-file",
        enc["key"]).ok()
    for name in files(copy, DISK):
        assert info(copy / DISK / name)["encrypted"] is True
    out = tmp_path / "out.raw"
    held = "FULL-" + inc.split("-")[1]   # the FULL now holds the INC's point
    cli("qmprestore", "merge", "--dir", copy / DISK, "--until", held, "--key-file", enc["key"],
        "--format", "raw", "--targetfile", out).ok()
    assert identical(out, enc["refs"][2])


def test_key_refusals_leave_every_change_for_the_next_run(cli, tmp_path: Path) -> None:
    """Missing, wrong or group-readable key: exit 2, one line, nothing touched; then the right key."""
    key = tmp_path / "key"
    cli("qmpbackup", "genkey", key).ok()
    root = tmp_path / "backup"
    with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm:
        run_backup(vm, root, "full", "--encrypt-key-file", str(key))
        before = sorted(p.name for p in (root / DISK).iterdir())
        vm.write(DISK, 0x44, 2 * MiB, 128 * 1024)
        before_bitmaps = dirty_bitmaps(vm)
        assert before_bitmaps and all(count for _, count in before_bitmaps)
        wrong = tmp_path / "wrong"
        cli("qmpbackup", "genkey", wrong).ok()
        loose = tmp_path / "loose"
        loose.write_bytes(key.read_bytes())
        loose.chmod(0o640)
        for extra, fragment in (((), "is encrypted"),
                                (("--encrypt-key-file", wrong), "is not the key"),
                                (("--encrypt-key-file", loose), "group or others")):
            result = cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
                         "--no-progress", "--target", root, *extra)
            assert result.rc == 2, result.err
            assert fragment in result.err and len(result.err.strip().splitlines()) == 1
            assert sorted(p.name for p in (root / DISK).iterdir()) == before
            assert dirty_bitmaps(vm) == before_bitmaps
        # a clear chain never takes encrypted files (nor the reverse)
        clear = tmp_path / "clear"
        run_backup(vm, clear, "full")
        result = cli("qmpbackup", "--socket", vm.tool_socket, "backup", "--level", "inc",
                     "--no-progress", "--target", clear, "--encrypt-key-file", str(key))
        assert result.rc == 2 and "cannot mix" in result.err
        run_backup(vm, root, "inc", "--encrypt-key-file", str(key))
        ref = vm.reference(DISK, tmp_path / "ref.raw")
    out = tmp_path / "out.raw"
    cli("qmprestore", "merge", "--dir", root / DISK, "--key-file", key, "--format", "raw",
        "--targetfile", out).ok()
    assert identical(out, ref)


def secret_objects(vm: TestVM) -> list[str]:
    return [o["name"] for o in vm.cmd("qom-list", path="/objects")
            if o["name"].startswith("qmpbackup-key")]


def killed_at(vm: TestVM, root: Path, key: Path, step: str, ready: Path) -> None:
    """An encrypted inc run SIGKILLed once it reached STEP (tests.paused_run holds it there)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.paused_run", step, str(ready), "--", "--socket",
         vm.tool_socket, "backup", "--level", "inc", "--target", str(root), "--no-progress",
         "--encrypt-key-file", str(key)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120   # a LUKS create costs ~2 s of CPU: slow on a busy host
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"step {step} not reached: {proc.communicate()[1]}")
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=30)


@pytest.mark.parametrize("step", ["jobs-running", "renamed"])
def test_an_interrupted_encrypted_run_leaves_the_chain_continuable(cli, tmp_path: Path,
                                                                   step: str) -> None:
    key = tmp_path / "key"
    cli("qmpbackup", "genkey", key).ok()
    root = tmp_path / "backup"
    with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm:
        run_backup(vm, root, "full", "--encrypt-key-file", str(key))
        vm.write(DISK, 0x55, 0, 4 * MiB)
        killed_at(vm, root, key, step, tmp_path / "ready")
        assert secret_objects(vm)   # the killed run's key is still in QEMU ...
        vm.write(DISK, 0x66, 6 * MiB, 64 * 1024)
        run_backup(vm, root, "inc", "--encrypt-key-file", str(key))
        assert secret_objects(vm) == []   # ... until the next run removes it
        assert vm.tool_leftovers() == []
        ref = vm.reference(DISK, tmp_path / "ref.raw")
    for name in files(root, DISK):
        assert info(root / DISK / name)["encrypted"] is True
    out = tmp_path / "out.raw"
    cli("qmprestore", "merge", "--dir", root / DISK, "--key-file", key, "--format", "raw",
        "--targetfile", out).ok()
    assert identical(out, ref)


def test_compress_fleecing_offline_and_prune_keep_the_chain_encrypted(
        cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compress, --fleecing and --image runs write encrypted files into one encrypted chain."""
    temp = Path(tempfile.mkdtemp(prefix="qbe"))   # the daemon's QMP socket: a short path
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    key = tmp_path / "key"
    cli("qmpbackup", "genkey", key).ok()
    root = tmp_path / "backup"
    refs: list[Path] = []
    try:
        with TestVM(tmp_path / "vm", [Disk(DISK, "virtio", "qcow2", 8 * MiB)]) as vm:
            image = vm.disk(DISK).path
            assert image is not None
            for index, extra in enumerate((("--level", "full", "--compress"),
                                           ("--level", "inc", "--fleecing", "--fleecing-dir",
                                            str(tmp_path)))):
                vm.write(DISK, PATTERNS[index], index * MiB, 256 * 1024)
                cli("qmpbackup", "--socket", vm.tool_socket, "backup", *extra, "--target", root,
                    "--no-progress", "--encrypt-key-file", key).ok()
                refs.append(vm.reference(DISK, tmp_path / f"ref{index}.raw"))
            vm.write(DISK, PATTERNS[2], 2 * MiB, 256 * 1024)
        # shut down: the offline run continues the chain through qemu-storage-daemon
        cli("qmpbackup", "--image", f"{DISK}={image}", "backup", "--level", "inc", "--target",
            root, "--no-progress", "--encrypt-key-file", key).ok()
        refs.append(tmp_path / "ref2.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(refs[-1])], check=True)
        result = cli("qmpbackup", "--image", f"{DISK}={image}", "backup", "--level", "inc",
                     "--target", root, "--no-progress")
        assert result.rc == 2 and "is encrypted" in result.err
        names = files(root, DISK)
        assert len(names) == 3
        for index, name in enumerate(names):
            raw = (root / DISK / name).read_bytes()
            assert info(root / DISK / name)["encrypted"] is True
            assert not any(pattern_bytes(p) in raw for p in PATTERNS)
            out = tmp_path / f"out{index}.raw"
            cli("qmprestore", "merge", "--dir", root / DISK, "--until", name, "--key-file", key,
                "--format", "raw", "--targetfile", out).ok()
            assert identical(out, refs[index])
        # the bitmap gone, auto starts a new encrypted chain; prune needs no key to drop the old
        cli("qmpbackup", "--image", f"{DISK}={image}", "cleanup", "--remove-bitmaps").ok()
        cli("qmpbackup", "--image", f"{DISK}={image}", "backup", "--level", "auto", "--target",
            root, "--no-progress", "--encrypt-key-file", key).ok()
        assert [c["encrypted"] for c in metadata(root)["chains"]] == [True, True]
        cli("qmpbackup", "prune", "--target", root, "--keep", "1").ok()
        assert len(metadata(root)["chains"]) == 1 and len(files(root, DISK)) == 1
        assert not any((root / DISK / n).exists() for n in names)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_a_clear_file_swapped_into_an_encrypted_chain_is_found(cli, enc: dict,
                                                               tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(enc["root"], copy, symlinks=True)
    name = files(copy, DISK)[1]
    swapped = copy / DISK / name
    previous = files(copy, DISK)[0]
    swapped.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", previous, "-F",
                    "qcow2", str(swapped), str(8 * MiB)], check=True)
    result = cli("qmprestore", "verify", "--dir", copy, "--json")
    assert result.rc == 11
    report = {f["file"]: f for f in json.loads(result.out)["files"]}
    assert any("is not encrypted, but its chain is encrypted" in p
               for p in report[name]["problems"]), report[name]
    out = tmp_path / "out.raw"
    result = cli("qmprestore", "merge", "--dir", copy / DISK, "--key-file", enc["key"],
                 "--skip-check", "--until", name, "--format", "raw", "--targetfile", out)
    assert result.rc != 0 and not out.exists()   # even unchecked, a clear layer never opens
