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
from pathlib import Path
from typing import Optional

from libqmpbackup.backup import bitmaps
from libqmpbackup.errors import ChainError, TargetError, VMGoneError
from libqmpbackup.qemu.devices import BlockDevice, refresh_bitmaps
from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.layout import month_folders

log = logging.getLogger(__name__)

def previous_month_folder(base: Path, current: Path) -> Optional[Path]:
    """The newest month folder of BASE before CURRENT that holds a chain."""
    try:
        months = [p for p in month_folders(base) if p.name < current.name]
    except (ChainError, TargetError) as err:
        log.warning("cannot find the previous month's chain: %s", err)
        return None
    return months[-1] if months else None


async def _remove_chain_bitmaps(session: QmpSession, disk: BlockDevice, chain_bitmap: str) -> bool:
    """The chain bitmap and its +diff go together; True when both are gone."""
    results = [await bitmaps.remove(session, disk, name)
               for name in bitmaps.chain_bitmaps(disk, chain_bitmap)]
    return all(results)


async def retire_previous_month(session: QmpSession, disks: list[BlockDevice], base: Path,
                                current: Path, current_bitmap: str) -> None:
    """Remove the chain bitmap of the month before CURRENT from every disk that has it."""
    folder = previous_month_folder(base, current)
    if folder is None:
        return
    try:
        with BackupFolder.open_month(base, folder.name) as previous:
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
