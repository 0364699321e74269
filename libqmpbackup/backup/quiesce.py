"""Filesystem quiesce around the backup transaction, through the guest agent.

The freeze only has to cover the instant the transaction fixes the point in
time of every disk, so the guest is thawed as soon as QEMU accepted the
transaction, not when the copy ends.  A guest left frozen hangs every
writer inside it — worse than an inconsistent backup — so once a freeze
was attempted the thaw is attempted on every way out, including errors,
timeouts and signals, and a failed thaw is retried and reported loudly.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from types import TracebackType
from typing import Optional

from libqmpbackup.errors import AgentError, ConnectError, QmpBackupError, UsageError
from libqmpbackup.qemu import agent as agent_module
from libqmpbackup.qemu.agent import GuestAgent

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 30.0
#: A freeze longer than this stalls every writer in the guest that long; it is
#: almost always the guest's fsfreeze hooks (databases) being slow, so say so.
SLOW_FREEZE = 10.0
THAW_ATTEMPTS = 3
SLOW_FREEZE_HINT = ("writes in the guest stall for that long; its fsfreeze hooks run inside "
                    "the freeze: see their log in the guest (/var/log/qga-fsfreeze-hook.log)")


def check_quiesce_options(agent_socket: Optional[str], required: bool) -> None:
    """Refuse ``--quiesce-required`` without an agent socket before anything is touched.

    A path that is no socket at all (a typo, the VM's agent not configured)
    cannot freeze the guest, and finding that out only at the freeze would
    leave the target folder and chain bitmap created for nothing.  An agent
    that exists but does not answer is still found out at the freeze (exit 10).
    """
    if not required:
        return
    if not agent_socket:
        raise UsageError("--quiesce-required needs --agent-socket")
    try:
        is_socket = stat.S_ISSOCK(os.stat(agent_socket).st_mode)
    except OSError as err:
        raise UsageError(f"--quiesce-required: --agent-socket {agent_socket}: "
                         f"{err.strerror}") from err
    if not is_socket:
        raise UsageError(f"--quiesce-required: --agent-socket {agent_socket} is not a socket")


class Quiescer:
    """``async with Quiescer(...)``: frozen inside the block when possible.

    Without ``required`` an agent that is missing, silent or already frozen
    costs a warning and the backup goes on unquiesced (``frozen`` stays
    False, which the chain metadata records).  With ``required`` the same
    cases raise: :class:`ConnectError` (exit 3) when the agent socket cannot
    be opened, :class:`AgentError` (exit 10) when the agent does not answer,
    refuses, or the guest is frozen already.
    """

    def __init__(self, agent_socket: Optional[str], *, required: bool = False,
                 timeout: Optional[float] = None) -> None:
        check_quiesce_options(agent_socket, required)
        self.agent_socket = agent_socket
        self.required = required
        # Read at run time, not bound as a default, so tests can shorten it.
        self.timeout = agent_module.DEFAULT_TIMEOUT if timeout is None else timeout
        self.frozen = False
        self.thaw_error: Optional[str] = None
        self._agent: Optional[GuestAgent] = None

    def _give_up(self, reason: str, error: type[QmpBackupError] = AgentError) -> None:
        if self.required:
            raise error(f"--quiesce-required: cannot freeze the guest filesystems: {reason}")
        log.warning("backing up without filesystem quiesce: %s", reason)

    async def __aenter__(self) -> Quiescer:
        if not self.agent_socket:
            self._give_up("no --agent-socket given")
            return self
        agent = GuestAgent(self.agent_socket, timeout=self.timeout)
        try:
            await agent.connect()
            status = await agent.fsfreeze_status()
        except ConnectError as err:
            self._give_up(str(err), ConnectError)
            return self
        except AgentError as err:
            await agent.close()
            self._give_up(str(err))
            return self
        except BaseException:
            await agent.close()
            raise
        if status == "frozen":
            # Someone else froze it; thawing would pull the rug from under
            # them, so it is left frozen and not touched at all.
            await agent.close()
            self._give_up("the guest filesystems are already frozen by someone else "
                          "(left frozen; whoever froze them must thaw them)")
            return self
        # From here on the guest may be frozen whatever happens next, so the
        # agent is kept for the thaw: __aexit__ does it, or the handlers
        # below when __aenter__ itself fails (then __aexit__ never runs).
        self._agent = agent
        started = time.monotonic()
        try:
            count = await agent.fsfreeze_freeze(timeout=FREEZE_TIMEOUT)
        except AgentError as err:
            # The guest may freeze anyway (a slow freeze that timed out).
            reason = str(err)
        except BaseException:
            # Cancelled (SIGINT/SIGTERM) while the freeze was in flight.
            await self._thaw()
            raise
        else:
            # The agent freezes only filesystems it can (not tmpfs, not raw
            # block devices): nothing frozen means nothing was made consistent.
            reason = "" if count else "the guest agent found no filesystem to freeze"
        if reason:
            try:
                self._give_up(reason)
            except AgentError:
                await self._thaw()
                raise
            return self
        self.frozen = True
        took = time.monotonic() - started
        log.info("froze %d guest filesystem(s) in %.2f s", count, took)
        if took > SLOW_FREEZE:
            log.warning("the guest agent took %.1f s to freeze (more than %g s): %s",
                        took, SLOW_FREEZE, SLOW_FREEZE_HINT)
        return self

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        await self._thaw()

    async def _thaw(self) -> None:
        """Thaw what we froze (or may have frozen), retrying; never raises an agent error."""
        agent, self._agent = self._agent, None
        if agent is None:
            return
        try:
            last = ""
            for _ in range(THAW_ATTEMPTS):
                try:
                    count = await agent.fsfreeze_thaw()
                except (AgentError, ConnectError) as err:
                    last = str(err)
                    log.warning("thaw failed, retrying: %s", err)
                    continue
                log.info("thawed %d guest filesystem(s)", count)
                return
            self.thaw_error = (f"could not thaw the guest filesystems ({last}): "
                               "the guest may still be frozen; run guest-fsfreeze-thaw "
                               "through the agent now")
            log.error("%s", self.thaw_error)
        finally:
            await agent.close()
