"""Mutual exclusion between qmpbackup runs: one lock per VM, one per chain folder.

QEMU happily runs two backups of the same disk at once and a QMP socket
silently queues a second client, so without locks a second cron run would
either race the first (two writers of one chain, one bitmap cleared twice) or
hang.  Both locks are ``flock`` locks taken without waiting: the kernel drops
them when the process dies, so a lock file left by a killed run is harmless.
A run deletes its lock file before releasing it, and a run that acquires a
lock checks that the file it locked is still the one the name names, so
deleting never lets two runs in.

An offline run (``--image``) takes one lock per image file instead, keyed
by the image's real path, in the same directory.

Where the VM lock lives (one file per QMP socket, named by a hash of the
socket's real path, so every path to the same socket shares one lock):

1. ``$QMPBACKUP_LOCK_DIR`` when set (created 0700; it must be this user's
   and writable by nobody else);
2. for root, ``/run/qmpbackup``: created 0700 by root in ``/run``, where only
   root can create anything, so no other user can plant it first (a
   predictable name in ``/run/lock`` or ``/tmp``, both world-writable, let any
   user create it before root and block every backup);
3. for other users, ``qmpbackup`` in their own runtime directory:
   ``$XDG_RUNTIME_DIR``, else ``/run/user/<uid>`` (the same folder when a
   session exists; cron without one still finds it while the user lingers).

A lock directory (or runtime directory) that is a symlink, is owned by
anyone else, or is writable by group or others is refused with one line
(exit 2): another user could plant or remove lock files in it.

The chain lock is ``.qmpbackup.lock`` inside the chain folder, so it follows
the folder to whatever host mounts it.  That folder may be writable by
others, so the lock file is reached like any folder content
(:class:`~libqmpbackup.store.handles.Folder`): never through a symlink,
type and owner checked on an ``O_PATH`` descriptor before it is opened for
I/O (a FIFO or device is never opened), one link only (a hard link to a
host file is refused, not written), and never truncated: the holder's pid
is written over the start of the checked file.
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
from libqmpbackup.store.handles import Folder, kind
from libqmpbackup.store.names import LOCK_NAME

log = logging.getLogger(__name__)

LOCK_DIR_ENV = "QMPBACKUP_LOCK_DIR"
RUN_DIR = Path("/run")
"""Where root's lock directory and users' runtime directories are (tests move it)."""
LOCK_ATTEMPTS = 5


def _private_dir_problem(path: Path) -> str:
    """Why PATH (created 0700 if missing) is no lock directory of ours; "" when it is.

    Another user's directory, or one others can write, could hold files or
    symlinks that block our locks forever, or have them removed under us.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    return _owned_dir_problem(path.lstat())


def _owned_dir_problem(info: os.stat_result) -> str:
    if not stat.S_ISDIR(info.st_mode):
        return f"is {kind(info)}, not a directory"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by this user"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "is writable by other users"
    return ""


def _checked_lock_dir(path: Path, how: str) -> Path:
    try:
        problem = _private_dir_problem(path)
    except OSError as err:
        raise UsageError(f"lock directory {path} ({how}): {err.strerror}") from err
    if problem:
        raise UsageError(f"lock directory {path} ({how}) {problem}: refused (remove it, "
                         f"or set {LOCK_DIR_ENV} to a directory only this user can write)")
    return path


def _runtime_dir() -> Path:
    """A non-root user's own runtime directory (see the module docstring)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    candidates = [*([Path(xdg)] if xdg else []), RUN_DIR / "user" / str(os.geteuid())]
    for candidate in candidates:
        try:
            problem = _owned_dir_problem(candidate.lstat())
        except OSError:
            continue
        if not problem:
            return candidate
        log.warning("ignoring runtime directory %s: it %s", candidate, problem)
    raise UsageError(f"no private runtime directory for the VM locks (tried "
                     f"{', '.join(map(str, candidates))}); set {LOCK_DIR_ENV}")


def lock_dir() -> Path:
    """The directory of VM locks (see the module docstring for the order)."""
    explicit = os.environ.get(LOCK_DIR_ENV)
    if explicit:
        return _checked_lock_dir(Path(explicit), LOCK_DIR_ENV)
    if os.geteuid() == 0:
        return _checked_lock_dir(RUN_DIR / "qmpbackup", "root's lock directory")
    return _checked_lock_dir(_runtime_dir() / "qmpbackup", "in the runtime directory")


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


def _keyed_lock_path(kind_: str, key: str, directory: Optional[Path]) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (directory or lock_dir()) / f"{kind_}-{digest}.lock"


def vm_lock_path(key: str, directory: Optional[Path] = None) -> Path:
    return _keyed_lock_path("vm", key, directory)


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file, for the error message."""
    try:
        pid = os.pread(fd, 64, 0).decode(errors="replace").split()[0]
    except (OSError, IndexError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _open_lock_file(folder: Folder, name: str, unusable: type[QmpBackupError],
                    refused: type[QmpBackupError]) -> Optional[int]:
    """The lock file NAME of FOLDER, opened read-write after the folder rule; None: try again.

    An existing file must be a regular file with one link owned by this
    user or root, checked before it is opened for I/O
    (:meth:`Folder.open`): a planted symlink, hard link, FIFO or device is
    refused (REFUSED) and nothing is written to it.  A missing one is
    created ``O_EXCL``.
    """
    try:
        return folder.open(name, "lock file", write=True).fd
    except FileNotFoundError:
        pass
    except ChainError as err:
        raise refused(f"{err} (remove it once no backup runs)") from err
    except TargetError as err:
        raise unusable(str(err)) from err
    try:
        return folder.create(name, "lock file").fd
    except TargetError as err:
        if folder.entry(name) is not None:
            return None     # another run created it meanwhile
        raise unusable(str(err)) from err


def _same_entry(folder: Folder, name: str, fd: int) -> bool:
    """Whether NAME in FOLDER (the entry itself, never followed) is the file FD holds."""
    named = folder.entry(name)
    opened = os.fstat(fd)
    return named is not None and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _try_lock(folder: Folder, name: str, what: str, unusable: type[QmpBackupError],
              refused: type[QmpBackupError]) -> Optional[int]:
    """A descriptor holding the lock on the file NAME names now, or None to try again.

    A holder that releases unlinks the file, so the file we opened may be
    gone by the time our flock succeeds; only a lock on the file NAME still
    names counts.
    """
    fd = _open_lock_file(folder, name, unusable, refused)
    if fd is None:
        return None
    path = folder.path / name
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _holder(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise unusable(f"cannot lock {path}: {err.strerror}") from err
        raise LockBusyError(f"another backup is running on {what}{holder}; "
                            f"lock {path}") from err
    if not _same_entry(folder, name, fd):
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def hold(path: Path, what: str, owner: str, unusable: type[QmpBackupError] = UsageError,
         refused: type[QmpBackupError] = UsageError) -> Iterator[None]:
    """Hold an exclusive lock on PATH or fail at once with LockBusyError (see :func:`hold_in`)."""
    with Folder.open_root(path.parent) as folder, \
            hold_in(folder, path.name, what, owner, unusable, refused):
        yield


@contextlib.contextmanager
def hold_in(folder: Folder, name: str, what: str, owner: str,
            unusable: type[QmpBackupError] = UsageError,
            refused: type[QmpBackupError] = UsageError) -> Iterator[None]:
    """Hold an exclusive lock on NAME in FOLDER (a held descriptor) or fail with LockBusyError.

    The file exists only while held (or after a killed holder, harmlessly).
    WHAT names the locked thing in messages; OWNER is written into the file
    after the pid, for admins.  A lock file that cannot be opened raises
    UNUSABLE, one that breaks the folder rule REFUSED: usage errors in the
    lock directory (the admin's own), a target error and a chain error in a
    chain folder (folder content).
    """
    for _ in range(LOCK_ATTEMPTS):
        fd = _try_lock(folder, name, what, unusable, refused)
        if fd is not None:
            break
    else:
        raise LockBusyError(f"another backup is running on {what}: lock {folder.path / name} "
                            "keeps changing")
    try:
        with contextlib.suppress(OSError):  # a courtesy: a full disk must not block
            os.pwrite(fd, f"{os.getpid()} {owner}\n".encode(), 0)
        log.debug("locked %s", folder.path / name)
        yield
    finally:
        with contextlib.suppress(OSError, QmpBackupError):
            if _same_entry(folder, name, fd):  # while still held: see _try_lock
                os.unlink(name, dir_fd=folder.fd)
        os.close(fd)                                 # releases the flock


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
    with Folder.open_root(root) as folder, chain_lock_in(folder):
        yield


@contextlib.contextmanager
def chain_lock_in(folder: Folder) -> Iterator[None]:
    """:func:`chain_lock` through the chain folder's held descriptor."""
    with hold_in(folder, LOCK_NAME, f"target {folder.path}", str(folder.path), TargetError,
                 ChainError):
        yield
