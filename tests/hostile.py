"""What the attacker of the security tests does: an unprivileged user who can write the folder.

Shared by the hostile tests (tests/test_security*.py): the host files that
must never change (:class:`Victim`), running a command as that user, a FIFO
nobody may open (:class:`BlockedWriter`), and a watcher that swaps a file the
tool has just created (:class:`Swapper`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import stat
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from tests.vm import file_digest

NOBODY = 65534
"""The unprivileged user who can write the shared folder."""
IN_CREATE = 0x100
IN_NONBLOCK = os.O_NONBLOCK


@dataclass
class Victim:
    """A host file outside the backup folder; what must never change about it."""

    path: Path

    @classmethod
    def make(cls, path: Path, content: bytes = b"precious host data\n") -> Victim:
        path.write_bytes(content)
        path.chmod(0o640)
        return cls(path)

    def state(self) -> tuple[object, ...]:
        info = os.lstat(self.path)
        return (file_digest(self.path), info.st_size, stat.S_IMODE(info.st_mode),
                stat.S_IFMT(info.st_mode))


def as_nobody(*argv: str) -> None:
    """Run ARGV as an unprivileged user: the attacker who can write the shared folder."""
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    *argv], check=True)


@dataclass
class Swapper:
    """An inotify watcher on FOLDER: each new name SUFFIX is moved away and REPLACE(path) put there.

    This is the race of issue 20 finding 3: a user who owns the target folder
    sees the tool create ``X.partial`` and swaps it before qemu-img or QEMU
    open that name.  The file the tool created is kept as ``<name>.stolen``.
    """

    folder: Path
    replace: Callable[[Path], None]
    suffix: str = ".partial"
    swapped: list[str] = field(default_factory=list)
    _stop: Optional[int] = None
    _thread: Optional[threading.Thread] = None

    def __enter__(self) -> Swapper:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        assert libc.inotify_add_watch(self._fd, bytes(self.folder), IN_CREATE) >= 0
        self._stop, self._wake = os.pipe()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._thread is not None and self._stop is not None
        os.write(self._wake, b"x")
        self._thread.join(10)
        for fd in (self._fd, self._stop, self._wake):
            os.close(fd)

    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop], [], [])
            if self._stop in ready:
                return
            data = os.read(self._fd, 65536)
            offset = 0
            while offset < len(data):
                length = int.from_bytes(data[offset + 12:offset + 16], "little")
                name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
                offset += 16 + length
                if name.endswith(self.suffix) and name not in self.swapped:
                    path = self.folder / name
                    try:
                        os.rename(path, self.folder / (name + ".stolen"))
                    except FileNotFoundError:
                        continue
                    self.replace(path)
                    self.swapped.append(name)


class BlockedWriter(threading.Thread):
    """A thread opening a FIFO for writing: it blocks until somebody opens the FIFO to read.

    Still blocked after a command ran means the command never opened the FIFO.
    """

    def __init__(self, fifo: Path) -> None:
        super().__init__(daemon=True)
        self.fifo = fifo
        self.fd = -1

    def run(self) -> None:
        self.fd = os.open(self.fifo, os.O_WRONLY)

    def still_blocked(self) -> bool:
        self.join(0.5)      # a writer that was let through needs a moment to return
        return self.is_alive()


@contextlib.contextmanager
def blocked_writer(fifo: Path) -> Iterator[BlockedWriter]:
    """A :class:`BlockedWriter` on FIFO; on the way out the FIFO is opened here to let it finish."""
    writer = BlockedWriter(fifo)
    writer.start()
    assert writer.still_blocked()
    try:
        yield writer
    finally:
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(10)
        os.close(reader)
        if writer.fd >= 0:
            os.close(writer.fd)
