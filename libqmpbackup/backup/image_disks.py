"""Which disk id an ``--image`` gets, so one chain goes on whether the VM runs or not.

The disk id names the disk's folder and its history in the chain metadata.
Online it comes from QEMU (``virtio0``); an image file alone has no such
name.  So, in this order:

1. ``ID=`` given on the command line;
2. the disk of the target's chain metadata whose recorded source image is
   this file (same real path; newest chain first): a chain started while
   the VM ran goes on offline in the same disk folders, and online again;
3. the image's file name without its extension (``vm1`` for ``vm1.qcow2``).

The metadata is untrusted: it only picks among names that then go through
the same folder-name rules as any disk id, and relative recorded paths
(relative to some QEMU's working directory) are never matched.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from libqmpbackup.errors import UsageError
from libqmpbackup.qemu.storage_daemon import DaemonImage
from libqmpbackup.store.backup_folder import read_chain_stores
from libqmpbackup.store.layout import month_names
from libqmpbackup.store.metadata import ChainStore, DiskChain
from libqmpbackup.store.names import CHAIN_FOLDER, validate_disk_id

log = logging.getLogger(__name__)

MAX_DISK_ID = 255


@dataclass(frozen=True)
class ImageSpec:
    """One ``--image [ID=]PATH`` as typed."""

    path: str
    disk_id: Optional[str] = None


def parse_image_spec(text: str) -> ImageSpec:
    """``ID=PATH`` when the part before the first ``=`` holds no ``/``, else a plain path.

    ``./a=b.qcow2`` is the way to name a file with ``=`` in the current folder.
    """
    name, sep, path = text.partition("=")
    if sep and "/" not in name:
        if not path:
            raise UsageError(f"--image {text}: no image path after {name}=")
        return ImageSpec(path=path, disk_id=validate_disk_id(name))
    return ImageSpec(path=text)


def real_image_path(spec: ImageSpec) -> tuple[str, bool]:
    """(absolute real path, is a block device) of an image that exists as either."""
    path = os.path.realpath(spec.path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise UsageError(f"--image {spec.path}: {err.strerror}") from err
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise UsageError(f"--image {spec.path} is not an image file or block device")
    return path, stat.S_ISBLK(mode)


def default_disk_id(path: str) -> str:
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    return stem or name


def chain_stores(target: Path, monthly: bool) -> list[ChainStore]:
    """The metadata that may know the images, newest first; unreadable ones are skipped."""
    names = ((lambda top: sorted(month_names(top), reverse=True)) if monthly
             else (lambda top: [CHAIN_FOLDER]))
    stores = []
    for folder, store in read_chain_stores(target, names):
        if isinstance(store, ChainStore):
            stores.append(store)
        else:
            log.debug("not looking up disk ids in %s: %s", folder, store)
    return stores


def _latest(history: DiskChain) -> tuple[int, str]:
    """(time, real path of the source image) of a disk's last backup; (0, "") if unusable."""
    if not history.backups:
        return 0, ""
    last = history.backups[-1]
    when = last.time if isinstance(last.time, int) else 0
    source = last.source_image
    if not isinstance(source, str) or not os.path.isabs(source) or "\0" in source:
        return when, ""
    return when, os.path.realpath(source)


def recorded_disk_ids(stores: Iterable[ChainStore]) -> dict[str, str]:
    """Real path of each disk's latest recorded (absolute) source image -> its disk id.

    Newest chain first; within a chain the disk backed up last wins.
    """
    found: dict[str, str] = {}
    for store in stores:
        for chain in reversed(store.chains):
            latest = sorted(((*_latest(history), disk_id)
                             for disk_id, history in chain.disks.items()), reverse=True)
            for _, source, disk_id in latest:
                # a name fit for one log line and a folder (after safe_component)
                if source and disk_id.isprintable() and 0 < len(disk_id) <= MAX_DISK_ID:
                    found.setdefault(source, disk_id)
    return found


def daemon_images(specs: Sequence[ImageSpec], stores: Iterable[ChainStore] = ()) -> list[DaemonImage]:
    """The images for qemu-storage-daemon, each with its disk id (see the module docstring)."""
    recorded = recorded_disk_ids(stores)
    images: list[DaemonImage] = []
    for spec in specs:
        path, block_device = real_image_path(spec)
        if spec.disk_id:
            disk_id, why = spec.disk_id, "given"
        elif path in recorded:
            disk_id, why = recorded[path], "the chain metadata's disk with this source image"
        else:
            disk_id, why = default_disk_id(spec.path), "the image's file name"
        log.debug("--image %s: disk id %s (%s)", spec.path, disk_id, why)
        for other in images:
            if other.path == path:
                raise UsageError(f"--image {spec.path} is given twice (as {other.disk_id})")
            if other.disk_id == disk_id:
                raise UsageError(f"--image {other.path} and {path} get the same disk id "
                                 f"{disk_id}: give one of them ID=PATH")
        images.append(DaemonImage(disk_id=disk_id, path=path, block_device=block_device))
    return images


def chain_disks_without_image(images: Sequence[DaemonImage],
                              stores: Sequence[ChainStore]) -> list[str]:
    """Disks of the newest chain that no --image names (qcow2 ones: raw disks cannot be given).

    An offline run backs up the images it is given and nothing else; a
    forgotten ``--image`` would leave a disk out of the point without a word,
    and a whole-VM restore of that point would be refused much later.
    """
    for store in stores:            # newest first
        chains = [chain for chain in store.chains if not chain.is_copies]
        if not chains:
            continue
        given = {image.disk_id for image in images}
        return sorted(disk_id for disk_id, history in chains[-1].disks.items()
                      if history.backups and history.backups[-1].source_format == "qcow2"
                      and disk_id not in given)
    return []
