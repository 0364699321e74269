#!/usr/bin/env python3
"""Throughput benchmark: qmpbackup against ``qemu-img convert`` on the same image.

This is a benchmark, not a test (pytest never collects it: no ``test_`` name).
It answers one question with numbers measured on the machine at hand: how much
does a live backup through qmpbackup cost compared with the cheapest possible
copy of the same image, and what does an incremental backup cost?

Measurements (see bench/README.md for how to read them):

a) ``qemu-img convert -U -O qcow2`` of the VM's image (the floor: one process,
   sequential copy, no QMP);
b) ``python -m qmpbackup ... backup --level full`` timed as a subprocess, end to
   end (interpreter start, connect, discovery, bitmap, job, metadata);
   a) and b) run in the same rounds in rotating order, so drift (page cache,
   host writeback, noisy neighbours) hits both alike, and the ratio is taken
   per round;
c) ``backup --level inc`` after 1 % of the disk was dirtied in 64 KiB writes;
d) the fixed overhead: a full backup of a 1 MiB disk.

Unless ``--no-baselines``, two raw QMP ``blockdev-backup`` runs (QEMU's default
copy path and ``x-perf`` with ``use-copy-range``) are added to a)/b) rounds, so
the report can tell QEMU's block-job cost apart from the tool's own cost.

The VM is the tests' real-QEMU helper (tests/vm.py ``TestVM``: no guest OS,
``-nodefaults -display none``, kvm:tcg, one QMP socket for the tool and one for
this harness); only a tiny starter lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from libqmpbackup.runner import byte_rate
from tests.vm import Disk, TestVM

ROOT = Path(__file__).resolve().parent.parent

log = logging.getLogger("bench")

MiB = 1 << 20
CLUSTER = 64 * 1024           # guest write size for the dirtying, = backup cluster size
TINY_SIZE = 1 * MiB           # disk of the fixed-overhead measurement
DIRTY_FRACTION = 0.01
CHUNK = 8 * MiB               # random-data generation chunk
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
JOB_TIMEOUT = 600.0
CHECKSUM_LOG = re.compile(r"checksums of \d+ file\(s\) in ([0-9.]+) s \(([0-9.]+) CPU s\)")


# --------------------------------------------------------------------------- helpers
def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command and fail with its stderr: a benchmark of a failing step is worthless."""
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def timed(func: Callable[[], Any]) -> float:
    """Wall-clock seconds of FUNC: what a user waiting for the backup experiences."""
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk (not the apparent size: qcow2 files are sparse)."""
    return os.stat(path).st_blocks * 512


def make_random_image(path: Path, size: int, seed: int) -> None:
    """A qcow2 image full of incompressible data, so nothing is skipped as zero/unallocated.

    Written as raw first (fast sequential writes) and converted, because filling
    a qcow2 through qemu-io would only write one pattern.
    """
    raw = path.with_suffix(".raw")
    rng = random.Random(seed)
    with open(raw, "wb") as handle:
        left = size
        while left:
            n = min(CHUNK, left)
            handle.write(rng.randbytes(n))
            left -= n
    try:
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)])
    finally:
        raw.unlink()


class CacheDropper:
    """Cold-cache timings: without this the second reader of the image gets it from RAM."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled and (os.geteuid() != 0 or not os.access(DROP_CACHES, os.W_OK)):
            log.warning("cannot write %s (not root?): timings use a warm page cache",
                        DROP_CACHES)
            self.enabled = False

    def __call__(self) -> None:
        os.sync()
        if self.enabled:
            DROP_CACHES.write_text("3\n")


class ForeignLoad:
    """Measures the CPU that other people's QEMU processes burn while the benchmark runs.

    On a shared machine another test suite's VMs and qemu-img calls compete
    for the same cores and disk; the numbers are then not comparable, and the
    report must say so instead of silently publishing them.  CPU time, not
    presence, is what counts: an idle leftover VM of someone else costs ~nothing.
    """

    INTERVAL = 0.5
    BUSY_SECONDS = 2.0     # more foreign QEMU CPU than this over the run: flag the result

    def __init__(self) -> None:
        self.first: dict[int, int] = {}     # pid -> CPU ticks when first seen
        self.last: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.load_max = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-load", daemon=True)

    @staticmethod
    def _stat(pid: int) -> Optional[list[str]]:
        """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None

    def _ours(self, pid: int, me: int) -> bool:
        """Descendants of this process (our VMs, qemu-img, qmpbackup children) don't count."""
        while pid > 1:
            if pid == me:
                return True
            fields = self._stat(pid)
            if fields is None:
                return False
            pid = int(fields[1])
        return False

    def sample(self) -> None:
        """Record CPU ticks of every foreign qemu* process (first and latest sighting)."""
        me = os.getpid()
        self.load_max = max(self.load_max, os.getloadavg()[0])
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if not comm.startswith("qemu") or (pid not in self.first and self._ours(pid, me)):
                continue
            fields = self._stat(pid)
            if fields is None:
                continue
            ticks = int(fields[11]) + int(fields[12])      # utime + stime
            self.first.setdefault(pid, ticks)
            self.last[pid] = ticks
            self.names[pid] = comm

    @property
    def cpu_seconds(self) -> float:
        ticks = sum(self.last[pid] - self.first[pid] for pid in self.first)
        return ticks / os.sysconf("SC_CLK_TCK")

    @property
    def busy(self) -> bool:
        return self.cpu_seconds > self.BUSY_SECONDS

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.sample()

    def __enter__(self) -> ForeignLoad:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------- the VM
class BenchVM(TestVM):
    """TestVM with one qcow2 virtio disk on a given image, plus the harness' QMP calls."""

    __test__ = False

    def __init__(self, folder: Path, image: Path, size: int) -> None:
        super().__init__(folder, [Disk("virtio0", "virtio", "qcow2", size, path=image)])
        self.image = image
        self.size = size

    def remove_tool_bitmaps(self) -> None:
        """Each full backup starts a chain and adds a bitmap; drop it so every round is alike."""
        for node, bitmaps in self.bitmaps().items():
            for bitmap in bitmaps:
                if bitmap["name"].startswith("qmpbackup-"):
                    self.cmd("block-dirty-bitmap-remove", node=node, name=bitmap["name"])

    def dirty(self, rng: random.Random, fraction: float, pattern: int) -> int:
        """Guest-like writes of CLUSTER bytes at distinct random aligned offsets; bytes written."""
        clusters = self.size // CLUSTER
        count = max(1, round(self.size * fraction / CLUSTER))
        for index in rng.sample(range(clusters), count):
            self.write("virtio0", pattern, index * CLUSTER, CLUSTER)
        return count * CLUSTER

    def direct_backup(self, target: Path, x_perf: Optional[dict[str, Any]] = None) -> None:
        """blockdev-backup sync=full straight over QMP: QEMU's job cost without the tool.

        Same target setup as the tool (qcow2, 64 KiB clusters, opened without
        backing, closed with blockdev-del so the data is flushed).
        """
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             str(target), str(self.size)])
        node, job = "bench-target", "bench-job"
        self.cmd("blockdev-add", driver="qcow2", **{"node-name": node},
                 file={"driver": "file", "filename": str(target)}, backing=None)
        try:
            assert self.qmp is not None
            self.qmp.clear_events()
            args: dict[str, Any] = {"job-id": job, "device": "virtio0", "target": node,
                                    "sync": "full"}
            if x_perf:
                args["x-perf"] = x_perf
            self.cmd("blockdev-backup", **args)
            result: Optional[dict[str, Any]] = None
            deadline = time.monotonic() + JOB_TIMEOUT
            while True:   # like the tool: done when the job is gone (status null)
                event = self.qmp.pull_event(wait=max(0.1, deadline - time.monotonic()))
                if event is None:
                    raise RuntimeError("direct blockdev-backup: no completion event")
                data = event.get("data", {})
                if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") \
                        and data.get("device") == job:
                    result = event
                elif event["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job \
                        and data.get("status") == "null":
                    break
            if result is None or result["event"] != "BLOCK_JOB_COMPLETED" \
                    or result["data"].get("error"):
                raise RuntimeError(f"direct blockdev-backup failed: {result}")
        except BaseException:
            with contextlib.suppress(Exception):   # keep the first error, not the cleanup's
                self.cmd("block-job-cancel", device=job, force=True)
                time.sleep(0.5)
                self.cmd("blockdev-del", **{"node-name": node})
            raise
        self.cmd("blockdev-del", **{"node-name": node})   # flushes: part of the timing


# --------------------------------------------------------------------------- results
@dataclass
class Series:
    """Timings of one measurement, kept raw so --json consumers can do their own stats."""

    name: str
    seconds: list[float] = field(default_factory=list)
    bytes_on_disk: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Report:
    """Everything a run found out, plus what is needed to judge whether to trust it."""

    size: int
    rounds: int
    drop_caches: bool
    machine: dict[str, str]
    series: dict[str, Series] = field(default_factory=dict)
    ratio_backup_convert: list[float] = field(default_factory=list)
    dirty_bytes: int = 0
    foreign_qemu: int = 0          # QEMU processes of others seen during the run
    foreign_cpu: float = 0.0       # CPU seconds they used meanwhile
    shared: bool = False           # foreign_cpu high enough to distort the timings
    load_max: float = 0.0          # highest 1-minute load average seen

    def add(self, name: str) -> Series:
        return self.series.setdefault(name, Series(name))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size, "rounds": self.rounds, "drop_caches": self.drop_caches,
            "machine": self.machine, "dirty_bytes": self.dirty_bytes,
            "foreign_qemu_processes": self.foreign_qemu,
            "foreign_qemu_cpu_seconds": self.foreign_cpu, "shared_machine": self.shared,
            "load_average_max": self.load_max,
            "median_ratio_backup_convert": statistics.median(self.ratio_backup_convert),
            "ratios_backup_convert": self.ratio_backup_convert,
            "series": {},
        }
        for name, series in self.series.items():
            entry = asdict(series)
            entry["median_seconds"] = series.median
            if series.bytes_on_disk:
                entry["median_bytes_on_disk"] = statistics.median(series.bytes_on_disk)
            out["series"][name] = entry
        return out

    def table(self) -> str:
        from tabulate import tabulate

        convert = self.series["convert"].median
        rows = []
        for name, series in self.series.items():
            data = self.size if name in ("convert", "full", "direct", "direct-x-perf",
                                         "checksum", "checksum-cpu") else None
            rows.append([
                name, len(series.seconds), f"{series.median:.3f}",
                f"{min(series.seconds):.3f}", f"{max(series.seconds):.3f}",
                f"{data / MiB / series.median:.0f}" if data else "",
                f"{series.median / convert:.2f}x" if data == self.size else "",
                f"{statistics.median(series.bytes_on_disk) / MiB:.2f}"
                if series.bytes_on_disk else "",
            ])
        return tabulate(rows, headers=["measurement", "n", "median s", "min s", "max s",
                                       "MiB/s", "vs convert", "MiB on disk"])


DESCRIPTIONS = {
    "convert": "qemu-img convert -U -O qcow2 of the running VM's image",
    "full": "python -m qmpbackup backup --level full (subprocess, end to end)",
    "direct": "blockdev-backup sync=full over the harness QMP socket (no tool)",
    "direct-x-perf": "same, x-perf {use-copy-range: true}",
    "checksum": "of which: hashing the finished FULL (SHA-256, page cache warm), from the run's log",
    "checksum-cpu": "CPU seconds of that hashing (what it costs when the machine is not shared)",
    "inc": "python -m qmpbackup backup --level inc after 1 % dirtied",
    "overhead-full": f"backup --level full of a {TINY_SIZE // MiB} MiB disk",
    "python-startup": "python -m qmpbackup --version (interpreter + imports, cold cache)",
}


def machine_description() -> dict[str, str]:
    """Numbers without the machine they came from cannot be compared later."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    qemu = run(["qemu-img", "--version"]).stdout.splitlines()[0]
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node(),
            "cpu": f"{os.cpu_count()} x {cpu}", "memory": f"{int(mem) // 1024 // 1024} GiB",
            "kernel": platform.release(), "python": platform.python_version(), "qemu": qemu}


# --------------------------------------------------------------------------- the benchmark
class Bench:
    """One benchmark run: owns the scratch folder's contents and the VMs it started."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.size: int = args.size
        self.workdir = workdir
        self.drop = CacheDropper(not args.no_drop_caches)
        self.rng = random.Random(args.seed)
        self.report = Report(self.size, args.rounds, self.drop.enabled, machine_description())
        self.vms: list[BenchVM] = []
        self.counter = 0
        self.last_log = ""

    def fresh(self, name: str) -> Path:
        """A path no earlier step used: a full backup needs an empty target folder."""
        self.counter += 1
        return self.workdir / "out" / f"{self.counter:03d}-{name}"

    def start_vm(self, name: str, size: int) -> BenchVM:
        folder = self.workdir / name
        folder.mkdir()
        image = folder / f"{name}.qcow2"
        log.info("creating %s: %d MiB of random data", image, size // MiB)
        make_random_image(image, size, self.args.seed)
        vm = BenchVM(folder, image, size)
        self.vms.append(vm)
        vm.start()
        return vm

    def qmpbackup(self, vm: BenchVM, *argv: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return run([sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket, *argv],
                   cwd=ROOT, env=env)

    def backup(self, vm: BenchVM, level: str, target: Path) -> float:
        self.drop()
        done: list[subprocess.CompletedProcess] = []
        seconds = timed(lambda: done.append(self.qmpbackup(
            vm, "backup", "--level", level, "--target", str(target), "--no-progress")))
        self.last_log = done[0].stderr
        return seconds

    def checksum_seconds(self) -> tuple[float, float]:
        """Wall and CPU seconds the last run spent hashing its files (its own log line)."""
        match = CHECKSUM_LOG.search(self.last_log)
        if match is None:
            raise RuntimeError(f"no checksum line in the run's log:\n{self.last_log}")
        return float(match.group(1)), float(match.group(2))

    # (a) + (b) [+ direct baselines], in rotating order
    def full_vs_convert(self, vm: BenchVM) -> None:
        def convert() -> float:
            out = self.fresh("convert.qcow2")
            out.parent.mkdir(parents=True, exist_ok=True)
            self.drop()
            seconds = timed(lambda: run(["qemu-img", "convert", "-U", "-O", "qcow2",
                                         str(vm.image), str(out)]))
            out.unlink()
            return seconds

        def full() -> float:
            target = self.fresh("full")
            seconds = self.backup(vm, "full", target)
            wall, cpu = self.checksum_seconds()
            self.report.add("checksum").seconds.append(wall)
            self.report.add("checksum-cpu").seconds.append(cpu)
            shutil.rmtree(target)
            vm.remove_tool_bitmaps()
            return seconds

        def direct(x_perf: Optional[dict[str, Any]]) -> Callable[[], float]:
            def measure() -> float:
                out = self.fresh("direct.qcow2")
                out.parent.mkdir(parents=True, exist_ok=True)
                self.drop()
                seconds = timed(lambda: vm.direct_backup(out, x_perf))
                out.unlink()
                return seconds
            return measure

        steps: list[tuple[str, Callable[[], float]]] = [("convert", convert), ("full", full)]
        if not self.args.no_baselines:
            steps += [("direct", direct(None)),
                      ("direct-x-perf", direct({"use-copy-range": True}))]
        for name, _ in steps:
            self.report.add(name)
        for round_ in range(self.args.rounds):
            # Rotate the order: every step takes every position equally often (with two
            # steps this is ABAB/BABA), so neither drift nor "who ran right after a
            # 1 GiB write" favours one of them.
            shift = round_ % len(steps)
            order = steps[shift:] + steps[:shift]
            times: dict[str, float] = {}
            for name, measure in order:
                times[name] = measure()
                self.report.series[name].seconds.append(times[name])
            self.report.ratio_backup_convert.append(times["full"] / times["convert"])
            log.info("round %d/%d: %s", round_ + 1, self.args.rounds,
                     ", ".join(f"{n} {t:.2f}s" for n, t in times.items()))

    # (c)
    def incremental(self, vm: BenchVM) -> None:
        chain = self.fresh("chain")
        log.info("full backup to start the incremental chain")
        self.qmpbackup(vm, "backup", "--level", "full", "--target", str(chain), "--no-progress")
        series = self.report.add("inc")
        for round_ in range(self.args.rounds):
            # The tool names files by unix second and waits for the next second when a
            # backup of the chain already has this one; real incrementals are hours apart,
            # so do not let that wait into the timing.
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            self.report.dirty_bytes = vm.dirty(self.rng, DIRTY_FRACTION, 0x40 + round_)
            before = set((chain / "virtio0").glob("INC-*"))
            series.seconds.append(self.backup(vm, "inc", chain))
            new = set((chain / "virtio0").glob("INC-*")) - before
            if len(new) != 1:
                raise RuntimeError(f"expected one new incremental file, found {sorted(new)}")
            series.bytes_on_disk.append(disk_usage(new.pop()))
            log.info("inc %d/%d: %.3f s, %.2f MiB on disk", round_ + 1, self.args.rounds,
                     series.seconds[-1], series.bytes_on_disk[-1] / MiB)
        shutil.rmtree(chain)
        vm.remove_tool_bitmaps()

    # (d)
    def overhead(self) -> None:
        tiny = self.start_vm("tiny", TINY_SIZE)
        series = self.report.add("overhead-full")
        startup = self.report.add("python-startup")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for _ in range(self.args.rounds):
            target = self.fresh("tiny-full")
            series.seconds.append(self.backup(tiny, "full", target))
            shutil.rmtree(target)
            tiny.remove_tool_bitmaps()
            self.drop()   # the backup above also started cold: compare like with like
            startup.seconds.append(timed(lambda: run(
                [sys.executable, "-m", "qmpbackup", "--version"], cwd=ROOT, env=env)))
        log.info("overhead: full of %d MiB %.3f s, interpreter+imports %.3f s",
                 TINY_SIZE // MiB, series.median, startup.median)

    def run(self) -> Report:
        vm = self.start_vm("main", self.size)
        log.info("VM up (pid %s, tool socket %s); %d round(s)", vm.proc.pid if vm.proc else "?",
                 vm.tool_socket, self.args.rounds)
        with ForeignLoad() as foreign:
            self.full_vs_convert(vm)
            self.incremental(vm)
            self.overhead()
        self.report.foreign_qemu = len(foreign.first)
        self.report.foreign_cpu = foreign.cpu_seconds
        self.report.shared = foreign.busy
        self.report.load_max = foreign.load_max
        if foreign.busy:
            log.warning("QEMU processes of others used %.1f CPU s during the benchmark: "
                        "the machine was shared, the numbers are not comparable",
                        foreign.cpu_seconds)
        return self.report

    def close(self) -> None:
        for vm in reversed(self.vms):
            vm.stop()
        self.vms.clear()


# --------------------------------------------------------------------------- CLI
def size_arg(text: str) -> int:
    value = byte_rate(text)
    if value < 64 * MiB or value % CLUSTER:
        raise argparse.ArgumentTypeError("size must be at least 64M and a multiple of 64k")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark qmpbackup (full, 1%% incremental, fixed overhead) against "
                    "qemu-img convert on a live VM with a random-filled qcow2 disk.")
    parser.add_argument("--size", type=size_arg, default=1 << 30, metavar="SIZE",
                        help="virtual size of the benchmark disk (default 1G; k/M/G suffixes)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per measurement; medians are reported (default 5)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="create the scratch folder below DIR (default /var/tmp); "
                             "needs about 3x --size free")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout instead of a table")
    parser.add_argument("--no-drop-caches", action="store_true",
                        help="do not drop the page cache before each timing "
                             "(automatic when not root)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the direct blockdev-backup baselines (faster)")
    parser.add_argument("--seed", type=int, default=1, help="seed for data and dirty offsets")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def print_report(report: Report) -> None:
    from tabulate import tabulate

    print("qmpbackup benchmark")
    print(tabulate(report.machine.items(), tablefmt="plain"))
    print(f"disk {report.size // MiB} MiB random qcow2, {report.rounds} rounds, "
          f"page cache {'dropped' if report.drop_caches else 'NOT dropped'} before each timing")
    print(f"other QEMU processes during the run: {report.foreign_qemu} using "
          f"{report.foreign_cpu:.1f} CPU s; max 1-min load average {report.load_max:.2f}"
          + ("  <-- SHARED MACHINE, numbers not comparable" if report.shared else "") + "\n")
    print(report.table())
    print()
    full = report.series["full"].median
    convert = report.series["convert"].median
    print(f"median ratio backup/convert (per round): "
          f"{statistics.median(report.ratio_backup_convert):.2f}x "
          f"(ratio of medians {full / convert:.2f}x)")
    checksum = report.series["checksum"].median
    print(f"checksums: median {checksum:.3f} s per full = {checksum / full:.0%} of it; "
          f"full without them ≈ {full - checksum:.3f} s, so with/without "
          f"{full / (full - checksum):.2f}x; CPU "
          f"{report.series['checksum-cpu'].median:.3f} s")
    inc = report.series["inc"]
    print(f"1 % incremental ({report.dirty_bytes / MiB:.2f} MiB dirtied in 64 KiB writes): "
          f"median {inc.median:.3f} s, {statistics.median(inc.bytes_on_disk) / MiB:.2f} MiB "
          "on disk")
    print(f"fixed overhead (full of {TINY_SIZE // MiB} MiB disk): "
          f"median {report.series['overhead-full'].median:.3f} s, of which interpreter + imports "
          f"{report.series['python-startup'].median:.3f} s")
    print()
    for name in report.series:
        print(f"  {name:15} {DESCRIPTIONS[name]}")


_signals: list[int] = []


def _interrupt(signum: int, _frame: Any) -> None:
    """Ctrl-C and SIGTERM: unwind into main's cleanup (QEMU stopped, scratch folder removed).

    A terminal's Ctrl-C also reaches QEMU and the qmpbackup child, so the
    failure that surfaces may be a lost QMP connection rather than
    KeyboardInterrupt; the recorded signal tells the two apart.
    """
    _signals.append(signum)
    raise KeyboardInterrupt


def _ignore_during_cleanup(signum: int, _frame: Any) -> None:
    log.warning("%s ignored: cleaning up", signal.Signals(signum).name)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 1:
        build_parser().error("--rounds must be at least 1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="bench: %(message)s", stream=sys.stderr)
    base = args.workdir or Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free
    if free < 3 * args.size + 256 * MiB:
        log.error("%s has %d MiB free, need about %d MiB", base, free // MiB,
                  (3 * args.size + 256 * MiB) // MiB)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="qmpbackup-bench-", dir=base))
    bench: Optional[Bench] = None
    try:
        bench = Bench(args, workdir)
        report = bench.run()
    except (KeyboardInterrupt, Exception) as err:
        if not _signals and not isinstance(err, KeyboardInterrupt):
            raise
        signum = _signals[0] if _signals else signal.SIGINT
        log.error("interrupted by %s: cleaning up", signal.Signals(signum).name)
        return 128 + signum
    finally:
        # a second Ctrl-C must not abort the cleanup half-way and leave QEMU running
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _ignore_during_cleanup)
        if bench is not None:
            bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
        log.debug("removed %s", workdir)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
