"""Removing what qmpbackup left in a VM on purpose: the chain bitmaps.

A bitmap costs a little on every guest write; once its chain is no longer
wanted (or before handing the VM to another backup tool) it should go.
"""

from __future__ import annotations

import logging
from typing import Optional

from libqmpbackup.backup import bitmaps
from libqmpbackup.qemu.devices import discover
from libqmpbackup.qemu.qmp import QmpSession

log = logging.getLogger(__name__)


async def remove_bitmaps(session: QmpSession, chain_id: Optional[str] = None) -> list[str]:
    """Remove qmpbackup bitmaps (of one chain when CHAIN_ID is given); return what went."""
    removed = []
    for disk in await discover(session):
        for name in bitmaps.tool_bitmaps(disk, chain_id):
            if await bitmaps.remove(session, disk, name):
                removed.append(f"{disk.disk_id}:{name}")
    if not removed:
        log.info("no qmpbackup bitmap%s found", f" of chain {chain_id}" if chain_id else "")
    return removed
