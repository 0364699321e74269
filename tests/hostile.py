"""Helpers for tests that play the other user: a hostile folder, a FIFO nobody may open."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

NOBODY = 65534
"""The unprivileged user who can write the shared folder."""


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
