"""Builders the unit tests share: devices, bitmaps, options and chain stores without QEMU."""

from __future__ import annotations

from pathlib import Path

from libqmpbackup.backup.plan import BackupOptions
from libqmpbackup.qemu.devices import BlockDevice, DirtyBitmap
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore, DiskChain


def disk(name: str, driver: str = "qcow2", bitmaps: tuple[DirtyBitmap, ...] = (),
         device: str = "", **kwargs: object) -> BlockDevice:
    return BlockDevice(disk_id=name, device=device or name, qdev="", node=f"#{name}",
                       driver=driver, filename=f"/img/{name}.{driver}", virtual_size=1 << 20,
                       read_only=False, removable=False, bitmaps=list(bitmaps), **kwargs)  # type: ignore[arg-type]


def bitmap(name: str, inconsistent: bool = False) -> DirtyBitmap:
    return DirtyBitmap(name, "#n", True, True, False, inconsistent, 0, 65536)


def opts(level: str, **kwargs: object) -> BackupOptions:
    return BackupOptions(level=level, target=Path("/b"), **kwargs)  # type: ignore[arg-type]


def store_with_chain(*disk_ids: str) -> ChainStore:
    chain = Chain("c1", "qmpbackup-c1", 1)
    for disk_id in disk_ids:
        chain.disks[disk_id] = DiskChain([BackupRecord(f"FULL-1-{disk_id}.qcow2", "full", 1, 1, "x")])
    return ChainStore(Path("/b"), [chain])
