"""Keeping a guest shutdown from killing a running backup, then honouring it.

With QEMU's default shutdown action (``poweroff``) a guest that powers off
mid-backup makes QEMU exit, which cancels the jobs: the 3 a.m. backup fails
because the guest's own cron shut it down.  For the duration of the jobs the
tool sets ``set-action shutdown=pause``: a guest shutdown then only stops the
VM (runstate ``shutdown``) while the jobs finish.  Afterwards the action is set
back, and if the guest asked to shut down meanwhile, the tool finishes what
QEMU would have done: ``quit``.

QEMU 7.2 cannot report its current actions, so "set back" means the action
on QEMU's command line (``-no-shutdown`` or ``-action shutdown=...``), read
from /proc/<pid>/cmdline of the process on the other end of the QMP socket;
when that is unknown (tcp socket, no /proc) QEMU's default ``poweroff`` is
assumed.  An action changed at run time by another QMP client is not known
and is replaced by the command-line one.  A host-side ``quit`` or SIGTERM is
unaffected: QEMU always exits for those.

A qemu-storage-daemon (offline backup) has no guest: the guard does nothing.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator, Optional, Sequence

from libqmpbackup.errors import VMGoneError
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession

log = logging.getLogger(__name__)

DEFAULT_ACTION = "poweroff"
HOLD_ACTION = "pause"


def configured_shutdown_action(argv: Sequence[str]) -> str:
    """The shutdown action a QEMU command line sets (the last option wins, as in QEMU)."""
    action = DEFAULT_ACTION
    args = iter(argv[1:])
    for arg in args:
        option = "-" + arg.lstrip("-") if arg.startswith("-") else ""
        if option == "-no-shutdown":
            action = HOLD_ACTION
        elif option == "-action":
            for item in next(args, "").split(","):
                key, _, value = item.partition("=")
                if key == "shutdown" and value:
                    action = value
    return action


def qemu_command_line(pid: Optional[int]) -> Optional[list[str]]:
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as err:
        log.debug("cannot read the command line of pid %s: %s", pid, err.strerror)
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


class ShutdownGuard:
    """Holds a guest shutdown back while the jobs run; see the module docstring."""

    def __init__(self, session: QmpSession) -> None:
        self.session = session
        self.active = session.has_guest
        argv = qemu_command_line(session.peer_pid) if self.active else None
        self.configured = configured_shutdown_action(argv) if argv else DEFAULT_ACTION
        self.known = argv is not None
        self.guest_shut_down = False

    async def restore(self) -> None:
        """Set the command-line action again."""
        if self.active and self.configured != HOLD_ACTION:
            await self._set(self.configured)

    async def settle_interrupted_run(self) -> None:
        """A killed run may have held a guest shutdown back: restore the action, say so."""
        if not self.active:
            return
        await self.restore()
        status = (await self.session.execute("query-status")).get("status")
        if status == "shutdown":
            log.warning("the guest shut down while an interrupted backup held it back; "
                        "the VM stays paused in state 'shutdown' (quit or reset it)")

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """Within this block a guest shutdown pauses the VM instead of ending QEMU."""
        if not self.active or self.configured == HOLD_ACTION:
            yield
            return
        with self.session.events(["SHUTDOWN"]) as shutdowns:
            try:
                await self._set(HOLD_ACTION)
                yield
            finally:
                events = shutdowns.drain()
                with contextlib.suppress(VMGoneError):  # nothing left to restore
                    await self._set(self.configured)
                self.guest_shut_down = any(e.data.get("guest", False) for e in events)

    async def finish(self) -> None:
        """If the guest shut down while held back, do what its configured action says."""
        if not self.guest_shut_down:
            return
        with contextlib.suppress(VMGoneError):  # gone already, or closed before replying to quit
            status = (await self.session.execute("query-status")).get("status")
            if status != "shutdown":
                log.info("the guest shut down during the backup, but the VM is %s now: "
                         "leaving it", status)
                return
            log.warning("the guest shut down during the backup; shutdown action is %s%s: "
                        "quitting QEMU now", self.configured,
                        "" if self.known else " (QEMU's default; command line unknown)")
            await self.session.execute("quit")

    async def _set(self, action: str) -> None:
        if not self.session.connected:
            return
        try:
            await self.session.execute("set-action", {"shutdown": action})
        except QmpCommandError as err:
            log.warning("could not set the shutdown action to %s: %s", action, err.desc)
        else:
            log.debug("shutdown action: %s", action)
