"""The key of an encrypted chain: read once from the admin's key file, handed on only as a descriptor.

Backup files of an encrypted chain are qcow2 images with LUKS encryption,
written encrypted by QEMU itself.  The key must never be readable from a
child's argv (``/proc/<pid>/cmdline`` is world-readable), a log, a ``--debug``
QMP trace or ``--json``.  So the key file is read once, after the rule (a
regular file owned by this user, no access for group or others: else exit 2),
and its bytes go into a sealed memfd:

* qemu-img gets ``--object secret,id=…,file=/dev/fd/N`` with the memfd passed;
* QEMU gets the memfd through ``add-fd`` (SCM_RIGHTS) and a ``secret`` object
  reading ``/proc/self/fd/<its number>`` (QEMU 7.2's secret object does not
  open ``/dev/fdset/N``; a memfd can be reopened through procfs by any user
  holding it, so this works when QEMU runs as another user too);
* our qemu-storage-daemon (same user) reads ``/proc/<our pid>/fd/N``.

No key check value is stored: the LUKS header of every file is the check
(opening a layer with a wrong key fails), so the metadata records only that
the chain is encrypted, and guessing the key is never cheaper than attacking
LUKS itself.

Key derivation cost: every file has its own LUKS header; QEMU's default
``iter-time`` (2 s) costs ~2.7 s of CPU per layer *opened*, ~80 s for a
31-layer restore.  :data:`DEFAULT_ITER_TIME_MS` is low on purpose: it is safe
for a key of random bytes (``qmpbackup genkey``: 256 random bits, which no
PBKDF cost changes), not for a passphrase a human chose (give that
``--encrypt-iter-time 2000`` or more).
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import stat
from pathlib import Path

from libqmpbackup.errors import UsageError

DEFAULT_ITER_TIME_MS = 50
MAX_KEY_BYTES = 65536
GENERATED_KEY_BYTES = 32
SECRET_PREFIX = "qmpbackup-key"


class Key:
    """The bytes of one key file, held in a sealed memfd; never printed."""

    def __init__(self, source: Path, data: bytes, iter_time: int = DEFAULT_ITER_TIME_MS) -> None:
        self.source = source
        self.iter_time = iter_time
        self.fd = os.memfd_create("qmpbackup-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(self.fd, data)
            os.lseek(self.fd, 0, os.SEEK_SET)
            # nobody holding the descriptor (QEMU, qemu-img) can change the key
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                        | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def __repr__(self) -> str:   # never the bytes
        return f"Key({str(self.source)!r})"

    @property
    def dev_path(self) -> str:
        """How a child that inherited the descriptor names it (qemu-img with pass_fds)."""
        return f"/dev/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @classmethod
    def load(cls, path: Path, iter_time: int = DEFAULT_ITER_TIME_MS) -> Key:
        """PATH's bytes after the key file rule; refused with exit 2 otherwise."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            raise UsageError(f"cannot open key file {path}: {err.strerror}") from err
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"key file {path} is not a regular file")
            if info.st_uid != os.geteuid():
                raise UsageError(f"key file {path} is owned by uid {info.st_uid}, not by "
                                 f"this user (uid {os.geteuid()})")
            if info.st_mode & 0o077:
                raise UsageError(f"key file {path} is accessible by group or others "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 it")
            data = os.read(fd, MAX_KEY_BYTES + 1)
        finally:
            os.close(fd)
        if not data or len(data) > MAX_KEY_BYTES:
            raise UsageError(f"key file {path} is empty or larger than {MAX_KEY_BYTES} bytes")
        return cls(path, data, iter_time)


def generate(path: Path) -> None:
    """Write a new random key (base64 text, 256 bits) to PATH, 0600; never over an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        raise UsageError(f"cannot create key file {path}: {err.strerror}") from err
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64encode(secrets.token_bytes(GENERATED_KEY_BYTES)) + b"\n")
        out.flush()
        os.fsync(out.fileno())


MAX_ITER_TIME_MS = 10000


def check_iter_time(value: int) -> int:
    """At most 10 s: opening a layer then costs ~13.5 s of CPU, well inside the CPU limit of a
    qemu-img inspection (:mod:`libqmpbackup.qemu.img_limits`, 60 s), which opens it too."""
    if not 1 <= value <= MAX_ITER_TIME_MS:
        raise UsageError(f"--encrypt-iter-time {value}: expected 1 to {MAX_ITER_TIME_MS} ms")
    return value
