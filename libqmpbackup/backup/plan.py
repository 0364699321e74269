"""Deciding what a backup run does, before anything is touched.

Planning is pure (VM disks + chain metadata + options in, a plan out) so
every rule about levels, bitmaps and disk selection is unit-testable without
QEMU, and a run that would fail for a reason known up front fails before it
has created a single file or bitmap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Optional

from libqmpbackup.backup.bitmaps import chain_bitmap_of, chain_bitmaps, diff_bitmap, tool_bitmaps
from libqmpbackup.backup.fleecing import FleecingOptions
from libqmpbackup.backup.jobs import BackupJob, TargetIO
from libqmpbackup.backup.progress import LOG_INTERVAL
from libqmpbackup.errors import ChainError, TargetError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.qemu.devices import BlockDevice
from libqmpbackup.store.layout import month_folder
from libqmpbackup.store.metadata import COPIES_ID, Chain, ChainStore
from libqmpbackup.store.names import (
    CHAIN_FOLDER,
    METADATA_NAME,
    PARTIAL_SUFFIX,
    RESERVED_FILE_NAMES,
    Level,
    backup_file_name,
    bitmap_name,
    image_name,
    link_name,
    new_chain_id,
    safe_component,
)

log = logging.getLogger(__name__)

AUTO_LEVEL = "auto"   # a --level choice, not a level: full or inc, decided by the run
LEVELS = (Level.FULL.value, Level.INC.value, Level.DIFF.value, AUTO_LEVEL, Level.COPY.value)


def level_help() -> str:
    """``--level``'s help: each choice with its one description (store.names.LEVEL_DESCRIPTIONS)."""
    return "; ".join(f"{choice}: " + ("full when needed, else inc" if choice == AUTO_LEVEL
                                       else Level(choice).description) for choice in LEVELS)


@dataclass
class BackupOptions:
    """Everything the user chose for one backup run."""

    level: str
    target: Path
    uuid: Optional[str] = None
    monthly: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_raw: bool = False
    compress: bool = False
    speed_limit: int = 0
    progress: bool = True
    quiesce: bool = False
    quiesce_required: bool = False
    agent_socket: Optional[str] = None
    copy_offload: str = "auto"
    pause: bool = False
    progress_interval: float = LOG_INTERVAL
    target_cache_direct: bool = False
    target_aio: Optional[str] = None
    no_subdir: bool = False        # files in the target folder itself, not DIR/<disk id>/
    no_timestamp: bool = False     # a FULL/COPY named exactly like the source image
    no_symlink: bool = False       # with no_timestamp: no FULL-<image> symlink beside it
    fleecing: Optional[FleecingOptions] = None   # None: plain backup jobs
    checksum: bool = True          # hash each written file and record its digest
    key: Optional[Key] = None      # --encrypt-key-file: a new chain is encrypted with it

    @property
    def target_io(self) -> TargetIO:
        return TargetIO(direct=self.target_cache_direct, aio=self.target_aio)


@dataclass(frozen=True)
class RunPlan:
    """What one run will do, decided before anything in QEMU or on disk changes."""

    level: str                        # the effective level: full, inc, diff or copy
    timestamp: int
    root: Path
    chain: Optional[Chain]            # for copy: the folder's bitmap-less chain of copies
    new_chain: bool
    jobs: list[BackupJob]
    bitmaps_to_add: list[BlockDevice] = field(default_factory=list)
    retire_bitmap: Optional[str] = None   # an older chain's bitmap that can no longer serve
    reason: str = ""


def select_disks(disks: list[BlockDevice], opts: BackupOptions) -> list[BlockDevice]:
    """Apply --include/--exclude/--include-raw; pflash is always part of the VM."""
    known = set().union(*(d.names() for d in disks)) if disks else set()
    for name in (*opts.include, *opts.exclude):
        if name not in known:
            raise UsageError(f"no disk named {name!r} in this VM (known: {', '.join(sorted(known))})")
    selected = []
    for disk in disks:
        if opts.include and not disk.names() & set(opts.include):
            log.info("skipping %s: not in --include", disk.disk_id)
            continue
        if disk.names() & set(opts.exclude):
            log.info("skipping %s: excluded", disk.disk_id)
            continue
        if disk.removable and disk.read_only:
            log.info("skipping %s: read-only removable medium (%s)", disk.disk_id, disk.filename)
            continue
        if not disk.supports_persistent_bitmaps and not disk.is_pflash and not opts.include_raw \
                and opts.level != "copy":
            log.warning("skipping %s: %s image cannot hold persistent bitmaps "
                        "(use --include-raw to copy it in full every time)",
                        disk.disk_id, disk.driver)
            continue
        selected.append(disk)
    if not selected:
        raise UsageError("no disk left to back up")
    ids = [d.disk_id for d in selected]
    dup = {safe_component(i) for i in ids if [safe_component(x) for x in ids].count(safe_component(i)) > 1}
    if dup:
        raise UsageError(f"disk ids collide as folder names: {', '.join(sorted(dup))}")
    if opts.no_subdir:
        images = [image_name(d.filename) for d in selected]
        clash = sorted({n for n in images if images.count(n) > 1})
        if clash:
            owners = [d.disk_id for d in selected if image_name(d.filename) in clash]
            raise UsageError(f"--no-subdir: disks {', '.join(owners)} would get the same file "
                             f"names ({', '.join(clash)}): drop --no-subdir or --exclude one")
    return selected


def left_out(disks: list[BlockDevice], opts: BackupOptions) -> list[str]:
    """Disk ids --include/--exclude leave out: a new chain records them (:attr:`Chain.excluded`)."""
    return sorted(d.disk_id for d in disks
                  if (opts.include and not d.names() & set(opts.include))
                  or d.names() & set(opts.exclude))


def chain_selection(disks: list[BlockDevice], chain: Chain,
                    opts: BackupOptions) -> list[BlockDevice]:
    """DISKS without those CHAIN left out when it started, unless --include names them.

    Without this a disk excluded at the first run would join every later run
    that forgot the --exclude, as if hot-added, with a new full.
    """
    kept = []
    for disk in disks:
        if (disk.disk_id in chain.excluded and disk.disk_id not in chain.disks
                and not disk.names() & set(opts.include)):
            log.info("skipping %s: left out when chain %s started (name it with --include to "
                     "add it)", disk.disk_id, chain.uuid)
            continue
        kept.append(disk)
    if not kept:
        raise UsageError(f"no disk left to back up: chain {chain.uuid} left out the others")
    return kept


def chain_root(opts: BackupOptions) -> Path:
    return month_folder(opts.target) if opts.monthly else opts.target


def whole_disk_sync(disk: BlockDevice) -> str:
    """The sync mode of a full copy: ``top`` skips what a disk without backing file never wrote.

    Without a backing file an unallocated cluster reads as zeros in the disk,
    and equally in the fresh backup file (opened without backing): skipping it
    is exact, and a mostly empty disk is copied (and ``--speed-limit``
    charged) by its data, not its virtual size.  With a backing file
    unallocated means "as in the backing file", so everything is copied.
    """
    return "full" if disk.has_backing else "top"


@dataclass(frozen=True)
class Layout:
    """Where this run's files go and how they are named (--no-subdir, --no-timestamp)."""

    root: Path
    store: ChainStore
    opts: BackupOptions
    existing: frozenset[str] = frozenset()   # paths below root, relative ("virtio0/FULL-…")

    def folder(self, disk: BlockDevice) -> str:
        """A disk stays where its chain keeps it; a new disk goes where the options say."""
        for chain in reversed(self.store.chains):
            if disk.disk_id in chain.disks:
                return chain.folder_of(disk.disk_id)
        return CHAIN_FOLDER if self.opts.no_subdir else safe_component(disk.disk_id)

    def plain_name(self, disk: BlockDevice, folder: str, level: str) -> Optional[str]:
        """The source image's name for a FULL/COPY with --no-timestamp, unless it is taken."""
        if not self.opts.no_timestamp or level in ("inc", "diff"):
            return None
        name = image_name(disk.filename)
        taken = {os.path.join(folder, n) for n in (name, link_name(level, name))} & self.existing
        if name in RESERVED_FILE_NAMES or taken:
            log.info("%s: %s is taken in the target; naming this %s backup with its time",
                     disk.disk_id, name, level)
            return None
        return name

    def job(self, disk: BlockDevice, level: str, timestamp: int, *, sync: Optional[str] = None,
            backing: Optional[str] = None, backed: bool = True, bitmap: Optional[str] = None,
            bitmap_mode: Optional[str] = None, image: Optional[str] = None,
            note: str = "") -> BackupJob:
        """IMAGE: the image name the file is named after (default: the disk's image file)."""
        folder_name = self.folder(disk)
        folder = self.root / folder_name
        plain = self.plain_name(disk, folder_name, level)
        name = plain or backup_file_name(level, timestamp, image or disk.filename)
        link = link_name(level, plain) if plain and not self.opts.no_symlink else None
        return BackupJob(disk=disk, level=level, sync=sync or whole_disk_sync(disk),
                         partial_path=folder / (name + PARTIAL_SUFFIX), final_path=folder / name,
                         backing=backing, backed=backed, timestamped=plain is None, link=link,
                         bitmap=bitmap, bitmap_mode=bitmap_mode, note=note)


def _chain_jobs(disks: list[BlockDevice], layout: Layout, chain: Chain, timestamp: int,
                level: str) -> tuple[list[BackupJob], list[BlockDevice]]:
    """Jobs for a chain run: LEVEL (inc or diff) where possible, full where a disk is new.

    A disk that cannot hold bitmaps (raw, pflash) is copied in full every time.
    A bitmap-capable disk without a full in the chain gets its full now,
    with the chain bitmap added beforehand and re-based on success.  An INC
    backs onto the disk's previous backup, a DIFF onto its FULL; both run
    with the chain bitmap (see :mod:`bitmaps` for how a DIFF fills it).
    After one of upstream's INCs (which name no backing file) the new file
    names none either, and is named after the chain's image like upstream's
    files (also when an overlay now sits on top), so the folder stays one
    kind of chain for upstream's tools.  A full where LEVEL was asked for
    carries a note saying why, for the run's summary.
    """
    jobs, add = [], []
    continuing = level in ("inc", "diff")
    for disk in disks:
        if not disk.supports_persistent_bitmaps:
            jobs.append(layout.job(disk, "full", timestamp,
                                   note=f"{disk.driver}: copied in full every run"
                                   if continuing else ""))
            continue
        history = chain.disks.get(disk.disk_id)
        if history and chain.has_full(disk.disk_id):
            previous = history.backups[-1]
            full = [b for b in history.backups if b.level == "full"][-1]
            base = full if level == "diff" else previous
            jobs.append(layout.job(disk, level, timestamp, sync="incremental",
                                   backing=base.file if previous.backed else None,
                                   backed=previous.backed, bitmap=chain.bitmap,
                                   image=None if previous.backed else full.source_image))
            continue
        if disk.bitmap(chain.bitmap) is None:
            add.append(disk)
        note = _why_full(chain, disk.disk_id, history is None,
                         layout.store.unmatched) if continuing else ""
        if note:
            log.info("%s: not in chain %s yet: a new full instead of %s (%s)", disk.disk_id,
                        chain.uuid, level, note)
        jobs.append(layout.job(disk, "full", timestamp, bitmap=chain.bitmap,
                               bitmap_mode="on-success", note=note))
    return jobs, add


def _why_full(chain: Chain, disk_id: str, new_to_chain: bool, unmatched: list[str]) -> str:
    """Why a disk of an inc/diff run gets a new full instead (UNMATCHED: see adopt_upstream)."""
    if not new_to_chain:
        return "no full in the chain"
    if disk_id in chain.excluded:
        return "named by --include"
    return "matches no upstream folder" if unmatched else "hot-added"


def _bitmap_problems(disks: list[BlockDevice], chain: Chain,
                     differential: bool = False) -> list[tuple[BlockDevice, str]]:
    """Disks of the chain whose bitmap can no longer describe the changes since the last backup.

    DIFFERENTIAL: the changes since the FULL are needed too (the diff bitmap).
    """
    problems = []
    for disk in disks:
        if not disk.supports_persistent_bitmaps or not chain.has_full(disk.disk_id):
            continue
        bitmap = disk.bitmap(chain.bitmap)
        diff = disk.bitmap(diff_bitmap(chain.bitmap))
        if bitmap is None:
            others = sorted({chain_bitmap_of(n) for n in tool_bitmaps(disk)} - {chain.bitmap})
            hint = f" (it has {', '.join(others)} from another chain)" if others else ""
            problems.append((disk, f"disk {disk.disk_id} has no bitmap {chain.bitmap}{hint}"))
        elif bitmap.inconsistent:
            problems.append((disk, f"bitmap {chain.bitmap} on {disk.disk_id} is inconsistent "
                                   "(QEMU did not shut down cleanly)"))
        elif differential and diff is None:
            problems.append((disk, f"disk {disk.disk_id} has no bitmap {diff_bitmap(chain.bitmap)} "
                                   "(the chain was started without it, or QEMU lost it)"))
        elif differential and diff is not None and diff.inconsistent:
            problems.append((disk, f"bitmap {diff.name} on {disk.disk_id} is inconsistent "
                                   "(QEMU did not shut down cleanly)"))
    return problems


def _not_empty(root: Path, chain: Optional[Chain]) -> str:
    """Why a new chain cannot start in ROOT, and the way out that actually works."""
    if chain is None:
        return (f"target {root} is not empty and holds no chain of qmpbackup "
                f"(no {METADATA_NAME}): a new chain needs an empty or new folder")
    return (f"target {root} is not empty: a new chain needs an empty folder "
            f"(use --level inc or auto to continue chain {chain.uuid} there, or --monthly)")


def plan_backup(disks: list[BlockDevice], store: ChainStore, opts: BackupOptions,
                timestamp: int, root_is_empty: bool,
                existing: Collection[str] = (), excluded: Collection[str] = ()) -> RunPlan:
    """EXCLUDED: disk ids of the VM the options leave out (:func:`left_out`), for a new chain."""
    root = store.root
    level = opts.level
    layout = Layout(root, store, opts, frozenset(existing))
    if level == "copy":
        if store.current is not None:
            raise TargetError(f"target {root} holds a backup chain: write copies to another folder")
        copies = store.copies
        return RunPlan(level="copy", timestamp=timestamp, root=root,
                       chain=copies or Chain(uuid=COPIES_ID, bitmap="", created=timestamp),
                       new_chain=copies is None,
                       jobs=[layout.job(d, "copy", timestamp) for d in disks],
                       reason="--level copy")

    chain = store.current
    if chain and opts.uuid and chain.uuid != opts.uuid:
        raise ChainError(f"target {root} holds chain {chain.uuid}, not --uuid {opts.uuid}")
    if chain and level != "full":
        selected = chain_selection(disks, chain, opts)
        excluded = sorted({*excluded, *(d.disk_id for d in disks if d not in selected)})
        disks = selected
    reason = "--level " + level
    unusable: list[tuple[BlockDevice, str]] = []
    if level == "auto":
        if chain is None:
            level, reason = "full", "auto: the target holds no chain yet"
        else:
            unusable = _bitmap_problems(disks, chain)
            if unusable:
                level = "full"
                reason = f"auto: {unusable[0][1]}; starting a new chain"
                # one warning per run, not one per disk: a lost bitmap is one event
                log.warning("%s; starting a new chain in %s",
                            "; ".join(problem for _, problem in unusable), root)
            else:
                level, reason = "inc", f"auto: continuing chain {chain.uuid}"

    if level == "full":
        if not root_is_empty and not unusable:
            raise TargetError(_not_empty(root, chain))
        chain_id = opts.uuid if opts.uuid and not unusable else new_chain_id()
        new = Chain(uuid=chain_id, bitmap=bitmap_name(chain_id), created=timestamp,
                    excluded=sorted(excluded))
        taken = [d.disk_id for d in disks if chain_bitmaps(d, new.bitmap)]
        if taken:
            # re-basing it would silently break the chain in the other folder
            raise ChainError(
                f"disk {taken[0]} already has bitmap {new.bitmap}: chain {chain_id} belongs "
                f"to another backup folder; choose another --uuid, or remove that chain's "
                f"bitmaps with: qmpbackup cleanup --remove-bitmaps --uuid {chain_id}")
        jobs, add = _chain_jobs(disks, layout, new, timestamp, "full")
        retire = chain.bitmap if unusable and chain else None
        return RunPlan(level="full", timestamp=timestamp, root=root, chain=new, new_chain=True,
                       jobs=jobs, bitmaps_to_add=add, retire_bitmap=retire, reason=reason)

    if chain is None:
        raise ChainError(f"target {root} holds no backup chain: run a full backup first")
    problems = _bitmap_problems(disks, chain, differential=level == "diff")
    if problems:
        kind = "a differential" if level == "diff" else "an incremental"
        raise ChainError(f"{problems[0][1]}: {kind} backup is impossible; "
                         "run --level auto (starts a new chain when the bitmap is unusable) or "
                         "a full backup into a new folder")
    jobs, add = _chain_jobs(disks, layout, chain, timestamp, level)
    return RunPlan(level=level, timestamp=timestamp, root=root, chain=chain, new_chain=False,
                   jobs=jobs, bitmaps_to_add=add, reason=reason)
