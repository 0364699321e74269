"""The ``info`` tables: what an admin checks before trusting a VM to cron."""

from __future__ import annotations

from tabulate import tabulate

from libqmpbackup.backup.bitmaps import tool_bitmaps
from libqmpbackup.qemu import agent as agent_module
from libqmpbackup.qemu.agent import GuestAgent
from libqmpbackup.qemu.devices import BlockDevice


def blockdev_table(disks: list[BlockDevice]) -> str:
    """One row per disk, naming its qmpbackup bitmaps: which chains this disk is part of."""
    rows = [(d.disk_id, d.node, d.driver, d.virtual_size, d.filename,
             "pflash" if d.is_pflash else ("yes" if d.supports_persistent_bitmaps else "no"),
             ", ".join(sorted(tool_bitmaps(d))) or "-")
            for d in disks]
    return tabulate(rows, headers=("disk", "node", "format", "virtual size", "image file",
                                   "bitmaps possible", "qmpbackup bitmaps"))


def bitmaps_table(disks: list[BlockDevice]) -> str:
    rows = [(b.name, d.disk_id, b.node, b.recording, b.persistent, b.inconsistent, b.busy,
             b.dirty_bytes)
            for d in disks for b in d.bitmaps]
    return tabulate(rows, headers=("bitmap", "disk", "node", "recording", "persistent",
                                   "inconsistent", "busy", "dirty bytes"))


async def agent_report(agent_socket: str) -> str:
    """Whether the guest agent answers (raises if not), its freeze state and the filesystems it would freeze.

    A frozen agent refuses everything but a few commands (guest-get-fsinfo
    among the refused), and a frozen guest is exactly what an admin wants
    to see here, so that state is reported instead of failing.
    """
    async with GuestAgent(agent_socket, timeout=agent_module.DEFAULT_TIMEOUT) as agent:
        await agent.ping()
        status = await agent.fsfreeze_status()
        if status == "frozen":
            return ("guest agent: answering, filesystems frozen\n"
                    "a frozen agent lists no filesystems; unless a backup is starting right "
                    "now, the guest was left frozen: guest-fsfreeze-thaw ends it")
        filesystems = await agent.get_fsinfo()
    if not filesystems:
        return (f"guest agent: answering, filesystems {status}\n"
                "no filesystem the agent could freeze (--quiesce would back up unquiesced)")
    rows = [(fs.get("mountpoint", ""), fs.get("type", ""), fs.get("name", ""))
            for fs in filesystems]
    table = tabulate(rows, headers=("mountpoint", "type", "device"))
    return f"guest agent: answering, filesystems {status}\n{table}"
