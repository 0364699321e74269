"""Leftovers of a killed run, removed by the next run before it plans anything.

A run killed with SIGKILL (or by a host power loss) cannot undo its steps.
What it leaves is recognisable by name: block jobs and nodes ``qmpbackup-*``
in QEMU, auxiliary bitmaps ``qmpbackup-<id>+pending`` / ``+new`` (see
:mod:`bitmaps`), ``*.partial`` backup files and half-written metadata temp
files in the chain folder (symlinked disk folders are not followed,
and only regular files are removed).  The caller holds the VM lock and the chain lock,
so no other qmpbackup run can own any of them: each is removed and logged,
and the run goes on — no manual step.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from libqmpbackup import folder_safety
from libqmpbackup.backup import bitmaps
from libqmpbackup.backup.jobs import cancel_jobs, remove_node
from libqmpbackup.backup.pause import resume_after_killed_run
from libqmpbackup.backup.shutdown_guard import ShutdownGuard
from libqmpbackup.errors import TargetError
from libqmpbackup.layout import partial_files, stale_temp_files
from libqmpbackup.names import TOOL_PREFIX
from libqmpbackup.qemu.devices import BlockDevice, named_nodes
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession

log = logging.getLogger(__name__)


async def clean_vm(session: QmpSession, disks: list[BlockDevice],
                   guard: ShutdownGuard) -> bool:
    """Remove an interrupted run's jobs, nodes and auxiliary bitmaps; True if bitmaps changed.

    Jobs go first (a running job keeps its target node and chain bitmap
    busy), then nodes, then bitmaps.  A killed run may also have left the
    shutdown action at ``pause``, so it is set back when anything was found.
    """
    await resume_after_killed_run(session)
    jobs = await _clean_jobs(session)
    nodes = await _clean_nodes(session)
    steps = bitmaps.recovery_steps(disks)
    for step in steps:
        if await bitmaps.try_transaction(session, step.actions, f"settle bitmaps of an "
                                         f"interrupted run on {step.disk.disk_id}"):
            log.warning("%s", step.message)
    if jobs or nodes or steps:
        await guard.settle_interrupted_run()
    return bool(steps)


async def _clean_jobs(session: QmpSession) -> list[str]:
    ours = [j for j in await session.execute("query-jobs") if j["id"].startswith(TOOL_PREFIX)]
    running = []
    for job in ours:
        if job.get("status") == "concluded":
            try:
                await session.execute("job-dismiss", {"id": job["id"]})
            except QmpCommandError as err:
                log.debug("dismiss %s: %s", job["id"], err.desc)
            log.warning("dismissed block job %s of an interrupted run", job["id"])
        else:
            log.warning("cancelling block job %s of an interrupted run (%s)", job["id"],
                        job.get("status"))
            running.append(job["id"])
    await cancel_jobs(session, running)
    return [j["id"] for j in ours]


async def _clean_nodes(session: QmpSession) -> list[str]:
    nodes = [n["node-name"] for n in await named_nodes(session)
             if n["node-name"].startswith(TOOL_PREFIX)]
    for node in nodes:
        if await remove_node(session, node):
            log.warning("removed block node %s of an interrupted run", node)
    return nodes


def clean_target(root: Path) -> None:
    """Delete unfinished backup files and metadata temp files an interrupted run left in ROOT.

    A disk folder the interrupted run created holds nothing else then; it
    goes too, so a killed first FULL does not leave the folder "not empty"
    for the next one.
    """
    for path in [*partial_files(root), *stale_temp_files(root)]:
        try:
            removed = folder_safety.remove(path.parent, path.name)
        except TargetError as err:
            raise TargetError(f"{err}, left by an interrupted run") from err
        if removed:
            log.warning("removed %s, left by an interrupted run", path)
        if removed and path.parent != root:
            with contextlib.suppress(OSError):   # only an empty folder can go
                path.parent.rmdir()
