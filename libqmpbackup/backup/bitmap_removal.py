"""Removing what qmpbackup left in a VM on purpose: the chain bitmaps.

A bitmap costs a little on every guest write; once its chain is no longer
wanted (or before handing the VM to another backup tool) it should go.
"""

from __future__ import annotations

import logging
from typing import Callable, Collection, Optional

from libqmpbackup.backup import bitmaps
from libqmpbackup.qemu.devices import BlockDevice, discover
from libqmpbackup.qemu.qmp import QmpSession

log = logging.getLogger(__name__)


async def _remove(session: QmpSession, chosen: Callable[[BlockDevice], list[str]], *,
                  dry_run: bool = False) -> list[str]:
    """Remove the bitmaps CHOSEN picks on each disk (none with DRY_RUN); return ``disk:bitmap``."""
    removed = []
    for disk in await discover(session):
        for name in chosen(disk):
            if dry_run or await bitmaps.remove(session, disk, name):
                removed.append(f"{disk.disk_id}:{name}")
    return removed


async def remove_bitmaps(session: QmpSession, chain_id: Optional[str] = None) -> list[str]:
    """Remove qmpbackup bitmaps (of one chain when CHAIN_ID is given); return what went."""
    removed = await _remove(session, lambda disk: bitmaps.tool_bitmaps(disk, chain_id))
    if not removed:
        log.info("no qmpbackup bitmap%s found", f" of chain {chain_id}" if chain_id else "")
    return removed


async def remove_chain_bitmaps(session: QmpSession, chain_ids: Collection[str],
                               spared: Collection[str], *, dry_run: bool = False) -> list[str]:
    """Remove the bitmaps of the chains CHAIN_IDS (auxiliaries too), never one of SPARED.

    SPARED names the chain bitmaps still in use (the chains a prune kept):
    metadata is untrusted, and a removed chain that claims a kept chain's
    bitmap must not cost the kept chain its next incremental.
    """
    def chosen(disk: BlockDevice) -> list[str]:
        return [name for chain_id in chain_ids for name in bitmaps.tool_bitmaps(disk, chain_id)
                if bitmaps.chain_bitmap_of(name) not in spared]
    return await _remove(session, chosen, dry_run=dry_run)
