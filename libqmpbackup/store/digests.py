"""Content digests of backup files: what makes silent bit rot visible.

``qemu-img check`` and the chain rules only see qcow2 metadata; a flipped
bit inside a data cluster restores without complaint.  So every backup file's
bytes are hashed when the run commits and the digest is stored with its
record in ``qmpbackup.json``; ``qmprestore verify`` and every restore
recompute it.

Why pieces: one hash over a whole file is a single chain of work on one
core, while the run's other cores sit idle (the job is over when we hash).
Cutting every file into 64 MiB pieces lets the pieces of *all* files of a
run be hashed at once on every core the process may use (hashlib and
xxhash release the GIL), and the digest is still checkable by hand with a
Debian command: what each kind means, and that command, are in
:mod:`digest_kinds`.  Why 64 MiB: plenty of work per task to hide the
pool's overhead, a 1 TiB disk is still only 16384 lines, and a 1 GiB file
still splits into 16 pieces for the cores.

Restores and ``verify`` hash the descriptors they checked and hand to
qemu-img (:func:`digest_handles`, :func:`check_handles`): the bytes hashed
are the bytes restored, whatever the name leads to by then.  The backup run
hashes its own new files by name (:func:`digest_files`), opened like every
other file a folder names (``folder_safety``: relative to the folder, never
through a symlink, regular files only).  Each file is read with
``os.preadv`` into one reused 1 MiB buffer per worker, so memory stays at
workers × 1 MiB whatever the files' sizes, and a piece that lies in a hole
(``SEEK_DATA``) is not read at all: it hashes as that many zero bytes, so a
huge sparse file (planted, or a mostly empty FULL) costs nothing.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from libqmpbackup.errors import ChainError
from libqmpbackup.store import folder_safety
from libqmpbackup.store.digest_kinds import (
    ALGORITHM,
    CHUNK,
    PIECE_SIZE,
    algorithm_of,
    combine_pieces,
    hash_name,
    is_pieces,
    new_hasher,
    zeros_digest,
)
from libqmpbackup.store.handles import FileHandle

log = logging.getLogger(__name__)

MAX_WORKERS = 8
"""More threads than this gain nothing on the storage backup files live on."""

DigestFailure = Union[OSError, ChainError]
"""Why a file could not be hashed: unreadable, or not a regular file of its folder."""


def worker_count() -> int:
    """The CPUs this process may run on (taskset, systemd ``CPUAffinity=``), at most MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):     # no affinity masks on this platform
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cpus))


_buffers = threading.local()


def page_aligned_buffer() -> mmap.mmap:
    """CHUNK bytes of anonymous memory that start on a page boundary.

    Why not ``bytearray(CHUNK)``: its bytes start a few bytes into the pages
    glibc maps for it, and the kernel's copy into a buffer that is not
    page-aligned was 4× slower here (AMD EPYC: 0.78 against 0.20 CPU s per
    GiB read from tmpfs), which made reading, not hashing, most of a
    checksum's cost.
    """
    return mmap.mmap(-1, CHUNK)


def _only_hole(fd: int, offset: int, length: int) -> bool:
    """True when FD holds no data from OFFSET for LENGTH bytes: a hole reads as zeros."""
    try:
        data = os.lseek(fd, offset, os.SEEK_DATA)   # lseek only: the pieces are read with preadv
    except OSError as err:
        return err.errno == errno.ENXIO     # no data after OFFSET; EINVAL: no hole support
    return data >= offset + length


def _hash_range(fd: int, offset: int, length: int, algorithm: str,
                cancel: Optional[threading.Event] = None) -> str:
    """Hex digest of LENGTH bytes of FD from OFFSET, read through this thread's buffer.

    A range that lies in a hole is not read: a huge sparse file (planted, or
    a mostly empty FULL) costs nothing, and its digest is the same.
    """
    if _only_hole(fd, offset, length):
        return zeros_digest(length, algorithm)
    buffer: Optional[mmap.mmap] = getattr(_buffers, "chunk", None)
    if buffer is None:
        buffer = _buffers.chunk = page_aligned_buffer()
    view = memoryview(buffer)
    digest = new_hasher(algorithm)
    end = offset + length
    while offset < end:
        if cancel is not None and cancel.is_set():
            raise OSError(errno.ECANCELED, "hashing cancelled")
        count = os.preadv(fd, [view[:min(CHUNK, end - offset)]], offset)
        if not count:
            raise OSError(errno.EIO, "file shrank while it was being hashed")
        digest.update(view[:count])
        offset += count
    return digest.hexdigest()


@dataclass
class _FileHashing:
    """One file while its pieces are in the pool: the descriptor is closed by its last piece."""

    path: Path
    algorithm: str
    source_fd: int = -1     # an open, checked file (a FileHandle's): hashed through a copy of it
    fd: int = -1
    size: int = 0
    pieces: list[Future[str]] = field(default_factory=list)
    failure: Optional[DigestFailure] = None
    pending: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> None:
        try:
            self.fd = (os.dup(self.source_fd) if self.source_fd >= 0 else
                       folder_safety.open_file(self.path.parent, self.path.name, os.O_RDONLY,
                                               what="backup file"))
            self.size = os.fstat(self.fd).st_size
        except (OSError, ChainError) as err:
            self.failure = err

    def piece_done(self, _: Future[str]) -> bool:
        """Count one finished piece; True (and the file closed) when it was the last."""
        with self.lock:
            self.pending -= 1
            if self.pending:
                return False
        self.close()
        return True

    def close(self) -> None:
        """Close the file, noting a size change since it was opened (never raises: a callback)."""
        try:
            if os.fstat(self.fd).st_size != self.size and self.failure is None:
                self.failure = OSError(errno.EIO, "file changed size while it was being hashed")
            os.close(self.fd)
        except OSError as err:
            self.failure = self.failure or err
        self.fd = -1

    def result(self) -> Union[str, DigestFailure]:
        if self.failure is not None:
            return self.failure
        for piece in self.pieces:
            err = piece.exception()
            if isinstance(err, OSError):
                return err
        hexes = [piece.result() for piece in self.pieces]
        if is_pieces(self.algorithm):
            return f"{self.algorithm}:{combine_pieces(hexes, self.algorithm)}"
        return f"{self.algorithm}:{hexes[0]}"


def _ranges(size: int, algorithm: str, piece_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each task for a file of SIZE bytes: its pieces, or the whole file."""
    if not is_pieces(algorithm):
        return [(0, size)]
    return [(offset, min(piece_size, size - offset)) for offset in range(0, size, piece_size)]


def _hash_all(items: Sequence[tuple[Path, str, int]], piece_size: int,
              cancel: Optional[threading.Event] = None) -> list[Union[str, DigestFailure]]:
    """Digest or failure of each (path, algorithm), every piece of every file in one pool.

    The files are opened in order, each only when a slot is free, so at most
    twice the workers are open at a time; their pieces queue behind those of
    the files before them, which keeps every worker busy to the end.  A signal
    (the runner raises in this thread) drops the queued pieces: the command
    stops after the pieces in flight instead of hashing every file first.
    CANCEL does the same from another thread (:class:`BackgroundCheck`).
    """
    files = [_FileHashing(path=path, algorithm=algorithm, source_fd=fd)
             for path, algorithm, fd in items]
    workers = worker_count()
    slots = threading.BoundedSemaphore(2 * workers)

    def piece_done(hashing: _FileHashing, piece: Future[str]) -> None:
        if hashing.piece_done(piece):
            slots.release()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="digest") as pool:
        try:
            for hashing in files:
                slots.acquire()
                if cancel is not None and cancel.is_set():
                    slots.release()
                    hashing.failure = OSError(errno.ECANCELED, "hashing cancelled")
                    continue
                hashing.open()
                if hashing.failure is not None:
                    slots.release()
                    continue
                ranges = _ranges(hashing.size, hashing.algorithm, piece_size)
                if not ranges:
                    hashing.close()
                    slots.release()
                    continue
                hashing.pending = len(ranges)   # before any piece can finish and count down
                for offset, length in ranges:
                    piece = pool.submit(_hash_range, hashing.fd, offset, length,
                                        hash_name(hashing.algorithm), cancel)
                    piece.add_done_callback(functools.partial(piece_done, hashing))
                    hashing.pieces.append(piece)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)   # cancelled pieces close their files
            for hashing in files:
                if hashing.fd != -1:    # interrupted before all its pieces were queued
                    hashing.close()
            raise
    return [hashing.result() for hashing in files]


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """``<algorithm>:<hex>`` of PATH's bytes; OSError if it cannot be read, ChainError if unsafe."""
    return digest_files([path], [algorithm])[0]


def digest_files(paths: Sequence[Path], algorithms: Optional[Sequence[str]] = None, *,
                 piece_size: int = PIECE_SIZE) -> list[str]:
    """Digests of PATHS, in order, all files' pieces hashed in one pool; raises the first failure.

    PIECE_SIZE other than 64 MiB is for tests only: the recorded id still says 64 MiB.
    """
    if not paths:
        return []
    chosen = list(algorithms) if algorithms is not None else [ALGORITHM] * len(paths)
    return _digests([(path, algorithm, -1) for path, algorithm in zip(paths, chosen)],
                    piece_size)


def digest_handles(handles: Sequence[FileHandle]) -> list[str]:
    """:func:`digest_files` of files already open and checked: hashed through their descriptors."""
    return _digests([(h.path, ALGORITHM, h.fd) for h in handles], PIECE_SIZE)


def _digests(items: Sequence[tuple[Path, str, int]], piece_size: int) -> list[str]:
    if not items:
        return []
    started = time.monotonic()
    results = _hash_all(items, piece_size)
    log.debug("digests of %d file(s) in %.2f s", len(items), time.monotonic() - started)
    digests = []
    for result in results:
        if not isinstance(result, str):
            raise result
        digests.append(result)
    return digests


@dataclass(frozen=True)
class DigestCheck:
    """One file against its recorded digest."""

    path: Path
    status: str             # ok, mismatch, unreadable, unrecorded
    detail: str = ""


def check_handles(files: Sequence[tuple[FileHandle, Optional[str]]]) -> list[DigestCheck]:
    """:func:`check_files` of files already open and checked, through their descriptors."""
    return _check([(h.path, recorded, h.fd) for h, recorded in files])


def check_files(files: Sequence[tuple[Path, Optional[str]]]) -> list[DigestCheck]:
    """Recompute the digest of each (path, recorded digest) pair, in parallel; never raises."""
    return _check([(path, recorded, -1) for path, recorded in files])


def _check(files: Sequence[tuple[Path, Optional[str], int]],
           cancel: Optional[threading.Event] = None) -> list[DigestCheck]:
    checkable = [(path, recorded, algorithm_of(recorded), fd) for path, recorded, fd in files]
    todo = [(path, algorithm, fd) for path, _, algorithm, fd in checkable if algorithm]
    computed = iter(_hash_all(todo, PIECE_SIZE, cancel))
    results = []
    for path, recorded, algorithm, _ in checkable:
        if algorithm is None:
            results.append(DigestCheck(path=path, status="unrecorded",
                                       detail="no checksum recorded"))
            continue
        actual = next(computed)
        if isinstance(actual, OSError):
            results.append(DigestCheck(path=path, status="unreadable",
                                       detail=actual.strerror or str(actual)))
        elif isinstance(actual, ChainError):
            results.append(DigestCheck(path=path, status="unreadable", detail=str(actual)))
        elif actual != recorded:
            results.append(DigestCheck(path=path, status="mismatch",
                                       detail=f"checksum mismatch ({algorithm} of the file "
                                              "differs from the one recorded at backup time)"))
        else:
            results.append(DigestCheck(path=path, status="ok"))
    return results


class BackgroundCheck:
    """:func:`check_handles` in a thread of its own, while the caller copies the same files.

    A restore hashes its sources while ``qemu-img convert`` reads them (the
    page cache makes the second read cheap), and publishes the copy only
    when :meth:`result` says every file matched.  :meth:`cancel` (the copy
    failed or was interrupted) stops the hashing after the chunks in flight
    and waits for it, so no descriptor stays open behind the caller.
    """

    def __init__(self, files: Sequence[tuple[FileHandle, Optional[str]]]) -> None:
        self._cancel = threading.Event()
        self._results: list[DigestCheck] = []
        self._failure: Optional[BaseException] = None
        items = [(h.path, recorded, h.fd) for h, recorded in files]
        self._thread = threading.Thread(target=self._run, args=(items,), name="digest-check",
                                        daemon=True)
        self._thread.start()

    def _run(self, items: Sequence[tuple[Path, Optional[str], int]]) -> None:
        try:
            self._results = _check(items, self._cancel)
        except BaseException as err:    # re-raised in the caller's thread by result()
            self._failure = err

    def result(self) -> list[DigestCheck]:
        """Every file's check, once all are hashed."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._results

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()
