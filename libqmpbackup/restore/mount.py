"""``qmprestore mount`` / ``umount``: a restore point as read-only raw files, without writing a disk.

The point's files pass the restore pre-check (:func:`check_before_restore`)
and stay open; a private ``qemu-storage-daemon`` inherits exactly those
descriptors (``/dev/fd/N``, read-only), gets the chain spelled out layer by
layer (``backing`` by node name, the FULL's ``null``: no header chooses a
file) and serves each disk's top layer as a FUSE export
``MOUNTPOINT/<disk id>.raw`` (``writable=off``).  Nothing is copied before the
first byte can be read, and nothing is written into the backup folder: the
daemon opens the images read-only and every state file lives in the private
runtime directory (:mod:`libqmpbackup.store.mounts`).

By default the command returns with the daemon running, detached in its own
session (like ``borg mount``); ``--foreground`` stays, the daemon dies with
the tool (``PR_SET_PDEATHSIG``), and SIGINT/SIGTERM unmount.  The record is
written before the daemon starts, so ``umount`` cleans up after anything.
Restores never load the QMP client, and the daemon needs no monitor: a disk
is ready when its file has become a mount of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from libqmpbackup.errors import (
    BackupDamaged,
    Interrupted,
    LockBusyError,
    MountError,
    TargetError,
    UsageError,
)
from libqmpbackup.keys import SECRET_PREFIX, Key
from libqmpbackup.qemu.daemon_process import DAEMON, die_with_parent_hook
from libqmpbackup.restore import filesystems, mount_check
from libqmpbackup.restore.folder import open_backup_dir
from libqmpbackup.restore.images import ChainFiles
from libqmpbackup.restore.precheck import check_before_restore
from libqmpbackup.restore.rules import RestoreOptions, RestorePoint
from libqmpbackup.store import mounts
from libqmpbackup.store.handles import FileHandle
from libqmpbackup.store.locks import hold
from libqmpbackup.store.mounts import ExposedDisk, MountRecord
from libqmpbackup.store.names import safe_component

log = logging.getLogger(__name__)

FUSE_DEVICE = Path("/dev/fuse")
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
POLL = 0.005
READ_AHEAD_KB = 4096


@dataclass
class MountRequest:
    mountpoint: Path
    filesystems: bool = False
    foreground: bool = False
    check_first: bool = False     # hash before exposing instead of while serving


def layer_options(prefix: str, dev_paths: Sequence[str], encrypted: bool = False) -> list[str]:
    """``--blockdev`` arguments for one chain (oldest first), every layer by descriptor.

    Each qcow2 layer names its backing layer by node name and the FULL has
    ``backing: null``, so no backing name written in a header is followed.
    ENCRYPTED: every layer is LUKS (the key secret of :func:`daemon_argv`)."""
    argv: list[str] = []
    below: Optional[str] = None
    encrypt = {"encrypt": {"format": "luks", "key-secret": SECRET_PREFIX}} if encrypted else {}
    for index, dev_path in enumerate(dev_paths):
        node = f"{prefix}l{index}"
        argv += ["--blockdev", json.dumps({"driver": "file", "node-name": f"{node}f",
                                           "filename": dev_path, "read-only": True}),
                 "--blockdev", json.dumps({"driver": "qcow2", "node-name": node,
                                           "file": f"{node}f", "backing": below,
                                           "read-only": True, **encrypt})]
        below = node
    return argv


def export_option(prefix: str, top: int, file: str) -> list[str]:
    return ["--export", json.dumps({"type": "fuse", "id": f"{prefix}e",
                                    "node-name": f"{prefix}l{top}", "mountpoint": file,
                                    "writable": False})]


def daemon_argv(chains: Sequence[tuple[Sequence[str], str]],
                key: Optional[Key] = None) -> list[str]:
    """The daemon's command line: per disk, (its layers' /dev/fd paths, the export file).

    KEY (encrypted chains): read from the inherited memfd, never from argv."""
    argv = [DAEMON]
    if key is not None:
        argv += ["--object", f"secret,id={SECRET_PREFIX},file={key.dev_path}"]
    for number, (layers, file) in enumerate(chains):
        argv += layer_options(f"d{number}", layers, encrypted=key is not None)
        argv += export_option(f"d{number}", len(layers) - 1, file)
    return argv


def _check_mountpoint(path: Path) -> str:
    """MOUNTPOINT as an absolute real path: an existing empty folder nobody mounted."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise TargetError(f"mountpoint {path} is not an existing folder")
    record = mounts.load(real)
    if record is not None:
        raise LockBusyError(f"{path} is already mounted by qmprestore (daemon pid {record.pid}"
                            f"{'' if mounts.alive(record) else ', dead'}): "
                            f"qmprestore umount {path} first")
    if os.path.ismount(real):
        raise LockBusyError(f"{path} is a mountpoint already: choose an empty folder")
    if os.listdir(real):
        raise TargetError(f"mountpoint {path} is not empty")
    return real


def _check_tools(request: MountRequest) -> None:
    if not FUSE_DEVICE.exists():
        raise MountError(f"{FUSE_DEVICE} is missing: the FUSE export needs it "
                         "(modprobe fuse, or give the container the device)")
    if shutil.which(DAEMON) is None:
        raise MountError(f"{DAEMON} is not installed (Debian: qemu-system-common)")
    if request.filesystems:
        filesystems.require_tools()


def mount(opts: RestoreOptions, request: MountRequest) -> MountRecord:
    """Expose the chosen point of every selected disk; return the record (daemon running)."""
    _check_tools(request)
    real = _check_mountpoint(request.mountpoint)
    with open_backup_dir(opts.dir, opts.name_filter) as backup:   # held until the daemon runs
        root = os.path.realpath(backup.root)
        if os.path.commonpath([real, root]) == root:
            raise TargetError(f"mountpoint {request.mountpoint} is inside the backup folder "
                              f"{root}: a mount never writes there, choose a folder outside it")
        points = backup.points(opts.until, opts.uuid)
        with hold(mounts.lock_path(real), f"mountpoint {real}", real), \
                contextlib.ExitStack() as opened:
            _check_mountpoint(request.mountpoint)   # another mount may have won the race
            checked = [opened.enter_context(check_before_restore(
                point, backup, skip_check=opts.skip_check, key=opts.key,
                verified_within=opts.verified_within, defer_digests=not request.check_first))
                for point in points]
            record = MountRecord(mountpoint=real, root=root)
            try:
                proc = _start(record, points, checked, request.foreground)
                _start_checker(record, [d for files in checked for d in files.deferred],
                               request.foreground)
                opened.close()   # the daemon holds its own copies of the descriptors
                _wait_ready(record, proc)
                if request.filesystems:
                    filesystems.attach(record, mounts.save)
            except BaseException:
                _cleanup(record, quiet=True)
                raise
    return record


def _start(record: MountRecord, points: list[RestorePoint], checked: list[ChainFiles],
           foreground: bool) -> subprocess.Popen[bytes]:
    """Create the export files, write the record, start the daemon on the checked descriptors."""
    chains: list[tuple[Sequence[str], str]] = []
    key = _chain_key(checked)
    fds: list[int] = [] if key is None else [key.fd]
    for point, files in zip(points, checked):
        file = _create_export_file(record, f"{safe_component(point.disk_id)}.raw")
        layers = [files.handle(r.file) for r in point.segment()]
        chains.append(([h.dev_path for h in layers], file))
        fds += [h.fd for h in layers]
        record.disks.append(ExposedDisk(disk=point.disk_id, file=file, chain=point.chain_id,
                                        point=point.label, folder=str(point.folder)))
    record.log = str(mounts.record_path(record.mountpoint)).replace(mounts.SUFFIX, ".log")
    mounts.save(record)
    argv = daemon_argv(chains, key)
    log.debug("starting %s", " ".join(argv))
    with open(record.log, "wb") as output:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, pass_fds=fds,
                start_new_session=True, cwd="/",
                preexec_fn=die_with_parent_hook() if foreground else None)
        except OSError as err:
            raise MountError(f"cannot start {DAEMON}: {err.strerror}") from err
    record.pid = proc.pid
    record.start = mounts.process_start(proc.pid) or ""
    mounts.save(record)
    return proc


def _start_checker(record: MountRecord, files: list[tuple[FileHandle, Optional[str]]],
                   foreground: bool) -> None:
    """Hash the files not remembered as verified while they are served (:mod:`mount_check`)."""
    if not files:
        return
    package = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package, *filter(None, [os.environ.get("PYTHONPATH")])]))
    with open(record.log, "ab") as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "libqmpbackup.restore.mount_check",
             mount_check.spec(record.mountpoint, files)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env,
            pass_fds=[h.fd for h, _ in files], start_new_session=True,
            preexec_fn=die_with_parent_hook() if foreground else None)
    record.checker, record.checker_start = proc.pid, mounts.process_start(proc.pid) or ""
    mounts.save(record)
    log.info("%d file(s) not verified within --verified-within: hashing them while mounted "
             "(pid %d); damage ends the mount", len(files), proc.pid)


def _chain_key(checked: list[ChainFiles]) -> Optional[Key]:
    """The key the daemon opens the layers with (None: clear chains); one chain, one key."""
    if len({files.encrypted for files in checked}) > 1:
        raise UsageError("the selected disks mix encrypted and clear chains: mount them one "
                         "at a time (--filter)")
    return checked[0].key if checked and checked[0].encrypted else None


def _create_export_file(record: MountRecord, name: str) -> str:
    """The empty regular file the FUSE export mounts over (new: O_EXCL, never a symlink)."""
    path = os.path.join(record.mountpoint, name)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400))
    except OSError as err:
        raise TargetError(f"cannot create {path}: {err.strerror}") from err
    record.created.append(path)
    return path


def _daemon_said(record: MountRecord) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in Path(record.log).read_text(errors="replace")
                 .splitlines() if line.strip()]
        return lines[-1] if lines else "no message"
    return "no message"


def _wait_ready(record: MountRecord, proc: subprocess.Popen[bytes]) -> None:
    """Every export file became a mount of its own (FUSE serves it), or say why not."""
    deadline = time.monotonic() + READY_TIMEOUT
    parent = os.stat(record.mountpoint).st_dev
    waiting = [d.file for d in record.disks]
    while waiting:
        if proc.poll() is not None:
            raise MountError(f"{DAEMON} exited before serving the point: {_daemon_said(record)}")
        waiting = [f for f in waiting if os.stat(f).st_dev == parent]
        if waiting and time.monotonic() > deadline:
            raise MountError(f"{DAEMON} did not serve {waiting[0]} within {READY_TIMEOUT:g} s")
        if waiting:
            time.sleep(POLL)
    for disk in record.disks:
        _read_ahead(disk.file)
    log.info("%s (pid %d) serves %s", DAEMON, proc.pid,
             ", ".join(f"{d.file} ({d.chain} {d.point})" for d in record.disks))


def _read_ahead(file: str) -> None:
    """A larger kernel read-ahead for the export (root only; best effort).

    QEMU 7.2's FUSE export serves one request at a time, so a sequential
    reader waits a round trip per request: 128 KiB of read-ahead (the
    default) made ``cp`` of a mounted disk ≈ 1.6× slower here than 4 MiB.
    """
    device = os.stat(file).st_dev
    knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    with contextlib.suppress(OSError):
        knob.write_text(f"{READ_AHEAD_KB}\n")


def stay(record: MountRecord, announce: Callable[[], object]) -> None:
    """--foreground: ANNOUNCE the mount, serve until SIGINT/SIGTERM (or the daemon dies), unmount.

    The announcement is inside: a signal right after it must still unmount.
    """
    try:
        announce()
        while mounts.alive(record):
            time.sleep(0.2)
        if not (mounts.load(record.mountpoint) or record).damaged:
            raise MountError(f"{DAEMON} (pid {record.pid}) died: {_daemon_said(record)}")
    except Interrupted:
        log.info("unmounting %s", record.mountpoint)
    finally:
        with hold(mounts.lock_path(record.mountpoint), f"mountpoint {record.mountpoint}",
                  record.mountpoint):
            _cleanup(mounts.load(record.mountpoint) or record)


def umount(mountpoint: Path) -> MountRecord:
    """End a mount: filesystems, loop devices, the daemon, the FUSE mounts, the files it made."""
    real = os.path.realpath(mountpoint)
    with hold(mounts.lock_path(real), f"mountpoint {real}", real):
        record = mounts.load(real)
        if record is None:
            raise UsageError(f"{mountpoint} is not mounted by qmprestore mount "
                             f"(no record in {mounts.mounts_dir()})")
        _cleanup(record)
    return record


def _cleanup(record: MountRecord, quiet: bool = False) -> None:
    """Undo everything the record lists; failures are reported and the record kept for a retry."""
    problems = filesystems.detach(record, mounts.save)
    if problems and not quiet:   # a busy filesystem: its loop device and daemon stay too
        raise MountError("; ".join(problems))
    _stop(record.checker, lambda: mounts.checking(record), "checksum process")
    if not record.pid:   # killed between starting the daemon and recording its pid
        _adopt_daemon(record)
    _stop(record.pid, lambda: mounts.alive(record), DAEMON)
    for disk in record.disks:
        if filesystems.mounted(disk.file):   # the daemon died without unmounting
            problems += filesystems.unmount(disk.file, lazy=True)
    for path in reversed(record.created):
        with contextlib.suppress(FileNotFoundError):
            try:
                if os.path.isdir(path):
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except OSError as err:
                problems.append(f"cannot remove {path}: {err.strerror}")
    if problems and not quiet:
        raise MountError("; ".join(problems))
    with contextlib.suppress(OSError):
        os.unlink(record.log)
    mounts.forget(record)
    if record.damaged and not quiet:
        raise BackupDamaged([f"{line}; the mount was ended when this was found"
                             for line in record.damaged])


def _adopt_daemon(record: MountRecord) -> None:
    """Find the daemon whose command line exports this mount's first file (a pid never recorded)."""
    if not record.disks:
        return
    wanted = json.dumps(record.disks[0].file).encode()
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if argv[0] == DAEMON.encode() and any(b'"type": "fuse"' in a and wanted in a
                                                   for a in argv):
                record.pid = int(entry.name)
                record.start = mounts.process_start(record.pid) or ""
                return


def _stop(pid: int, running: Callable[[], bool], what: str) -> None:
    """SIGTERM (the daemon closes the images and ends its exports), SIGKILL if it hangs.

    RUNNING checks the pid is still the process the record names.
    """
    if not running():
        return
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + STOP_TIMEOUT
        while running() and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(POLL)
        if not running():
            return
    raise MountError(f"{what} (pid {pid}) does not stop")


def _reap(pid: int) -> None:
    """A daemon this process started (--foreground, tests) is its child: collect it."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def mount_document(record: MountRecord) -> dict[str, object]:
    return {"command": "mount", **record.document()}


def describe(record: MountRecord) -> list[str]:
    lines = []
    for disk in record.disks:
        lines.append(f"{disk.file}: disk {disk.disk}, chain {disk.chain}, point {disk.point}")
        for found in disk.filesystems:
            lines.append(f"  {found['path']}: {found.get('type') or 'unknown'}"
                         + (f" NOT MOUNTED: {found['error']}" if found.get("error") else ""))
    lines.append(f"daemon pid {record.pid}; end with: qmprestore umount {record.mountpoint}")
    return lines

