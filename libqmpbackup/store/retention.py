"""Which chains a prune keeps, and which files and metadata entries go with the others.

Pure (chain metadata in, a plan out) so every rule that decides what is
deleted is unit-tested without a VM or a file:

* a chain is kept or removed whole: half a chain looks restorable and is not;
* chains of every folder (a backup folder and its ``YYYY-MM`` month folders)
  are ordered by their newest backup, and the newest N are kept;
* a file a kept chain lists in its disk folder is never deleted, even if
  (damaged or hand-edited) metadata lets a removed chain list it too;
* a kept chain whose disk does not start with a FULL needs a file its
  metadata does not name, so nothing can be pruned safely next to it;
* names from the metadata are untrusted: only a single path component named
  like a finished backup file may ever be joined to a disk folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from libqmpbackup.errors import ChainError, UsageError
from libqmpbackup.store.metadata import BackupRecord, Chain, ChainStore
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import bitmap_name


def check_keep(keep: int) -> None:
    if keep < 1:
        raise UsageError(f"--keep {keep}: keep at least 1 chain (prune never removes the "
                         "newest chain)")


def chain_files(chain: Chain) -> list[ChainFile]:
    """Every backup file of CHAIN, as its metadata names them (checked when it was read)."""
    return [ChainFile(chain.folder_of(disk_id), record.file)
            for disk_id, disk in chain.disks.items() for record in disk.backups]


@dataclass(frozen=True)
class ChainSummary:
    """One chain of one folder, as a prune sees it."""

    root: Path
    position: int                 # index in its folder's metadata
    chain: Chain
    files: tuple[ChainFile, ...]
    first: Optional[BackupRecord]
    last: Optional[BackupRecord]

    @property
    def newest(self) -> int:
        return self.last.time if self.last else self.chain.created

    @property
    def first_point(self) -> str:
        return self.first.label if self.first else ""

    @property
    def last_point(self) -> str:
        return self.last.label if self.last else ""


def summarize(store: ChainStore, position: int) -> ChainSummary:
    chain = store.chains[position]
    records = sorted((r for d in chain.disks.values() for r in d.backups), key=lambda r: r.time)
    return ChainSummary(root=store.root, position=position, chain=chain,
                        files=tuple(chain_files(chain)),
                        first=records[0] if records else None,
                        last=records[-1] if records else None)


@dataclass
class FolderChange:
    """What a prune does to one chain folder: its new chain list and the files that go."""

    store: ChainStore
    remaining: list[Chain]
    delete: list[ChainFile]

    @property
    def emptied(self) -> bool:
        return not self.remaining


@dataclass
class RetentionPlan:
    chains: list[ChainSummary]              # every chain, oldest first
    kept: list[ChainSummary]
    removed: list[ChainSummary]
    changes: list[FolderChange] = field(default_factory=list)

    def is_kept(self, summary: ChainSummary) -> bool:
        return any(k is summary for k in self.kept)

    def removed_chain_ids(self) -> list[str]:
        return list(dict.fromkeys(s.chain.uuid for s in self.removed))

    def kept_bitmaps(self) -> set[str]:
        """Bitmaps a kept chain may use: a removed chain claiming one (a reused id) must not take it."""
        return {name for s in self.kept for name in (s.chain.bitmap, bitmap_name(s.chain.uuid))}

    def delete_paths(self) -> list[Path]:
        return [f.path(c.store.root) for c in self.changes for f in c.delete]


def _needs_foreign_full(summary: ChainSummary) -> Optional[str]:
    for disk_id, disk in summary.chain.disks.items():
        if disk.backups and disk.backups[0].level != "full":
            return disk_id
    return None


def plan_retention(stores: Sequence[ChainStore], keep: int) -> RetentionPlan:
    """Keep the KEEP chains with the newest backups (across STORES), whole; plan the rest away."""
    check_keep(keep)
    summaries = [summarize(store, i) for store in stores for i in range(len(store.chains))]
    ordered = sorted(summaries, key=lambda s: (s.newest, s.chain.created, str(s.root), s.position))
    cut = max(len(ordered) - keep, 0)
    kept, removed = ordered[cut:], ordered[:cut]
    for summary in kept:
        disk_id = _needs_foreign_full(summary)
        if disk_id is not None:
            raise ChainError(f"{summary.root}: kept chain {summary.chain.uuid} does not start "
                             f"with a FULL backup of disk {disk_id}, so its points need a file "
                             "the metadata does not name; nothing was pruned")
    plan = RetentionPlan(chains=ordered, kept=kept, removed=removed)
    for store in stores:
        gone = {s.position for s in removed if s.root == store.root}
        if not gone:
            continue
        needed = {f for s in kept if s.root == store.root for f in s.files}
        delete = list(dict.fromkeys(f for s in removed if s.root == store.root
                                    for f in s.files if f not in needed))
        remaining = [c for i, c in enumerate(store.chains) if i not in gone]
        plan.changes.append(FolderChange(store=store, remaining=remaining, delete=delete))
    return plan
