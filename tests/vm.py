"""The tests' VM: the shared real-QEMU harness plus what only tests check.

The QEMU process itself (disks, QMP sockets, qemu-io writes) is
:mod:`harness.qemu_vm`, which bench/ uses too; here are the tests' disk zoo,
reference copies of a disk and the tool's leftovers in QEMU.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any, Optional

from harness.qemu_vm import Disk, MiB, QemuVM, run

__all__ = ["Disk", "MiB", "TestVM", "default_disks", "file_digest", "identical", "run"]


def default_disks() -> list[Disk]:
    """The disk zoo of the issue: qcow2 on virtio and ide, a raw disk, pflash, -blockdev."""
    return [
        Disk("virtio0", "virtio", "qcow2", 32 * MiB),
        Disk("ide0-hd0", "ide", "qcow2", 16 * MiB),
        Disk("virtio1", "virtio", "raw", 8 * MiB),
        Disk("pflash0", "pflash", "raw", unit=0),
        Disk("pflash1", "pflash", "raw", 256 * 1024, unit=1),
        Disk("data1", "blockdev", "qcow2", 8 * MiB),
    ]


class TestVM(QemuVM):
    """A throwaway VM (default: the disk zoo); always a context manager, so QEMU dies."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, disks: Optional[list[Disk]] = None, **options: Any) -> None:
        super().__init__(folder, disks if disks is not None else default_disks(), **options)

    def reference(self, disk: str, out: Path) -> Path:
        """A raw copy of what the guest disk holds now (VM paused while copying)."""
        was_running = self.running()
        if was_running:
            self.cmd("stop")   # drains and flushes every disk
        else:
            # prelaunch/paused: writes may still sit in QEMU's cache
            assert self.hmp(f'qemu-io {self.disk(disk).qemu_io_id} "flush"') == ""
        try:
            run(["qemu-img", "convert", "-U", "-O", "raw", str(self.disk(disk).path), str(out)])
        finally:
            if was_running:
                self.cmd("cont")
        return out

    def tool_leftovers(self) -> list[str]:
        nodes = [n["node-name"] for n in self.cmd("query-named-block-nodes", flat=True)
                 if n["node-name"].startswith("qmpbackup-")]
        jobs = [j["id"] for j in self.cmd("query-jobs")]
        fdsets = [f"fdset {f['fdset-id']}" for f in self.cmd("query-fdsets")]
        return nodes + jobs + fdsets


def identical(a: Path, b: Path) -> bool:
    """qemu-img compare: content equality regardless of format and allocation."""
    proc = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stderr)
    return proc.returncode == 0


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
