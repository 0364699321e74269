"""Asyncio client for the QEMU guest agent (qemu-ga).

The guest agent speaks QMP-like JSON but is not QMP: it sends no greeting,
it has no command ids, and the virtio-serial channel it sits on outlives
every client.  A reply that a previous client never read (because it timed
out or was killed) is still waiting in the channel and would be taken as the
answer to our first command.  So every connection starts by resynchronising
with ``guest-sync-delimited``: the agent answers it with a ``0xFF`` byte
followed by the reply, and everything before that byte is stale.  After a
command times out the same thing happens again before the next command,
because its late reply may still arrive.

Only one client can use the agent socket at a time (QEMU's chardev serves a
single connection); keep connections short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Optional

from libqmpbackup.errors import AgentError, ConnectError
from libqmpbackup.printable import escape

log = logging.getLogger(__name__)

#: Byte that makes the agent reset its JSON parser when we send it, and that
#: precedes the reply to ``guest-sync-delimited`` when the agent sends it.
SYNC_DELIMITER = b"\xff"

#: Replies are single JSON lines.  The guest is untrusted: a line longer
#: than this ends the call with an error instead of growing our memory.
#: 1 MiB holds every reply the tool needs (fsfreeze, fsinfo of hundreds of
#: filesystems); callers that read bulk output (``guest-exec-status``) may
#: pass a larger ``read_limit``.
READ_LIMIT = 1 << 20

#: Seconds every call may take.  A live agent answers in milliseconds even in
#: a busy guest; a socket without an agent behind it (qemu-ga not running)
#: stays silent, and each run that meets one pays this wait once.
DEFAULT_TIMEOUT = 5.0

FSFREEZE_STATUSES = ("thawed", "frozen")


def encode_command(command: str, args: Optional[dict[str, Any]] = None) -> bytes:
    """Serialise one agent command as the single line the agent expects."""
    message: dict[str, Any] = {"execute": command}
    if args:
        message["arguments"] = args
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_line(line: bytes) -> Any:
    """The JSON value of one reply line; any line that is not UTF-8 JSON raises ValueError.

    The guest is untrusted and chooses every byte: besides garbage
    (ValueError) and bytes that are not UTF-8 (UnicodeDecodeError), a line of
    deeply nested ``[[[…]]]`` well under :data:`READ_LIMIT` makes the JSON
    parser raise RecursionError.  All of them are one thing here, an
    unreadable reply, so no caller ever sees a parser's own exception.
    """
    try:
        return json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError) as err:    # UnicodeDecodeError is a ValueError
        raise ValueError(f"{type(err).__name__}: {str(err)[:80]}") from err


def decode_reply(command: str, line: bytes) -> Any:
    """Return the ``return`` value of a reply line to *command*.

    Raises :class:`AgentError` for an ``error`` reply and for anything that is
    not a reply at all, naming the command so the one-line message says what
    failed.
    """
    try:
        reply = parse_line(line)
    except ValueError as err:
        raise AgentError(
            f"guest agent sent an unreadable reply to {command}: {_shorten(line)}"
        ) from err
    if not isinstance(reply, dict):
        raise AgentError(f"guest agent sent an unexpected reply to {command}: {_shorten(line)}")
    if "error" in reply:
        error = reply["error"]
        if isinstance(error, dict):
            desc = error.get("desc", "no description")
            cls = error.get("class", "GenericError")
        else:
            desc, cls = error, "GenericError"
        raise AgentError(f"guest agent refused {command}: {_shorten_value(desc)} "
                         f"({_shorten_value(cls)})")
    if "return" not in reply:
        raise AgentError(f"guest agent sent an unexpected reply to {command}: {_shorten(line)}")
    return reply["return"]


def _shorten(data: bytes, limit: int = 120) -> str:
    """At most LIMIT characters of what the guest sent, printable (its bytes are untrusted)."""
    text = data[:4 * limit].decode("utf-8", errors="replace").strip()
    return escape(text[:limit]) + ("…" if len(text) > limit or len(data) > 4 * limit else "")


def _shorten_value(value: Any) -> str:
    """A value from a reply, for a message: a string or number as it is, else just its type."""
    if isinstance(value, str):
        return _shorten(value.encode())
    if value is None or isinstance(value, (bool, int, float)):
        return _shorten(repr(value).encode())
    return f"a JSON {type(value).__name__}"


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass(eq=False)
class GuestAgent:
    """One connection to a guest agent's host-side unix socket.

    Use as ``async with GuestAgent(path) as ga:``; every call is bounded by
    *timeout* seconds because an agent that is not running inside the guest
    looks exactly like a slow one: the socket accepts and stays silent.
    """

    path: str
    timeout: float = DEFAULT_TIMEOUT
    read_limit: int = READ_LIMIT
    _reader: Optional[asyncio.StreamReader] = field(default=None, init=False, repr=False)
    _writer: Optional[asyncio.StreamWriter] = field(default=None, init=False, repr=False)
    _lock: Optional[asyncio.Lock] = field(default=None, init=False, repr=False)
    _need_sync: bool = field(default=True, init=False, repr=False)

    async def __aenter__(self) -> GuestAgent:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the socket and resynchronise, so the first reply read is ours."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=self.read_limit), self.timeout
            )
        except asyncio.TimeoutError as err:
            raise ConnectError(
                f"cannot connect to guest agent socket {self.path}: "
                f"no answer within {_format_seconds(self.timeout)}"
            ) from err
        except OSError as err:
            reason = err.strerror or str(err)
            raise ConnectError(f"cannot connect to guest agent socket {self.path}: {reason}") from err
        # Created here, not in __init__, because on Python < 3.10 a Lock binds
        # to the event loop that is current when it is created.
        self._lock = asyncio.Lock()
        self._need_sync = True
        log.debug("connected to guest agent at %s", self.path)
        try:
            async with self._lock:
                await self._sync()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the socket; the agent keeps running and waits for the next client."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        try:
            await writer.wait_closed()
        except OSError as err:
            # The peer (QEMU) may already be gone; closing is all we wanted.
            log.debug("closing guest agent socket %s: %s", self.path, err)

    async def execute(
        self, command: str, args: Optional[dict[str, Any]] = None, *, timeout: Optional[float] = None
    ) -> Any:
        """Run *command* and return its ``return`` value.

        *timeout* overrides the connection's default for commands that may
        legitimately take long (a freeze flushes every dirty page first).
        Raises :class:`AgentError` if the agent refuses, does not answer in
        time or the connection breaks.
        """
        if self._writer is None or self._lock is None:
            raise AgentError(f"guest agent at {self.path} is not connected (sending {command})")
        async with self._lock:
            if self._need_sync:
                await self._sync()
            line = await self._roundtrip(
                command, encode_command(command, args), self.timeout if timeout is None else timeout
            )
        return decode_reply(command, line)

    async def ping(self) -> None:
        """Fail unless the agent inside the guest answers."""
        await self.execute("guest-ping")

    async def fsfreeze_freeze(self, timeout: Optional[float] = None) -> int:
        """Freeze all guest filesystems; return how many were frozen.

        If this raises (timeout, broken connection), the guest may still have
        frozen, or may freeze a moment later: callers must thaw in their
        cleanup whatever this returned.
        """
        reply = await self.execute("guest-fsfreeze-freeze", timeout=timeout)
        return self._expect_int("guest-fsfreeze-freeze", reply)

    async def fsfreeze_thaw(self, timeout: Optional[float] = None) -> int:
        """Thaw the guest filesystems; return how many were thawed (0 if none were frozen)."""
        reply = await self.execute("guest-fsfreeze-thaw", timeout=timeout)
        return self._expect_int("guest-fsfreeze-thaw", reply)

    async def fsfreeze_status(self) -> str:
        """Return ``"frozen"`` or ``"thawed"`` as the agent sees it."""
        status = await self.execute("guest-fsfreeze-status")
        if not isinstance(status, str) or status not in FSFREEZE_STATUSES:   # qemu-ga: no other
            raise AgentError("guest agent sent an unexpected reply to guest-fsfreeze-status: "
                             f"{_shorten_value(status)}")
        return status

    async def get_fsinfo(self) -> list[Any]:
        """Return the agent's list of mounted guest filesystems."""
        info = await self.execute("guest-get-fsinfo")
        if not isinstance(info, list):
            raise AgentError("guest agent sent an unexpected reply to guest-get-fsinfo: "
                             f"{_shorten_value(info)}")
        return info

    @staticmethod
    def _expect_int(command: str, value: Any) -> int:
        # bool is an int subclass but never a valid count.
        if not isinstance(value, int) or isinstance(value, bool):
            raise AgentError(f"guest agent sent an unexpected reply to {command}: {_shorten_value(value)}")
        return value

    async def _roundtrip(self, command: str, data: bytes, timeout: float) -> bytes:
        """Send one command line and read one reply line, within the timeout."""
        assert self._reader is not None and self._writer is not None
        log.debug("agent <- %s", data.decode("utf-8", errors="replace").rstrip("\n"))
        # Until the reply is read in full, a late answer may still be in the
        # channel: the next command must resynchronise first.
        self._need_sync = True
        try:
            line = await asyncio.wait_for(self._send_and_readline(data), timeout)
        except asyncio.TimeoutError as err:
            raise AgentError(
                f"guest agent did not answer {command} within {_format_seconds(timeout)}"
            ) from err
        except asyncio.IncompleteReadError as err:
            raise AgentError(f"guest agent connection closed during {command} (QEMU gone?)") from err
        except (OSError, asyncio.LimitOverrunError, ValueError) as err:
            raise AgentError(f"guest agent connection failed during {command}: {err}") from err
        log.debug("agent -> %s", line.decode("utf-8", errors="replace").rstrip("\n"))
        self._need_sync = False
        return line

    async def _send_and_readline(self, data: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        self._writer.write(data)
        await self._writer.drain()
        line = await self._reader.readline()
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        return line

    async def _sync(self) -> None:
        """Discard stale data until the agent echoes a fresh sync id."""
        # A random id keeps an old sync reply, left over from an earlier
        # client, from passing for ours.
        sync_id = random.randint(1, 2**31 - 1)
        command = encode_command("guest-sync-delimited", {"id": sync_id})
        try:
            await asyncio.wait_for(self._sync_exchange(sync_id, command), self.timeout)
        except asyncio.TimeoutError as err:
            raise AgentError(
                f"guest agent did not answer guest-sync-delimited within "
                f"{_format_seconds(self.timeout)} "
                "(is qemu-ga running in the guest, and no other client connected?)"
            ) from err
        except asyncio.IncompleteReadError as err:
            raise AgentError(
                "guest agent connection closed during guest-sync-delimited (QEMU gone?)"
            ) from err
        except (OSError, asyncio.LimitOverrunError, ValueError) as err:
            raise AgentError(f"guest agent connection failed during guest-sync-delimited: {err}") from err
        self._need_sync = False

    async def _sync_exchange(self, sync_id: int, command: bytes) -> None:
        assert self._reader is not None and self._writer is not None
        log.debug("agent <- \\xff%s", command.decode("utf-8").rstrip("\n"))
        # The leading 0xFF makes the agent drop any half-received command.
        self._writer.write(SYNC_DELIMITER + command)
        await self._writer.drain()
        while True:
            stale = await self._reader.readuntil(SYNC_DELIMITER)
            if len(stale) > 1:
                log.debug("agent: discarded %d stale bytes: %s", len(stale) - 1, _shorten(stale[:-1]))
            line = await self._reader.readline()
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            log.debug("agent -> \\xff%s", line.decode("utf-8", errors="replace").rstrip("\n"))
            if sync_reply_id(line) == sync_id:
                return


def sync_reply_id(line: bytes) -> Optional[int]:
    """Return the id a ``guest-sync-delimited`` reply line carries, or None.

    Anything else (an error reply, garbage, an unrelated reply) is None, so
    the caller keeps looking for its own reply instead of failing on noise.
    """
    try:
        reply = parse_line(line)
    except ValueError:
        return None
    if isinstance(reply, dict):
        value = reply.get("return")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
