"""The ``info`` reports: what an admin checks before trusting a VM to cron.

Each report is built once as data and rendered either as a table or as the
``--json`` document, so the two can never tell different stories.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from libqmpbackup.backup.bitmaps import DIFF_SUFFIX, chain_bitmap_of, tool_bitmaps
from libqmpbackup.errors import UsageError
from libqmpbackup.json_output import Document
from libqmpbackup.qemu import agent as agent_module
from libqmpbackup.qemu.agent import GuestAgent
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.store.backup_folder import read_chain_stores
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import BITMAP_PREFIX
from libqmpbackup.tables import table

log = logging.getLogger(__name__)


def _bitmaps_possible(disk: BlockDevice) -> str:
    return "pflash" if disk.is_pflash else ("yes" if disk.supports_persistent_bitmaps else "no")


def _chain_bitmaps(disk: BlockDevice) -> list[str]:
    """qmpbackup's bitmaps on DISK, without the +diff that goes with each chain bitmap."""
    return sorted(n for n in tool_bitmaps(disk) if not n.endswith(DIFF_SUFFIX))


def blockdev_table(disks: list[BlockDevice]) -> str:
    """One row per disk, naming its qmpbackup bitmaps: which chains this disk is part of."""
    rows = [(d.disk_id, d.node, d.driver, d.virtual_size, d.filename, _bitmaps_possible(d),
             ", ".join(_chain_bitmaps(d)) or "-")
            for d in disks]
    return table(rows, headers=("disk", "node", "format", "virtual size", "image file",
                                "bitmaps possible", "qmpbackup bitmaps"))


def blockdev_document(disks: list[BlockDevice]) -> Document:
    return {"command": "info", "show": "blockdev", "disks": [
        {"disk": d.disk_id, "node": d.node, "format": d.driver, "virtual_size": d.virtual_size,
         "image": d.filename, "pflash": d.is_pflash,
         "persistent_bitmaps": d.supports_persistent_bitmaps,
         "qmpbackup_bitmaps": _chain_bitmaps(d)} for d in disks]}


def bitmaps_table(disks: list[BlockDevice]) -> str:
    rows = [(b.name, d.disk_id, b.node, b.recording, b.persistent, b.inconsistent, b.busy,
             b.dirty_bytes)
            for d in disks for b in d.bitmaps]
    return table(rows, headers=("bitmap", "disk", "node", "recording", "persistent",
                                   "inconsistent", "busy", "dirty bytes"))


def bitmaps_document(disks: list[BlockDevice]) -> Document:
    return {"command": "info", "show": "bitmaps", "bitmaps": [
        {"name": b.name, "disk": d.disk_id, "node": b.node, "recording": b.recording,
         "persistent": b.persistent, "inconsistent": b.inconsistent, "busy": b.busy,
         "dirty_bytes": b.dirty_bytes} for d in disks for b in d.bitmaps]}


@dataclass
class AgentReport:
    """What the guest agent said: its freeze state and the filesystems it would freeze."""

    status: str
    filesystems: list[dict[str, Any]] = field(default_factory=list)

    def text(self) -> str:
        head = f"guest agent: answering, filesystems {self.status}"
        if self.status == "frozen":
            return (f"{head}\na frozen agent lists no filesystems; unless a backup is starting "
                    "right now, the guest was left frozen: guest-fsfreeze-thaw ends it")
        if not self.filesystems:
            return (f"{head}\nno filesystem the agent could freeze (--quiesce would back up "
                    "unquiesced)")
        rows = [(fs["mountpoint"], fs["type"], fs["device"]) for fs in self.filesystems]
        return f"{head}\n{table(rows, headers=('mountpoint', 'type', 'device'))}"

    def document(self) -> Document:
        return {"command": "info", "show": "agent", "agent": {
            "answering": True, "status": self.status, "filesystems": self.filesystems}}


async def agent_report(agent_socket: str) -> AgentReport:
    """Whether the guest agent answers (raises if not), its freeze state and the filesystems it would freeze.

    A frozen agent refuses everything but a few commands (guest-get-fsinfo
    among the refused), and a frozen guest is exactly what an admin wants
    to see here, so that state is reported instead of failing.  The agent's
    reply is untrusted: only string fields are taken over.
    """
    async with GuestAgent(agent_socket, timeout=agent_module.DEFAULT_TIMEOUT) as agent:
        await agent.ping()
        status = await agent.fsfreeze_status()
        if status == "frozen":
            return AgentReport(status=status)
        filesystems = await agent.get_fsinfo()
    return AgentReport(status=status, filesystems=[
        {key: _text(fs.get(field_name)) for key, field_name in
         (("mountpoint", "mountpoint"), ("type", "type"), ("device", "name"))}
        for fs in filesystems if isinstance(fs, dict)])


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def known_chain_bitmaps(folders: Sequence[Path]) -> set[str]:
    """The chain bitmaps of every chain in FOLDERS and their YYYY-MM month folders."""
    known: set[str] = set()
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--target {folder} is not a folder")
        for path, store in read_chain_stores(folder):
            if isinstance(store, ChainStore):
                known.update(chain.bitmap for chain in store.chains if chain.bitmap)
            else:
                log.debug("not looking for chain bitmaps in %s: %s", path, store)
    return known


def orphan_bitmaps(disks: list[BlockDevice], known: set[str]) -> dict[str, list[str]]:
    """Chain bitmap -> its disks, for qmpbackup's bitmaps whose chain is in none of KNOWN.

    Such a bitmap is left by a chain whose folder was deleted or moved (or by
    a folder ``info`` was not told about): it costs a little on every guest
    write, and nothing will ever remove it by itself.
    """
    found: dict[str, set[str]] = {}
    for disk in disks:
        for name in tool_bitmaps(disk):
            chain_bitmap = chain_bitmap_of(name)
            if chain_bitmap not in known:
                found.setdefault(chain_bitmap, set()).add(disk.disk_id)
    return {bitmap: sorted(ids) for bitmap, ids in sorted(found.items())}


def warn_orphan_bitmaps(disks: list[BlockDevice], folders: Sequence[Path]) -> None:
    """One warning per chain bitmap that no chain of FOLDERS has (``info --target``)."""
    for bitmap, disk_ids in orphan_bitmaps(disks, known_chain_bitmaps(folders)).items():
        log.warning("bitmap %s on %s belongs to no chain in %s: if that chain is gone, remove "
                    "it (it costs a little on every guest write): qmpbackup cleanup "
                    "--remove-bitmaps --uuid %s", bitmap, ", ".join(disk_ids),
                    ", ".join(map(str, folders)), bitmap[len(BITMAP_PREFIX):])
