"""The chain metadata of a backup folder: ``qmpbackup.json``.

A backup target folder holds one metadata file that lists its chains
(normally one; ``auto`` adds a new one when the VM lost the old chain's
bitmap).  Each chain names its dirty bitmap and, per disk, the ordered list
of backup files.  The metadata, not file modification times, is the truth
about order; it is rewritten atomically (temp file, fsync, rename) so a crash
leaves either the old or the new version, never half of one.

Every disk folder also carries ``qmpbackup-disk.json``: the same records,
limited to the disks stored in that folder, written (each atomically) just
before the top-level file.  A disk folder copied, moved or renamed on its
own therefore still knows its chain, and restores with the same checks.
Copies (``--level copy``) are kept as one chain without a bitmap.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.fsutil import write_atomically
from libqmpbackup.names import DISK_METADATA_NAME, METADATA_NAME, safe_component

METADATA_VERSION = 1
COPIES_ID = "copies"
"""The id of the bitmap-less chain that lists a folder's ``--level copy`` backups."""


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
    backed: bool = True         # an INC names its predecessor as backing file (upstream's do not)
    timestamped: bool = True    # named LEVEL-<time>-<image>; False: named like the source image
    holds: Optional[int] = None     # set by commit/snapshotrebase: the later point the file holds

    @property
    def point_time(self) -> int:
        """The moment the file holds: its own time, or the point committed into it in place.

        commit and snapshotrebase keep the FULL's name (upstream's docs
        point at that name), so the name and ``time`` stay the backup's own
        and the point the file now holds is recorded beside them.
        """
        return self.holds if self.holds is not None else self.time


@dataclass
class DiskChain:
    backups: list[BackupRecord] = field(default_factory=list)
    folder: Optional[str] = None   # relative to the chain folder; None: the disk id; "": itself


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

    @property
    def is_copies(self) -> bool:
        return not self.bitmap

    def folder_of(self, disk_id: str) -> str:
        """Where DISK_ID's files of this chain live, relative to the chain folder."""
        chain = self.disks.get(disk_id)
        if chain is not None and chain.folder is not None:
            return chain.folder
        return safe_component(disk_id)


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
        """The chain a backup continues: the newest one with a bitmap."""
        return next((c for c in reversed(self.chains) if not c.is_copies), None)

    @property
    def copies(self) -> Optional[Chain]:
        return self.find(COPIES_ID)

    def find(self, chain_id: str) -> Optional[Chain]:
        return next((c for c in self.chains if c.uuid == chain_id), None)

    def latest_time(self) -> int:
        """The newest backup time recorded (a --no-timestamp FULL has none in its name)."""
        return max((r.time for c in self.chains for d in c.disks.values() for r in d.backups),
                   default=0)

    def folders(self) -> list[str]:
        """Every disk folder below the root that the chains use (not the root itself)."""
        names = {c.folder_of(d) for c in self.chains for d in c.disks}
        return sorted(n for n in names if n)

    def for_folder(self, folder: str) -> ChainStore:
        """The records of the disks stored in FOLDER, as a store rooted in that folder."""
        chains = []
        for chain in self.chains:
            disks = {d: DiskChain(backups=list(dc.backups), folder="")
                     for d, dc in chain.disks.items() if chain.folder_of(d) == folder}
            if disks:
                chains.append(Chain(uuid=chain.uuid, bitmap=chain.bitmap, created=chain.created,
                                    disks=disks))
        return ChainStore(root=self.root / folder, chains=chains)

    @classmethod
    def load(cls, root: Path, name: str = METADATA_NAME) -> ChainStore:
        path = root / name
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls(root)
        except (OSError, ValueError) as err:
            raise ChainError(f"cannot read chain metadata {path}: {err}") from err
        try:
            chains = [_chain_from_dict(c) for c in raw["chains"]]
        except KeyError as err:
            raise ChainError(f"chain metadata {path} is malformed: missing {err}") from err
        except (TypeError, AttributeError) as err:
            raise ChainError(f"chain metadata {path} is malformed: {err}") from err
        pruning = raw.get("pruning", [])
        if not isinstance(pruning, list) or not all(isinstance(p, str) for p in pruning):
            raise ChainError(f"chain metadata {path} is malformed: 'pruning' is not a list of names")
        return cls(root=root, chains=chains, pruning=pruning)

    def save(self) -> None:
        """Write each disk folder's records, then the folder's metadata (the commit point).

        A disk folder no chain uses any more (a prune dropped them) loses its
        records file, so that the prune can remove the emptied folder.
        """
        for folder in sorted({*self.folders(), *self._folders_with_records()}):
            path = self.root / folder
            if path.is_symlink() or not path.is_dir():
                continue    # never write through a link that may lead out of the folder
            records = self.for_folder(folder)
            if records.chains:
                records.write(DISK_METADATA_NAME)
            else:
                (self.root / folder / DISK_METADATA_NAME).unlink(missing_ok=True)
        self.write(METADATA_NAME)

    def _folders_with_records(self) -> list[str]:
        try:
            return [p.parent.name for p in self.root.glob(f"*/{DISK_METADATA_NAME}")]
        except OSError:
            return []

    def write(self, name: str) -> None:
        data: dict[str, Any] = {"version": METADATA_VERSION,
                                "chains": [asdict(c) for c in self.chains]}
        if self.pruning and name == METADATA_NAME:
            data["pruning"] = self.pruning
        write_atomically(self.root / name, json.dumps(data, indent=2) + "\n")


def is_folder_name(name: object) -> bool:
    """"" (the chain folder itself) or one plain path component."""
    return isinstance(name, str) and (name == "" or (
        name not in (".", "..") and "/" not in name and "\0" not in name))


def _chain_from_dict(raw: dict[str, Any]) -> Chain:
    disks = {}
    for disk_id, d in raw["disks"].items():
        folder = d.get("folder")
        if folder is not None and not is_folder_name(folder):
            # the metadata is untrusted: a folder must stay inside the backup folder
            raise TypeError(f"folder {folder!r} of disk {disk_id!r} is not a folder name")
        disks[disk_id] = DiskChain(backups=[BackupRecord(**b) for b in d["backups"]],
                                   folder=folder)
    return Chain(uuid=raw["uuid"], bitmap=raw["bitmap"], created=raw["created"], disks=disks)
