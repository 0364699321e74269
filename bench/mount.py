"""Restore-side timings: ``qmprestore mount`` (first byte, sequential read) against ``merge`` and convert.

Run as ``python3 -m bench.mount``.  A VM with a random-filled disk makes a
FULL and three INCs (``--dirty`` of the disk rewritten before each); then,
in rotating order every round:

* ``convert-raw``: ``qemu-img convert -O raw`` of the chain (top file, its
  backing files by header) into a new file: the floor of any restore;
* ``merge`` / ``merge-unremembered``: ``qmprestore merge`` of the newest
  point (qcow2), with the backup's remembered verification (default) and
  with ``--verified-within 0`` (every file hashed first: a first restore);
* ``mount-first-byte`` / ``mount-first-byte-unremembered``: from starting
  ``qmprestore mount`` to one byte read from ``MOUNTPOINT/virtio0.raw``;
* ``mount-read``: reading the mounted file sequentially into a new file
  (1 MiB reads and writes), the mount already up: compare with convert-raw;
* ``mount-read-null``: the same read, nothing written.

Everything it creates is removed at the end (mounts unmounted, VM stopped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from bench.run import ROOT, BenchVM, make_random_image, size_arg, timed

log = logging.getLogger("bench.mount")

MiB = 1 << 20
BUFFER = 1 * MiB


def format_size(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size // MiB} MiB"


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def copy_out(source: Path, target: Path | None) -> None:
    with open(source, "rb", buffering=0) as reader:
        out = open(target, "wb", buffering=0) if target else None
        try:
            while block := reader.read(BUFFER):
                if out:
                    out.write(block)
        finally:
            if out:
                out.close()


class MountBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rows: dict[str, list[float]] = {}
        os.environ["QMPBACKUP_CACHE_DIR"] = str(work / "cache")
        os.environ["QMPBACKUP_RUNTIME_DIR"] = str(work / "run")
        self.backup = work / "backup"
        self.mnt = work / "mnt"
        self.mnt.mkdir()

    def build(self) -> Path:
        """FULL + 3 INC of a random disk; returns the newest file."""
        image = self.work / "disk.qcow2"
        log.info("creating a %s random disk", format_size(self.args.size))
        make_random_image(image, self.args.size, self.args.seed)
        vm = BenchVM(self.work / "vm", image, self.args.size)
        rng = random.Random(self.args.seed)
        with vm:
            for number in range(4):
                if number:
                    vm.dirty(rng, self.args.dirty, 0x40 + number)
                tool("-m", "qmpbackup", "--socket", vm.tool_socket, "--quiet", "backup",
                     "--level", "full" if number == 0 else "inc", "--target", str(self.backup),
                     "--no-progress")
        meta = json.loads((self.backup / "qmpbackup.json").read_text())
        files: list[str] = [r["file"] for r in meta["chains"][-1]["disks"]["virtio0"]["backups"]]
        return self.backup / "virtio0" / files[-1]

    def steps(self, top: Path) -> list[tuple[str, Callable[[], float]]]:
        def convert() -> float:
            out = self.work / "convert.raw"
            seconds = timed(lambda: subprocess.run(
                ["qemu-img", "convert", "-O", "raw", str(top), str(out)], check=True))
            out.unlink()
            return seconds

        def merge(*extra: str) -> Callable[[], float]:
            def measure() -> float:
                out = self.work / "merge.qcow2"
                seconds = timed(lambda: tool("-m", "qmprestore", "merge", "--dir",
                                             str(self.backup / "virtio0"), *extra,
                                             "--targetfile", str(out)))
                out.unlink()
                return seconds
            return measure

        def first_byte(*extra: str) -> Callable[[], float]:
            def measure() -> float:
                def mount() -> None:
                    tool("-m", "qmprestore", "mount", "--dir", str(self.backup), *extra,
                         str(self.mnt))
                    with open(self.mnt / "virtio0.raw", "rb") as exposed:
                        assert exposed.read(1)
                try:
                    return timed(mount)
                finally:
                    tool("-m", "qmprestore", "umount", str(self.mnt))
            return measure

        def read(target: bool) -> Callable[[], float]:
            def measure() -> float:
                tool("-m", "qmprestore", "mount", "--dir", str(self.backup), str(self.mnt))
                out = self.work / "read.raw"
                try:
                    return timed(lambda: copy_out(self.mnt / "virtio0.raw",
                                                  out if target else None))
                finally:
                    tool("-m", "qmprestore", "umount", str(self.mnt))
                    out.unlink(missing_ok=True)
            return measure

        return [("convert-raw", convert), ("merge", merge()),
                ("merge-unremembered", merge("--verified-within", "0")),
                ("mount-first-byte", first_byte()),
                ("mount-first-byte-unremembered", first_byte("--verified-within", "0")),
                ("mount-read", read(True)), ("mount-read-null", read(False))]

    def run(self) -> None:
        steps = self.steps(self.build())
        for round_ in range(self.args.rounds):
            shift = round_ % len(steps)
            for name, measure in steps[shift:] + steps[:shift]:
                self.rows.setdefault(name, []).append(measure())
            log.info("round %d/%d done", round_ + 1, self.args.rounds)

    def table(self) -> str:
        base = self.rows["convert-raw"]
        merge = self.rows["merge"]
        lines = [f"chain: FULL + 3 INC, {format_size(self.args.size)} random disk, "
                 f"{self.args.dirty:.0%} rewritten per INC; {self.args.rounds} rounds in "
                 f"{self.work.parent}", "",
                 "| row | median s | × convert-raw | × merge |", "|---|---|---|---|"]
        for name, seconds in self.rows.items():
            to_convert = statistics.median(a / b for a, b in zip(seconds, base))
            to_merge = statistics.median(a / b for a, b in zip(seconds, merge))
            lines.append(f"| `{name}` | {statistics.median(seconds):.3f} | {to_convert:.2f} | "
                         f"{to_merge:.2f} |")
        return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.mount", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=size_arg, default=1 << 30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--dirty", type=float, default=0.05)
    parser.add_argument("--workdir", type=Path, default=Path("/dev/shm"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # the finally below cleans up
    work = Path(tempfile.mkdtemp(prefix="qmpbackup-bench-mount-", dir=args.workdir))
    bench = MountBench(args, work)
    try:
        bench.run()
    finally:
        if (bench.mnt / "virtio0.raw").exists():
            subprocess.run([sys.executable, "-m", "qmprestore", "umount", str(bench.mnt)],
                           cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(bench.rows, indent=1) if args.json else bench.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
