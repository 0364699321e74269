"""Hostile qcow2 images built byte by byte, for tests of what untrusted folders may hold.

Kept apart from the fixtures so any test (verify, restore, mount, digests)
can plant the same image.  Everything is written with :mod:`struct` from
the qcow2 specification (docs/interop/qcow2.txt of QEMU), never with
qemu-img, because qemu-img refuses to create what an attacker writes.
"""

from __future__ import annotations

import struct
from pathlib import Path

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
#: QEMU's ceiling on the active L1 table (QCOW_MAX_L1_SIZE, 32 MiB of 8-byte entries)
MAX_L1_ENTRIES = (32 << 20) // 8

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")   # the 104 bytes of a version 3 header


def write_cluster_bomb(path: Path, l1_entries: int = MAX_L1_ENTRIES) -> int:
    """Write a small, internally consistent qcow2 that makes ``qemu-img check`` run for hours.

    Every one of L1_ENTRIES L1 entries points at the same L2 table, whose
    every entry points at the same data cluster: about 34 MB on disk
    describe 2 PiB of guest data, and ``check`` walks all of it (4 M L2
    tables of 8192 entries).  The 64-bit refcounts (``refcount_order`` 6)
    are set to exactly the number of references, so the image is *not*
    corrupt: nothing but a CPU or time limit ends the walk.  ``qemu-img
    info`` on it is quick.  Returns the virtual size.
    """
    l1_clusters = -(-l1_entries * 8 // CLUSTER)
    reftable_at, refblock_at, l2_at, data_at = (n * CLUSTER for n in range(1, 5))
    l1_at = 5 * CLUSTER
    total_clusters = 5 + l1_clusters
    virtual_size = l1_entries * L2_ENTRIES * CLUSTER
    header = _HEADER.pack(
        b"QFI\xfb", 3,
        0, 0,                       # no backing file
        CLUSTER_BITS, virtual_size,
        0,                          # no encryption
        l1_entries, l1_at,
        reftable_at, 1,             # one refcount table cluster
        0, 0,                       # no snapshots
        0, 0, 0,                    # incompatible, compatible, autoclear features
        6,                          # refcount_order: 64-bit refcounts, so no overflow
        _HEADER.size)
    # refcounts: metadata and L1 clusters once; the L2 table once per L1 entry; the data
    # cluster once per L2 entry per L1 entry.  A refcount other than 1 means no COPIED flag.
    refcounts = [1, 1, 1, l1_entries, l1_entries * L2_ENTRIES] + [1] * l1_clusters
    refblock = struct.pack(f">{total_clusters}Q", *refcounts)
    assert total_clusters <= CLUSTER // 8, "one refcount block must cover the whole file"
    with open(path, "wb") as out:
        out.write(header.ljust(CLUSTER, b"\0"))
        out.write(struct.pack(">Q", refblock_at).ljust(CLUSTER, b"\0"))
        out.write(refblock.ljust(CLUSTER, b"\0"))
        out.write(struct.pack(">Q", data_at) * L2_ENTRIES)
        out.write(b"\xa5" * CLUSTER)
        assert out.tell() == l1_at
        entry = struct.pack(">Q", l2_at)
        chunk = entry * L2_ENTRIES
        for _ in range(l1_entries // L2_ENTRIES):
            out.write(chunk)
        out.write(entry * (l1_entries % L2_ENTRIES))
        out.truncate(l1_at + l1_clusters * CLUSTER)
    return virtual_size


def write_error_flood(path: Path, l1_entries: int = 1 << 16) -> int:
    """Like :func:`write_cluster_bomb` with 16-bit refcounts all 1: ``check`` prints an error per reference.

    Every reference past the 65535th of the shared L2 table and data cluster
    overflows, and ``qemu-img check`` writes two lines to stderr for each:
    over 100 MB in the first seconds.  Returns the virtual size.
    """
    virtual_size = write_cluster_bomb(path, l1_entries)
    clusters = 5 + -(-l1_entries * 8 // CLUSTER)
    with open(path, "r+b") as image:
        image.seek(_HEADER.size - 8)             # refcount_order, before header_length
        image.write(struct.pack(">I", 4))
        image.seek(2 * CLUSTER)                 # the refcount block, now of 16-bit entries
        image.write(struct.pack(f">{clusters}H", *[1] * clusters).ljust(CLUSTER, b"\0"))
    return virtual_size
