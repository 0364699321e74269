"""One backup run, from discovery to the committed chain metadata.

The order of steps is what keeps data safe:

1. plan (pure, may refuse before anything exists);
2. create ``.partial`` targets and open them in QEMU;
3. add missing chain bitmaps (separate transaction: QEMU cannot add bitmaps
   in a grouped transaction);
4. start every disk's job in one grouped transaction and wait;
5. only after all jobs succeeded: rename targets and commit the metadata.

Every step registers its undo; on any failure or signal the undo runs in
reverse, so QEMU is left without our nodes and jobs, the folder without
half-written files, and the bitmaps with all their bits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import bitmaps, qemuimg
from .chain import (BackupRecord, ChainStore, fsync_dir, is_empty_dir, latest_backup_time,
                    partial_files, prepare_root)
from .devices import discover
from .errors import AgentError, TargetError
from .jobs import BackupJob, add_target_node, cancel_jobs, new_run_tag, remove_node, run_transaction
from .plan import BackupOptions, RunPlan, chain_root, plan_backup, select_disks
from .progress import ProgressReporter
from .qmp import QmpSession
from .quiesce import Quiescer

log = logging.getLogger(__name__)


@dataclass
class BackupResult:
    level: str
    root: Path
    chain_id: Optional[str]
    files: list[Path] = field(default_factory=list)
    reason: str = ""


def _timestamp_after(last: int) -> int:
    """A unix time later than every backup in the folder, so names stay unique and ordered."""
    now = int(time.time())
    if now <= last:
        time.sleep(last + 1 - time.time())
        now = last + 1
    return now


async def run_backup(session: QmpSession, opts: BackupOptions) -> BackupResult:
    disks = select_disks(await discover(session), opts)
    root = chain_root(opts)
    prepare_root(root)
    leftovers = partial_files(root)
    if leftovers:
        raise TargetError(
            f"unfinished backup file {leftovers[0]} in {root}: another run is active or one "
            "was killed; remove the .partial files once no backup is running")
    store = ChainStore.load(root)
    timestamp = _timestamp_after(latest_backup_time(root))
    plan = plan_backup(disks, store, opts, timestamp, is_empty_dir(root))
    log.info("level %s for %d disk(s) into %s (%s)", plan.level, len(plan.jobs), root, plan.reason)
    if plan.retire_bitmap:
        for disk in disks:
            if disk.bitmap(plan.retire_bitmap):
                await bitmaps.remove(session, disk, plan.retire_bitmap)
    quiescer = (Quiescer(opts.agent_socket, required=opts.quiesce_required)
                if opts.quiesce else None)
    await _execute(session, plan, opts, quiescer)
    if plan.chain is not None:
        _commit_metadata(store, plan, opts.compress, bool(quiescer and quiescer.frozen))
    if quiescer and quiescer.thaw_error:
        raise AgentError(quiescer.thaw_error)
    return BackupResult(plan.level, root, plan.chain.uuid if plan.chain else None,
                        [j.final_path for j in plan.jobs], plan.reason)


async def _execute(session: QmpSession, plan: RunPlan, opts: BackupOptions,
                   quiescer: Optional[Quiescer]) -> None:
    tag = new_run_tag()
    async with contextlib.AsyncExitStack() as undo:
        committed = False

        def forget_partials() -> None:
            if committed:
                return
            for job in plan.jobs:
                with contextlib.suppress(FileNotFoundError):
                    job.partial_path.unlink()
                    log.info("removed unfinished %s", job.partial_path)

        undo.callback(forget_partials)
        for index, job in enumerate(plan.jobs):
            job.assign_names(index, tag)
            _create_target(job)
        open_nodes: list[str] = []

        async def close_targets() -> None:
            while open_nodes:
                await remove_node(session, open_nodes.pop())

        undo.push_async_callback(close_targets)
        for job in plan.jobs:
            await add_target_node(session, job)
            open_nodes.append(job.target_node)
        if plan.bitmaps_to_add:
            assert plan.chain is not None
            await bitmaps.add_persistent(session, plan.bitmaps_to_add, plan.chain.bitmap)
            log.info("added bitmap %s to %s", plan.chain.bitmap,
                     ", ".join(d.disk_id for d in plan.bitmaps_to_add))

            async def drop_new_bitmaps() -> None:
                if not committed:
                    for disk in plan.bitmaps_to_add:
                        await bitmaps.remove(session, disk, plan.chain.bitmap)  # type: ignore[union-attr]
            undo.push_async_callback(drop_new_bitmaps)
        undo.push_async_callback(_cancel_if_running, session, plan.jobs)
        reporter = ProgressReporter(session) if opts.progress else None
        await run_transaction(session, plan.jobs, speed=opts.speed_limit,
                              compress=opts.compress, progress=reporter,
                              start_guard=quiescer)
        await close_targets()
        for job in plan.jobs:
            os.replace(job.partial_path, job.final_path)
            fsync_dir(job.final_path.parent)
            log.info("%s: %s backup %s", job.disk.disk_id, job.level, job.final_path)
        committed = True


async def _cancel_if_running(session: QmpSession, jobs: list[BackupJob]) -> None:
    if session.connected:
        await cancel_jobs(session, [j.job_id for j in jobs])


def _create_target(job: BackupJob) -> None:
    folder = job.partial_path.parent
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise TargetError(f"cannot create {folder}: {err.strerror}") from err
    qemuimg.create(job.partial_path, job.disk.virtual_size, backing=job.backing)


def _commit_metadata(store: ChainStore, plan: RunPlan, compressed: bool, quiesced: bool) -> None:
    chain = plan.chain
    assert chain is not None
    if plan.new_chain:
        store.chains.append(chain)
    for job in plan.jobs:
        chain.disk(job.disk.disk_id).backups.append(BackupRecord(
            file=job.final_path.name, level=job.level,
            time=plan.timestamp,
            virtual_size=job.disk.virtual_size, source_image=job.disk.filename,
            source_format=job.disk.driver, compressed=compressed, quiesced=quiesced))
    store.save()
