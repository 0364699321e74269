"""Whether a run asks QEMU to copy with ``copy_file_range`` (``x-perf.use-copy-range``).

With copy offload the kernel moves the data between the source image and
the backup file without QEMU's bounce buffers: on this project's machine the
job takes about half the time of QEMU's default copy path (bench/README.md).
``x-perf`` is an unstable QEMU interface, hence the rules kept here, pure and
unit-tested:

* ``off`` never uses it; ``auto`` uses it when this QEMU's schema offers it
  and falls back to the plain job if QEMU still rejects it; ``on`` insists
  and fails otherwise;
* never with ``--compress``: compressed clusters must pass through QEMU's
  compression, a byte-for-byte kernel copy would bypass it.

QEMU's block-copy itself falls back to read/write when ``copy_file_range``
fails (target on another filesystem), so an offloaded backup is always a
complete one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from libqmpbackup.errors import UsageError

MODES = ("auto", "on", "off")
X_PERF: dict[str, Any] = {"use-copy-range": True}
# query-qmp-schema costs QEMU ≈0.04 s of CPU; offload saves about that on 100 MiB or so
AUTO_MIN_BYTES = 256 << 20


@dataclass(frozen=True)
class OffloadChoice:
    """The x-perf argument for this run's jobs (None: QEMU's default copy path) and why."""

    x_perf: Optional[dict[str, Any]]
    required: bool      # a rejection by QEMU fails the run instead of falling back
    reason: str


def check_options(mode: str, compress: bool) -> None:
    """Refuse contradictory options before anything is touched."""
    if mode not in MODES:
        raise UsageError(f"--copy-offload must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "on" and compress:
        raise UsageError("--copy-offload on copies bytes unchanged and cannot write "
                         "compressed clusters: drop --compress or use --copy-offload off")


def wants_probe(mode: str, compress: bool, whole_disk_bytes: int) -> bool:
    """Ask QEMU's schema only when the answer can change the run, and pays for itself.

    ``auto`` uses offload for whole-disk copies of at least AUTO_MIN_BYTES
    (virtual size) in total: an incremental, or a copy of small disks, moves
    too little data to make up for the schema query (≈0.04 s of QEMU's CPU).
    """
    if mode == "on":
        return True
    return mode == "auto" and not compress and whole_disk_bytes >= AUTO_MIN_BYTES


def choose(mode: str, compress: bool, offered: Optional[bool]) -> OffloadChoice:
    """The copy path for MODE, given whether this QEMU OFFERED x-perf.use-copy-range.

    OFFERED is None when the schema was not asked (see :func:`wants_probe`).
    """
    check_options(mode, compress)
    if mode == "off":
        return OffloadChoice(x_perf=None, required=False, reason="--copy-offload off")
    if compress:
        return OffloadChoice(x_perf=None, required=False,
                             reason="--compress: compressed clusters are written by QEMU")
    if offered is None:
        return OffloadChoice(x_perf=None, required=False,
                             reason=f"whole-disk copies under {AUTO_MIN_BYTES >> 20} MiB "
                                    "in this run: not worth asking QEMU")
    if not offered:
        if mode == "on":
            raise UsageError("--copy-offload on: this QEMU's blockdev-backup has no "
                             "x-perf.use-copy-range (needs QEMU 6.0 or later); "
                             "use --copy-offload auto or off")
        return OffloadChoice(x_perf=None, required=False,
                             reason="this QEMU offers no x-perf.use-copy-range")
    return OffloadChoice(x_perf=dict(X_PERF), required=mode == "on",
                         reason=f"--copy-offload {mode}: x-perf use-copy-range")
