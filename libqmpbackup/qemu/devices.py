"""Which disks a VM has, under names that survive a restart.

QEMU names the same disk differently depending on how it was attached
(``-drive`` gets a device name, ``-blockdev`` gets none, auto node names
change at every start).  The disk id used for folders and metadata is the
most stable name available: the device name, else the ``-device id=``, else
the node name.  Dirty bitmaps are read per node from
``query-named-block-nodes`` because during a backup the top node seen by
``query-block`` is QEMU's copy-before-write filter.  Offline (a
qemu-storage-daemon on image files, no devices) the disks are the image
nodes the tool opened, with the disk ids it chose; both ways yield the same
:class:`BlockDevice`, so nothing after discovery knows the difference.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from libqmpbackup.errors import JobError
from libqmpbackup.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

FILTER_DRIVERS = frozenset({"copy-before-write", "copy-on-read", "throttle", "preallocate",
                            "compress"})
_PERIPHERAL_RE = re.compile(r"^/machine/peripheral/([^/]+)(?:/virtio-backend)?$")


@dataclass(frozen=True)
class DirtyBitmap:
    name: str
    node: str
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool
    dirty_bytes: int
    granularity: int


@dataclass
class BlockDevice:
    """A disk as the backup code needs it."""

    disk_id: str
    device: str
    qdev: str
    node: str
    driver: str
    filename: str
    virtual_size: int
    read_only: bool
    removable: bool
    qcow2_compat: Optional[str] = None
    bitmaps: list[DirtyBitmap] = field(default_factory=list)
    has_backing: bool = True     # unknown counts as backed: only a known-flat image is skipped sparsely
    backing_filename: str = ""   # query-block's backing-image filename: the image below an overlay

    @property
    def is_pflash(self) -> bool:
        return self.device.startswith("pflash") or "system.flash" in self.qdev

    @property
    def supports_persistent_bitmaps(self) -> bool:
        """Only qcow2 v3 (compat 1.1) images can store persistent dirty bitmaps."""
        return self.driver == "qcow2" and self.qcow2_compat != "0.10"

    def bitmap(self, name: str) -> Optional[DirtyBitmap]:
        return next((b for b in self.bitmaps if b.name == name), None)

    def image_files(self) -> list[str]:
        """The disk's image file, then the one below it when the top is an overlay.

        Upstream qmpbackup names a disk's folder after the base name of one of
        these (the lower one when an active snapshot's overlay sits on top).
        """
        return [f for f in (self.filename, self.backing_filename) if f]

    def names(self) -> set[str]:
        """Every name a user may give in --include/--exclude for this disk."""
        return {n for n in (self.disk_id, self.device, self.node,
                            qdev_id(self.qdev)) if n}


def qdev_id(qdev: str) -> str:
    """The user-given ``-device id=`` from a qdev path, or '' for anonymous devices."""
    match = _PERIPHERAL_RE.match(qdev)
    if match:
        return match.group(1)
    return qdev if qdev and "/" not in qdev else ""


def disk_id_for(device: str, qdev: str, node: str) -> str:
    return device or qdev_id(qdev) or node


def _bitmaps_from_node(node: dict[str, Any]) -> list[DirtyBitmap]:
    result = []
    for raw in node.get("dirty-bitmaps", []):
        if "name" not in raw:  # QEMU's own anonymous bitmaps during a backup job
            continue
        result.append(DirtyBitmap(
            name=raw["name"], node=node["node-name"],
            recording=raw.get("recording", False),
            persistent=raw.get("persistent", False),
            busy=raw.get("busy", False),
            inconsistent=raw.get("inconsistent", False),
            dirty_bytes=raw.get("count", 0),
            granularity=raw.get("granularity", 0)))
    return result


async def named_nodes(session: QmpSession) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = await session.execute(
        "query-named-block-nodes", {"flat": True})
    return nodes


def below_filters(inserted: dict[str, Any],
                  nodes: dict[str, dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    """(node, driver, image info) of a disk's image, under any filter QEMU stacked on it.

    A running backup job (another tool's, or one of a killed qmpbackup run)
    puts a copy-before-write filter on top of the disk; the image, its bitmaps
    and new jobs are on the node below.  query-block names no child node, so
    the node below is the one with the filter's inner image format and file.
    """
    node, driver = inserted["node-name"], inserted.get("drv", "")
    image: dict[str, Any] = inserted.get("image", {})
    while driver in FILTER_DRIVERS and "backing-image" in image:
        inner = image["backing-image"]
        below = [n for n in nodes.values() if n["node-name"] != node
                 and n.get("drv") == inner.get("format")
                 and n.get("image", {}).get("filename") == inner.get("filename")]
        if len(below) != 1:
            log.debug("cannot tell which node is below filter %s", node)
            break
        node, driver = below[0]["node-name"], below[0]["drv"]
        image = below[0].get("image", inner)
    return node, driver, image


def _block_device(disk_id: str, node: dict[str, Any], nodes: dict[str, dict[str, Any]], *,
                  device: str = "", qdev: str = "", removable: bool = False) -> BlockDevice:
    """NODE (a query-block ``inserted`` or a named node: both are BlockDeviceInfo) as a disk.

    An empty DISK_ID means the VM's own naming (:func:`disk_id_for`).
    """
    node_name, driver, image = below_filters(node, nodes)
    specific = image.get("format-specific", {}).get("data", {})
    return BlockDevice(
        disk_id=disk_id or disk_id_for(device, qdev, node_name),
        device=device,
        qdev=qdev,
        node=node_name,
        driver=driver,
        filename=image.get("filename", node.get("file", "")),
        virtual_size=image.get("virtual-size", 0),
        read_only=node.get("ro", False),
        removable=removable,
        qcow2_compat=specific.get("compat"),
        has_backing="backing-image" in image or bool(image.get("backing-filename")),
        backing_filename=image.get("backing-image", {}).get("filename", ""),
        bitmaps=_bitmaps_from_node(nodes.get(node_name, {})),
    )


async def discover(session: QmpSession) -> list[BlockDevice]:
    """All block devices that have a medium, with their bitmaps.

    A qemu-storage-daemon has no devices (query-block is empty): its disks
    are the image nodes it opened for this run, under the disk ids chosen
    for them (:attr:`QmpSession.image_nodes`).
    """
    nodes = {n["node-name"]: n for n in await named_nodes(session)}
    if session.image_nodes is not None:
        return [_block_device(disk_id, _image_node(nodes, name), nodes)
                for name, disk_id in session.image_nodes.items()]
    devices = []
    for block in await session.execute("query-block"):
        inserted = block.get("inserted")
        if not inserted:
            log.debug("skipping %s: no medium", block.get("device") or block.get("qdev"))
            continue
        devices.append(_block_device("", inserted, nodes, device=block.get("device", ""),
                                     qdev=block.get("qdev", ""),
                                     removable=block.get("removable", False)))
    return devices


def _image_node(nodes: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    try:
        return nodes[name]
    except KeyError:
        raise JobError(f"qemu-storage-daemon lost image node {name}") from None


async def refresh_bitmaps(session: QmpSession, disks: list[BlockDevice]) -> None:
    """Re-read the bitmaps of DISKS after the tool itself changed them."""
    nodes = {n["node-name"]: n for n in await named_nodes(session)}
    for disk in disks:
        disk.bitmaps = _bitmaps_from_node(nodes.get(disk.node, {}))
