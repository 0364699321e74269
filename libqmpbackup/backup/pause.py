"""--pause: the VM stands still while its disks are copied, and runs again afterwards.

(``--fleecing`` pauses it the same way for the few milliseconds of its switch.)

A VM that a backup left paused is an outage nobody notices until morning,
so once the tool has paused it, the resume (QMP ``cont``) is attempted on
every way out of the copy: success, a failed or cancelled job, a refused
command, SIGINT/SIGTERM.  A VM that was not running before the run (paused
by its admin, prelaunch ``-S``, shut down) is left exactly as it was: the
tool resumes only what it paused itself.

A run killed with SIGKILL cannot resume anything, so before pausing, the
tool leaves a marker in QEMU itself: a QOM object named
:data:`PAUSE_MARKER`.  It dies with the QEMU process, so it can never
describe another VM or an old boot.  The next run finds it
(:func:`resume_after_killed_run`), resumes the VM if it is still paused, and
removes it.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Optional

from libqmpbackup.errors import VMGoneError
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.names import TOOL_PREFIX

log = logging.getLogger(__name__)

PAUSE_MARKER = f"{TOOL_PREFIX}paused"
"""QOM object id: "a qmpbackup run paused this VM and has not resumed it yet"."""


async def _status(session: QmpSession) -> str:
    return str((await session.execute("query-status")).get("status", ""))


async def _has_marker(session: QmpSession) -> bool:
    return any(o.get("name") == PAUSE_MARKER
               for o in await session.execute("qom-list", {"path": "/objects"}))


async def _remove_marker(session: QmpSession) -> None:
    try:
        await session.execute("object-del", {"id": PAUSE_MARKER})
    except QmpCommandError as err:
        log.warning("could not remove the pause marker %s: %s", PAUSE_MARKER, err.desc)


async def resume_after_killed_run(session: QmpSession) -> None:
    """Resume a VM that a killed ``--pause`` run left paused (see the module docstring)."""
    if not session.has_guest or not await _has_marker(session):   # a storage daemon: no VM
        return
    if await _status(session) == "paused":
        await session.execute("cont")
        log.warning("resumed the VM: an interrupted qmpbackup run (--pause or --fleecing) "
                    "had left it paused")
    await _remove_marker(session)


class VmPause:
    """``async with VmPause(session)``: the VM is paused inside the block if it was running.

    A resume that fails is logged at once and kept in ``resume_error`` so the
    run can end with an error after its backup is safely recorded.
    """

    def __init__(self, session: QmpSession, *, option: str = "--pause",
                 purpose: str = "the backup") -> None:
        self.session = session
        self.option = option
        self.purpose = purpose
        self.paused = False
        self.resume_error: Optional[str] = None

    async def __aenter__(self) -> VmPause:
        status = await _status(self.session)
        if status != "running":
            log.info("%s: the VM is %s already; it stays so", self.option, status)
            return self
        await self.session.execute("object-add", {
            "qom-type": "secret", "id": PAUSE_MARKER, "data": f"paused by qmpbackup {self.option}"})
        # From here on the VM may be paused whatever happens (a cancelled
        # `stop` may still have reached QEMU): resume on every way out.
        self.paused = True
        try:
            await self.session.execute("stop")
        except BaseException:
            await self._resume()
            raise
        log.info("paused the VM for %s (%s)", self.purpose, self.option)
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        await self._resume()

    async def _resume(self) -> None:
        """Resume and drop the marker; never raises, so the run's own error stays the one reported."""
        if not self.paused:
            return
        self.paused = False
        if not self.session.connected:
            return   # QEMU is gone: nothing is paused any more
        try:
            await self.session.execute("cont")
            await _remove_marker(self.session)
        except QmpCommandError as err:
            self.resume_error = (f"could not resume the VM after the backup ({err.desc}): "
                                 "it is still paused; resume it with the QMP command cont")
            log.error("%s", self.resume_error)
        except VMGoneError:
            return
        else:
            log.info("resumed the VM")
