"""Persistent dirty bitmaps: the memory of what changed since the last backup.

A chain's bitmap is named ``qmpbackup-<chain id>`` on every disk of the
chain.  Only this module creates or removes bitmaps, so the rules (persistent,
created atomically for all disks, never cleared except by a successful
grouped job) live in one place.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

from .chain import BITMAP_PREFIX
from .devices import BlockDevice
from .qmp import QmpCommandError, QmpSession

log = logging.getLogger(__name__)


async def add_persistent(session: QmpSession, disks: Iterable[BlockDevice], name: str) -> None:
    """Create NAME on all DISKS in one transaction: all get it or none does."""
    actions = [{"type": "block-dirty-bitmap-add",
                "data": {"node": d.node, "name": name, "persistent": True}}
               for d in disks]
    if actions:
        await session.execute("transaction", {"actions": actions})


async def remove(session: QmpSession, disk: BlockDevice, name: str) -> bool:
    try:
        await session.execute("block-dirty-bitmap-remove", {"node": disk.node, "name": name})
    except QmpCommandError as err:
        log.warning("could not remove bitmap %s from %s: %s", name, disk.disk_id, err.desc)
        return False
    log.debug("removed bitmap %s from %s", name, disk.disk_id)
    return True


def tool_bitmaps(disk: BlockDevice, chain_id: Optional[str] = None) -> list[str]:
    """Bitmaps qmpbackup made on DISK (of one chain when CHAIN_ID is given)."""
    wanted = f"{BITMAP_PREFIX}{chain_id}" if chain_id else None
    return [b.name for b in disk.bitmaps
            if b.name.startswith(BITMAP_PREFIX) and (wanted is None or b.name == wanted)]
