"""A qemu-storage-daemon on image files: QMP to the disks of a VM that is shut down.

The dirty bitmaps of a chain live inside the qcow2 images, so a chain can
go on without the VM: qemu-storage-daemon opens the images with QEMU's own
block layer and speaks the same QMP, so the backup code runs unchanged.

The daemon belongs to one qmpbackup run and must never outlive it, even
when qmpbackup is SIGKILLed: a daemon left behind would hold the image
locks and keep the VM from starting.  Hence

* its QMP socket lives in a private 0700 temp dir, removed as soon as the
  session is up (a connected socket and an open log need no names), so
  not even a SIGKILL of qmpbackup leaves it behind;
* the kernel sends it SIGTERM when qmpbackup dies (``PR_SET_PDEATHSIG``).
  SIGTERM, not SIGKILL: the daemon then cancels the jobs and closes the
  images cleanly, which stores the persistent bitmaps (after a SIGKILL they
  would come back inconsistent and the chain would need a new full);
* it runs in its own session, so a Ctrl-C meant for qmpbackup does not end
  it before qmpbackup has cancelled its jobs through it;
* every way out of :class:`StorageDaemon` terminates it.

Image locking keeps it off an image a running QEMU holds (the VM needs
``--socket`` then), and keeps a VM from starting on an image it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Optional, Sequence

from libqmpbackup.errors import ConnectError, ImageInUseError, QmpBackupError
from libqmpbackup.qemu.daemon_process import DAEMON, die_with_parent_hook
from libqmpbackup.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0     # opening images with many bitmaps takes a moment
STOP_TIMEOUT = 60.0      # closing flushes the images and stores the bitmaps
POLL_INTERVAL = 0.01
_OPTION_ERROR_RE = re.compile(r"^qemu-storage-daemon: --blockdev (\{.*?\}): (.*)$")
_LOCK_FAILURE = "Failed to get"


@dataclass(frozen=True)
class DaemonImage:
    """One image for the daemon: its absolute real path, and the disk id it stands for."""

    disk_id: str
    path: str
    block_device: bool = False   # QEMU's "file" driver takes regular files only


def image_node(index: int) -> str:
    """Node name of the INDEXth image; never the tool's reserved prefix (leftover cleanup)."""
    return f"img{index}"


def blockdev_options(images: Sequence[DaemonImage]) -> list[str]:
    """``--blockdev`` arguments: qcow2 over file per image, in JSON (paths may hold commas)."""
    argv = []
    for index, image in enumerate(images):
        node = image_node(index)
        protocol = "host_device" if image.block_device else "file"
        argv += ["--blockdev", json.dumps({"driver": protocol, "filename": image.path,
                                           "node-name": f"{node}-file"}),
                 "--blockdev", json.dumps({"driver": "qcow2", "file": f"{node}-file",
                                           "node-name": node})]
    return argv


def command_line(images: Sequence[DaemonImage], socket_path: str) -> list[str]:
    """Images first: the QMP socket appears only once every image is open."""
    chardev_path = socket_path.replace(",", ",,")  # QemuOpts escaping
    return [DAEMON, *blockdev_options(images),
            "--chardev", f"socket,id=qmp0,path={chardev_path},server=on,wait=off",
            "--monitor", "chardev=qmp0"]


def startup_error(output: str, images: Sequence[DaemonImage]) -> QmpBackupError:
    """Why the daemon exited before it served QMP, naming the image it failed on."""
    by_node = {image_node(i): image.path for i, image in enumerate(images)}
    by_node.update({f"{node}-file": path for node, path in list(by_node.items())})
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        match = _OPTION_ERROR_RE.match(line)
        if not match:
            continue
        try:
            node = json.loads(match.group(1)).get("node-name", "")
        except ValueError:
            node = ""
        path, reason = by_node.get(node, "an --image"), match.group(2)
        if reason.startswith(_LOCK_FAILURE):
            return ImageInUseError(
                f"image {path} is in use by a running QEMU (it holds the image lock: "
                f"{reason}); back that VM up with --socket")
        if "not in qcow2 format" in reason:
            reason += " (--image takes qcow2 images)"
        return ConnectError(f"qemu-storage-daemon cannot open image {path}: {reason}")
    detail = lines[-1] if lines else "no message"
    return ConnectError(f"qemu-storage-daemon exited before serving QMP: {detail}")


class StorageDaemon:
    """``async with StorageDaemon(images) as session``: a QMP session to a private daemon.

    The session's ``image_nodes`` map the daemon's image nodes to the disk
    ids, which is how discovery finds disks without devices.
    """

    def __init__(self, images: Sequence[DaemonImage]) -> None:
        self.images = list(images)
        self._dir: Optional[Path] = None
        self._log: Optional[BinaryIO] = None    # the daemon's output, read back
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._session: Optional[QmpSession] = None
        self._session_opened = False

    async def __aenter__(self) -> QmpSession:
        try:
            return await self._start()
        except BaseException:
            await self._stop()
            raise

    async def __aexit__(self, exc_type: Optional[type[BaseException]],
                        exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        await self._stop()

    async def _start(self) -> QmpSession:
        self._dir = Path(tempfile.mkdtemp(prefix="qmpbackup-qsd-"))   # mode 0700
        socket_path = str(self._dir / "qmp.sock")
        argv = command_line(self.images, socket_path)
        log.debug("starting %s", " ".join(argv))
        log_path = self._dir / "daemon.log"
        with open(log_path, "wb") as output:
            # a description of our own: reading must not move the daemon's offset
            self._log = open(log_path, "rb")  # closed in _terminate
            try:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                    start_new_session=True, preexec_fn=die_with_parent_hook())
            except OSError as err:
                raise ConnectError(f"cannot start {DAEMON} (needed for --image): "
                                   f"{err.strerror}; it comes with QEMU "
                                   "(Debian: qemu-system-common)") from err
        session = QmpSession(socket_path, peer=f"{DAEMON} pid {self._proc.pid}")
        await self._connect(session)
        self._remove_dir()
        session.image_nodes = {image_node(i): image.disk_id
                               for i, image in enumerate(self.images)}
        log.info("%s (pid %d) opened %s", DAEMON, self._proc.pid,
                 ", ".join(f"{i.disk_id}={i.path}" for i in self.images))
        return session

    async def _connect(self, session: QmpSession) -> None:
        """Wait for the socket, then the greeting; a daemon that exits says why."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise startup_error(self._read_log(), self.images)
            if os.path.exists(session.spec):
                try:
                    await session.connect()
                    self._session, self._session_opened = session, True
                    return
                except ConnectError:
                    # bound but not yet listening, or exiting: the next round tells
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise ConnectError(f"{DAEMON} did not open its QMP socket within "
                                   f"{START_TIMEOUT:g} s")
            await asyncio.sleep(POLL_INTERVAL)

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")
        except OSError:
            return ""

    def _remove_dir(self) -> None:
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None

    async def _stop(self) -> None:
        try:
            if self._session is not None:
                await self._session.close()
        finally:
            self._session = None
            self._terminate()

    def _terminate(self) -> None:
        """End the daemon cleanly (it stores the bitmaps as it closes the images).

        Synchronous on purpose: a second cancellation must not leave it running.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %d) did not stop within %.0f s: killed; its images' "
                              "bitmaps may come back inconsistent", DAEMON, proc.pid,
                              STOP_TIMEOUT)
                    proc.kill()
                    proc.wait()
            output = self._read_log().strip()
            if self._session_opened and proc.returncode not in (0, -signal.SIGTERM):
                # it died under the run (a failed start was reported already)
                log.warning("%s exited with status %d: %s", DAEMON, proc.returncode,
                            output or "no message")
            elif output:
                log.debug("%s said: %s", DAEMON, output)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_dir()
