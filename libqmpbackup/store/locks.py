"""Mutual exclusion between qmpbackup runs: one lock per VM, one per chain folder.

QEMU happily runs two backups of the same disk at once and a QMP socket
silently queues a second client, so without locks a second cron run would
either race the first (two writers of one chain, one bitmap cleared twice) or
hang.  Both locks are ``flock`` locks taken without waiting: the kernel drops
them when the process dies, so a lock file left by a killed run is harmless.
A run deletes its lock file before releasing it, and a run that acquires a
lock checks that the file it locked is still the one the path names, so
deleting never lets two runs in.

An offline run (``--image``) takes one lock per image file instead, keyed
by the image's real path, in the same directory.

Where the VM lock lives (one file per QMP socket, named by a hash of the
socket's real path, so every path to the same socket shares one lock):

1. ``$QMPBACKUP_LOCK_DIR`` when set;
2. ``/run/lock/qmpbackup`` for root, ``/run/lock/qmpbackup-<uid>`` for others
   (a tmpfs that exists at 3 a.m. without a login session);
3. ``<tmp>/qmpbackup-<uid>`` when /run/lock is missing.

The chain lock is ``.qmpbackup.lock`` inside the chain folder, so it follows
the folder to whatever host mounts it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from libqmpbackup.errors import (
    ChainError,
    ConnectError,
    LockBusyError,
    QmpBackupError,
    TargetError,
    UsageError,
)
from libqmpbackup.store.names import LOCK_NAME

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "QMPBACKUP_LOCK_DIR"
RUN_LOCK = Path("/run/lock")
LOCK_ATTEMPTS = 5


def _usable_private_dir(path: Path) -> bool:
    """Create PATH 0700 if needed; True only if it is our own directory nobody else can write.

    A lock directory another user controls could hold symlinks or files that
    block our locks forever, so anything else is rejected.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def lock_dir() -> Path:
    """The directory of VM locks (see the module docstring for the order)."""
    explicit = os.environ.get(LOCK_DIR_ENV)
    if explicit:
        try:
            if _usable_private_dir(Path(explicit)):
                return Path(explicit)
        except OSError as err:
            raise UsageError(f"{LOCK_DIR_ENV}={explicit}: {err.strerror}") from err
        raise UsageError(f"{LOCK_DIR_ENV}={explicit} is not a directory owned by this user "
                         "and writable only by it")
    uid = os.geteuid()
    candidates = [RUN_LOCK / ("qmpbackup" if uid == 0 else f"qmpbackup-{uid}"),
                  Path(tempfile.gettempdir()) / f"qmpbackup-{uid}"]
    for candidate in candidates:
        try:
            if _usable_private_dir(candidate):
                return candidate
        except OSError as err:
            log.debug("lock directory %s unusable: %s", candidate, err.strerror)
            continue
        log.warning("ignoring lock directory %s: not owned by this user or writable by others",
                    candidate)
    raise UsageError(f"no usable lock directory (tried {', '.join(map(str, candidates))}); "
                     f"set {LOCK_DIR_ENV}")


def vm_lock_keys(address: str) -> list[str]:
    """What identifies a VM: the real path of its unix socket, or every address a tcp: name resolves to.

    ``tcp:localhost:4444`` and ``tcp:127.0.0.1:4444`` are one VM: a key per
    resolved address and port makes the two spellings share a lock.
    """
    if not address.startswith("tcp:"):
        return [os.path.realpath(address)]
    host, _, port = address[len("tcp:"):].rpartition(":")
    if not host or not port.isdigit():
        return [address]   # not an address: the connection attempt reports it
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise ConnectError(f"cannot resolve QMP address {address}: {err}") from err
    return sorted({":".join(("tcp", str(info[4][0]), str(info[4][1]))) for info in found})


def _keyed_lock_path(kind: str, key: str, directory: Optional[Path]) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (directory or lock_dir()) / f"{kind}-{digest}.lock"


def vm_lock_path(key: str, directory: Optional[Path] = None) -> Path:
    return _keyed_lock_path("vm", key, directory)


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file, for the error message."""
    try:
        pid = os.pread(fd, 64, 0).decode(errors="replace").split()[0]
    except (OSError, IndexError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _open_lock_file(path: Path, unusable: type[QmpBackupError]) -> int:
    """Open PATH as a lock file: new and exclusive when absent, never through a symlink.

    The folder of a chain lock may be writable by others: a planted symlink
    would make root truncate and write the file it points to, and a file
    someone else owns is not ours to trust, so both are refused.
    """
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ChainError(f"lock file {path} is a symlink: refused (remove it once no "
                             "backup runs)") from err
        raise unusable(f"cannot open lock file {path}: {err.strerror}") from err
    info = os.fstat(fd)
    problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode)
               else f"belongs to uid {info.st_uid}, not to this user"
               if info.st_uid != os.geteuid() else "")
    if problem:
        os.close(fd)
        raise ChainError(f"lock file {path} {problem}: refused (remove it once no backup runs)")
    os.set_blocking(fd, True)
    return fd


def _try_lock(path: Path, what: str, unusable: type[QmpBackupError]) -> Optional[int]:
    """A descriptor holding the lock on the file PATH names now, or None to try again.

    A holder that releases unlinks the file, so the file we opened may be
    gone by the time our flock succeeds; only a lock on the file PATH still
    names (lstat: the name itself, never what a symlink there points to) counts.
    """
    fd = _open_lock_file(path, unusable)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened, named = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        os.close(fd)
        return None
    except OSError as err:
        holder = _holder(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise unusable(f"cannot lock {path}: {err.strerror}") from err
        raise LockBusyError(f"another backup is running on {what}{holder}; "
                            f"lock {path}") from err
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def hold(path: Path, what: str, owner: str,
         unusable: type[QmpBackupError] = UsageError) -> Iterator[None]:
    """Hold an exclusive lock on PATH or fail at once with LockBusyError.

    The file exists only while held (or after a killed holder, harmlessly).
    WHAT names the locked thing in messages; OWNER is written into the file
    after the pid, for admins.  A lock file that cannot be opened raises
    UNUSABLE: a usage error for the lock directory, a target error for a
    chain folder.
    """
    for _ in range(LOCK_ATTEMPTS):
        fd = _try_lock(path, what, unusable)
        if fd is not None:
            break
    else:
        raise LockBusyError(f"another backup is running on {what}: lock {path} keeps changing")
    try:
        with contextlib.suppress(OSError):  # the pid is a courtesy: a full disk must not block
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {owner}\n".encode())
        log.debug("locked %s", path)
        yield
    finally:
        with contextlib.suppress(OSError):
            _unlink_if_same(path, fd)   # while still held: see _try_lock
        os.close(fd)                    # releases the flock


def _unlink_if_same(path: Path, fd: int) -> None:
    """Remove PATH only while it still names the file we hold (unlink never follows a symlink)."""
    opened, named = os.fstat(fd), os.lstat(path)
    if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):
        path.unlink()


@contextlib.contextmanager
def vm_lock(address: str) -> Iterator[None]:
    """Exclusive use of one VM's QMP socket by this qmpbackup run."""
    with contextlib.ExitStack() as held:
        for key in vm_lock_keys(address):
            held.enter_context(hold(vm_lock_path(key), f"VM socket {address}", key))
        yield


@contextlib.contextmanager
def image_lock(real_path: str) -> Iterator[None]:
    """Exclusive use of one image file (by its real path) by this offline run.

    Image locking would stop a second qemu-storage-daemon anyway, but as
    "in use by a running QEMU"; this lock says what really happens.
    """
    with hold(_keyed_lock_path("image", real_path, None), f"image {real_path}", real_path):
        yield


@contextlib.contextmanager
def chain_lock(root: Path) -> Iterator[None]:
    """Exclusive use of one chain folder (whatever VM writes to it)."""
    with hold(root / LOCK_NAME, f"target {root}", str(root), TargetError):
        yield
