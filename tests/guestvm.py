"""A real, tiny Linux guest for qmpbackup's end-to-end tests.

No-OS VMs are enough to exercise QMP, but freezing filesystems through the
guest agent and checking that a backup holds a consistent filesystem need a
kernel and qemu-ga inside the VM.  ``tests/guest/build-guest.sh`` builds one
from Debian packages (cached outside the tree); this module boots it under
TCG with one virtio data disk mounted on /mnt in the guest.

The VM gets two QMP sockets because a QMP socket serves one client at a
time: ``tool_socket`` is for the code under test, ``test_socket`` for the
harness (``GuestVM.qmp``).  The guest agent socket has the same limit and
there is only one agent, so the harness connects to it only for the length
of one call (``exec``, ``agent_call``) and never while the tool holds it.

Nothing here needs pytest; fixtures turn :class:`GuestUnavailable` into a skip.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, NamedTuple, Optional, TypeVar, Union

from qemu.qmp.legacy import QEMUMonitorProtocol

from harness.qemu_vm import die_with_parent, harness_qmp
from libqmpbackup.errors import AgentError, ConnectError
from libqmpbackup.qemu.agent import GuestAgent

log = logging.getLogger(__name__)

BUILD_SCRIPT = Path(__file__).resolve().parent / "guest" / "build-guest.sh"
#: Printed by the guest's /init; keep in sync with build-guest.sh.
READY_LINE = "QMPBACKUP-GUEST-READY"
FAILED_LINE = "QMPBACKUP-GUEST-FAILED"
#: build-guest.sh exit status for "cannot be built on this machine".
EXIT_UNAVAILABLE = 77

T = TypeVar("T")


class GuestUnavailable(Exception):
    """The guest cannot be built here (no apt, no package lists, no download)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class GuestVMError(RuntimeError):
    """The guest failed to build, boot or run a command."""


@dataclass(frozen=True)
class GuestImages:
    kernel: Path
    initrd: Path


@functools.lru_cache(maxsize=1)
def ensure_guest() -> GuestImages:
    """Build the guest if the cache lacks it and return its kernel and initramfs.

    Memoised: the script's cache check costs an apt-cache call (~0.5 s).
    """
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except FileNotFoundError as err:
        raise GuestUnavailable(f"cannot run {BUILD_SCRIPT.name}: {err}") from err
    except subprocess.TimeoutExpired as err:
        raise GuestVMError(f"{BUILD_SCRIPT.name} did not finish within {err.timeout} s") from err
    stderr_lines = proc.stderr.strip().splitlines()
    if proc.returncode == EXIT_UNAVAILABLE:
        reason = stderr_lines[-1] if stderr_lines else "no reason given"
        raise GuestUnavailable(reason.replace("build-guest: guest unavailable: ", "", 1))
    if proc.returncode != 0:
        tail = "\n".join(stderr_lines[-15:])
        raise GuestVMError(f"{BUILD_SCRIPT.name} failed with status {proc.returncode}:\n{tail}")
    out_lines = proc.stdout.strip().splitlines()
    if not out_lines:
        raise GuestVMError(f"{BUILD_SCRIPT.name} printed no directory")
    directory = Path(out_lines[-1])
    images = GuestImages(kernel=directory / "vmlinuz", initrd=directory / "initramfs.gz")
    for path in (images.kernel, images.initrd):
        if not path.is_file():
            raise GuestVMError(f"{BUILD_SCRIPT.name} reported {directory} but {path.name} is missing")
    return images


def make_data_disk(path: Union[os.PathLike[str], str], size_mb: int = 64) -> Path:
    """Create a qcow2 image holding an empty ext4 filesystem (the guest's /mnt).

    64 KiB clusters, as qmpbackup's own targets use, so cluster-level
    numbers in tests match what users see.
    """
    target = Path(path)
    raw = target.with_name(target.name + ".raw-tmp")
    try:
        subprocess.run(["truncate", "-s", f"{size_mb}M", str(raw)], check=True)
        subprocess.run(["mkfs.ext4", "-F", "-q", str(raw)], check=True)
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", "-o", "cluster_size=65536", str(raw), str(target)],
            check=True,
        )
    finally:
        raw.unlink(missing_ok=True)
    return target


class ExecResult(NamedTuple):
    """Outcome of a guest command; unpacks as ``(exitcode, stdout, stderr)``.

    A command killed by a signal has ``exitcode == -signal``, as in subprocess.
    """

    exitcode: int
    stdout: str
    stderr: str


class GuestVM:
    """The test guest as a context manager: booted on enter, always killed on exit."""

    def __init__(
        self,
        images: GuestImages,
        data_disk: Union[os.PathLike[str], str],
        *,
        memory_mb: int = 512,
        log_dir: Optional[Union[os.PathLike[str], str]] = None,
        extra_args: Sequence[str] = (),
        boot_timeout: float = 60.0,
        agent_timeout: float = 5.0,
    ) -> None:
        self.images = images
        self.data_disk = Path(data_disk)
        self.memory_mb = memory_mb
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.agent_timeout = agent_timeout
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._qmp: Optional[QEMUMonitorProtocol] = None
        self._sockdir: Optional[str] = None
        # A private loop, never set as the thread's current one, so that
        # qemu.qmp's legacy client (which owns the current loop) and the
        # async agent client do not trip over each other.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = False

    # --- paths -----------------------------------------------------------------
    def _sock(self, name: str) -> str:
        if self._sockdir is None:
            raise GuestVMError("the guest VM is not started")
        return os.path.join(self._sockdir, name)

    @property
    def tool_socket(self) -> str:
        """QMP socket reserved for the code under test."""
        return self._sock("tool.sock")

    @property
    def test_socket(self) -> str:
        """QMP socket the harness uses (see :attr:`qmp`)."""
        return self._sock("test.sock")

    @property
    def qga_socket(self) -> str:
        """Host side of the guest agent channel."""
        return self._sock("qga.sock")

    @property
    def serial_log(self) -> Path:
        return self._logdir() / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self._logdir() / "qemu.log"

    def _logdir(self) -> Path:
        if self.log_dir is not None:
            return self.log_dir
        return Path(self._sock(""))

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        """Synchronous QMP client of the harness, connected on :attr:`test_socket`."""
        if self._qmp is None:
            raise GuestVMError("the guest VM is not started")
        return self._qmp

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise GuestVMError("the guest VM is not started")
        return self._proc.pid

    # --- lifecycle ---------------------------------------------------------------
    def command_line(self) -> list[str]:
        return [
            "qemu-system-x86_64",
            "-machine", "q35,accel=tcg",
            "-m", str(self.memory_mb),
            "-nodefaults",
            "-display", "none",
            "-kernel", str(self.images.kernel),
            "-initrd", str(self.images.initrd),
            "-append", "console=ttyS0 panic=-1",
            "-no-reboot",
            "-serial", f"file:{self.serial_log}",
            "-drive", f"if=virtio,file={self.data_disk},format=qcow2",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={self.qga_socket},server=on,wait=off",
            "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.tool_socket},server=on,wait=off",
            "-qmp", f"unix:{self.test_socket},server=on,wait=off",
            *self.extra_args,
        ]

    def start(self) -> GuestVM:
        """Boot the guest and return once its agent answers."""
        if self._proc is not None:
            raise GuestVMError("the guest VM is already started")
        # Unix socket paths must stay under ~100 bytes: a short dir in /tmp,
        # whatever TMPDIR or pytest's tmp_path look like.
        self._sockdir = tempfile.mkdtemp(prefix="qbg", dir="/tmp" if os.path.isdir("/tmp") else None)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        started = time.monotonic()
        try:
            cmd = self.command_line()
            log.debug("starting guest: %s", " ".join(cmd))
            with open(self.qemu_log, "wb") as qemu_log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=qemu_log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            self._wait_for_ready_line()
            booted = time.monotonic()
            self._qmp = harness_qmp(self.test_socket)
            self._qmp.connect()
            self._qmp.settimeout(30.0)
            self._wait_for_agent()
            self._ready = True
            log.debug(
                "guest ready: boot %.2f s, agent %.2f s",
                booted - started, time.monotonic() - booted,
            )
        except BaseException:
            self.stop(clean=False)
            raise
        return self

    def _wait_for_ready_line(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.boot_timeout
        while True:
            text = self._read_serial()
            if FAILED_LINE in text:
                line = next(ln for ln in text.splitlines() if FAILED_LINE in ln)
                raise GuestVMError(f"guest init failed: {line}\n{self._diagnostics()}")
            if READY_LINE in text:
                return
            if self._proc.poll() is not None:
                raise GuestVMError(
                    f"QEMU exited with status {self._proc.returncode} during boot\n{self._diagnostics()}"
                )
            if time.monotonic() > deadline:
                raise GuestVMError(
                    f"guest did not print {READY_LINE} within {self.boot_timeout:g} s\n{self._diagnostics()}"
                )
            time.sleep(0.05)

    def _wait_for_agent(self) -> None:
        # qemu-ga is started just before the ready line; give it a moment to
        # open its port.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self.agent_call(lambda ga: ga.ping(), timeout=2.0)
                return
            except (AgentError, ConnectError) as err:
                if time.monotonic() > deadline:
                    raise GuestVMError(f"guest agent never answered: {err}\n{self._diagnostics()}") from err
                time.sleep(0.1)

    def stop(self, clean: bool = True) -> None:
        """Stop QEMU, escalating to SIGKILL; never raises for an already dead VM.

        With *clean*, the data disk is thawed and unmounted in the guest first
        so host-side checks of it see a cleanly unmounted filesystem.
        """
        try:
            if clean and self._ready and self._alive():
                try:
                    self.agent_call(lambda ga: ga.fsfreeze_thaw(), timeout=5.0)
                    self.exec("umount /mnt; sync", timeout=15)
                except (AgentError, ConnectError, GuestVMError) as err:
                    log.warning("could not unmount the guest data disk cleanly: %s", err)
            if self._qmp is not None:
                if self._alive():
                    try:
                        self._qmp.cmd("quit")
                    except Exception as err:
                        log.debug("quit: %r", err)
                try:
                    self._qmp.close()
                except Exception as err:
                    log.debug("closing QMP: %r", err)
                self._qmp = None
            self._reap()
        finally:
            self._ready = False
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            if self._sockdir is not None:
                shutil.rmtree(self._sockdir, ignore_errors=True)
                self._sockdir = None

    def _reap(self) -> None:
        proc = self._proc
        if proc is None:
            return
        for action, wait in ((None, 10.0), (proc.terminate, 5.0), (proc.kill, 5.0)):
            if action is not None:
                action()
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self._proc = None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> GuestVM:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        # After a failure the guest may be in any state: just kill it.
        self.stop(clean=exc_type is None)

    # --- guest agent -------------------------------------------------------------
    def agent_call(
        self, func: Callable[[GuestAgent], Awaitable[T]], timeout: Optional[float] = None
    ) -> T:
        """Run ``await func(agent)`` on a fresh agent connection and close it again.

        The connection lives only for this call because the agent socket
        serves one client: the tool under test must find it free.
        """
        if self._loop is None:
            raise GuestVMError("the guest VM is not started")

        async def run() -> T:
            async with GuestAgent(self.qga_socket, timeout=timeout or self.agent_timeout) as ga:
                return await func(ga)

        return self._loop.run_until_complete(run())

    def exec(self, cmd: str, timeout: float = 30) -> ExecResult:
        """Run ``/bin/sh -c cmd`` in the guest and return its exit code and output."""

        async def run(ga: GuestAgent) -> ExecResult:
            started = await ga.execute(
                "guest-exec",
                {"path": "/bin/sh", "arg": ["-c", cmd], "capture-output": True},
            )
            pid = started["pid"]
            deadline = time.monotonic() + timeout
            delay = 0.01
            while True:
                status: dict[str, Any] = await ga.execute("guest-exec-status", {"pid": pid})
                if status.get("exited"):
                    break
                if time.monotonic() > deadline:
                    raise GuestVMError(f"guest command still running after {timeout:g} s: {cmd!r}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
            code = int(status["exitcode"]) if "exitcode" in status else -int(status.get("signal", 0))
            return ExecResult(code, _b64(status.get("out-data")), _b64(status.get("err-data")))

        return self.agent_call(run)

    def write_file(self, path: str, data: Union[str, bytes], mode: int = 0o644) -> None:
        """Create (or replace) PATH in the guest with DATA, then set its MODE."""
        raw = data.encode() if isinstance(data, str) else data

        async def run(ga: GuestAgent) -> None:
            handle = await ga.execute("guest-file-open", {"path": path, "mode": "w"})
            try:
                await ga.execute("guest-file-write", {
                    "handle": handle, "buf-b64": base64.b64encode(raw).decode()})
            finally:
                await ga.execute("guest-file-close", {"handle": handle})

        self.agent_call(run)
        code, _, err = self.exec(f"chmod {mode:o} '{path}'")
        if code != 0:
            raise GuestVMError(f"chmod {mode:o} {path} in the guest failed: {err}")

    # --- diagnostics ---------------------------------------------------------------
    def _read_serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self, lines: int = 25) -> str:
        parts = []
        for title, path in (("serial console", self.serial_log), ("QEMU output", self.qemu_log)):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            if tail:
                parts.append(f"--- {title} ({path}), last lines:\n" + "\n".join(tail))
        return "\n".join(parts)



def _b64(data: Optional[str]) -> str:
    if not data:
        return ""
    return base64.b64decode(data).decode("utf-8", errors="replace")
