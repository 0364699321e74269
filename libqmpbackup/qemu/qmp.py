"""A QMP session with the guarantees the backup code relies on.

qemu.qmp does the protocol; this module adds what an unattended tool needs:
a connect timeout (a QMP socket serves one client, a second one would wait
for the greeting forever), one-line errors instead of library exceptions,
and a way to notice that QEMU went away while we wait for job events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional, Sequence, Union

from qemu.qmp import ConnectError as QmpConnectError
from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)

from libqmpbackup.errors import CommandRefused, ConnectError, UsageError, VMGoneError

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 5.0
Address = Union[str, tuple[str, int]]


def parse_address(spec: str) -> Address:
    """Unix socket path, or ``tcp:HOST:PORT``."""
    if spec.startswith("tcp:"):
        host, sep, port = spec[4:].rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"invalid QMP address {spec!r}: expected tcp:HOST:PORT")
        return (host, int(port))
    return spec


def check_unix_socket(path: str, what: str = "QMP socket") -> None:
    """Turn the common mistakes into messages a user understands."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise ConnectError(f"{what} {path} does not exist") from err
    except OSError as err:
        raise ConnectError(f"cannot access {what} {path}: {err.strerror}") from err
    if not stat.S_ISSOCK(mode):
        raise ConnectError(f"{path} is not a socket (expected the VM's {what})")


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process that created the listening socket, if the OS tells."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option,
                                                               struct.calcsize("3i")))
    except OSError:
        return None
    return pid or None


def _refusal(cause: Optional[BaseException]) -> str:
    """Why a connection attempt failed, in the words an admin needs."""
    if isinstance(cause, (ConnectionRefusedError, FileNotFoundError)):
        return "connection refused (is the VM running?)"
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return "the peer does not speak QMP"


@dataclass(frozen=True)
class QmpEvent:
    """One QMP event, its data as a plain dict (qemu.qmp types message fields as ``object``)."""

    name: str
    data: dict[str, Any]

    @classmethod
    def of(cls, message: Message) -> QmpEvent:
        data = message.get("data")
        return cls(str(message.get("event", "")), data if isinstance(data, dict) else {})


class EventStream:
    """The events one :meth:`QmpSession.events` block receives, as :class:`QmpEvent`."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[QmpEvent]:
        async for message in self._listener:
            yield QmpEvent.of(message)

    def drain(self) -> list[QmpEvent]:
        """The events received and not yet iterated, without waiting."""
        return [QmpEvent.of(m) for m in self._listener.clear()]


class QmpCommandError(CommandRefused):
    """QEMU answered a command with an error; the layer that sent it decides what that means."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class _Client(QMPClient):
    """qemu.qmp's client without its eager message logging.

    qemu.qmp (0.0.4-0.0.6) formats every message as indented JSON for its debug
    log even when nothing logs at debug level: ~0.4 s of CPU for the reply of
    ``query-qmp-schema`` here, and a few ms for every discovery reply.  The
    messages are still logged, and formatted, with ``--debug``.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


class QmpSession:
    """One connection to a VM's QMP monitor."""

    connect_timeout = DEFAULT_CONNECT_TIMEOUT

    def __init__(self, address: str, peer: str = "") -> None:
        self.spec = address
        self.peer = peer or f"QMP socket {address}"   # what messages call the other end
        self.address = parse_address(address)
        self.client = _Client("qmpbackup")
        self.peer_pid: Optional[int] = None   # QEMU's pid when known (unix socket on Linux)
        # node name -> disk id of the images a qemu-storage-daemon opened for
        # this run; None when the peer is a VM, whose disks are its devices
        self.image_nodes: Optional[dict[str, str]] = None

    async def __aenter__(self) -> QmpSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self._open(), timeout=self.connect_timeout)
        except asyncio.TimeoutError as err:
            greeted = self.client.greeting is not None
            await self.close()
            if greeted:   # QEMU 7.2 right after a start with --preconfig, now and then
                raise ConnectError(
                    f"{self.peer} greeted but did not answer qmp_capabilities within "
                    f"{self.connect_timeout:g} s: its monitor is stuck; try again, and if "
                    "it stays so, restart the VM") from err
            raise ConnectError(
                f"{self.peer} did not greet within {self.connect_timeout:g} s: "
                "another client (libvirt, a monitor, another tool) holds it, "
                "or it is not a QMP socket") from err
        except OSError as err:
            raise ConnectError(f"cannot connect to {self.peer}: "
                               f"{_refusal(err)}") from err
        except QmpConnectError as err:
            await self.close()
            raise ConnectError(f"cannot connect to {self.peer}: "
                               f"{_refusal(err.exc)}") from err
        if self.client.greeting is not None:
            version = self.client.greeting.QMP.version
            log.debug("connected to QEMU %s (pid %s)", version, self.peer_pid)

    async def _open(self) -> None:
        if isinstance(self.address, str):
            check_unix_socket(self.address)
            await self.client.connect(await self._unix_connection(self.address))
        else:
            await self.client.connect(self.address)

    async def _unix_connection(self, path: str) -> socket.socket:
        """Connect by hand to learn the peer's pid (SO_PEERCRED), which qemu.qmp hides."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        self.peer_pid = peer_pid(sock)
        return sock

    async def close(self) -> None:
        try:
            await self.client.disconnect()
        except (QMPError, OSError, EOFError) as err:
            # The session is over either way; the cause was already reported.
            log.debug("ignoring error on disconnect: %s", err)

    @property
    def qemu_version(self) -> Optional[tuple[int, int]]:
        """(major, minor) from QEMU's greeting; None when it is missing or malformed."""
        greeting = self.client.greeting
        qemu = greeting.QMP.version.get("qemu") if greeting is not None else None
        if not isinstance(qemu, dict):
            return None
        major, minor = qemu.get("major"), qemu.get("minor")
        if isinstance(major, int) and isinstance(minor, int):
            return major, minor
        return None

    @property
    def has_guest(self) -> bool:
        """False for a qemu-storage-daemon: no guest to quiesce, pause or shut down."""
        return self.image_nodes is None

    @property
    def connected(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def execute(self, command: str, arguments: Optional[dict[str, Any]] = None) -> Any:
        try:
            return await self.client.execute(command, arguments)
        except ExecuteError as err:
            raise QmpCommandError(command, err.error_class, str(err)) from err
        except (ExecInterruptedError, StateError, EOFError, ConnectionError) as err:
            raise VMGoneError(
                f"lost the connection to {self.peer} during {command}: "
                "QEMU quit or was killed") from err

    @property
    def passes_fds(self) -> bool:
        """A unix socket carries descriptors (SCM_RIGHTS); over ``tcp:`` QEMU only gets names."""
        return isinstance(self.address, str)

    async def add_fd(self, fd: int, opaque: str) -> int:
        """Hand FD to QEMU in a new fdset; its id (QEMU then opens the file as ``/dev/fdset/N``).

        OPAQUE is shown by ``query-fdsets``: it lets the next run recognise
        and remove an fdset a killed run left behind.
        """
        return (await self.pass_fd(fd, opaque))[0]

    async def pass_fd(self, fd: int, opaque: str) -> tuple[int, int]:
        """:meth:`add_fd`, also returning the descriptor's number inside QEMU."""
        try:
            self.client.send_fd_scm(fd)
        except (QMPError, StateError, OSError) as err:
            raise VMGoneError(f"cannot pass a file descriptor to {self.peer}: {err}") from err
        reply = await self.execute("add-fd", {"opaque": opaque})
        return int(reply["fdset-id"]), int(reply["fd"])

    async def remove_fdset(self, fdset: int) -> bool:
        """Drop fdset FDSET (QEMU closes its copy once no node uses it); False if that failed."""
        if not self.connected:
            return False
        try:
            await self.execute("remove-fd", {"fdset-id": fdset})
        except QmpCommandError as err:
            log.warning("could not remove fdset %d: %s", fdset, err.desc)
            return False
        except VMGoneError:
            return False
        return True

    async def wait_disconnected(self) -> None:
        """Return once the connection is gone (QEMU quit, crashed or closed the socket)."""
        while self.client.runstate == Runstate.RUNNING:
            await self.client.runstate_changed()

    @contextlib.contextmanager
    def events(self, names: Sequence[str], job_id: Optional[str] = None) -> Iterator[EventStream]:
        """Receive NAMES events (of one block job only, with JOB_ID) while the block runs.

        Events are queued from the moment the block is entered, so a caller
        that enters before issuing a command cannot miss what the command causes.
        """
        def belongs_to_job(message: Message) -> bool:
            data = QmpEvent.of(message).data
            return job_id is None or job_id in (data.get("device"), data.get("id"))
        listener = EventListener(list(names), event_filter=belongs_to_job)
        with self.client.listen(listener):
            yield EventStream(listener)
