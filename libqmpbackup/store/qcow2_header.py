"""The few qcow2 header fields the folder rule needs, read from an open descriptor.

``qemu-img info`` renders a backing name's invalid UTF-8 as U+FFFD, so two
different names (``\\xffULL-…`` and ``\\ufffdULL-…``) look alike in its output;
and it opens an external data file the header names before anything could
refuse it.  The header itself is exact and cheap: the backing name as bytes
and the "external data file" feature bit are read here, before qemu-img is
run on the file at all (qcow2 spec, docs/interop/qcow2.txt in QEMU).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

MAGIC = b"QFI\xfb"
INCOMPAT_DATA_FILE = 1 << 2
MAX_BACKING_NAME = 1023
"""QEMU refuses longer backing names."""
_HEADER = struct.Struct(">4sIQI")        # magic, version, backing offset, backing size
_INCOMPAT_OFFSET = 72                    # version 3: incompatible_features (u64)


@dataclass(frozen=True)
class Header:
    """What a qcow2 header says, exactly (``backing`` decoded as the file system would)."""

    version: int
    backing: Optional[str]
    data_file: bool


def read_header(fd: int) -> Optional[Header]:
    """The header of the qcow2 file open as FD, or None when it is not a readable qcow2 header."""
    raw = os.pread(fd, _INCOMPAT_OFFSET + 8, 0)
    if len(raw) < _HEADER.size:
        return None
    magic, version, offset, size = _HEADER.unpack_from(raw)
    if magic != MAGIC or version not in (2, 3):
        return None
    incompatible = 0
    if version == 3:
        if len(raw) < _INCOMPAT_OFFSET + 8:
            return None
        (incompatible,) = struct.unpack_from(">Q", raw, _INCOMPAT_OFFSET)
    backing = None
    if offset and size:
        if size > MAX_BACKING_NAME:
            return None
        name = os.pread(fd, size, offset)
        if len(name) != size:
            return None
        backing = os.fsdecode(name)
    return Header(version=version, backing=backing,
                  data_file=bool(incompatible & INCOMPAT_DATA_FILE))
