"""Progress of running jobs: a live line on a terminal, periodic log lines otherwise.

Progress is polled with ``query-jobs`` rather than derived from events,
because QEMU sends no events while a job copies.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Optional, TextIO

from libqmpbackup.backup.jobs import BackupJob
from libqmpbackup.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

TTY_INTERVAL = 1.0
LOG_INTERVAL = 10.0


def _mib(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


class ProgressReporter:
    """Callable handed to :func:`jobs.run_transaction`; runs until cancelled."""

    def __init__(self, session: QmpSession, stream: Optional[TextIO] = None, *,
                 log_interval: float = LOG_INTERVAL) -> None:
        self.session = session
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.log_interval = log_interval   # --progress-interval; the live line stays at 1 s

    async def __call__(self, jobs: list[BackupJob]) -> None:
        interval = TTY_INTERVAL if self.tty else self.log_interval
        names = {j.job_id: j.disk.disk_id for j in jobs}
        start = time.monotonic()
        try:
            while True:
                await asyncio.sleep(interval)
                states = await self.session.execute("query-jobs")
                elapsed = max(time.monotonic() - start, 1e-6)
                parts = []
                for state in states:
                    disk = names.get(state["id"])
                    if disk is None:
                        continue
                    done = state.get("current-progress", 0)
                    total = state.get("total-progress", 0) or 1
                    parts.append(f"{disk} {100 * done / total:5.1f}% "
                                 f"({_mib(done / elapsed)}/s)")
                if not parts:
                    continue
                line = "  ".join(parts)
                if self.tty:
                    self.stream.write("\r" + line)
                    self.stream.flush()
                else:
                    log.info("progress: %s", line)
        finally:
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
