"""The piece digests are exactly what Debian's tools print, and hashing stays within its bounds.

No QEMU; ``xxhsum`` is Debian's ``xxhash`` package (``make system-deps`` installs it).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from libqmpbackup.store import digests
from libqmpbackup.store.digest_kinds import PIECE_SIZE, combine_pieces, zeros_digest
from libqmpbackup.store.digests import check_files, digest_files, file_digest
from libqmpbackup.store.handles import Folder

MiB = 1 << 20


BY_HAND = {
    "xxh128x64m": "split -b {piece} --filter='xxhsum -H2' {path} | cut -c1-32 | xxhsum -H2",
    "sha256x64m": "split -b {piece} --filter=sha256sum {path} | sha256sum",
}
"""The by-hand checks the README gives (the default kind first), with the piece size a test uses."""
KINDS = list(BY_HAND)


def coreutils_digest(path: Path, piece: str = "64M", kind: str = "xxh128x64m") -> str:
    """What the README's shell pipeline for KIND prints for PATH, as a recorded digest."""
    split = subprocess.run(BY_HAND[kind].format(piece=piece, path=path), shell=True,
                           check=True, capture_output=True, text=True, cwd=path.parent)
    hexdigest, _ = split.stdout.split()    # "<hex>  -" (sha256sum) or "<hex>  stdin" (xxhsum)
    return f"{kind}:{hexdigest}"


def sparse_file(path: Path, size: int) -> Path:
    """SIZE bytes, mostly a hole, with marks so that each piece's content differs."""
    with open(path, "wb") as handle:
        os.truncate(handle.fileno(), size)
        for offset in (0, size // 2, size - 1):
            if 0 <= offset < size:
                handle.seek(offset)
                handle.write(b"\x5a")
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [0, 1, PIECE_SIZE, PIECE_SIZE + 1])
def test_the_digest_is_what_the_shell_pipeline_prints(tmp_path: Path, size: int,
                                                      kind: str) -> None:
    path = sparse_file(tmp_path / "FULL-1-disk.qcow2", size)
    assert file_digest(path, kind) == coreutils_digest(path, kind=kind)


def test_new_backups_record_xxh128_pieces(tmp_path: Path) -> None:
    """XXH3-128: ≈ 10 GB/s per core here, where SHA-256 made checksums cost more than the copy."""
    path = sparse_file(tmp_path / "FULL-1-disk.qcow2", 3 * MiB)
    assert file_digest(path) == coreutils_digest(path)
    assert file_digest(path).startswith("xxh128x64m:")


@pytest.mark.parametrize("kind", KINDS)
def test_small_pieces_follow_the_same_rule(tmp_path: Path, kind: str) -> None:
    """Many pieces, cut at every edge, for files hashed together in one pool."""
    sizes = [0, 1, 1023, 1024, 1025, 5 * 1024, 5 * 1024 + 7]   # split forks once per piece
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"f{index}"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    assert digest_files(paths, [kind] * len(paths), piece_size=1024) == \
        [coreutils_digest(p, "1K", kind) for p in paths]


def test_old_and_new_algorithms_mix_in_one_call(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * MiB + 1))
    new, pieces, old = digest_files([path, path, path], ["xxh128x64m", "sha256x64m", "sha256"],
                                    piece_size=MiB)
    assert new == coreutils_digest(path, "1M")
    assert pieces == coreutils_digest(path, "1M", "sha256x64m")
    plain = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True)
    assert old == "sha256:" + plain.stdout.split()[0]


def test_workers_follow_the_cpu_affinity_up_to_eight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert digests.worker_count() == 1, "taskset / CPUAffinity= limit the pool"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert digests.worker_count() == 8
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert digests.worker_count() == 2


def open_descriptors(folder: Path) -> int:
    """Descriptors of this process open on FOLDER or files in it.

    Only those: a pytest worker's other descriptors come and go with the
    garbage of earlier tests, so a count of all of them is not this code's.
    """
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:     # closed meanwhile, or the listing's own descriptor
            continue
        count += target == str(folder) or target.startswith(f"{folder}/")
    return count


def test_many_files_need_few_descriptors_and_none_stay_open(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for index in range(60):
        path = tmp_path / f"f{index}"
        path.write_bytes(bytes([index]) * (index * 100))
        paths.append(path)
    opened = 0
    most = 0
    real_open = digests.folder_safety.open_file

    def counting_open(*args: object, **kwargs: object) -> int:
        nonlocal opened, most
        opened += 1
        most = max(most, open_descriptors(tmp_path))
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(digests.folder_safety, "open_file", counting_open)
    assert len(set(digest_files(paths, piece_size=1024))) == 60
    assert opened == 60, "each file is opened once"
    assert most <= 2 * digests.worker_count(), "only a few files open at a time"
    assert open_descriptors(tmp_path) == 0


def test_an_interruption_stops_hashing_and_closes_every_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner raises in the main thread on SIGINT/SIGTERM: no file stays open behind it."""
    paths = []
    for index in range(40):
        path = tmp_path / f"f{index}"
        path.write_bytes(os.urandom(64 * 1024))
        paths.append(path)
    real_open = digests.folder_safety.open_file
    opened = 0

    def interrupted_open(*args: object, **kwargs: object) -> int:
        nonlocal opened
        opened += 1
        if opened == 12:
            raise KeyboardInterrupt
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(digests.folder_safety, "open_file", interrupted_open)
    with pytest.raises(KeyboardInterrupt):
        digest_files(paths, piece_size=1024)
    assert opened == 12 and open_descriptors(tmp_path) == 0


def test_a_symlink_or_a_fifo_is_not_hashed(tmp_path: Path) -> None:
    """The folder rule holds for checksums too: never read through a link, never hang on a FIFO."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    recorded = file_digest(target)
    results = check_files([(tmp_path / "link", recorded), (tmp_path / "fifo", recorded),
                           (target, recorded)])
    assert [r.status for r in results] == ["unreadable", "unreadable", "ok"]
    assert "symlink" in results[0].detail and "FIFO" in results[1].detail


def test_pieces_in_holes_are_not_read_and_hash_as_zeros(tmp_path: Path) -> None:
    """Finding 8: a planted 64 GiB sparse file costs nothing; the digest is still coreutils'."""
    huge = tmp_path / "FULL-1-huge.qcow2"
    with open(huge, "wb") as handle:
        os.truncate(handle.fileno(), 64 << 30)
    started = time.monotonic()
    digest = file_digest(huge)
    assert time.monotonic() - started < 10, "a hole must not be read"
    zeros = zeros_digest(PIECE_SIZE, "xxh3_128")
    assert digest == f"xxh128x64m:{combine_pieces([zeros] * 1024, 'xxh128x64m')}"
    middle_hole = sparse_file(tmp_path / "INC-2-disk.qcow2", 3 * PIECE_SIZE)
    with open(middle_hole, "r+b") as handle:   # data in the first and last piece only
        handle.seek(PIECE_SIZE // 2)
        handle.write(b"\x00")
    assert file_digest(middle_hole) == coreutils_digest(middle_hole)


def test_open_files_are_hashed_through_their_descriptor(tmp_path: Path) -> None:
    """Hashing by descriptor: what was opened and checked is what is hashed, not the name."""
    original = sparse_file(tmp_path / "FULL-1-disk.qcow2", 3 * MiB)
    expected = file_digest(original)
    with Folder.open_root(tmp_path) as folder, folder.open(original.name) as handle:
        original.rename(tmp_path / "elsewhere")
        sparse_file(tmp_path / original.name, MiB)   # a different file under the same name
        assert digests.digest_handles([handle]) == [expected]
        assert [c.status for c in digests.check_handles([(handle, expected)])] == ["ok"]


def test_a_background_check_judges_and_a_cancelled_one_closes_everything(tmp_path: Path) -> None:
    """Restores hash while qemu-img copies: the result is the same, and a cancel leaves nothing open."""
    good = sparse_file(tmp_path / "FULL-1-disk.qcow2", 3 * MiB)
    bad = sparse_file(tmp_path / "INC-2-disk.qcow2", 3 * MiB)
    recorded = file_digest(good)
    with Folder.open_root(tmp_path) as folder, folder.open(good.name) as one, \
            folder.open(bad.name) as two:
        check = digests.BackgroundCheck([(one, recorded), (two, recorded)])
        assert [c.status for c in check.result()] == ["ok", "ok"]
        with open(bad, "r+b") as handle:
            handle.write(b"\x01")
        check = digests.BackgroundCheck([(one, recorded), (two, recorded)])
        assert [c.status for c in check.result()] == ["ok", "mismatch"]
        check = digests.BackgroundCheck([(one, recorded)] * 50)
        check.cancel()
        assert open_descriptors(tmp_path) == 3, "the folder and the two files the test opened"
