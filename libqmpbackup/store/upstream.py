"""Folders written by upstream qmpbackup 0.67, read as chain metadata.

Upstream keeps no metadata file: ``DIR/uuid`` holds the chain id (bitmap
``qmpbackup-<uuid>``), each disk has ``DIR/<image>/FULL-<t>-<image>`` and
``INC-<t>-<image>`` files whose headers name no backing file (or, with
``--no-subdir``, the files sit in DIR itself), and ``DIR/<image>.config``
is the image's ``qemu-img info``; ``<image>`` is the base name of the disk's
image file (:mod:`libqmpbackup.backup.adopt` matches it to a disk).  The
order of a chain is all there is to know, and upstream's own restore takes
it from the names; here it comes from the time in each name, never from
file modification times.

Only regular files count: a symlink is never taken for a backup, so a
hostile or stale link cannot smuggle another file into a chain.  Nothing in
the folder is changed by reading it; a backup run that continues such a
chain records it in ``qmpbackup.json`` beside upstream's files, which stay
as they are.
"""

from __future__ import annotations

import stat
from typing import Iterator, Optional

from libqmpbackup.errors import ChainError, TargetError, UsageError
from libqmpbackup.store import folder_safety
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.metadata import COPIES_ID, BackupRecord, Chain, ChainStore, DiskChain
from libqmpbackup.store.names import (
    CHAIN_FOLDER,
    PARTIAL_SUFFIX,
    UPSTREAM_UUID_NAME,
    bitmap_name,
    parse_backup_name,
    validate_uuid,
)

UNKNOWN_ID = "upstream"
"""Chain id of an upstream disk folder copied without its ``DIR/uuid``."""


def _backup_files(folder: Folder) -> list[str]:
    """Names of the regular backup files in FOLDER (symlinks and .partial files excluded)."""
    found = []
    for name in folder.names():
        if name.endswith(PARTIAL_SUFFIX) or parse_backup_name(name) is None:
            continue
        info = folder.entry(name)
        if info is not None and stat.S_ISREG(info.st_mode):
            found.append(name)
    return found


def _in_subfolders(root: Folder) -> Iterator[tuple[str, Folder]]:
    """Each real sub-folder of ROOT, opened relative to it (a symlinked one is never read)."""
    for name in root.subfolder_names():
        try:
            sub = root.sub(name)
        except (ChainError, TargetError):
            continue    # replaced meanwhile
        with sub:
            yield name, sub


def chain_id(root: Folder) -> Optional[str]:
    """The chain id in ROOT/uuid, or None without that file."""
    path = root.path / UPSTREAM_UUID_NAME
    info = root.entry(UPSTREAM_UUID_NAME)
    if info is None or not stat.S_ISREG(info.st_mode):
        return None
    data = folder_safety.read_bytes(root, UPSTREAM_UUID_NAME, "upstream chain id file", 4096)
    text = (data or b"").decode(errors="replace").strip()
    try:
        return validate_uuid(text)
    except UsageError as err:
        raise ChainError(f"{path} holds no usable chain id: {err}") from err


def looks_like_upstream(folder: Folder) -> bool:
    """FOLDER/uuid, or backup files in FOLDER or one of its sub-folders, and no metadata of ours."""
    return (chain_id(folder) is not None or bool(_backup_files(folder))
            or any(_backup_files(sub) for _, sub in _in_subfolders(folder)))


def read_folder(root: Folder) -> ChainStore:
    """ROOT (an upstream backup folder, or one of its disk folders on its own) as chain metadata.

    A disk is identified by its folder name when the folder holds one
    image, else by the image name (``--no-subdir`` folders hold several).
    Records get no virtual size (upstream recorded none; the checks that
    need it are skipped) and ``backed=False``: the INCs name no backing file.
    """
    uuid = chain_id(root) or UNKNOWN_ID
    chain = Chain(uuid=uuid, bitmap=bitmap_name(uuid), created=0)
    copies = Chain(uuid=COPIES_ID, bitmap="", created=0)
    for folder, names in [(CHAIN_FOLDER, _backup_files(root)),
                          *((name, _backup_files(sub)) for name, sub in _in_subfolders(root))]:
        groups: dict[str, list[BackupRecord]] = {}
        for name in names:
            parsed = parse_backup_name(name)
            assert parsed is not None
            groups.setdefault(parsed.image, []).append(BackupRecord(
                file=name, level=parsed.level, time=parsed.timestamp, virtual_size=0,
                source_image=parsed.image, backed=False))
        for image, records in sorted(groups.items()):
            disk_id = folder if folder and len(groups) == 1 else image
            for target, kept in ((chain, [r for r in records if r.level != "copy"]),
                                 (copies, [r for r in records if r.level == "copy"])):
                if kept:
                    kept.sort(key=lambda r: r.time)
                    target.disks[disk_id] = DiskChain(backups=kept, folder=folder)
    for found in (chain, copies):
        times = [r.time for d in found.disks.values() for r in d.backups]
        found.created = min(times, default=0)
    return ChainStore(root.path, [c for c in (chain, copies) if c.disks])
