"""Image fleecing: a slow or hung backup target never stalls the guest.

With a plain ``blockdev-backup`` a guest write to a cluster the job has not
copied yet waits until the old data reached the backup target, so a slow
NAS slows the guest for the whole backup.  With ``--fleecing`` each writable
disk's device is switched onto a ``copy-before-write`` filter that saves old
data into a fleecing image on fast local storage; the jobs read the frozen
view through a ``snapshot-access`` node and write the target at its own pace::

    device -> qmpbackup-fc<i>  (copy-before-write) --file--> disk node
                   |  target
                   v
              qmpbackup-fi<i>  (qcow2 fleecing image in --fleecing-dir)
    job    <- qmpbackup-fs<i>  (snapshot-access of qmpbackup-fc<i>)

The point in time is the switch.  QEMU 7.2 cannot switch devices in one
transaction, and a guest write between opening a filter (which reads the
chain bitmap) and switching the device would escape the snapshot, so a
running VM is paused (``stop``) for the few milliseconds of the switch (the
log says how long) by :class:`pause.VmPause`, whose marker lets the next run
resume a VM that a run killed inside the window left paused.  In the same window, in one transaction, an
incremental's chain bitmap is frozen into a bitmap of the snapshot node (the
job copies exactly those clusters, and the filter copies before write only
those) and every chain bitmap is cleared, so from then on it records the
writes after the point in time.  The ``+pending`` copy (:mod:`bitmaps`) still
holds every change since the last commit until the backup is committed, so a
failure or a kill merges it back and loses nothing.

``on-cbw-error: break-snapshot``: when saving old data fails or takes longer
than ``--cbw-timeout``, the guest's write completes anyway and the snapshot
refuses all further reads; the job fails and :mod:`jobs` reports it as
:class:`FleecingError`.

Fleecing images live in a private folder (``mkdtemp``, the run's pid in its
name) and are unlinked as soon as QEMU opened them: QEMU frees the space when
it closes the node or dies, so only a run killed in that short window leaves
files, which the next run removes (the pid is gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator, Optional

from libqmpbackup.backup import bitmaps
from libqmpbackup.backup.jobs import BackupJob, remove_node
from libqmpbackup.backup.pause import VmPause
from libqmpbackup.errors import CommandRefused, UsageError, VMGoneError
from libqmpbackup.qemu import qemuimg
from libqmpbackup.qemu.devices import BlockDevice, named_nodes
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.names import TOOL_PREFIX, fleecing_folder_prefix, safe_component

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/var/tmp")
DEFAULT_CBW_TIMEOUT = 45
MAX_CBW_TIMEOUT = 3600
SNAPSHOT_BITMAP = f"{TOOL_PREFIX}snapshot"   # on the snapshot node only, dies with it
FILTER_DRIVER = "copy-before-write"
SNAPSHOT_DRIVER = "snapshot-access"
# QEMU does the file I/O of all nodes with one pool of at most 64 threads, and a
# backup job copies with up to 64 workers: against a hung target every worker
# blocks one thread in its write, and the guest's own I/O (and the fleecing
# copies) would queue behind them.  The jobs of a fleecing run together keep to
# half the pool (``x-perf``, in QEMU 7.2's schema, marked unstable).
THREAD_BUDGET = 32
MAX_JOB_WORKERS = 8


@dataclass(frozen=True)
class FleecingOptions:
    """--fleecing-dir and --cbw-timeout, checked."""

    folder: Path = DEFAULT_DIR
    cbw_timeout: int = DEFAULT_CBW_TIMEOUT


def check_options(folder: Path, cbw_timeout: int, target: Path) -> FleecingOptions:
    """Refuse a fleecing set-up that cannot work, before anything is touched."""
    if not 1 <= cbw_timeout <= MAX_CBW_TIMEOUT:
        raise UsageError(f"--cbw-timeout {cbw_timeout}: use 1 to {MAX_CBW_TIMEOUT} seconds "
                         "(without a limit a hung fleecing storage would hang the guest)")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--fleecing-dir {folder} is not a writable directory")
    real, target_real = folder.resolve(), target.resolve()
    if real == target_real or target_real in real.parents:
        raise UsageError(f"--fleecing-dir {folder} is inside the backup target {target}: "
                         "fleecing images belong on fast local storage, not on the target")
    return FleecingOptions(folder=real, cbw_timeout=cbw_timeout)   # QEMU has its own cwd


def device_path(disk: BlockDevice) -> str:
    """The QOM path whose ``drive`` property attaches DISK to its guest device."""
    return disk.qdev if disk.qdev.startswith("/") else f"/machine/peripheral/{disk.qdev}"


def needs_fleecing(disk: BlockDevice) -> bool:
    """Only a device the guest can write through can make it wait."""
    return bool(disk.qdev) and not disk.read_only


@dataclass
class _FleecedDisk:
    """One disk's fleecing nodes and how far they got, so teardown undoes exactly that."""

    job: BackupJob
    image_node: str
    filter_node: str
    snapshot_node: str
    added: list[str] = field(default_factory=list)
    switched: bool = False

    @property
    def disk(self) -> BlockDevice:
        return self.job.disk


@dataclass
class Fleecing:
    """The fleecing part of one run: :meth:`prepare`, :meth:`switch`, then :meth:`release`."""

    session: QmpSession
    options: FleecingOptions
    jobs: list[BackupJob]
    run_tag: str
    disks: list[_FleecedDisk] = field(default_factory=list)
    folder: Optional[Path] = None

    async def prepare(self) -> None:
        """Create and open one fleecing image per writable disk (nothing is switched yet)."""
        fleeced = [j for j in self.jobs if needs_fleecing(j.disk)]
        if not fleeced:
            return
        self.folder = folder = Path(tempfile.mkdtemp(prefix=fleecing_folder_prefix(os.getpid()),
                                                     dir=self.options.folder))
        try:
            for index, job in enumerate(fleeced):
                entry = _FleecedDisk(job=job, image_node=f"{TOOL_PREFIX}fi{index}-{self.run_tag}",
                                     filter_node=f"{TOOL_PREFIX}fc{index}-{self.run_tag}",
                                     snapshot_node=f"{TOOL_PREFIX}fs{index}-{self.run_tag}")
                self.disks.append(entry)
                image = folder / f"{safe_component(job.disk.disk_id)}.qcow2"
                # a temporary local image, unlinked once QEMU holds it: never encrypted
                # (the chain's key is for the backup files; see README, Encryption at rest)
                with qemuimg.using_key(None):
                    qemuimg.create(image, job.disk.virtual_size)
                await self._add(entry, entry.image_node, {
                    "driver": "qcow2", "file": {"driver": "file", "filename": str(image)},
                    "backing": None})
        finally:
            # QEMU holds the open images; their space goes when QEMU lets go
            for image in folder.iterdir():
                with contextlib.suppress(OSError):
                    image.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()   # NFS and FUSE keep open unlinked files as hidden names
        log.info("fleecing %s through %s (cbw-timeout %d s)",
                 ", ".join(d.disk.disk_id for d in self.disks), self.options.folder,
                 self.options.cbw_timeout)

    async def switch(self, start_guard: Optional[AsyncContextManager[Any]] = None) -> None:
        """Fix the point in time: every device onto its filter, bitmaps frozen, at one instant.

        START_GUARD (the quiesce freeze) is held around exactly that instant.
        """
        if not self.disks:
            return
        async with contextlib.AsyncExitStack() as stack:
            if start_guard is not None:
                await stack.enter_async_context(start_guard)
            async with self._vm_held_still():
                for entry in self.disks:
                    await self._switch_one(entry)
                await bitmaps.transaction(self.session, self._bitmap_actions())
        workers = max(1, min(MAX_JOB_WORKERS, THREAD_BUDGET // len(self.disks)))
        for entry in self.disks:
            bitmap = SNAPSHOT_BITMAP if entry.job.sync == "incremental" else None
            entry.job.read_from(entry.snapshot_node, bitmap, max_workers=workers)

    async def _switch_one(self, entry: _FleecedDisk) -> None:
        disk, job = entry.disk, entry.job
        cbw: dict[str, Any] = {"driver": FILTER_DRIVER, "file": disk.node,
                               "target": entry.image_node, "on-cbw-error": "break-snapshot",
                               "cbw-timeout": self.options.cbw_timeout}
        if job.sync == "incremental" and job.bitmap:
            # only what the incremental copies needs saving before a guest write
            cbw["bitmap"] = {"node": disk.node, "name": job.bitmap}
        await self._add(entry, entry.filter_node, cbw)
        entry.switched = True   # also when cancelled in flight: release looks before it acts
        await self.session.execute("qom-set", {"path": device_path(disk), "property": "drive",
                                               "value": entry.filter_node})
        await self._add(entry, entry.snapshot_node,
                        {"driver": SNAPSHOT_DRIVER, "file": entry.filter_node})

    def _bitmap_actions(self) -> list[bitmaps.Action]:
        actions = []
        for entry in self.disks:
            job = entry.job
            if not job.bitmap:
                continue
            if job.sync == "incremental":
                actions += bitmaps.copy_to_node_actions(entry.disk, job.bitmap,
                                                        entry.snapshot_node, SNAPSHOT_BITMAP)
            actions.append(bitmaps.clear_action(entry.disk, job.bitmap))
        return actions

    async def _add(self, entry: _FleecedDisk, node: str, options: dict[str, Any]) -> None:
        await self.session.execute("blockdev-add", {"node-name": node, **options})
        entry.added.append(node)

    @contextlib.asynccontextmanager
    async def _vm_held_still(self) -> AsyncIterator[None]:
        """Pause a running VM while the devices are switched: one point in time."""
        pause = VmPause(self.session, option="--fleecing", purpose="the fleecing switch")
        started = time.monotonic()
        async with pause:
            paused = pause.paused
            yield
        if paused:
            log.info("VM paused for %.1f ms to switch %d disk(s) at one point in time",
                     (time.monotonic() - started) * 1000, len(self.disks))
        if pause.resume_error:
            raise CommandRefused(pause.resume_error)

    async def release(self, *, strict: bool = False) -> None:
        """Switch every device back and remove the fleecing nodes (which frees the images).

        Safe to call again; with STRICT a device that stays on its filter is an
        error (the run must not count), otherwise it is logged for the next run.
        """
        stuck = []
        for entry in self.disks:
            if not await _release_disk(self.session, entry):
                stuck.append(entry.disk.disk_id)
        if self.folder is not None and not stuck:
            shutil.rmtree(self.folder, ignore_errors=True)
        if stuck and strict:
            if not self.session.connected:
                raise VMGoneError("QEMU went away before the fleecing filters were removed; "
                                  "nothing was recorded")
            raise CommandRefused(f"could not switch {', '.join(stuck)} back from the fleecing "
                                 "filter; the backup was discarded, nothing was recorded (the "
                                 "next run retries)")


async def _release_disk(session: QmpSession, entry: _FleecedDisk) -> bool:
    """Undo ENTRY's steps in reverse; False if any stays."""
    if entry.snapshot_node in entry.added:
        # the snapshot node keeps the filter from sharing writes: it goes first
        if not await remove_node(session, entry.snapshot_node):
            return False
        entry.added.remove(entry.snapshot_node)
    if entry.switched:
        if not await switch_back(session, entry.disk, entry.filter_node):
            return False
        entry.switched = False
    for node in reversed(list(entry.added)):
        if not await remove_node(session, node):
            return False
        entry.added.remove(node)
    return True


async def switch_back(session: QmpSession, disk: BlockDevice, filter_node: str) -> bool:
    """Put DISK's device back on its own node if it is on FILTER_NODE; False if it stays there.

    Looks first: QEMU 7.2 dies on a ``qom-set`` of the node a device already uses.
    """
    if not session.connected:
        return False
    try:
        blocks = await session.execute("query-block")
        top = next((b.get("inserted", {}).get("node-name") for b in blocks
                    if b.get("qdev") == disk.qdev), None)
        if top != filter_node:
            return True
        await session.execute("qom-set", {"path": device_path(disk), "property": "drive",
                                          "value": disk.node})
    except QmpCommandError as err:
        log.error("could not switch %s back from %s: %s", disk.disk_id, filter_node, err.desc)
        return False
    except VMGoneError:
        return False
    log.debug("%s switched back from %s", disk.disk_id, filter_node)
    return True


async def clean_leftovers(session: QmpSession, disks: list[BlockDevice]) -> list[str]:
    """Undo the fleecing of a killed run: switch devices back from its filters.

    Returns the fleecing nodes it removed; the job and other nodes are
    :mod:`leftovers`' business (jobs are cancelled before this runs).
    """
    nodes = {n["node-name"]: n for n in await named_nodes(session)
             if n["node-name"].startswith(TOOL_PREFIX)}
    removed = []
    for name, node in nodes.items():
        if node.get("drv") == SNAPSHOT_DRIVER and await remove_node(session, name):
            removed.append(name)
    filters = {n for n, node in nodes.items() if node.get("drv") == FILTER_DRIVER}
    for block in await session.execute("query-block"):
        top = block.get("inserted", {}).get("node-name")
        disk = next((d for d in disks if d.qdev and d.qdev == block.get("qdev")), None)
        if top in filters and disk is not None and await switch_back(session, disk, top):
            log.warning("switched %s back from fleecing filter %s of an interrupted run",
                        disk.disk_id, top)
    for name in filters:
        if await remove_node(session, name):
            removed.append(name)
    for name in removed:
        log.warning("removed block node %s of an interrupted run", name)
    return removed
