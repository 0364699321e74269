"""Running backup jobs: one QMP transaction, one asyncio task per disk.

All disks of a run start in one ``transaction`` with ``completion-mode:
grouped``: QEMU then finishes (and advances the dirty bitmaps of) either all
jobs or none, so one failing disk can never leave another disk's bitmap
cleared.  Each job is watched by its own task until QEMU reports its final
state; a separate watcher notices when QEMU itself disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncContextManager, Awaitable, Callable, Optional

from libqmpbackup.backup.offload import OffloadChoice
from libqmpbackup.backup.run_steps import reached
from libqmpbackup.errors import FleecingError, JobError, TargetError, UsageError, VMGoneError
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.qemu.qmp import EventStream, QmpCommandError, QmpSession
from libqmpbackup.store.names import TOOL_PREFIX, safe_component

log = logging.getLogger(__name__)

JOB_EVENTS = ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR",
              "JOB_STATUS_CHANGE"]
CANCEL_TIMEOUT = 30.0
AIO_MODES = ("threads", "io_uring")
QUIT_GRACE = 1.0

ProgressHook = Callable[[list["BackupJob"]], Awaitable[None]]


@dataclass
class BackupJob:
    """One disk's part of a run: the source, where it goes and how."""

    disk: BlockDevice
    level: str                      # recorded level: full, inc or copy
    sync: str                       # blockdev-backup sync mode
    partial_path: Path
    final_path: Path
    backing: Optional[str] = None   # relative name of the previous backup
    backed: bool = True             # False: an INC after upstream's, which name no backing file
    timestamped: bool = True        # False: --no-timestamp, named like the source image
    link: Optional[str] = None      # the convenience symlink to create beside it (FULL-<image>)
    bitmap: Optional[str] = None
    bitmap_mode: Optional[str] = None
    note: str = ""                  # why LEVEL is not the run's level ("hot-added"), for the summary
    job_id: str = ""
    target_node: str = ""
    result: Optional[str] = None    # None while running, "" on success, else error
    target_failed: bool = False     # the error was writing the target (full, unwritable)
    source_node: str = ""           # the node the job reads, when not the disk's (fleecing)
    source_failed: bool = False     # the error was reading the source
    max_workers: int = 0            # bound on the job's parallel copies (0: QEMU's 64)
    digest: Optional[str] = None    # checksum of the finished file (see libqmpbackup.store.digests)
    bytes_copied: int = 0           # what the job copied, from its completion event
    started: float = 0.0            # monotonic clock: transaction sent
    finished: float = 0.0           # monotonic clock: completion event

    @property
    def duration(self) -> float:
        return max(self.finished - self.started, 0.0) if self.finished else 0.0

    def assign_names(self, index: int, run_tag: str) -> None:
        """Recognisable names, so leftovers of a killed run can be found and removed."""
        self.job_id = f"{TOOL_PREFIX}{safe_component(self.disk.disk_id)}-{run_tag}"
        self.target_node = f"{TOOL_PREFIX}t{index}-{run_tag}"

    def read_from(self, node: str, bitmap: Optional[str], *, max_workers: int = 0) -> None:
        """Copy from NODE (a snapshot of the disk) instead, with NODE's own BITMAP if any.

        A whole-disk copy then reads everything (``full``, not ``top``): the
        snapshot node's block status is not a promise about the disk's allocation.
        """
        self.source_node = node
        if self.sync == "top":
            self.sync = "full"
        self.bitmap = bitmap
        self.bitmap_mode = None
        self.max_workers = max_workers


def new_run_tag() -> str:
    return os.urandom(3).hex()


def backup_action(job: BackupJob, *, speed: int = 0, compress: bool = False,
                  x_perf: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    args: dict[str, Any] = {
        "job-id": job.job_id,
        "device": job.source_node or job.disk.node,
        "target": job.target_node,
        "sync": job.sync,
        "auto-finalize": True,
        "auto-dismiss": True,
    }
    if job.bitmap:
        args["bitmap"] = job.bitmap
    if job.bitmap_mode:
        args["bitmap-mode"] = job.bitmap_mode
    if speed:
        args["speed"] = speed
    if compress:
        args["compress"] = True
    x_perf_args = dict(x_perf or {})
    if job.max_workers:
        x_perf_args["max-workers"] = job.max_workers
    if x_perf_args:
        args["x-perf"] = x_perf_args
    return {"type": "blockdev-backup", "data": args}


@dataclass(frozen=True)
class TargetIO:
    """How QEMU writes the backup files (upstream's --blockdev-disable-cache / --blockdev-aio)."""

    direct: bool = False            # O_DIRECT: a full backup does not evict the host's page cache
    aio: Optional[str] = None       # None: QEMU's default engine


async def check_target_io(session: QmpSession, io: TargetIO) -> None:
    """Refuse an I/O engine this QEMU was built without, before anything is created."""
    if io.aio is None:
        return
    schema = await session.execute("query-qmp-schema")
    if io.aio not in aio_modes_of(schema):
        raise UsageError(f"--blockdev-aio {io.aio}: this QEMU was built without it "
                         "(use --blockdev-aio threads, or leave the option out)")


def aio_modes_of(schema: list[dict[str, Any]]) -> set[str]:
    """The file driver's aio values in query-qmp-schema (type names there are masked).

    io_uring is a build option of QEMU; its enum value exists only when built in.
    """
    for entry in schema:
        values = entry.get("values") or []
        if entry.get("meta-type") == "enum" and "threads" in values and "native" in values:
            return set(values)
    return {"threads"}


async def add_target_node(session: QmpSession, job: BackupJob, filename: str,
                          io: TargetIO = TargetIO(), secret: Optional[str] = None) -> None:
    """Open the target in QEMU without its backing file: the job writes only new clusters.

    FILENAME is ``/dev/fdset/N`` for a target handed over as a descriptor
    (:mod:`libqmpbackup.backup.targets`).  SECRET: the id of the key's secret
    object for a target of an encrypted chain (QEMU encrypts what it writes).
    """
    file: dict[str, Any] = {"driver": "file", "filename": filename}
    if io.aio:
        file["aio"] = io.aio
    node: dict[str, Any] = {"driver": "qcow2", "node-name": job.target_node, "file": file,
                            "backing": None}
    if io.direct:
        node["cache"] = {"direct": True}
    if secret is not None:
        node["encrypt"] = {"format": "luks", "key-secret": secret}
    await session.execute("blockdev-add", node)


async def remove_node(session: QmpSession, node: str) -> bool:
    """Close NODE; False if it stays (QEMU refused, or is gone and took it along)."""
    if not session.connected:
        return False
    try:
        await session.execute("blockdev-del", {"node-name": node})
    except QmpCommandError as err:
        log.warning("could not remove block node %s: %s", node, err.desc)
        return False
    except VMGoneError:
        return False
    return True


async def _watch_job(session: QmpSession, job: BackupJob) -> None:
    """Wait until QEMU reports the job gone, recording how it ended."""
    with session.events(JOB_EVENTS, job.job_id) as events:
        async for event in events:
            name, data = event.name, event.data
            if name == "BLOCK_JOB_COMPLETED":
                job.result = data.get("error", "")
                job.bytes_copied = int(data.get("offset", 0))
                job.finished = time.monotonic()
            elif name == "BLOCK_JOB_CANCELLED":
                job.result = job.result or "cancelled"
            elif name == "BLOCK_JOB_ERROR":
                log.debug("job %s: I/O error on %s", job.job_id, data.get("operation"))
                # a backup job reads only its source and writes only its target
                job.target_failed = job.target_failed or data.get("operation") == "write"
                job.source_failed = job.source_failed or data.get("operation") == "read"
            elif name == "JOB_STATUS_CHANGE" and data.get("status") == "null":
                if job.result is None:
                    job.result = "job vanished without a completion event"
                return


async def _host_shutdown(session: QmpSession) -> str:
    """Return the reason once QEMU itself starts to quit (QMP quit, SIGTERM, ...).

    QEMU then cancels every job before it closes the socket; without this the
    run would report "cancelled" instead of "the VM went away".  A guest
    shutdown (``guest: true``) is not one: the tool keeps QEMU alive for that.
    """
    with session.events(["SHUTDOWN"]) as events:
        async for event in events:
            if not event.data.get("guest", False):
                return str(event.data.get("reason", "quit"))
    return "quit"


async def _wait_for_jobs(session: QmpSession, jobs: list[BackupJob]) -> None:
    watchers = [asyncio.ensure_future(_watch_job(session, job)) for job in jobs]
    gone = asyncio.ensure_future(session.wait_disconnected())
    quitting = asyncio.ensure_future(_host_shutdown(session))
    try:
        pending = set(watchers)
        while pending:
            done, pending = await asyncio.wait(pending | {gone},
                                               return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                raise VMGoneError(
                    f"QEMU went away during the backup ({session.peer} closed); "
                    "nothing was recorded")
            pending.discard(gone)
            for task in done:
                task.result()
        if any(j.result == "cancelled" for j in jobs):
            # a quitting QEMU cancels the jobs itself: tell that apart from another client
            await asyncio.wait({quitting, gone}, timeout=QUIT_GRACE)
        if quitting.done() or gone.done():
            reason = quitting.result() if quitting.done() else "socket closed"
            raise VMGoneError(f"QEMU shut down during the backup ({reason}); "
                              "nothing was recorded")
    finally:
        tasks: list[asyncio.Future[Any]] = [*watchers, gone, quitting]
        for future in tasks:
            future.cancel()
        await asyncio.gather(*watchers, gone, quitting, return_exceptions=True)


async def run_transaction(session: QmpSession, jobs: list[BackupJob], *,
                          speed: int = 0, compress: bool = False,
                          offload: Optional[OffloadChoice] = None,
                          progress: Optional[ProgressHook] = None,
                          start_guard: Optional[AsyncContextManager[Any]] = None) -> None:
    """Start all jobs atomically with grouped completion and wait for them.

    START_GUARD is entered right before the transaction and left as soon as
    QEMU accepted it: the point in time of every disk is fixed by then.
    """
    waiter: Optional[asyncio.Future[None]] = None
    try:
        if start_guard is None:
            waiter = await _start(session, jobs, speed=speed, compress=compress, offload=offload)
        else:
            # e.g. guest filesystems frozen just for the start; the command is
            # created inside, so a guard that refuses leaves no unawaited coroutine
            async with start_guard:
                waiter = await _start(session, jobs, speed=speed, compress=compress,
                                      offload=offload)
    except BaseException:
        if waiter is not None:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        raise
    reached("jobs-running")
    reporter = asyncio.ensure_future(progress(jobs)) if progress else None
    try:
        await waiter
    finally:
        if reporter:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
    failed = [j for j in jobs if j.result]
    if failed:
        real = [j for j in failed if j.result != "cancelled"] or failed
        if all(j.target_failed for j in real):
            detail = "; ".join(f"cannot write {j.partial_path}: {j.result}" for j in real)
            raise TargetError(f"backup failed: {detail}; nothing recorded, no bitmap advanced")
        if all(snapshot_broke(j) for j in real):
            disks = ", ".join(j.disk.disk_id for j in real)
            raise FleecingError(
                f"the fleecing snapshot of {disks} broke: old data could not be saved to the "
                "fleecing image within --cbw-timeout (fleecing storage too slow or full); "
                "the guest's writes went through, nothing recorded, no bitmap advanced")
        detail = "; ".join(f"{j.disk.disk_id}: {j.result}" for j in real)
        raise JobError(f"backup job failed ({detail}); nothing recorded, no bitmap advanced")


async def _start(session: QmpSession, jobs: list[BackupJob], *, speed: int, compress: bool,
                 offload: Optional[OffloadChoice]) -> asyncio.Future[None]:
    """Start the transaction, once more without x-perf if QEMU refuses it (unless required).

    A refused transaction is atomic (no job, no bitmap change), so the retry
    starts from the same state and still fixes one point in time for all disks.
    A refusal that stands is the jobs failing to start: a :class:`JobError`.
    """
    x_perf = offload.x_perf if offload else None
    try:
        return await _start_once(session, jobs, speed=speed, compress=compress, x_perf=x_perf)
    except QmpCommandError as err:
        if x_perf is None or (offload is not None and offload.required):
            raise JobError(str(err)) from err
        log.warning("QEMU refused copy offload (%s); backing up with its default copy path",
                    err.desc)
    for job in jobs:
        job.result, job.target_failed = None, False
    try:
        return await _start_once(session, jobs, speed=speed, compress=compress, x_perf=None)
    except QmpCommandError as err:
        raise JobError(str(err)) from err


async def _start_once(session: QmpSession, jobs: list[BackupJob], *, speed: int,
                      compress: bool, x_perf: Optional[dict[str, Any]]) -> asyncio.Future[None]:
    """Send the transaction with every job's watcher already listening; return the waiter."""
    actions = [backup_action(j, speed=speed, compress=compress, x_perf=x_perf) for j in jobs]
    waiter = asyncio.ensure_future(_wait_for_jobs(session, jobs))
    await asyncio.sleep(0)  # let the watchers register before any event can arrive
    for job in jobs:
        job.started = time.monotonic()
    try:
        await session.execute("transaction", {"actions": actions,
                                              "properties": {"completion-mode": "grouped"}})
    except BaseException:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        raise
    return waiter


def snapshot_broke(job: BackupJob) -> bool:
    """A fleecing snapshot refuses every read (EACCES) once a copy-before-write failed."""
    return bool(job.source_node) and job.source_failed and job.result == os.strerror(errno.EACCES)


async def cancel_jobs(session: QmpSession, job_ids: list[str]) -> None:
    """Cancel the given jobs (only ours) and wait until QEMU has dropped them."""
    if not job_ids:   # every run asks for its leftovers: no round trip when there are none
        return
    running = {j["id"] for j in await session.execute("query-jobs")} & set(job_ids)
    if not running:
        return
    with contextlib.ExitStack() as stack:
        streams = {job_id: stack.enter_context(session.events(["JOB_STATUS_CHANGE"], job_id))
                   for job_id in running}
        await _cancel_and_wait(session, streams)


async def _cancel_and_wait(session: QmpSession, streams: dict[str, EventStream]) -> None:
    try:
        for job_id in streams:
            log.info("cancelling block job %s", job_id)
            try:
                await session.execute("block-job-cancel", {"device": job_id, "force": True})
            except QmpCommandError as err:
                log.debug("cancel %s: %s", job_id, err.desc)

        async def gone(events: EventStream) -> None:
            async for event in events:
                if event.data.get("status") == "null":
                    return
        await asyncio.wait_for(asyncio.gather(*(gone(s) for s in streams.values())),
                               timeout=CANCEL_TIMEOUT)
    except asyncio.TimeoutError:
        log.warning("block jobs %s did not end within %.0f s", sorted(streams), CANCEL_TIMEOUT)

