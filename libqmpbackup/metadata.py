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

from libqmpbackup.errors import ChainError
from libqmpbackup.fsutil import write_atomically
from libqmpbackup.names import METADATA_NAME

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
        path = root / METADATA_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(root)
        except (OSError, ValueError) as err:
            raise ChainError(f"cannot read chain metadata {path}: {err}") from err
        try:
            chains = [_chain_from_dict(c) for c in raw["chains"]]
        except (KeyError, TypeError) as err:
            raise ChainError(f"chain metadata {path} is malformed: missing {err}") from err
        pruning = raw.get("pruning", [])
        if not isinstance(pruning, list) or not all(isinstance(p, str) for p in pruning):
            raise ChainError(f"chain metadata {path} is malformed: 'pruning' is not a list of names")
        return cls(root=root, chains=chains, pruning=pruning)

    def save(self) -> None:
        data: dict[str, Any] = {"version": METADATA_VERSION,
                                "chains": [asdict(c) for c in self.chains]}
        if self.pruning:
            data["pruning"] = self.pruning
        write_atomically(self.path, json.dumps(data, indent=2) + "\n")


def _chain_from_dict(raw: dict[str, Any]) -> Chain:
    disks = {disk_id: DiskChain([BackupRecord(**b) for b in d["backups"]])
             for disk_id, d in raw["disks"].items()}
    return Chain(raw["uuid"], raw["bitmap"], raw["created"], disks)
