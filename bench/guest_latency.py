#!/usr/bin/env python3
"""Guest write latency while a backup runs: idle vs plain backup vs ``--fleecing``.

The question (issue 11): how much does a running backup cost the guest's disk
writes, above all when the backup target is slow or stalls?  A plain
``blockdev-backup`` makes a guest write to a cluster it has not copied yet
wait for the copy to reach the target; fleecing saves that old data locally.

Each scenario boots the shared harness VM (harness/qemu_vm.py ``QemuVM``, no guest OS) on a
qcow2 disk full of random data and times small writes (4 KiB at distinct
random clusters, each through QEMU's block layer as ``qemu-io`` over HMP,
like a guest write; the time includes one monitor round trip, equally in
every scenario) while ``qmpbackup backup --level copy`` runs as a
subprocess with ``--speed-limit``, so the job is still copying during the
window:

* ``idle``: no backup;
* ``plain`` / ``fleecing`` with the target on local disk;
* ``plain`` / ``fleecing`` with the target on a FUSE passthrough
  (harness/slowfs.py) whose writes stall for ``--stall`` seconds (default 10)
  starting right after the job started — a NAS that hangs.

Reported per scenario: p50, p99 and max over all writes of all rounds, the
median per-round p99, the number of writes, how long the tool paused the VM
for the fleecing switch, and the backup's duration.  Needs root (FUSE mount).
This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
from typing import Any, Optional

from bench.run import ForeignLoad, machine_description, make_random_image, size_arg
from harness.qemu_vm import Disk, QemuVM
from harness.slowfs import SlowFS
from libqmpbackup.store.locks import LOCK_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CLUSTER = 64 * 1024
WRITE = 4096
PAUSE_RE = re.compile(r"VM paused for ([\d.]+) ms")

log = logging.getLogger("bench.guest_latency")


@dataclass(frozen=True)
class Scenario:
    name: str
    backup: bool = False
    fleecing: bool = False
    stalled_target: bool = False


SCENARIOS = (
    Scenario("idle"),
    Scenario("plain, local target", backup=True),
    Scenario("fleecing, local target", backup=True, fleecing=True),
    Scenario("plain, target stalls", backup=True, stalled_target=True),
    Scenario("fleecing, target stalls", backup=True, fleecing=True, stalled_target=True),
)


@dataclass
class Result:
    scenario: str
    latencies: list[float] = field(default_factory=list)     # seconds, all rounds
    round_p99: list[float] = field(default_factory=list)
    pauses_ms: list[float] = field(default_factory=list)
    backup_seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)          # the tool's error lines

    def row(self) -> list[str]:
        ms = sorted(x * 1000 for x in self.latencies)
        return [self.scenario, f"{percentile(ms, 50):.1f}", f"{percentile(ms, 99):.1f}",
                f"{ms[-1]:.1f}" if ms else "-",
                f"{statistics.median(self.round_p99) * 1000:.1f}" if self.round_p99 else "-",
                str(len(ms)),
                f"{statistics.median(self.pauses_ms):.1f}" if self.pauses_ms else "-",
                f"{statistics.median(self.backup_seconds):.1f}" if self.backup_seconds else "-",
                str(len(self.failures))]


HEADER = ["scenario", "p50 ms", "p99 ms", "max ms", "median round p99 ms", "writes",
          "VM pause ms", "backup s", "failed"]


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile: with few samples p99 is the slowest write, as it should be."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


class Writer:
    """Timed guest writes at distinct random clusters, one every INTERVAL seconds."""

    INTERVAL = 0.02

    def __init__(self, vm: QemuVM, size: int, rng: random.Random) -> None:
        self.vm = vm
        self.clusters = rng.sample(range(size // CLUSTER), size // CLUSTER)
        self.pattern = 0

    def run_for(self, seconds: float, until: Optional[subprocess.Popen[str]] = None) -> list[float]:
        latencies = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.clusters:
            if until is not None and until.poll() is not None and latencies:
                break
            offset = self.clusters.pop() * CLUSTER
            self.pattern = (self.pattern + 1) % 255 + 1
            started = time.perf_counter()
            reply = self.vm.hmp(f'qemu-io virtio0 "write -P {self.pattern} {offset} {WRITE}"')
            latencies.append(time.perf_counter() - started)
            if reply:
                raise RuntimeError(f"guest write failed: {reply}")
            time.sleep(self.INTERVAL)
        return latencies


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.image = workdir / "disk.qcow2"
        self.counter = 0
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), **{LOCK_DIR_ENV: str(workdir / "locks")})

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.workdir / f"{self.counter:03d}-{name}"

    def run(self) -> list[Result]:
        log.info("creating a %d MiB disk of random data", self.args.size // MiB)
        make_random_image(self.image, self.args.size, self.args.seed)
        chosen = [s for s in SCENARIOS if not self.args.scenario or s.name in self.args.scenario]
        results = {s.name: Result(s.name) for s in chosen}
        for round_ in range(self.args.rounds):
            # rotate the order so drift and neighbours' load hit every scenario alike
            shift = round_ % len(chosen)
            for scenario in chosen[shift:] + chosen[:shift]:
                log.info("round %d: %s", round_ + 1, scenario.name)
                self.one(scenario, results[scenario.name])
        return list(results.values())

    def one(self, scenario: Scenario, result: Result) -> None:
        folder = self.fresh("vm")
        disk = Disk("virtio0", "virtio", "qcow2", self.args.size, path=self.workdir / "run.qcow2")
        shutil.copyfile(self.image, disk.path)   # every scenario starts from the same disk
        with QemuVM(folder, [disk], firmware_log=True) as vm:
            vm.wait_for_firmware()
            writer = Writer(vm, self.args.size, self.rng)
            if not scenario.backup:
                latencies = writer.run_for(self.args.stall + 2)
            elif scenario.stalled_target:
                with SlowFS(self.fresh("slowfs")) as slow:
                    latencies = self.during_backup(vm, writer, scenario, result,
                                                   slow.mount / "target", slow)
            else:
                latencies = self.during_backup(vm, writer, scenario, result,
                                               self.fresh("target"), None)
        result.latencies += latencies
        result.round_p99.append(percentile(sorted(latencies), 99))

    def during_backup(self, vm: QemuVM, writer: Writer, scenario: Scenario, result: Result,
                      target: Path, slow: Optional[SlowFS]) -> list[float]:
        argv = [sys.executable, "-m", "qmpbackup", "--socket", vm.tool_socket,
                *(["--debug"] if self.args.debug else []), "backup",
                "--level", "copy", "--target", str(target), "--no-progress",
                "--speed-limit", self.args.speed_limit]
        if scenario.fleecing:
            fleece = self.fresh("fleece")
            fleece.mkdir()
            argv += ["--fleecing", "--fleecing-dir", str(fleece)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        resumer: Optional[threading.Timer] = None
        try:
            wait_for_job(vm, proc)
            if slow is not None:
                slow.stall()
                resumer = threading.Timer(self.args.stall, slow.resume)
                resumer.start()
            latencies = writer.run_for(self.args.stall + 2, until=proc)
            _, err = proc.communicate(timeout=600)
        finally:
            if resumer is not None:
                resumer.cancel()
            if slow is not None:
                slow.resume()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            # reported, not hidden: the latencies of the round still count
            errors = [line for line in err.splitlines() if ": error: " in line]
            result.failures.append(f"exit {proc.returncode}: {errors[-1] if errors else err}")
            log.warning("%s: backup failed: %s", scenario.name, result.failures[-1])
            if self.args.debug:
                sys.stderr.write(err)
        else:
            result.backup_seconds.append(time.monotonic() - started)
        result.pauses_ms += [float(m) for m in PAUSE_RE.findall(err)]
        return latencies


def wait_for_job(vm: QemuVM, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not vm.cmd("query-jobs"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the backup started no job: {proc.communicate()[1]}")
        time.sleep(0.005)


def markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in results]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.guest_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_arg, default=128 * MiB,
                        help="disk size (default 128M)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    parser.add_argument("--stall", type=float, default=10.0,
                        help="seconds the stalled target blocks every write (default 10)")
    parser.add_argument("--speed-limit", default="32M",
                        help="the backup's --speed-limit, so it runs during the window")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="a qmpbackup-latency-* scratch folder is made below it")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS],
                        help="run only this scenario (repeatable; default all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--debug", action="store_true",
                        help="run the tool with --debug; print its whole log when it fails")
    parser.add_argument("--json", action="store_true", help="raw results as JSON")
    return parser


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C: the VMs stop and the scratch folder goes."""
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    why = SlowFS.unavailable()
    if why:
        log.error("the stalling target needs FUSE: %s", why)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="qmpbackup-latency-", dir=args.workdir))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ForeignLoad() as load:
            results = Bench(args, workdir).run()
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        json.dump({"machine": machine_description(), "args": {**vars(args), "workdir": str(
            args.workdir)}, "foreign_qemu_cpu_seconds": load.cpu_seconds,
            "results": [asdict(r) for r in results]}, sys.stdout, indent=2)
        print()
        return 0
    machine = machine_description()
    print(f"{machine['date']}, {machine['cpu']}, QEMU {machine['qemu']}; disk "
          f"{args.size // MiB} MiB, {args.rounds} rounds, {WRITE // 1024} KiB writes every "
          f"{Writer.INTERVAL * 1000:.0f} ms, stall {args.stall:g} s, speed limit "
          f"{args.speed_limit}; other processes' QEMU CPU during the run: "
          f"{load.cpu_seconds:.0f} s (max load {load.load_max:.1f})")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
