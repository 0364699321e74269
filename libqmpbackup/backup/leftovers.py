"""Leftovers of a killed run, removed by the next run before it plans anything.

A run killed with SIGKILL (or by a host power loss) cannot undo its steps.
What it leaves is recognisable by name: block jobs and nodes ``qmpbackup-*``
in QEMU (with ``--fleecing`` also devices switched onto a filter of ours:
:func:`fleecing.clean_leftovers`), a fleecing
folder whose process is gone, auxiliary bitmaps ``qmpbackup-<id>+pending`` / ``+new`` (see
:mod:`bitmaps`), ``*.partial`` backup files and half-written metadata temp
files in the chain folder (symlinked disk folders are not followed,
and only regular files are removed).  The caller holds the VM lock and the chain lock,
so no other qmpbackup run can own any of them: each is removed and logged,
and the run goes on — no manual step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from pathlib import Path

from libqmpbackup.backup import bitmaps, encryption, fleecing
from libqmpbackup.backup.jobs import cancel_jobs, remove_node
from libqmpbackup.backup.pause import resume_after_killed_run
from libqmpbackup.backup.shutdown_guard import ShutdownGuard
from libqmpbackup.errors import TargetError
from libqmpbackup.qemu.devices import BlockDevice, named_nodes
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import partial_files, stale_temp_files
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import CHAIN_FOLDER, TOOL_PREFIX, fleecing_folder_pid

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
    nodes = [*await fleecing.clean_leftovers(session, disks), *await _clean_nodes(session),
             *await _clean_fdsets(session)]
    await encryption.clean_leftover_secrets(session)
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


async def _clean_fdsets(session: QmpSession) -> list[str]:
    """The fdsets of a killed run's targets (their opaque is the node name, qmpbackup-…)."""
    if not session.has_guest:
        return []    # a qemu-storage-daemon has no fdsets (and lives only as long as its run)
    stale = [fdset["fdset-id"] for fdset in await session.execute("query-fdsets")
             if any(str(fd.get("opaque", "")).startswith(TOOL_PREFIX)
                    for fd in fdset.get("fds", []))]
    for fdset in stale:
        if await session.remove_fdset(fdset):
            log.warning("removed fdset %s of an interrupted run", fdset)
    return [f"fdset {fdset}" for fdset in stale]


def clean_target(chain_folder: BackupFolder) -> None:
    """Delete what an interrupted run left in the chain folder: unfinished and unrecorded files,
    temp files.

    Unrecorded files are those the run's intent record names and the metadata
    does not (:mod:`libqmpbackup.store.intent`): complete copies of a backup that
    was never committed.  Their changes are still in the dirty bitmaps (the
    VM side was settled by :func:`clean_vm` first), so this run backs them up
    again.  The record goes last, once the deletions are on disk.

    The folder is walked through its descriptor: a disk folder is opened
    relative to it without following symlinks, so a record naming
    ``evil/<file>`` with ``evil`` a symlink to a host folder is refused, and
    nothing outside the folder can be deleted.
    """
    intent = chain_folder.intent
    unrecorded = intent.unrecorded(chain_folder.store) if intent else []
    top = chain_folder.folder
    leftovers = [ChainFile(*_split(name)) for name in [*partial_files(top),
                                                          *stale_temp_files(top)]]
    touched: set[str] = set()
    for file in [*leftovers, *unrecorded]:
        folder = chain_folder.disk_folder(file.folder)
        touched.add(file.folder)
        _remove_leftover(folder, file.name,
                         unrecorded=file in unrecorded and file.folder != CHAIN_FOLDER)
    for name in sorted(touched):
        chain_folder.disk_folder(name).fsync()   # the deletions are on disk before the record goes
    chain_folder.close_disk_folders()
    for name in sorted(touched - {CHAIN_FOLDER}):
        with contextlib.suppress(OSError):   # kept when it holds other files
            os.rmdir(name, dir_fd=top.fd)
    if intent is not None:
        chain_folder.drop_intent()
        top.fsync()
        log.warning("removed the intent record of an interrupted run (%s)",
                    "its files were recorded" if not unrecorded else "rolled back")


def _split(name: str) -> tuple[str, str]:
    """(disk folder, file) of a name :func:`names_in_and_below` gave."""
    folder, _, file = name.rpartition("/")
    return folder or CHAIN_FOLDER, file


def _remove_leftover(folder: Folder, name: str, *, unrecorded: bool) -> None:
    try:
        removed = folder.remove(name, "file")
    except TargetError as err:
        raise TargetError(f"{err}, left by an interrupted run") from err
    if removed and unrecorded:
        log.warning("removed %s, left by an interrupted run that never recorded it: "
                    "its changes go into this backup", folder.path / name)
    elif removed:
        log.warning("removed %s, left by an interrupted run", folder.path / name)


def clean_fleecing_dir(folder: Path) -> None:
    """Delete fleecing folders of runs whose process is gone (killed before the images were unlinked)."""
    try:
        candidates = list(folder.iterdir())
    except OSError:
        return
    for path in candidates:
        pid = fleecing_folder_pid(path.name)
        if pid is None or pid == os.getpid() or _alive(pid) or not _own_folder(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an interrupted run", path)


def _own_folder(path: Path) -> bool:
    """A real folder of this user: another user's look-alike in a shared /var/tmp is not ours."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
