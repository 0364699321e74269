"""Persistent dirty bitmaps: the memory of what changed since the last backup.

A chain's bitmap is named ``qmpbackup-<chain id>`` on every disk of the
chain.  Only this module creates or removes bitmaps, so the rules (persistent,
created atomically for all disks, never cleared except by a successful
grouped job — or at a fleecing switch, under the ``+pending`` copy below —)
live in one place.

QEMU advances a chain bitmap the moment a grouped job succeeds, but the
backup only counts once its metadata is committed.  A run that dies in
between (SIGKILL, host crash) would make the next incremental miss those
changes, so each run brackets its jobs with two kinds of auxiliary bitmaps
(``+`` cannot occur in a chain id):

``qmpbackup-<id>+pending``
    for a disk whose chain bitmap already exists: a persistent, recording
    copy of it, made just before the jobs start.  It holds "everything since
    the last committed backup" and is removed only after the commit.  A run
    that finds one merges it back into the chain bitmap.
``qmpbackup-<id>+new``
    for a disk that gets its chain bitmap in this run: an empty, disabled
    marker saying "this chain bitmap has no committed backup yet".  A run
    that finds one removes the chain bitmap with it.

Both are persistent so they survive a clean QEMU restart together with the
chain bitmap they describe.

Differential backups (``--level diff``) need "everything since the FULL",
which the chain bitmap forgets at every backup.  So each disk of a chain has
a second persistent bitmap, ``qmpbackup-<id>+diff``, added together with its
chain bitmap when the disk gets its FULL, and never cleared nor used by a
job: a new FULL starts a new chain with new bitmaps.  A DIFF run merges it
into the chain bitmap (after ``+pending`` took its copy) in the preparing
transaction, and then runs exactly like an incremental with the chain
bitmap: on success QEMU re-bases the chain bitmap to the DIFF's start, so a
following INC holds the changes since the DIFF; on failure the merge-back
leaves the chain bitmap a superset (the next INC copies more, misses
nothing); a killed run is settled by ``+pending`` as always.  ``+diff`` is
not auxiliary: recovery never merges it, and it goes with its chain bitmap
(``+new`` marker, retired chains, cleanup).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from libqmpbackup.errors import VMGoneError
from libqmpbackup.qemu.devices import BlockDevice, DirtyBitmap
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.names import BITMAP_PREFIX, bitmap_name

log = logging.getLogger(__name__)

PENDING_SUFFIX = "+pending"
NEW_SUFFIX = "+new"
AUXILIARY_SUFFIXES = (PENDING_SUFFIX, NEW_SUFFIX)
DIFF_SUFFIX = "+diff"

Action = dict[str, Any]


def _split(name: str, suffixes: tuple[str, ...]) -> Optional[tuple[str, str]]:
    if not name.startswith(BITMAP_PREFIX):
        return None
    for suffix in suffixes:
        if name.endswith(suffix) and len(name) > len(BITMAP_PREFIX) + len(suffix):
            return name[:-len(suffix)], suffix
    return None


def split_auxiliary(name: str) -> Optional[tuple[str, str]]:
    """(chain bitmap, suffix) for an auxiliary bitmap name, else None."""
    return _split(name, AUXILIARY_SUFFIXES)


def diff_bitmap(chain_bitmap: str) -> str:
    """The bitmap holding every change since the disk's FULL in this chain."""
    return chain_bitmap + DIFF_SUFFIX


def add_action(disk: BlockDevice, name: str, *, disabled: bool = False,
               granularity: int = 0) -> Action:
    data: dict[str, Any] = {"node": disk.node, "name": name, "persistent": True}
    if disabled:
        data["disabled"] = True
    if granularity:
        data["granularity"] = granularity
    return {"type": "block-dirty-bitmap-add", "data": data}


def merge_action(disk: BlockDevice, target: str, source: str) -> Action:
    return {"type": "block-dirty-bitmap-merge",
            "data": {"node": disk.node, "target": target, "bitmaps": [source]}}


def remove_action(disk: BlockDevice, name: str) -> Action:
    return {"type": "block-dirty-bitmap-remove", "data": {"node": disk.node, "name": name}}


def clear_action(disk: BlockDevice, name: str) -> Action:
    return {"type": "block-dirty-bitmap-clear", "data": {"node": disk.node, "name": name}}


def copy_to_node_actions(disk: BlockDevice, name: str, node: str, copy: str) -> list[Action]:
    """Freeze what bitmap NAME of DISK holds now into a transient bitmap COPY on NODE.

    Used for a node that shows the disk's content (a fleecing snapshot): a
    job there can only name bitmaps of its own node.
    """
    return [{"type": "block-dirty-bitmap-add",
             "data": {"node": node, "name": copy, "persistent": False}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": node, "target": copy,
                      "bitmaps": [{"node": disk.node, "name": name}]}}]


async def transaction(session: QmpSession, actions: list[Action]) -> None:
    """Run bitmap ACTIONS atomically: all happen or none does."""
    if actions:
        await session.execute("transaction", {"actions": actions})


async def try_transaction(session: QmpSession, actions: list[Action], what: str) -> bool:
    """Like :func:`transaction` on an exit path: a refusal is logged, not raised.

    Whatever stays behind is found and settled by the next run (see
    :func:`recovery_steps`), so an exit path must go on cleaning up.
    """
    if not session.connected:
        log.debug("cannot %s: QEMU is gone", what)
        return False
    try:
        await transaction(session, actions)
    except QmpCommandError as err:
        log.warning("could not %s: %s", what, err.desc)
        return False
    except VMGoneError as err:
        log.warning("could not %s: %s", what, err)
        return False
    return True


async def remove(session: QmpSession, disk: BlockDevice, name: str) -> bool:
    if not await try_transaction(session, [remove_action(disk, name)],
                                 f"remove bitmap {name} from {disk.disk_id}"):
        return False
    log.debug("removed bitmap %s from %s", name, disk.disk_id)
    return True


def tool_bitmaps(disk: BlockDevice, chain_id: Optional[str] = None) -> list[str]:
    """Bitmaps qmpbackup made on DISK (of one chain, auxiliaries included, when CHAIN_ID is given)."""
    names = [b.name for b in disk.bitmaps if b.name.startswith(BITMAP_PREFIX)]
    if chain_id is None:
        return names
    return [n for n in names if chain_bitmap_of(n) == bitmap_name(chain_id)]


def chain_bitmap_of(name: str) -> str:
    """The chain bitmap an auxiliary or diff bitmap belongs to (a chain bitmap is its own)."""
    parts = _split(name, (*AUXILIARY_SUFFIXES, DIFF_SUFFIX))
    return parts[0] if parts else name


def chain_bitmaps(disk: BlockDevice, chain_bitmap: str) -> list[str]:
    """The chain bitmap and its diff bitmap, as far as DISK has them."""
    return [n for n in (chain_bitmap, diff_bitmap(chain_bitmap)) if disk.bitmap(n)]


@dataclass
class RunBitmaps:
    """The auxiliary bitmaps of one chain run and how each way out of the run settles them.

    kept: disks whose chain bitmap exists and is used (they get ``+pending``);
    added: disks that get the chain bitmap in this run (they get ``+new``,
    and ``+diff``);
    differential: kept disks backed up as DIFF (``+diff`` merged into the
    chain bitmap after ``+pending`` copied it);
    diff_added: disks getting their FULL whose chain bitmap already existed
    (left by an earlier run) but whose ``+diff`` did not.
    """

    chain_bitmap: str
    kept: list[BlockDevice] = field(default_factory=list)
    added: list[BlockDevice] = field(default_factory=list)
    differential: list[BlockDevice] = field(default_factory=list)
    diff_added: list[BlockDevice] = field(default_factory=list)
    markers_removed: bool = False

    @property
    def pending(self) -> str:
        return self.chain_bitmap + PENDING_SUFFIX

    @property
    def marker(self) -> str:
        return self.chain_bitmap + NEW_SUFFIX

    @property
    def diff(self) -> str:
        return diff_bitmap(self.chain_bitmap)

    def _granularity(self, disk: BlockDevice) -> int:
        current = disk.bitmap(self.chain_bitmap)
        return current.granularity if current else 0

    def prepare_actions(self) -> list[Action]:
        """In order: QEMU runs a transaction's actions one after the other."""
        actions = []
        for disk in self.kept:
            actions += [add_action(disk, self.pending, granularity=self._granularity(disk)),
                        merge_action(disk, self.pending, self.chain_bitmap)]
        for disk in self.differential:
            actions.append(merge_action(disk, self.chain_bitmap, self.diff))
        for disk in self.added:
            actions += [add_action(disk, self.chain_bitmap),
                        add_action(disk, self.diff),
                        add_action(disk, self.marker, disabled=True)]
        for disk in self.diff_added:
            actions.append(add_action(disk, self.diff, granularity=self._granularity(disk)))
        return actions

    async def prepare(self, session: QmpSession) -> None:
        """Create every auxiliary bitmap (and new chain bitmaps) in one transaction."""
        await transaction(session, self.prepare_actions())
        if self.added:
            log.info("added bitmap %s to %s", self.chain_bitmap,
                     ", ".join(d.disk_id for d in self.added))

    async def before_commit(self, session: QmpSession) -> None:
        """The new chain bitmaps are about to be backed by metadata: drop their markers.

        Done before, not after, the commit: if the run dies in between, an
        orphan chain bitmap (harmless, removable) is better than a marker
        that makes the next run delete a committed chain's bitmap.
        """
        await self._each(session, self.added, lambda d: [remove_action(d, self.marker)],
                         "remove marker")
        self.markers_removed = True

    async def after_commit(self, session: QmpSession) -> None:
        """The backup is recorded: the chain bitmap alone now says what changed since."""
        await self._each(session, self.kept, lambda d: [remove_action(d, self.pending)],
                         "remove bitmap")

    async def undo(self, session: QmpSession) -> None:
        """The run failed: the chain bitmaps must again cover everything since the last commit.

        Merging ``+pending`` back is always right: after a failed job it only
        repeats bits the chain bitmap kept; after a job that succeeded but was
        not committed it restores the bits QEMU cleared.
        """
        await self._each(session, self.kept, lambda d: [merge_action(d, self.chain_bitmap,
                                                                     self.pending),
                                                        remove_action(d, self.pending)],
                         "restore bitmap")
        await self._each(session, self.added, lambda d: [
            remove_action(d, self.chain_bitmap), remove_action(d, self.diff),
            *([] if self.markers_removed else [remove_action(d, self.marker)])],
            "remove new bitmap")
        await self._each(session, self.diff_added, lambda d: [remove_action(d, self.diff)],
                         "remove new bitmap")

    async def _each(self, session: QmpSession, disks: Iterable[BlockDevice],
                    actions_for: Callable[[BlockDevice], list[Action]], what: str) -> None:
        """One transaction per disk, so one refusal does not keep the others unsettled."""
        for disk in disks:
            await try_transaction(session, actions_for(disk),
                                  f"{what} on {disk.disk_id} ({self.chain_bitmap})")


@dataclass(frozen=True)
class RecoveryStep:
    disk: BlockDevice
    actions: list[Action]
    message: str


def recovery_steps(disks: Iterable[BlockDevice]) -> list[RecoveryStep]:
    """How to settle the auxiliary bitmaps an interrupted run left (pure, for unit tests)."""
    steps = []
    for disk in disks:
        for bitmap in disk.bitmaps:
            parts = split_auxiliary(bitmap.name)
            if parts is None:
                continue
            chain_name, suffix = parts
            chain = disk.bitmap(chain_name)
            if suffix == NEW_SUFFIX:
                steps.append(_drop_uncommitted(disk, bitmap, chain_name))
            else:
                steps.append(_merge_back(disk, bitmap, chain))
    return steps


def _drop_uncommitted(disk: BlockDevice, marker: DirtyBitmap, chain_name: str) -> RecoveryStep:
    """The marker's chain bitmap (and its diff bitmap) never saw a recorded FULL: drop them."""
    chain = disk.bitmap(chain_name)
    actions = [remove_action(disk, name) for name in
               (diff_bitmap(chain_name), marker.name) if disk.bitmap(name)]
    if chain is None:
        return RecoveryStep(disk=disk, actions=actions,
                            message=f"removed marker {marker.name} from {disk.disk_id}")
    return RecoveryStep(
        disk=disk, actions=[remove_action(disk, chain.name), *actions],
        message=f"removed bitmap {chain.name} from {disk.disk_id}: an interrupted run created "
                "it and never recorded its full backup")


def _merge_back(disk: BlockDevice, pending: DirtyBitmap,
                chain: Optional[DirtyBitmap]) -> RecoveryStep:
    remove = remove_action(disk, pending.name)
    unusable = ("its chain bitmap is missing" if chain is None
                else "its chain bitmap is inconsistent" if chain.inconsistent
                else "it is inconsistent" if pending.inconsistent else "")
    if chain is None or unusable:
        return RecoveryStep(disk=disk, actions=[remove],
                            message=f"removed {pending.name} from {disk.disk_id}: {unusable}")
    return RecoveryStep(
        disk=disk, actions=[merge_action(disk, chain.name, pending.name), remove],
        message=f"merged {pending.name} back into {chain.name} on {disk.disk_id}: the next "
                "incremental also holds the changes of an interrupted run")
