"""One backup run, from discovery to the committed chain metadata.

The order of steps is what keeps data safe:

1. plan (pure, may refuse before anything exists);
2. under the VM lock (taken by the caller) and the chain lock: remove what an
   interrupted run left (:mod:`leftovers`) and the files an interrupted prune
   had already dropped from the metadata (:mod:`libqmpbackup.store.prune`);
3. create ``.partial`` targets and hand them to QEMU as descriptors, never by
   name (:mod:`targets`: a user who can write the folder cannot redirect them);
4. in one transaction: add missing chain bitmaps and the auxiliary bitmaps
   that keep the changes since the last commit (:class:`bitmaps.RunBitmaps`);
5. with ``--fleecing``, switch the devices onto their fleecing filters (the
   point in time, :mod:`fleecing`); start every disk's job in one grouped
   transaction and wait, with guest shutdowns held back (:mod:`shutdown`);
   switch the devices back;
6. only after all jobs succeeded: close the targets, hash them (checksums for
   the metadata), announce the renames in the intent record, rename, commit
   the metadata, then drop the intent record and the auxiliary bitmaps; a
   signal after the commit no longer fails the run (the result is returned).

Every step registers its undo; on any failure or signal the undo runs in
reverse, so QEMU is left without our nodes and jobs, the folder without
half-written files, and the bitmaps covering every change since the last
committed backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Optional

from libqmpbackup.backup import bitmaps, encryption, leftovers, monthly, offload
from libqmpbackup.backup.adopt import adopt_upstream
from libqmpbackup.backup.fleecing import Fleecing
from libqmpbackup.backup.jobs import (
    BackupJob,
    cancel_jobs,
    check_target_io,
    new_run_tag,
    run_transaction,
)
from libqmpbackup.backup.pause import VmPause
from libqmpbackup.backup.plan import (
    BackupOptions,
    RunPlan,
    chain_root,
    left_out,
    plan_backup,
    select_disks,
)
from libqmpbackup.backup.progress import ProgressReporter
from libqmpbackup.backup.quiesce import Quiescer
from libqmpbackup.backup.result import BackupFile, BackupResult, per_disk_levels
from libqmpbackup.backup.run_steps import finish_regardless, reached
from libqmpbackup.backup.shutdown_guard import ShutdownGuard
from libqmpbackup.backup.targets import TargetFiles, TargetNodes
from libqmpbackup.errors import AgentError, CommandRefused, TargetError, UsageError, VMGoneError
from libqmpbackup.qemu import capabilities, qemuimg
from libqmpbackup.qemu.devices import BlockDevice, discover, refresh_bitmaps
from libqmpbackup.qemu.qmp import QmpSession
from libqmpbackup.store import upstream
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import (
    existing_names,
    is_empty_dir,
    latest_backup_time,
    prepare_root,
    refuse_mixed,
)
from libqmpbackup.store.metadata import BackupRecord
from libqmpbackup.store.names import CHAIN_FOLDER, METADATA_NAME
from libqmpbackup.store.prune import finish_interrupted_prune

log = logging.getLogger(__name__)


def _timestamp_after(last: int) -> int:
    """A unix time later than every backup in the folder, so names stay unique and ordered."""
    now = int(time.time())
    if now <= last:
        time.sleep(last + 1 - time.time())
        now = last + 1
    return now


def _open_target(opts: BackupOptions) -> Optional[Folder]:
    """--target held open, once a folder is there; a plain run and a --monthly one never mix."""
    if not os.path.isdir(opts.target):
        return None     # missing (created below), or not a folder (prepare_root says so)
    target = Folder.open_root(opts.target)
    try:
        if opts.level != "copy":
            refuse_mixed(target, opts.monthly, plain_chain=(
                target.entry(METADATA_NAME) is not None or upstream.chain_id(target) is not None))
    except BaseException:
        target.close()
        raise
    return target


def _chain_folder(opts: BackupOptions, root: Path, target: Optional[Folder]
                  ) -> Optional[BackupFolder]:
    """The run's chain folder, from the held --target: itself, or its month (never a link)."""
    if target is None or (opts.monthly and target.entry(root.name) is None):
        return None
    return BackupFolder.below(target, root.name if opts.monthly else CHAIN_FOLDER)


async def run_backup(session: QmpSession, opts: BackupOptions) -> BackupResult:
    """Back up the VM behind SESSION; the caller holds the VM lock (see :mod:`locks`).

    The target is opened once and the chain folder held from then on
    (:class:`BackupFolder`): everything the run reads or writes in it goes
    through that object.
    """
    disks = await discover(session)
    selected = select_disks(disks, opts)
    await check_target_io(session, opts.target_io)
    root = chain_root(opts)
    held = contextlib.ExitStack()
    try:
        target = _open_target(opts)
        if target is not None:
            held.callback(target.close)
        chain_folder = _chain_folder(opts, root, target)
        if chain_folder is not None:
            held.callback(chain_folder.close)
        # the key fits the chain, or nothing is touched (the bitmaps keep every change)
        encryption.precheck(chain_folder, opts.level, opts.key,
                            session.passes_fds or not session.has_guest)
        created = prepare_root(root)
        try:
            if target is None:
                target = held.enter_context(Folder.open_root(opts.target))
            if chain_folder is None:
                chain_folder = _chain_folder(opts, root, target)
                assert chain_folder is not None   # prepare_root made it
                held.callback(chain_folder.close)
            with chain_folder.locked():
                return await _locked_run(session, opts, disks, selected, target, chain_folder)
        except BaseException:
            # a failed run leaves no folder it created (rmdir keeps any that is in use)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    finally:
        held.close()


async def _locked_run(session: QmpSession, opts: BackupOptions, disks: list[BlockDevice],
                      selected: list[BlockDevice], target: Folder, chain_folder: BackupFolder
                      ) -> BackupResult:
    root = chain_folder.path
    guard = ShutdownGuard(session)
    if await leftovers.clean_vm(session, disks, guard):
        await refresh_bitmaps(session, selected)
    leftovers.clean_target(chain_folder)
    if opts.fleecing:
        leftovers.clean_fleecing_dir(opts.fleecing.folder)
    finish_interrupted_prune(chain_folder)
    chain_folder.refuse_unfinished_restores()
    store = chain_folder.store
    if not store.chains and upstream.chain_id(chain_folder.folder) is not None:
        store = adopt_upstream(chain_folder, disks)
    first_chain = store.current is None
    top = chain_folder.folder
    timestamp = _timestamp_after(max(latest_backup_time(top), store.latest_time()))
    plan = plan_backup(selected, store, opts, timestamp, is_empty_dir(top), existing_names(top),
                       excluded=left_out(disks, opts))
    log.info("level %s: %s into %s (%s)", plan.level,
             per_disk_levels([(j.level, j.note) for j in plan.jobs]), root, plan.reason)
    _encryption_of(plan, opts)
    if plan.retire_bitmap:
        for disk in selected:
            for name in bitmaps.chain_bitmaps(disk, plan.retire_bitmap):
                await bitmaps.remove(session, disk, name)
    quiescer = (Quiescer(opts.agent_socket, required=opts.quiesce_required)
                if opts.quiesce else None)
    pause = VmPause(session) if opts.pause else None
    try:
        await _execute(session, plan, chain_folder, opts, guard, quiescer, pause)
    finally:
        await guard.finish()
    if (opts.monthly and plan.chain is not None and not plan.chain.is_copies
            and plan.new_chain and first_chain):
        await monthly.retire_previous_month(session, disks, target, root.name, plan.chain.bitmap)
    if quiescer and quiescer.thaw_error:
        raise AgentError(quiescer.thaw_error)
    if pause and pause.resume_error:
        raise CommandRefused(pause.resume_error)
    chain_id = plan.chain.uuid if plan.chain and not plan.chain.is_copies else None
    return BackupResult(level=plan.level, root=root, chain_id=chain_id, time=plan.timestamp,
                        files=[BackupFile.of(j, plan.timestamp) for j in plan.jobs],
                        reason=plan.reason, quiesced=bool(quiescer and quiescer.frozen))


async def _execute(session: QmpSession, plan: RunPlan, chain_folder: BackupFolder,
                   opts: BackupOptions,
                   guard: ShutdownGuard, quiescer: Optional[Quiescer],
                   pause: Optional[VmPause]) -> None:
    tag = new_run_tag()
    copy_path = await _copy_path(session, plan, opts)   # may refuse: before anything exists
    key = opts.key if plan.chain is not None and plan.chain.encrypted else None
    with qemuimg.using_key(key), TargetFiles(jobs=plan.jobs, chain_folder=chain_folder,
                                             recorded=plan.chain is not None,
                                             names_for_qemu=not session.passes_fds) as files:
        async with contextlib.AsyncExitStack() as undo:
            undo.callback(files.discard)
            targets = []
            for index, job in enumerate(plan.jobs):
                job.assign_names(index, tag)
                targets.append(files.create(job))
            reached("targets-created")
            nodes = TargetNodes(session)
            if key is not None:
                nodes.secret = await encryption.add_secret(session, key, tag)
                # registered first, so it goes after the nodes that use it
                undo.push_async_callback(encryption.remove_secret, session, nodes.secret)
            undo.push_async_callback(nodes.close)
            for target in targets:
                await nodes.open(target, opts.target_io)
            run_bitmaps = _run_bitmaps(plan)
            if run_bitmaps:
                await run_bitmaps.prepare(session)
                undo.push_async_callback(run_bitmaps.undo, session)
            fleecing = (Fleecing(session=session, options=opts.fleecing, jobs=plan.jobs, run_tag=tag)
                        if opts.fleecing else None)
            if fleecing:
                undo.push_async_callback(fleecing.release)
                await fleecing.prepare()
            undo.push_async_callback(_cancel_if_running, session, plan.jobs)
            reporter = (ProgressReporter(session, log_interval=opts.progress_interval)
                        if opts.progress else None)
            async with contextlib.AsyncExitStack() as copying:
                start_guard = quiescer
                if pause is not None:
                    # a paused guest's agent cannot answer: freeze before the
                    # pause, thaw after it (the guest sees no time pass between)
                    if quiescer is not None:
                        await copying.enter_async_context(quiescer)
                        start_guard = None
                    await copying.enter_async_context(pause)
                await copying.enter_async_context(guard.holding())
                if fleecing:   # the point in time is the switch: the freeze covers it instead
                    await fleecing.switch(start_guard=start_guard)
                    start_guard = None
                await run_transaction(session, plan.jobs, speed=opts.speed_limit,
                                      compress=opts.compress, offload=copy_path, progress=reporter,
                                      start_guard=start_guard)
            if fleecing:
                await fleecing.release(strict=True)
            left_open = await nodes.close()
            if left_open:   # an image QEMU did not close may lack its last metadata writes
                if not session.connected:
                    raise VMGoneError("QEMU went away before it closed the backup files; "
                                      "they were discarded, nothing was recorded")
                raise CommandRefused(f"QEMU could not close backup node(s) {', '.join(left_open)}; "
                                     "the backup was discarded, nothing was recorded")
            reached("jobs-done")
            if plan.chain is not None and opts.checksum:
                await files.compute_digests()
            files.finish()
            reached("renamed")
            if run_bitmaps:
                await run_bitmaps.before_commit(session)
            if plan.chain is not None:
                _commit_metadata(chain_folder, plan, opts.compress,
                                 bool(quiescer and quiescer.frozen))
            undo.pop_all()  # committed: from here on nothing may be undone
        # a signal from here on no longer fails the run: the backup is recorded
        await finish_regardless(_after_commit(session, plan, files, run_bitmaps, nodes.secret))


def _encryption_of(plan: RunPlan, opts: BackupOptions) -> None:
    """A new chain is encrypted when a key was given; a continued one must match it."""
    chain = plan.chain
    if chain is None:
        return
    if plan.new_chain:
        chain.encrypted = opts.key is not None
    elif chain.encrypted != (opts.key is not None):   # precheck refused this before; raced
        raise UsageError(f"chain {chain.uuid} is {'' if chain.encrypted else 'not '}encrypted: "
                         "a chain cannot mix encrypted and clear files")


async def _after_commit(session: QmpSession, plan: RunPlan, files: TargetFiles,
                        run_bitmaps: Optional[bitmaps.RunBitmaps], secret: Optional[str] = None
                        ) -> None:
    """What is left once the backup is recorded: cleanup, never undone, never a failure."""
    reached("committed")
    if secret is not None:
        await encryption.remove_secret(session, secret)
    if plan.chain is not None:
        files.chain_folder.drop_intent()
    files.link()
    if run_bitmaps:
        await run_bitmaps.after_commit(session)
    reached("finished")


async def _copy_path(session: QmpSession, plan: RunPlan,
                     opts: BackupOptions) -> offload.OffloadChoice:
    whole = sum(j.disk.virtual_size for j in plan.jobs if j.sync in ("full", "top"))
    offered = None
    if offload.wants_probe(opts.copy_offload, opts.compress, whole):
        offered = (await capabilities.probe(session)).copy_range
    choice = offload.choose(opts.copy_offload, opts.compress, offered)
    log.debug("copy path: %s", choice.reason)
    return choice


def _run_bitmaps(plan: RunPlan) -> Optional[bitmaps.RunBitmaps]:
    if plan.chain is None or plan.chain.is_copies:
        return None
    added = plan.bitmaps_to_add
    chain_bitmap = plan.chain.bitmap
    kept = [j.disk for j in plan.jobs if j.bitmap and j.disk not in added]
    return bitmaps.RunBitmaps(
        chain_bitmap, kept=kept, added=list(added),
        differential=[j.disk for j in plan.jobs if j.level == "diff"],
        diff_added=[j.disk for j in plan.jobs if j.level == "full" and j.bitmap
                    and j.disk not in added
                    and j.disk.bitmap(bitmaps.diff_bitmap(chain_bitmap)) is None])


async def _cancel_if_running(session: QmpSession, jobs: list[BackupJob]) -> None:
    with contextlib.suppress(VMGoneError):  # QEMU gone: its jobs are gone too
        await cancel_jobs(session, [j.job_id for j in jobs])


def _commit_metadata(chain_folder: BackupFolder, plan: RunPlan, compressed: bool,
                     quiesced: bool) -> None:
    store = chain_folder.store
    chain = plan.chain
    assert chain is not None
    if plan.new_chain:
        store.chains.append(chain)
    for job in plan.jobs:
        disk = chain.disk(job.disk.disk_id)
        disk.folder = (CHAIN_FOLDER if job.final_path.parent == store.root
                       else job.final_path.parent.name)
        disk.backups.append(BackupRecord(
            file=job.final_path.name, level=job.level,
            time=plan.timestamp,
            virtual_size=job.disk.virtual_size, source_image=job.disk.filename,
            source_format=job.disk.driver, compressed=compressed, quiesced=quiesced,
            backed=job.backed, timestamped=job.timestamped, digest=job.digest))
    try:
        chain_folder.save(before_replace=lambda: reached("commit-written"))
    except TargetError as err:
        raise TargetError(f"{err}; the backup was discarded") from err
