"""Restore rows of the benchmark: what an admin waits for during an outage.

A chain of FULL + 3 INC (5 % of the disk rewritten before each INC, in
64 KiB guest writes) is made by the tool from the benchmark VM; then, in
rotating rounds like the backup rows:

* ``restore-convert``: ``qemu-img convert -O qcow2`` of the newest INC,
  following the chain by its backing names (the floor: one process, no
  checks, no checksums);
* ``merge``: ``python -m qmprestore merge`` of the same point (subprocess,
  end to end: pre-check, ``qemu-img check`` of every file, checksums of
  every file, the copy, the rename);
* ``merge-skip-check``: the same with ``--skip-check`` (no check, no hashing);
* ``verify``: ``python -m qmprestore verify`` of the chain folder (always
  reads every byte of every file).

Each is timed against ``restore-convert`` of the same round (the ratio is
taken per round, then the median), so a shared machine's load hits both.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:   # run.py imports this module: no import cycle at run time
    from bench.run import Bench, BenchVM, Report

MiB = 1 << 20
GiB = 1 << 30
INCS = 3
DIRTY_FRACTION = 0.05


def make_chain(bench: Bench, vm: BenchVM) -> Path:
    """FULL + INCS incrementals of VM's disk, each after DIRTY_FRACTION of it was rewritten."""
    chain = bench.fresh("restore-chain")
    bench.qmpbackup(vm, "backup", "--level", "full", "--target", str(chain), "--no-progress")
    for index in range(INCS):
        time.sleep(1.0 - time.time() % 1.0 + 0.01)   # file names are unix seconds
        vm.dirty(bench.rng, DIRTY_FRACTION, 0x60 + index)
        bench.qmpbackup(vm, "backup", "--level", "inc", "--target", str(chain), "--no-progress")
    vm.remove_tool_bitmaps()
    return chain


def chain_files(chain: Path) -> list[Path]:
    """The chain's backup files, oldest first (their names carry the unix second)."""
    folder = chain / "virtio0"
    return sorted(folder.glob("FULL-*.qcow2")) + sorted(folder.glob("INC-*.qcow2"))


def _qmprestore(bench: Bench, *argv: str) -> Callable[[], object]:
    return lambda: bench.run_tool("qmprestore", *argv)


def convert_step(bench: Bench, newest: Path) -> Callable[[], float]:
    def measure() -> float:
        out = bench.fresh("restore-convert.qcow2")
        out.parent.mkdir(parents=True, exist_ok=True)
        bench.drop()
        seconds = bench.timed_run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                                   str(newest), str(out)])
        out.unlink()
        return seconds
    return measure


def merge_step(bench: Bench, chain: Path, *extra: str) -> Callable[[], float]:
    def measure() -> float:
        out = bench.fresh("merge.qcow2")
        out.parent.mkdir(parents=True, exist_ok=True)
        bench.drop()
        seconds = bench.timed(_qmprestore(bench, "merge", "--dir", str(chain / "virtio0"),
                                          "--targetfile", str(out), *extra))
        out.unlink()
        return seconds
    return measure


def verify_step(bench: Bench, chain: Path) -> Callable[[], float]:
    def measure() -> float:
        bench.drop()
        return bench.timed(_qmprestore(bench, "verify", "--dir", str(chain)))
    return measure


def measure(bench: Bench, vm: BenchVM) -> None:
    """The restore rows, in rotating rounds; the chain is removed afterwards."""
    chain = make_chain(bench, vm)
    files = chain_files(chain)
    report = bench.report
    report.restore_bytes = sum(f.stat().st_size for f in files)
    add = report.add
    size = bench.size
    add("restore-convert", f"qemu-img convert -O qcow2 of FULL + {INCS} INC "
        f"({DIRTY_FRACTION:.0%} rewritten before each), by its backing names", data=size)
    add("merge", "python -m qmprestore merge of that point (checks, checksums, copy)",
        baseline="restore-convert", data=size)
    add("merge-skip-check", "same with --skip-check (no checks, no checksums)",
        baseline="restore-convert", data=size)
    add("verify", "python -m qmprestore verify of the chain folder (reads every file)",
        baseline="restore-convert", data=report.restore_bytes)
    steps = [("restore-convert", convert_step(bench, files[-1])),
             ("merge", merge_step(bench, chain)),
             ("merge-skip-check", merge_step(bench, chain, "--skip-check")),
             ("verify", verify_step(bench, chain))]
    try:
        bench.rotate(vm, steps, bench.args.rounds, "restore")
    finally:
        bench.remove_tree(chain)


def summary(report: Report) -> list[str]:
    """The restore lines of the printed report (none when the rows were not measured)."""
    if "merge" not in report.series:
        return []
    lines = [f"restore of FULL + {INCS} INC ({report.restore_bytes / MiB:.0f} MiB of files): "
             f"merge/convert {report.median_ratio('merge'):.2f}x per round, "
             f"--skip-check {report.median_ratio('merge-skip-check'):.2f}x"]
    verify = statistics.median(report.series["verify"].seconds)
    lines.append(f"verify: median {verify:.3f} s = {verify / (report.restore_bytes / GiB):.3f} s "
                 f"per GiB of files, {report.median_ratio('verify'):.2f}x convert of the chain")
    return lines


if __name__ == "__main__":
    sys.exit("run it through bench/run.py (--restore-only for these rows alone)")
