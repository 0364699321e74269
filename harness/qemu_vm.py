"""A real QEMU without guest OS, shared by the tests and the benchmarks: images, two QMP sockets.

A QMP socket serves one client at a time, so every VM gets one socket for the
tool under test and one for the harness itself.  Guest data is changed with
``human-monitor-command`` → ``qemu-io``, which goes through the block layer and
so dirties bitmaps exactly like guest writes.  tests/vm.py adds what only the
tests check (the tests' disk zoo, reference copies, the tool's leftovers);
bench/ adds its CPU accounting.  Neither subclasses the other.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = "qemu-system-x86_64"
SEABIOS = "/usr/share/seabios/bios-256k.bin"
MiB = 1 << 20
START_ATTEMPTS = 3
MONITOR_ANSWER_TIMEOUT = 15   # seconds; a healthy monitor answers in well under one


@dataclass
class Disk:
    """One disk of a test VM.

    attach: ``virtio`` / ``ide`` (``-drive``, device names virtioN / ideN-hd0),
    ``blockdev`` (``-blockdev`` + ``-device virtio-blk-pci,id=NAME``: empty device
    name) or ``pflash`` (unit 0 is firmware and read-only, unit 1 a vars store).
    """

    name: str
    attach: str = "virtio"
    fmt: str = "qcow2"
    size: int = 32 * MiB
    unit: int = 0
    path: Optional[Path] = None
    qemu_io_id: str = ""    # what qemu-io needs to address the disk

    def create(self, folder: Path) -> None:
        if self.path is None:
            suffix = "fd" if self.attach == "pflash" else self.fmt
            self.path = folder / f"{self.name}.{suffix}"
        if self.path.exists():
            return
        if self.attach == "pflash" and self.unit == 0:
            shutil.copyfile(SEABIOS, self.path)
            return
        run(["qemu-img", "create", "-q", "-f", self.fmt, str(self.path), str(self.size)])


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL QEMU if the test process dies without teardown.

    Teardown kills QEMU in every normal path; this covers a SIGKILLed or
    crashed pytest worker, which would otherwise leave VMs behind. Runs in
    the child between fork and exec; best effort, Linux only.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def harness_qmp(path: str) -> QEMUMonitorProtocol:
    """The test's own synchronous QMP client.

    On Python 3.9 an asyncio.Queue binds to the current event loop when it is
    made, and the tool's in-process ``asyncio.run`` leaves none behind.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            usable = not asyncio.get_event_loop().is_closed()
        except RuntimeError:
            usable = False
    if not usable:
        asyncio.set_event_loop(asyncio.new_event_loop())
    return QEMUMonitorProtocol(path)


def reap(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Wait for a process that was asked to end; kill it if it does not within TIMEOUT."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)


def accel() -> str:
    return "kvm:tcg" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


Self = TypeVar("Self", bound="QemuVM")


class QemuVM:
    """A throwaway VM; always use as a context manager (or call stop()) so QEMU dies."""

    def __init__(self, folder: Path, disks: list[Disk], *,
                 prelaunch: bool = False, extra_args: tuple[str, ...] = (),
                 firmware_log: bool = False) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.disks = disks
        self.prelaunch = prelaunch
        self.extra_args = extra_args
        self.firmware_log = folder / "seabios.log" if firmware_log else None
        self.sockdir = Path(tempfile.mkdtemp(prefix="qbt"))
        self.tool_socket = str(self.sockdir / "tool.sock")
        self.test_socket = str(self.sockdir / "test.sock")
        self.proc: Optional[subprocess.Popen] = None
        self.qmp: Optional[QEMUMonitorProtocol] = None

    def disk(self, name: str) -> Disk:
        return next(d for d in self.disks if d.name == name)

    def command_line(self) -> list[str]:
        argv = [QEMU, "-machine", f"q35,accel={accel()}", "-nodefaults", "-display", "none",
                "-m", "64", "-no-user-config"]
        ide_index = 0
        for disk in self.disks:
            disk.create(self.folder)
            path = str(disk.path)
            if disk.attach == "virtio":
                argv += ["-drive", f"if=virtio,format={disk.fmt},file={path}"]
                disk.qemu_io_id = disk.name
            elif disk.attach == "ide":
                argv += ["-drive", f"if=ide,index={ide_index},format={disk.fmt},file={path}"]
                disk.qemu_io_id = f"ide{ide_index}-hd0"
                ide_index += 1
            elif disk.attach == "pflash":
                ro = ",readonly=on" if disk.unit == 0 else ""
                argv += ["-drive", f"if=pflash,unit={disk.unit},format={disk.fmt},file={path}{ro}"]
                disk.qemu_io_id = f"pflash{disk.unit}"
            elif disk.attach == "blockdev":
                argv += ["-blockdev", f"driver=file,filename={path},node-name={disk.name}-file",
                         "-blockdev", f"driver={disk.fmt},file={disk.name}-file,node-name={disk.name}-fmt",
                         "-device", f"virtio-blk-pci,drive={disk.name}-fmt,id={disk.name}"]
                disk.qemu_io_id = f"-d /machine/peripheral/{disk.name}/virtio-backend"
            else:
                raise ValueError(disk.attach)
        for sock in (self.tool_socket, self.test_socket):
            argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
        if self.prelaunch:
            argv.append("-S")
        if self.firmware_log:
            argv += ["-chardev", f"file,id=seabios,path={self.firmware_log}",
                     "-device", "isa-debugcon,iobase=0x402,chardev=seabios"]
        return argv + list(self.extra_args)

    def start(self: Self) -> Self:
        if self.proc is not None:
            # a second QEMU on the same images would fail their write locks
            raise RuntimeError("this VM is started already")
        if shutil.which(QEMU) is None:   # the pure unit tests run without QEMU; these cannot
            raise RuntimeError(f"{QEMU} is missing: run the tests with `make test`")
        for _ in range(START_ATTEMPTS):
            with open(self.folder / "qemu.log", "ab") as log:
                self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=log,
                                             preexec_fn=die_with_parent)
            try:
                if self._monitor_answers():
                    return self._connect()
                if self.proc.poll() is not None:   # it died: starting again would not help
                    raise RuntimeError(f"QEMU exited: {(self.folder / 'qemu.log').read_text()}")
            except BaseException:
                self.stop()   # a VM whose start failed must not outlive the test
                raise
            self._end_qemu()
        self.stop()
        raise RuntimeError(f"QEMU's monitor never answered in {START_ATTEMPTS} starts")

    def _monitor_answers(self) -> bool:
        """Whether the test socket's monitor answers one command; False if it wedged.

        QEMU 7.2 started with ``--preconfig`` under CPU load sometimes greets
        the first client and then never answers its ``qmp_capabilities`` (about
        1 start in 40 on 2 busy cores; seen in CI as a 600 s hang).  The
        monitor stays wedged, so the only cure is a new QEMU.  A raw exchange
        with a deadline finds it; the harness's qemu.qmp client has none.
        """
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.test_socket) and os.path.exists(self.tool_socket)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.folder / 'qemu.log').read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its QMP sockets")
            time.sleep(0.02)
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(MONITOR_ANSWER_TIMEOUT)
                try:
                    sock.connect(self.test_socket)
                except ConnectionRefusedError:
                    # the socket file exists from bind() on, but accepts only after listen()
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
                    continue
                replies = sock.makefile("rb")
                try:
                    replies.readline()   # the greeting
                    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
                    return b'"return"' in replies.readline()
                except socket.timeout:
                    return False
                finally:
                    replies.close()

    def _connect(self: Self) -> Self:
        self.qmp = harness_qmp(self.test_socket)
        self.qmp.connect()
        return self

    def __enter__(self: Self) -> Self:
        """Starts the VM unless it runs already (as one from tests' ``restart`` does)."""
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._end_qemu()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def _end_qemu(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            reap(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL QEMU: what a host crash looks like to the images."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.stop()

    def wait_for_firmware(self, timeout: float = 60) -> None:
        """Until SeaBIOS gave up booting (needs ``firmware_log``).

        Its probing resets the virtio disks, and a reset drains the disk's
        whole block graph, a running backup job included: a write stall of
        the backup target then stalls the vCPU.  A real guest is long past it.
        """
        assert self.firmware_log is not None
        deadline = time.monotonic() + timeout
        while "No bootable device" not in (self.firmware_log.read_text(errors="replace")
                                           if self.firmware_log.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the firmware did not finish: {self.firmware_log}")
            time.sleep(0.05)

    # -- QMP helpers --------------------------------------------------------
    def cmd(self, command: str, **arguments: Any) -> Any:
        assert self.qmp is not None
        reply = self.qmp.cmd_obj({"execute": command, "arguments": arguments})
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": command_line})

    def write(self, disk: str, pattern: int, offset: int, length: int) -> None:
        """Write through the block layer, as a guest would (dirties bitmaps)."""
        target = self.disk(disk).qemu_io_id
        reply = self.hmp(f'qemu-io {target} "write -P {pattern:#x} {offset} {length}"')
        assert reply == "", reply

    def running(self) -> bool:
        return bool(self.cmd("query-status")["running"])

    def bitmaps(self) -> dict[str, list[dict[str, Any]]]:
        """node-name -> named dirty bitmaps."""
        return {n["node-name"]: [b for b in n.get("dirty-bitmaps", []) if "name" in b]
                for n in self.cmd("query-named-block-nodes", flat=True)}
