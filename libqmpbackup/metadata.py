"""The chain metadata of a backup folder: ``qmpbackup.json``.

A backup target folder holds one metadata file that lists its chains
(normally one; ``auto`` adds a new one when the VM lost the old chain's
bitmap).  Each chain names its dirty bitmap and, per disk, the ordered list
of backup files.  The metadata, not file modification times, is the truth
about order; it is rewritten atomically (temp file, fsync, rename) so a crash
leaves either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from libqmpbackup import folder_safety
from libqmpbackup import json_shape as shape
from libqmpbackup.fsutil import write_atomically
from libqmpbackup.names import BITMAP_PREFIX, LEVEL_PREFIX, METADATA_NAME, is_chain_id, safe_component

METADATA_VERSION = 1


@dataclass
class BackupRecord:
    """One backup file of one disk, as written at backup time."""

    file: str
    level: str
    time: int
    virtual_size: int
    source_image: str
    source_format: str = "qcow2"
    compressed: bool = False
    quiesced: bool = False


@dataclass
class DiskChain:
    backups: list[BackupRecord] = field(default_factory=list)


@dataclass
class Chain:
    uuid: str
    bitmap: str
    created: int
    disks: dict[str, DiskChain] = field(default_factory=dict)

    def disk(self, disk_id: str) -> DiskChain:
        return self.disks.setdefault(disk_id, DiskChain())

    def has_full(self, disk_id: str) -> bool:
        chain = self.disks.get(disk_id)
        return bool(chain and any(b.level == "full" for b in chain.backups))


@dataclass
class ChainStore:
    """The metadata file of one backup folder.

    ``pruning`` lists the files (``<disk folder>/<file>``) of chains that
    ``qmpbackup prune`` already dropped from ``chains`` but has not deleted
    yet: the metadata is rewritten before any file goes, so a prune killed
    in between leaves files that are named here, and the next prune or
    backup run deletes exactly those.
    """

    root: Path
    chains: list[Chain] = field(default_factory=list)
    pruning: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.root / METADATA_NAME

    @property
    def current(self) -> Optional[Chain]:
        return self.chains[-1] if self.chains else None

    def find(self, chain_id: str) -> Optional[Chain]:
        return next((c for c in self.chains if c.uuid == chain_id), None)

    @classmethod
    def load(cls, root: Path) -> ChainStore:
        """The folder's chains; anything but what :meth:`save` writes is a chain error naming the file.

        The file is untrusted (see :mod:`folder_safety`): every file name in it
        must follow the backup-file grammar before anything uses it.
        """
        where = f"chain metadata {root / METADATA_NAME}"
        raw = folder_safety.read_json(root, METADATA_NAME, "chain metadata")
        if raw is folder_safety.ABSENT:
            return cls(root)
        top = shape.as_object(raw, where)
        chains = [_chain_from_dict(c, where) for c in shape.array(top, "chains", where)]
        pruning = [_pruning_entry(e, where) for e in shape.array(top, "pruning", where, default=[])]
        return cls(root=root, chains=chains, pruning=pruning)

    def save(self) -> None:
        data: dict[str, Any] = {"version": METADATA_VERSION,
                                "chains": [asdict(c) for c in self.chains]}
        if self.pruning:
            data["pruning"] = self.pruning
        write_atomically(self.path, json.dumps(data, indent=2) + "\n")


def _chain_from_dict(value: Any, where: str) -> Chain:
    raw = shape.as_object(value, where, "a chain")
    chain_id = shape.text(raw, "uuid", where)
    if not is_chain_id(chain_id):
        raise shape.malformed(where, f"chain id {chain_id!r} is not a valid chain id")
    bitmap = shape.text(raw, "bitmap", where)
    if not (bitmap.startswith(BITMAP_PREFIX) and is_chain_id(bitmap[len(BITMAP_PREFIX):])):
        raise shape.malformed(where, f"bitmap {bitmap!r} is not a qmpbackup bitmap name")
    disks = {}
    for disk_id, disk in shape.mapping(raw, "disks", where).items():
        if not disk_id or len(disk_id) > shape.MAX_TEXT:
            raise shape.malformed(where, f"disk id {disk_id[:80]!r} is not valid")
        backups = shape.array(shape.as_object(disk, where, f"disk {disk_id!r}"), "backups", where)
        disks[disk_id] = DiskChain([_record_from_dict(b, where) for b in backups])
    return Chain(uuid=chain_id, bitmap=bitmap, created=shape.integer(raw, "created", where),
                 disks=disks)


def _pruning_entry(value: Any, where: str) -> str:
    """``<disk folder>/<backup file>``: a prune deletes it, so it must not lead anywhere else."""
    if not isinstance(value, str):
        raise shape.malformed(where, "'pruning' must list file names")
    folder, _, name = value.partition("/")
    if not folder or folder != safe_component(folder):
        raise shape.malformed(where, f"pruning entry {value[:120]!r} is not <disk folder>/<file>")
    folder_safety.backup_file(name, f"{where}: pruning entry")
    return value


def _record_from_dict(value: Any, where: str) -> BackupRecord:
    raw = shape.as_object(value, where, "a backup record")
    level = shape.text(raw, "level", where)
    if level not in LEVEL_PREFIX:
        raise shape.malformed(where, f"level {level[:80]!r} is not one of {', '.join(LEVEL_PREFIX)}")
    return BackupRecord(
        file=folder_safety.backup_file(raw.get("file"), f"{where}: file"),
        level=level,
        time=shape.integer(raw, "time", where),
        virtual_size=shape.integer(raw, "virtual_size", where),
        source_image=shape.text(raw, "source_image", where, default="", empty_ok=True),
        source_format=shape.text(raw, "source_format", where, default="qcow2"),
        compressed=shape.flag(raw, "compressed", where, default=False),
        quiesced=shape.flag(raw, "quiesced", where, default=False))
