"""--monthly: a month's first chain retires the previous month's chain bitmap (and its +diff).

Each month folder (``DIR/YYYY-MM``) holds a chain with a bitmap of its own.
Once a month's first full backup is committed, the previous month's chain
is never continued again (``auto`` continues only the current month's
folder), yet its bitmap would go on recording every guest write, forever,
one more each month.  So the run that commits a month's first chain removes
the previous month's chain bitmap, and only that one: the current chain's,
older months' and other folders' bitmaps are not this run's to judge
(``cleanup --remove-bitmaps --uuid ID`` removes those).  It runs after the
commit: until the new chain is recorded, the old one is still the live one.
"""

from __future__ import annotations

import logging
from typing import Optional

from libqmpbackup.backup import bitmaps
from libqmpbackup.errors import ChainError, TargetError, VMGoneError
from libqmpbackup.qemu.devices import BlockDevice, refresh_bitmaps
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.layout import month_names

log = logging.getLogger(__name__)

def previous_month(target: Folder, current: str) -> Optional[str]:
    """The newest month folder of the held TARGET before CURRENT that holds a chain."""
    try:
        months = [name for name in month_names(target) if name < current]
    except (ChainError, TargetError) as err:
        log.warning("cannot find the previous month's chain: %s", err)
        return None
    return months[-1] if months else None


async def _remove_chain_bitmaps(session: QmpSession, disk: BlockDevice, chain_bitmap: str) -> bool:
    """The chain bitmap and its +diff go together; True when both are gone."""
    results = [await bitmaps.remove(session, disk, name)
               for name in bitmaps.chain_bitmaps(disk, chain_bitmap)]
    return all(results)


async def retire_previous_month(session: QmpSession, disks: list[BlockDevice], target: Folder,
                                current: str, current_bitmap: str) -> None:
    """Remove the chain bitmap of the month before CURRENT (a month folder of the held
    --target TARGET) from every disk that has it."""
    name = previous_month(target, current)
    if name is None:
        return
    folder = target.path / name
    try:
        with BackupFolder.below(target, name) as previous:
            chain = previous.store.current
    except (ChainError, TargetError) as err:
        log.warning("the previous month's bitmap stays on the VM: %s", err)
        return
    if chain is None or chain.bitmap == current_bitmap:
        return
    try:   # the backup is recorded: nothing here may turn the run into a failure
        await refresh_bitmaps(session, disks)
    except (VMGoneError, QmpCommandError) as err:   # e.g. QEMU quit: the guest shut down
        log.warning("bitmap %s of the previous month's chain (%s) could not be removed (%s); "
                    "remove it with: qmpbackup cleanup --remove-bitmaps --uuid %s",
                    chain.bitmap, folder, err, chain.uuid)
        return
    holding = [d for d in disks if bitmaps.chain_bitmaps(d, chain.bitmap)]
    removed = [d.disk_id for d in holding if await _remove_chain_bitmaps(session, d, chain.bitmap)]
    if removed:
        log.info("removed bitmap %s of the previous month's chain (%s) from %s: a new month's "
                 "chain has started, that one is not continued", chain.bitmap, folder,
                 ", ".join(removed))
    if len(removed) < len(holding):
        log.warning("bitmap %s of the previous month's chain (%s) is still on the VM; remove it "
                    "with: qmpbackup cleanup --remove-bitmaps --uuid %s", chain.bitmap, folder,
                    chain.uuid)
