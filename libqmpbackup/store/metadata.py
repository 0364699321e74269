"""The chain metadata of a backup folder: ``qmpbackup.json``.

A backup target folder holds one metadata file that lists its chains
(normally one; ``auto`` adds a new one when the VM lost the old chain's
bitmap).  Each chain names its dirty bitmap and, per disk, the ordered list
of backup files.  The metadata, not file modification times, is the truth
about order; it is rewritten atomically (temp file, fsync, rename: BackupFolder.save) so a crash
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

from libqmpbackup.store import folder_safety, name_rules
from libqmpbackup.store import json_shape as shape
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import (
    BITMAP_PREFIX,
    CHAIN_FOLDER,
    LEVEL_PREFIX,
    METADATA_NAME,
    is_chain_id,
    safe_component,
)

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
    digest: Optional[str] = None    # "<algorithm>:<hex>" of the file's bytes (see digests.py);
                                    # None in metadata written before checksums existed
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

    @property
    def label(self) -> str:
        """How users see the point: ``FULL-<time>`` / ``INC-<time>``, whatever the file is named.

        Also for files named like their source image (--no-timestamp); a FULL
        that commit/snapshotrebase made hold a later point is named for that point.
        """
        if self.holds is not None:
            return f"{LEVEL_PREFIX['full']}-{self.holds}"
        return f"{LEVEL_PREFIX.get(self.level, self.level.upper())}-{self.time}"


@dataclass
class DiskChain:
    backups: list[BackupRecord] = field(default_factory=list)
    folder: Optional[str] = None   # relative to the chain folder; None: the disk id;
                                   # CHAIN_FOLDER: the chain folder itself


@dataclass
class Chain:
    """One chain: its bitmap, each disk's records, and the disks left out when it started.

    ``excluded`` (disk ids the VM had but --exclude/--include left out at the
    chain's first run) keeps them out of later runs unless --include names
    them; only a disk the VM did not have then joins as hot-added.  Metadata
    of earlier releases has no such list: every disk may join, as before.
    """

    uuid: str
    bitmap: str
    created: int
    disks: dict[str, DiskChain] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    # every file of the chain is a LUKS-encrypted qcow2 (never a mix); no key check value is
    # kept: each file's LUKS header is the check (see libqmpbackup.keys)
    encrypted: bool = False

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

    ``pruning`` lists the files of chains that
    ``qmpbackup prune`` already dropped from ``chains`` but has not deleted
    yet: the metadata is rewritten before any file goes, so a prune killed
    in between leaves files that are named here, and the next prune or
    backup run deletes exactly those.
    """

    root: Path
    chains: list[Chain] = field(default_factory=list)
    pruning: list[ChainFile] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)   # upstream folders no disk matched (not saved)

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
            disks = {d: DiskChain(backups=list(dc.backups), folder=CHAIN_FOLDER)
                     for d, dc in chain.disks.items() if chain.folder_of(d) == folder}
            if disks:
                chains.append(Chain(uuid=chain.uuid, bitmap=chain.bitmap, created=chain.created,
                                    disks=disks, encrypted=chain.encrypted))
        return ChainStore(root=self.root / folder, chains=chains)

    @classmethod
    def read(cls, folder: Folder, name: str = METADATA_NAME) -> ChainStore:
        """The chains NAME in FOLDER lists; anything but what :meth:`text` writes is a chain error.

        The file is untrusted (see :mod:`folder_safety`): every file and folder
        name in it must be one the tool could have written before anything uses
        it.  Read relative to the folder's descriptor: commands read it once,
        through their :class:`~libqmpbackup.store.backup_folder.BackupFolder`.
        """
        root = folder.path
        where = f"chain metadata {root / name}"
        raw = folder_safety.read_json(folder, name, "chain metadata")
        if raw is folder_safety.ABSENT:
            return cls(root)
        top = shape.as_object(raw, where)
        chains = [_chain_from_dict(c, where) for c in shape.array(top, "chains", where)]
        pruning = [name_rules.ChainFile.parse(e, f"{where}: pruning entry")
                   for e in shape.array(top, "pruning", where, default=[])]
        return cls(root=root, chains=chains, pruning=pruning)

    def text(self, name: str) -> str:
        """The JSON document NAME (the folder's metadata, or a disk folder's records) holds."""
        data: dict[str, Any] = {"version": METADATA_VERSION,
                                "chains": [asdict(c) for c in self.chains]}
        if self.pruning and name == METADATA_NAME:
            data["pruning"] = [entry.pruning_text() for entry in self.pruning]
        return json.dumps(data, indent=2) + "\n"


def _chain_from_dict(value: Any, where: str) -> Chain:
    raw = shape.as_object(value, where, "a chain")
    chain_id = shape.text(raw, "uuid", where)
    if not is_chain_id(chain_id):
        raise shape.malformed(where, f"chain id {chain_id[:80]!r} is not a valid chain id")
    bitmap = shape.text(raw, "bitmap", where, empty_ok=True)   # empty: the copies
    if bitmap and not (bitmap.startswith(BITMAP_PREFIX)
                       and is_chain_id(bitmap[len(BITMAP_PREFIX):])):
        raise shape.malformed(where, f"bitmap {bitmap[:80]!r} is not a qmpbackup bitmap name")
    disks = {}
    for disk_id, disk in shape.mapping(raw, "disks", where).items():
        if not disk_id or len(disk_id) > shape.MAX_TEXT:
            raise shape.malformed(where, f"disk id {disk_id[:80]!r} is not valid")
        fields = shape.as_object(disk, where, f"disk {disk_id[:80]!r}")
        folder = fields.get("folder")
        if folder is not None:   # a folder must stay inside the backup folder
            folder = name_rules.disk_folder(folder, f"{where}: folder of disk {disk_id[:80]!r}")
        backups = shape.array(fields, "backups", where)
        disks[disk_id] = DiskChain(backups=[_record_from_dict(b, where) for b in backups],
                                   folder=folder)
    excluded = shape.array(raw, "excluded", where, default=[])
    if not all(isinstance(d, str) and 0 < len(d) <= shape.MAX_TEXT for d in excluded):
        raise shape.malformed(where, "'excluded' must list disk ids")
    return Chain(uuid=chain_id, bitmap=bitmap, created=shape.integer(raw, "created", where),
                 disks=disks, excluded=excluded,
                 encrypted=shape.flag(raw, "encrypted", where, default=False))


def _record_from_dict(value: Any, where: str) -> BackupRecord:
    raw = shape.as_object(value, where, "a backup record")
    level = shape.text(raw, "level", where)
    if level not in LEVEL_PREFIX:
        raise shape.malformed(where, f"level {level[:80]!r} is not one of {', '.join(LEVEL_PREFIX)}")
    timestamped = shape.flag(raw, "timestamped", where, default=True)
    what = f"{where}: file"
    return BackupRecord(
        file=(name_rules.backup_file(raw.get("file"), what) if timestamped
              else name_rules.recorded_file(raw.get("file"), what)),
        level=level,
        time=shape.integer(raw, "time", where),
        virtual_size=shape.integer(raw, "virtual_size", where),
        source_image=shape.text(raw, "source_image", where, default="", empty_ok=True),
        source_format=shape.text(raw, "source_format", where, default="qcow2"),
        compressed=shape.flag(raw, "compressed", where, default=False),
        quiesced=shape.flag(raw, "quiesced", where, default=False),
        backed=shape.flag(raw, "backed", where, default=True),
        timestamped=timestamped,
        holds=None if raw.get("holds") is None else shape.integer(raw, "holds", where),
        digest=None if raw.get("digest") is None else shape.text(raw, "digest", where))
