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
d) the fixed overhead: a full backup of a 1 MiB disk;
e) a sparse disk (``--no-sparse`` skips it);
f) restores (bench/restore.py): ``qmprestore merge`` of FULL + 3 INC against
   ``qemu-img convert`` of the same chain, ``merge --skip-check`` and
   ``verify`` (``--no-restore`` skips them, ``--restore-only`` runs only them).

Unless ``--no-baselines``, two raw QMP ``blockdev-backup`` runs (QEMU's default
copy path and ``x-perf`` with ``use-copy-range``) are added to a)/b) rounds, so
the report can tell QEMU's block-job cost apart from the tool's own cost.

The VM is the real-QEMU harness the tests use too (harness/qemu_vm.py ``QemuVM``: no guest OS,
``-nodefaults -display none``, kvm:tcg, one QMP socket for the tool and one for
this harness); only a tiny starter lives here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import platform
import random
import re
import resource
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

from bench import restore
from harness.qemu_vm import Disk, QemuVM
from libqmpbackup.runner import byte_rate

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
SPARSE_EXTENT = 1 * MiB       # allocated pieces of the sparse disk
SPARSE_LIMITED_ROUNDS = 3     # the rate-limited row takes seconds per round and varies little


@dataclass(frozen=True)
class Lever:
    """One way of running QEMU's backup job, timed as a row over the harness' QMP socket.

    These rows measure options the tool could pass (x-perf, the target's
    file-node options, its qcow2 creation options) without the tool around
    them, in the same rotating rounds as ``qemu-img convert``.
    """

    name: str
    description: str
    x_perf: Optional[dict[str, Any]] = None
    sync: str = "full"
    cluster_size: int = CLUSTER
    create_options: tuple[str, ...] = ()
    file_options: dict[str, Any] = field(default_factory=dict)


COPY_RANGE = {"use-copy-range": True}
BASELINES = (
    Lever("direct", "blockdev-backup sync=full over the harness QMP socket (no tool)"),
    Lever("direct-x-perf", "same, x-perf {use-copy-range: true}", x_perf=COPY_RANGE),
)
# --levers: the target node's options, each on top of copy offload (what the tool uses)
TARGET_LEVERS = (
    Lever("xp+cache.direct", "direct-x-perf, target file opened O_DIRECT (cache.direct=on)",
          x_perf=COPY_RANGE, file_options={"cache": {"direct": True}}),
    Lever("xp+aio=io_uring", "direct-x-perf, target file aio=io_uring",
          x_perf=COPY_RANGE, file_options={"aio": "io_uring"}),
    Lever("xp+aio=native", "direct-x-perf, target aio=native + cache.direct=on",
          x_perf=COPY_RANGE, file_options={"aio": "native", "cache": {"direct": True}}),
    Lever("xp+cluster=2M", "direct-x-perf, FULL target with 2 MiB qcow2 clusters",
          x_perf=COPY_RANGE, cluster_size=2 * MiB),
    Lever("xp+prealloc=meta", "direct-x-perf, target created with preallocation=metadata",
          x_perf=COPY_RANGE, create_options=("preallocation=metadata",)),
    Lever("xp+workers=8", "direct-x-perf with max-workers 8 (default 64)",
          x_perf={"use-copy-range": True, "max-workers": 8}),
    Lever("xp+workers=4", "direct-x-perf with max-workers 4: fewer reads in flight on a disk",
          x_perf={"use-copy-range": True, "max-workers": 4}),
    Lever("xp+chunk=16M", "direct-x-perf with max-chunk 16 MiB: longer sequential copies",
          x_perf={"use-copy-range": True, "max-chunk": 16 * MiB}),
    Lever("xp+w4+chunk=16M", "direct-x-perf with max-workers 4 and max-chunk 16 MiB",
          x_perf={"use-copy-range": True, "max-workers": 4, "max-chunk": 16 * MiB}),
    Lever("plain+aio=io_uring", "direct (no x-perf), target file aio=io_uring",
          file_options={"aio": "io_uring"}),
    Lever("plain+cache.direct", "direct (no x-perf), target file cache.direct=on",
          file_options={"cache": {"direct": True}}),
)
SPARSE_DIRECT = Lever("sparse-direct-full", "sparse disk: blockdev-backup sync=full, no x-perf "
                      "(the tool's copy path before sync=top and offload)")


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


def children_cpu() -> float:
    """CPU seconds of this process' finished children: unlike wall time, not inflated by load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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


def make_sparse_image(path: Path, size: int, extents: int, seed: int) -> None:
    """A qcow2 image of SIZE where only EXTENTS random-data 1 MiB pieces, scattered, are allocated.

    Like a real VM disk: mostly never written.  The raw file has holes where
    nothing was written, and ``qemu-img convert`` leaves those unallocated.
    """
    raw = path.with_suffix(".raw")
    rng = random.Random(seed)
    with open(raw, "wb") as handle:
        handle.truncate(size)
        for index in sorted(rng.sample(range(size // SPARSE_EXTENT), extents)):
            handle.seek(index * SPARSE_EXTENT)
            handle.write(rng.randbytes(SPARSE_EXTENT))
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
class BenchVM(QemuVM):
    """The shared harness VM with one qcow2 virtio disk on a given image, plus the bench's QMP calls."""

    def __init__(self, folder: Path, image: Path, size: int) -> None:
        # named threads ("CPU 0/KVM"): io_cpu() tells vCPU time from the block layer's
        super().__init__(folder, [Disk("virtio0", "virtio", "qcow2", size, path=image)],
                         extra_args=("-name", "bench,debug-threads=on"))
        self.image = image
        self.size = size

    def io_cpu(self) -> float:
        """CPU seconds QEMU spent outside its vCPU threads: block layer, jobs, I/O workers.

        The guest-less VM's vCPU spins in firmware (~0.15 CPU s per second
        here), which has nothing to do with a backup; every other thread's
        time, including exited I/O workers' (kept in the process total), does.
        """
        assert self.proc is not None
        tick = os.sysconf("SC_CLK_TCK")

        def ticks(stat: Path) -> int:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        vcpu = 0
        for task in task_dir.iterdir():
            with contextlib.suppress(OSError):
                if (task / "comm").read_text().startswith("CPU "):
                    vcpu += ticks(task / "stat")
        return (ticks(Path(f"/proc/{self.proc.pid}/stat")) - vcpu) / tick

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

    def direct_backup(self, target: Path, lever: Lever) -> None:
        """blockdev-backup straight over QMP: QEMU's job cost without the tool.

        Same target setup as the tool (qcow2, 64 KiB clusters unless LEVER
        says otherwise, opened without backing, closed with blockdev-del so
        the data is flushed); LEVER adds x-perf, file-node and image options.
        """
        options = ",".join([f"cluster_size={lever.cluster_size}", *lever.create_options])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(target),
             str(self.size)])
        node, job = "bench-target", "bench-job"
        self.cmd("blockdev-add", driver="qcow2", **{"node-name": node},
                 file={"driver": "file", "filename": str(target), **lever.file_options},
                 backing=None)
        try:
            assert self.qmp is not None
            self.qmp.clear_events()
            args: dict[str, Any] = {"job-id": job, "device": "virtio0", "target": node,
                                    "sync": lever.sync}
            if lever.x_perf:
                args["x-perf"] = lever.x_perf
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
    """Timings of one measurement, kept raw so --json consumers can do their own stats.

    BASELINE names the ``qemu-img convert`` row timed in the same rounds (the
    ratio is taken per round, then the median); DATA is the bytes the row
    copies, for MiB/s.
    """

    name: str
    description: str = ""
    seconds: list[float] = field(default_factory=list)
    tool_cpu: list[float] = field(default_factory=list)      # the qmpbackup process' own CPU
    cpu_seconds: list[float] = field(default_factory=list)   # all of it: tool, qemu-img, QEMU I/O
    bytes_on_disk: list[int] = field(default_factory=list)
    baseline: Optional[str] = None
    data: int = 0

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
    workdir: str = ""
    series: dict[str, Series] = field(default_factory=dict)
    dirty_bytes: int = 0
    sparse_size: int = 0
    sparse_data: int = 0
    sparse_speed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)   # row -> why it could not run
    foreign_qemu: int = 0          # QEMU processes of others seen during the run
    foreign_cpu: float = 0.0       # CPU seconds they used meanwhile
    shared: bool = False           # foreign_cpu high enough to distort the timings
    load_max: float = 0.0          # highest 1-minute load average seen
    restore_bytes: int = 0         # size of the restore rows' chain files

    def add(self, name: str, description: str, *, baseline: Optional[str] = None,
            data: int = 0) -> Series:
        return self.series.setdefault(name, Series(name, description, baseline=baseline,
                                                   data=data))

    def ratios(self, name: str, base: Optional[str] = None) -> list[float]:
        """Per-round ratios of NAME to BASE, by default its baseline row (same rounds, same
        positions); none when either row was not measured (a skipped step, an older tool)."""
        series = self.series.get(name)
        base = base or (series.baseline if series else None)
        if series is None or base not in self.series:
            return []
        return [mine / theirs for mine, theirs in zip(series.seconds, self.series[base].seconds)]

    def median_ratio(self, name: str, base: Optional[str] = None) -> Optional[float]:
        ratios = self.ratios(name, base)
        return statistics.median(ratios) if ratios else None

    def median_cpu_ratio(self, name: str) -> Optional[float]:
        """Like :meth:`median_ratio` for CPU seconds, which other load inflates far less."""
        series = self.series[name]
        if series.baseline is None or not series.cpu_seconds:
            return None
        base = self.series[series.baseline].cpu_seconds
        return statistics.median(mine / theirs for mine, theirs in zip(series.cpu_seconds, base)
                                 if theirs > 0)

    @property
    def ratio_backup_convert(self) -> list[float]:
        return self.ratios("full")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "size": self.size, "rounds": self.rounds, "drop_caches": self.drop_caches,
            "workdir": self.workdir, "machine": self.machine, "dirty_bytes": self.dirty_bytes,
            "sparse_size": self.sparse_size, "sparse_data": self.sparse_data,
            "sparse_speed_limit": self.sparse_speed, "skipped": self.skipped,
            "foreign_qemu_processes": self.foreign_qemu,
            "foreign_qemu_cpu_seconds": self.foreign_cpu, "shared_machine": self.shared,
            "load_average_max": self.load_max, "restore_chain_bytes": self.restore_bytes,
            "median_ratio_backup_convert": self.median_ratio("full"),
            "median_ratio_backup_convert_flushed": self.median_ratio("full", "convert-flushed"),
            "ratios_backup_convert": self.ratio_backup_convert,
            "series": {},
        }
        for name, series in self.series.items():
            entry = asdict(series)
            entry["median_seconds"] = series.median
            entry["median_ratio"] = self.median_ratio(name)
            entry["median_cpu_ratio"] = self.median_cpu_ratio(name)
            if series.bytes_on_disk:
                entry["median_bytes_on_disk"] = statistics.median(series.bytes_on_disk)
            out["series"][name] = entry
        return out

    def table(self) -> str:
        from tabulate import tabulate

        rows = []
        for name, series in self.series.items():
            ratio = self.median_ratio(name)
            cpu_ratio = self.median_cpu_ratio(name)
            rows.append([
                name, len(series.seconds), f"{series.median:.3f}",
                f"{min(series.seconds):.3f}", f"{max(series.seconds):.3f}",
                f"{series.data / MiB / series.median:.0f}" if series.data else "",
                f"{ratio:.2f}x" if ratio is not None else "",
                f"{statistics.median(series.tool_cpu):.3f}" if series.tool_cpu else "",
                f"{statistics.median(series.cpu_seconds):.3f}" if series.cpu_seconds else "",
                f"{cpu_ratio:.2f}x" if cpu_ratio is not None else "",
                f"{statistics.median(series.bytes_on_disk) / MiB:.2f}"
                if series.bytes_on_disk else "",
            ])
        return tabulate(rows, headers=["measurement", "n", "median s", "min s", "max s",
                                       "MiB/s", "ratio/round", "tool CPU s", "CPU s",
                                       "CPU ratio", "MiB on disk"])


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


Step = tuple[str, Callable[[], float]]


# --------------------------------------------------------------------------- the benchmark
class Bench:
    """One benchmark run: owns the scratch folder's contents and the VMs it started."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.size: int = args.size
        self.workdir = workdir
        self.drop = CacheDropper(not args.no_drop_caches)
        self.rng = random.Random(args.seed)
        self.report = Report(self.size, args.rounds, self.drop.enabled, machine_description(),
                             workdir=str(workdir.parent))
        self.vms: list[BenchVM] = []
        self.counter = 0
        self.last_cpu = 0.0
        self.last_log = ""
        self.tool_env = self.compiled_tool_env()

    def compiled_tool_env(self) -> dict[str, str]:
        """The environment the tool runs in: its modules compiled to bytecode beforehand.

        ``pip install`` writes the ``.pyc`` files of a package, so an installed
        qmpbackup never compiles its sources at start.  A source tree run with
        PYTHONDONTWRITEBYTECODE (set in many CI and developer shells) compiles
        every module on every run: ≈0.05 s that no installed copy pays.  The
        bytecode goes to a cache folder in the scratch directory, not into the
        tree being measured.
        """
        env = dict(os.environ, PYTHONPATH=str(self.args.tool_root),
                   PYTHONPYCACHEPREFIX=str(self.workdir / "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        packages = [str(self.args.tool_root / name)
                    for name in ("qmpbackup", "qmprestore", "libqmpbackup")
                    if (self.args.tool_root / name).is_dir()]
        subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], env=env,
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return env

    def fresh(self, name: str) -> Path:
        """A path no earlier step used: a full backup needs an empty target folder."""
        self.counter += 1
        return self.workdir / "out" / f"{self.counter:03d}-{name}"

    def start_vm(self, name: str, size: int,
                 make: Callable[[Path], None]) -> BenchVM:
        folder = self.workdir / name
        folder.mkdir()
        image = folder / f"{name}.qcow2"
        make(image)
        vm = BenchVM(folder, image, size)
        self.vms.append(vm)
        vm.start()
        return vm

    def random_vm(self, name: str, size: int) -> BenchVM:
        log.info("creating %s: %d MiB of random data", name, size // MiB)
        return self.start_vm(name, size, lambda image: make_random_image(image, size,
                                                                         self.args.seed))

    def qmpbackup(self, vm: BenchVM, *argv: str) -> subprocess.CompletedProcess:
        return self.run_tool("qmpbackup", "--socket", vm.tool_socket, *argv)

    def run_tool(self, program: str, *argv: str) -> subprocess.CompletedProcess:
        """``python -m PROGRAM ARGV`` from the tool tree being measured, bytecode compiled."""
        return run([sys.executable, "-m", program, *argv], cwd=self.args.tool_root,
                   env=self.tool_env)

    @staticmethod
    def timed(func: Callable[[], Any]) -> float:
        return timed(func)

    @staticmethod
    def timed_run(argv: list[str]) -> float:
        return timed(lambda: run(argv))

    @staticmethod
    def remove_tree(path: Path) -> None:
        shutil.rmtree(path)

    def backup(self, vm: BenchVM, level: str, target: Path, *extra: str) -> float:
        """Wall seconds of one qmpbackup run; its CPU seconds go to self.last_cpu."""
        self.drop()
        cpu = children_cpu()
        done: list[subprocess.CompletedProcess] = []
        seconds = timed(lambda: done.append(self.qmpbackup(
            vm, "backup", "--level", level, "--target", str(target), "--no-progress", *extra)))
        self.last_cpu = children_cpu() - cpu
        self.last_log = done[0].stderr
        return seconds

    def record_checksum(self) -> None:
        """Wall and CPU seconds the last run spent hashing its files (its own log line).

        A tool without checksums (an older --tool-root) logs none: no row then.
        """
        match = CHECKSUM_LOG.search(self.last_log)
        if match is None:
            return
        self.report.add("checksum", "of which: hashing the finished FULL (the default digest, 64 MiB "
                        "pieces, page cache warm), from the run's log").seconds.append(float(match.group(1)))
        self.report.add("checksum-cpu", "CPU seconds of that hashing (what it costs when the "
                        "machine is not shared)").seconds.append(float(match.group(2)))

    # -- the steps of a rotating round
    def convert_step(self, vm: BenchVM, *extra: str) -> Callable[[], float]:
        def measure() -> float:
            out = self.fresh("convert.qcow2")
            out.parent.mkdir(parents=True, exist_ok=True)
            self.drop()
            seconds = timed(lambda: run(["qemu-img", "convert", "-U", *extra, "-O", "qcow2",
                                         str(vm.image), str(out)]))
            out.unlink()
            return seconds
        return measure

    def full_step(self, vm: BenchVM, name: str, *extra: str) -> Callable[[], float]:
        def measure() -> float:
            target = self.fresh("full")
            seconds = self.backup(vm, "full", target, *extra)
            self.report.series[name].tool_cpu.append(self.last_cpu)
            if name == "full":
                self.record_checksum()
            shutil.rmtree(target)
            vm.remove_tool_bitmaps()
            return seconds
        return measure

    def key_file(self) -> Path:
        """A random key (as `qmpbackup genkey` writes one: 0600) for the encrypted row."""
        path = self.fresh("bench.key")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(base64.b64encode(os.urandom(32)) + b"\n")
        return path

    def direct_step(self, vm: BenchVM, lever: Lever) -> Callable[[], float]:
        def measure() -> float:
            out = self.fresh("direct.qcow2")
            out.parent.mkdir(parents=True, exist_ok=True)
            self.drop()
            try:
                return timed(lambda: vm.direct_backup(out, lever))
            finally:
                out.unlink(missing_ok=True)
        return measure

    def rotate(self, vm: BenchVM, steps: list[Step], rounds: int, label: str) -> None:
        """Run STEPS in rotating order ROUNDS times (every step takes every position).

        A step that fails in the first round (e.g. O_DIRECT on tmpfs) is
        dropped and reported as skipped; later failures abort the benchmark.
        """
        for round_ in range(rounds):
            shift = round_ % len(steps)
            times: dict[str, float] = {}
            for name, measure in steps[shift:] + steps[:shift]:
                try:
                    cpu = children_cpu() + vm.io_cpu()
                    times[name] = measure()
                    self.report.series[name].cpu_seconds.append(
                        children_cpu() + vm.io_cpu() - cpu)
                except RuntimeError as err:
                    if round_:
                        raise
                    reason = str(err).strip().splitlines()[-1][:160]
                    log.warning("%s: dropped, it does not run here: %s", name, reason)
                    self.report.skipped[name] = reason
                    self.report.series.pop(name, None)
            steps[:] = [s for s in steps if s[0] in times]
            for name, seconds in times.items():
                self.report.series[name].seconds.append(seconds)
            log.info("%s round %d/%d: %s", label, round_ + 1, rounds,
                     ", ".join(f"{n} {t:.2f}s" for n, t in times.items()))

    # (a) + (b) [+ direct rows], in rotating order
    def full_vs_convert(self, vm: BenchVM) -> None:
        add = self.report.add
        add("convert", "qemu-img convert -U -O qcow2 of the running VM's image", data=self.size)
        steps: list[Step] = [("convert", self.convert_step(vm))]
        add("convert-flushed", "qemu-img convert -t writeback: its data flushed to the disk at the "
            "end, as a backup's is (plain convert leaves it in the page cache)",
            baseline="convert", data=self.size)
        steps.append(("convert-flushed", self.convert_step(vm, "-t", "writeback")))
        add("full", "python -m qmpbackup backup --level full (subprocess, end to end; "
            "default --copy-offload auto)", baseline="convert", data=self.size)
        steps.append(("full", self.full_step(vm, "full")))
        add("full-no-checksum", "same with --no-checksum (no hashing of the written file)",
            baseline="convert", data=self.size)
        steps.append(("full-no-checksum", self.full_step(vm, "full-no-checksum", "--no-checksum")))
        add("full-encrypted", "same with --encrypt-key-file (LUKS qcow2, a random key, default "
            "--encrypt-iter-time)", baseline="convert", data=self.size)
        steps.append(("full-encrypted", self.full_step(vm, "full-encrypted", "--encrypt-key-file",
                                                       str(self.key_file()))))
        add("full-no-offload", "same with --copy-offload off", baseline="convert",
            data=self.size)
        steps.append(("full-no-offload", self.full_step(vm, "full-no-offload", "--copy-offload", "off")))
        levers = [] if self.args.no_baselines else list(BASELINES)
        if self.args.levers:
            levers += TARGET_LEVERS
        for lever in levers:
            add(lever.name, lever.description, baseline="convert", data=self.size)
            steps.append((lever.name, self.direct_step(vm, lever)))
        self.rotate(vm, steps, self.args.rounds, "full")

    # (c)
    def incremental(self, vm: BenchVM) -> None:
        chain = self.fresh("chain")
        log.info("full backup to start the incremental chain")
        self.qmpbackup(vm, "backup", "--level", "full", "--target", str(chain), "--no-progress")
        series = self.report.add("inc", "python -m qmpbackup backup --level inc after 1 % "
                                 "dirtied")
        for round_ in range(self.args.rounds):
            # The tool names files by unix second and waits for the next second when a
            # backup of the chain already has this one; real incrementals are hours apart,
            # so do not let that wait into the timing.
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            self.report.dirty_bytes = vm.dirty(self.rng, DIRTY_FRACTION, 0x40 + round_)
            before = set((chain / "virtio0").glob("INC-*"))
            series.seconds.append(self.backup(vm, "inc", chain))
            series.tool_cpu.append(self.last_cpu)
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
        tiny = self.random_vm("tiny", TINY_SIZE)
        series = self.report.add("overhead-full", f"backup --level full of a "
                                 f"{TINY_SIZE // MiB} MiB disk")
        startup = self.report.add("python-startup", "python -m qmpbackup --version "
                                  "(interpreter + imports, cold cache)")
        for _ in range(self.args.rounds):
            target = self.fresh("tiny-full")
            series.seconds.append(self.backup(tiny, "full", target))
            series.tool_cpu.append(self.last_cpu)
            shutil.rmtree(target)
            tiny.remove_tool_bitmaps()
            self.drop()   # the backup above also started cold: compare like with like
            cpu = children_cpu()
            startup.seconds.append(timed(lambda: run(
                [sys.executable, "-m", "qmpbackup", "--version"], cwd=self.args.tool_root,
                env=self.tool_env)))
            startup.tool_cpu.append(children_cpu() - cpu)
        log.info("overhead: full of %d MiB %.3f s, interpreter+imports %.3f s",
                 TINY_SIZE // MiB, series.median, startup.median)

    # (e) a mostly empty disk, as real VM disks are
    def sparse(self) -> None:
        size, fraction = self.args.sparse_size, self.args.sparse_fraction
        extents = max(1, round(size * fraction / SPARSE_EXTENT))
        data = extents * SPARSE_EXTENT
        self.report.sparse_size, self.report.sparse_data = size, data
        log.info("creating sparse disk: %d MiB virtual, %d MiB in %d scattered extents",
                 size // MiB, data // MiB, extents)
        vm = self.start_vm("sparse", size, lambda image: make_sparse_image(
            image, size, extents, self.args.seed))
        add = self.report.add
        add("sparse-convert", "sparse disk: qemu-img convert -U -O qcow2", data=data)
        add("sparse-full", "sparse disk: backup --level full (default: sync=top, offload)",
            baseline="sparse-convert", data=data)
        add(SPARSE_DIRECT.name, SPARSE_DIRECT.description, baseline="sparse-convert", data=data)
        add("sparse-convert-flushed", "sparse disk: qemu-img convert -t writeback (data flushed)",
            baseline="sparse-convert", data=data)
        add("sparse-full-no-checksum", "sparse disk: backup --level full --no-checksum",
            baseline="sparse-convert", data=data)
        steps: list[Step] = [("sparse-convert", self.convert_step(vm)),
                             ("sparse-convert-flushed", self.convert_step(vm, "-t", "writeback")),
                             ("sparse-full-no-checksum",
                              self.full_step(vm, "sparse-full-no-checksum", "--no-checksum")),
                             ("sparse-full", self.full_step(vm, "sparse-full")),
                             (SPARSE_DIRECT.name, self.direct_step(vm, SPARSE_DIRECT))]
        self.rotate(vm, steps, self.args.rounds, "sparse")
        speed = self.args.sparse_speed
        if speed:
            self.report.sparse_speed = speed
            limited = add("sparse-full-limited", f"sparse disk: backup --level full "
                          f"--speed-limit {speed // MiB}M (expect ≈ data / limit = "
                          f"{data / speed:.1f} s; virtual size / limit = {size / speed:.1f} s)",
                          data=data)
            for _ in range(min(SPARSE_LIMITED_ROUNDS, self.args.rounds)):
                limited.seconds.append(
                    self.full_step(vm, limited.name, "--speed-limit", str(speed))())
                log.info("sparse-full-limited: %.2f s", limited.seconds[-1])

    def run(self) -> Report:
        vm = self.random_vm("main", self.size)
        log.info("VM up (pid %s, tool socket %s); %d round(s)", vm.proc.pid if vm.proc else "?",
                 vm.tool_socket, self.args.rounds)
        with ForeignLoad() as foreign:
            if not self.args.restore_only:
                self.full_vs_convert(vm)
                self.incremental(vm)
                self.overhead()
                if not self.args.no_sparse:
                    self.sparse()
            if not self.args.no_restore:
                restore.measure(self, vm)
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


def fraction_arg(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("fraction must be in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark qmpbackup (full, 1%% incremental, fixed overhead, sparse disk) "
                    "against qemu-img convert on a live VM.")
    parser.add_argument("--size", type=size_arg, default=1 << 30, metavar="SIZE",
                        help="virtual size of the random-filled benchmark disk "
                             "(default 1G; k/M/G suffixes)")
    parser.add_argument("--rounds", type=int, default=12,
                        help="rounds per measurement; medians are reported (default 12)")
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
    parser.add_argument("--levers", action="store_true",
                        help="also time the target-node levers (cache, aio, cluster size, "
                             "preallocation, max-workers) as direct rows")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse-disk rows")
    parser.add_argument("--no-restore", action="store_true", help="skip the restore rows")
    parser.add_argument("--restore-only", action="store_true",
                        help="only the restore rows (merge, merge --skip-check, verify "
                             "against qemu-img convert of the same chain)")
    parser.add_argument("--sparse-size", type=size_arg, default=4 << 30, metavar="SIZE",
                        help="virtual size of the sparse disk (default 4G)")
    parser.add_argument("--sparse-fraction", type=fraction_arg, default=0.10, metavar="F",
                        help="part of the sparse disk holding data, in scattered 1 MiB "
                             "extents (default 0.10)")
    parser.add_argument("--sparse-speed", type=byte_rate, default=200 * MiB, metavar="RATE",
                        help="--speed-limit of the sparse-full-limited row (default 200M; "
                             "0 skips the row)")
    parser.add_argument("--tool-root", type=Path, default=ROOT, metavar="DIR",
                        help="run qmpbackup from this source tree (e.g. an export of an older "
                             "commit, for before/after tables); rows using options it lacks "
                             "are skipped")
    parser.add_argument("--seed", type=int, default=1, help="seed for data and dirty offsets")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def print_report(report: Report) -> None:
    from tabulate import tabulate

    print("qmpbackup benchmark")
    print(tabulate(report.machine.items(), tablefmt="plain"))
    print(f"disk {report.size // MiB} MiB random qcow2, {report.rounds} rounds, scratch below "
          f"{report.workdir}, page cache "
          f"{'dropped' if report.drop_caches else 'NOT dropped'} before each timing")
    print(f"other QEMU processes during the run: {report.foreign_qemu} using "
          f"{report.foreign_cpu:.1f} CPU s; max 1-min load average {report.load_max:.2f}"
          + ("  <-- SHARED MACHINE, numbers not comparable" if report.shared else "") + "\n")
    print(report.table())
    print()
    if "full" in report.series:
        print_backup_summary(report)
    for line in restore.summary(report):
        print(line)
    print()
    for name, series in report.series.items():
        print(f"  {name:19} {series.description}")
    for name, reason in report.skipped.items():
        print(f"  {name:19} SKIPPED: {reason}")


def print_backup_summary(report: Report) -> None:
    """The backup rows' summary lines."""
    full = report.series["full"].median
    convert = report.series["convert"].median
    print(f"median ratio backup/convert (per round): {report.median_ratio('full'):.2f}x "
          f"(ratio of medians {full / convert:.2f}x)")
    flushed = report.median_ratio("full", "convert-flushed")
    if flushed is not None:
        line = f"full / convert-flushed (both leave the data on the disk) per round: {flushed:.2f}x"
        no_checksum = report.median_ratio("full-no-checksum", "convert-flushed")
        if no_checksum is not None:
            line += f"; full-no-checksum {no_checksum:.2f}x"
        print(line)
    if "checksum" in report.series:
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
    if "sparse-full" in report.series:
        flushed = report.median_ratio("sparse-full", "sparse-convert-flushed")
        print(f"sparse disk ({report.sparse_size // MiB} MiB virtual, "
              f"{report.sparse_data // MiB} MiB data): full/convert "
              f"{report.median_ratio('sparse-full'):.2f}x per round"
              + (f", full/convert-flushed {flushed:.2f}x" if flushed is not None else ""))


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
    sparse = 0 if args.no_sparse or args.restore_only else \
        3 * int(args.sparse_size * args.sparse_fraction)
    need = (3 if args.no_restore else 4) * args.size + sparse + 256 * MiB
    if free < need:
        log.error("%s has %d MiB free, need about %d MiB", base, free // MiB, need // MiB)
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
