"""Named instants of a backup run, where the kill-anywhere tests stop it.

The run calls :func:`reached` at each step boundary.  In production
:data:`PAUSE` is None and the call does nothing; no option, environment
variable or file turns it on.  Only a test wrapper (``tests/paused_run.py``)
sets the attribute in its own process before it calls the CLI's ``main``,
then SIGKILLs the process once the ready file appears.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Coroutine, Optional

log = logging.getLogger(__name__)

STEPS = (
    "targets-created",     # .partial files exist, QEMU nodes and bitmaps not yet touched
    "jobs-running",        # the transaction was accepted, QEMU copies
    "jobs-done",           # every job succeeded and every target is closed
    "intent-written",      # the intent record names the files, none renamed yet
    "renamed",             # the files have their final names, nothing recorded
    "commit-written",      # the new metadata is on disk under its temp name, not in place
    "committed",           # the metadata lists the backup
    "finished",            # everything settled, the run is about to return
)


@dataclass(frozen=True)
class Pause:
    step: str
    ready: Path                       # created when the step is reached
    signum: Optional[int] = None      # send this signal to the own process and go on, else wait


PAUSE: Optional[Pause] = None


def reached(step: str) -> None:
    assert step in STEPS, step
    pause = PAUSE
    if pause is None or pause.step != step:
        return
    pause.ready.write_text(f"{os.getpid()}\n")
    if pause.signum is not None:
        os.kill(os.getpid(), pause.signum)
        return
    while True:   # the test kills the process here; blocking the event loop is the point
        time.sleep(60)



async def finish_regardless(step: Coroutine[Any, Any, None]) -> None:
    """Run STEP to its end even when the run is cancelled (a signal) meanwhile.

    Used once the backup is recorded: cancelling then would undo nothing but
    turn a success into exit 130/143, and a cron job would report a backup
    that exists as failed.  The cancellation is absorbed here, so the run
    returns its result and the runner learns from that (a command that
    returns after a signal finished what it had recorded).
    """
    task = asyncio.ensure_future(step)
    while True:
        try:
            await asyncio.shield(task)
            return
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            current = asyncio.current_task()
            uncancel = getattr(current, "uncancel", None)   # Python >= 3.11
            if uncancel is not None:
                uncancel()
            log.warning("interrupted after the backup was recorded: finishing the run")
