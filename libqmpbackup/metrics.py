"""``--metrics-file``: each backup and prune run's outcome for Prometheus' node_exporter.

The textfile collector reads every ``*.prom`` file of its folder at each
scrape, so one file per host serves every VM and target: a run rewrites only
its own series (its target, its disks) and keeps what runs for other targets
wrote, under an flock of a lock file beside it (``.NAME.lock``, which the
collector ignores), and replaces the file atomically, so a scrape never sees
half of it.  A failed run updates the attempt time and exit code of the
disks the target had, and leaves their success time alone: an alert on that
time fires.  The file is made readable by everyone (0644): the collector
runs as another user, and it holds no more than folder paths.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import math
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import ImageInUseError, QmpBackupError, UsageError
from libqmpbackup.runner import at_exit
from libqmpbackup.store.backup_folder import read_chain_stores
from libqmpbackup.store.fsutil import write_atomically

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

BACKUP_FAMILIES = {
    "qmpbackup_last_success_timestamp_seconds":
        "Unix time the last successful backup run of the disk ended.",
    "qmpbackup_last_attempt_timestamp_seconds":
        "Unix time the last backup run of the disk's target started.",
    "qmpbackup_last_exit_code": "Exit code of that run (0 success; see the README's exit codes).",
    "qmpbackup_last_duration_seconds": "Wall-clock seconds that run took.",
    "qmpbackup_last_written_bytes": "Bytes the last successful backup copied for the disk.",
    "qmpbackup_last_success_level_info":
        "Level of the last successful backup of the disk (label level), always 1.",
    "qmpbackup_restore_points":
        "Restore points of the disk in the target (every chain, month folders included).",
}
PRUNE_FAMILIES = {
    "qmpbackup_prune_last_success_timestamp_seconds": "Unix time the last successful prune ended.",
    "qmpbackup_prune_last_attempt_timestamp_seconds": "Unix time the last prune started.",
    "qmpbackup_prune_last_exit_code": "Exit code of the last prune (0 success).",
    "qmpbackup_prune_chains_kept": "Chains the last successful prune kept.",
    "qmpbackup_prune_chains_removed": "Chains the last successful prune removed.",
}
FAMILIES = {**BACKUP_FAMILIES, **PRUNE_FAMILIES}
MAX_FILE = 4 << 20      # an existing file larger than this is not ours: it is started anew
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?")
LABEL = re.compile(r'\s*([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"\s*,?')
ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n"}


def escape(value: str) -> str:
    """A label value as the text format writes it: backslash, double quote and newline escaped."""
    return "".join(ESCAPES.get(c, c) for c in value)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def parse(text: str) -> Samples:
    """The samples of our families in TEXT (a file this module wrote); anything else is dropped."""
    samples: Samples = {}
    for line in text.splitlines():
        match = SAMPLE.fullmatch(line.strip())
        if not match or match.group(1) not in FAMILIES:
            continue
        inner = match.group(2) or ""
        labels = tuple(sorted((m.group(1), _unescape(m.group(2)))
                              for m in LABEL.finditer(inner)))
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        samples[(match.group(1), labels)] = value
    return samples


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(samples: Samples) -> str:
    """The textfile: HELP and TYPE of each family that has samples, samples in a stable order."""
    lines = []
    for name, help_text in FAMILIES.items():
        mine = sorted((labels, value) for (family, labels), value in samples.items()
                      if family == name)
        if not mine:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, value in mine:
            text = ",".join(f'{key}="{escape(val)}"' for key, val in labels)
            lines.append(f"{name}{{{text}}} {_number(value)}")
    return "".join(line + "\n" for line in lines)


def _read(path: Path) -> str:
    """PATH's text, or "" when there is none (or it is no regular file of a sane size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ELOOP):
            raise
        return ""
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_FILE:
            return ""
        return handle.read(MAX_FILE).decode("utf-8", "replace")


@dataclass
class DiskOutcome:
    disk: str
    level: str
    bytes_written: int


@dataclass
class RunMetrics:
    """One run's metrics; :meth:`finish` with the exit code writes them (the runner calls it)."""

    path: Path
    target: Path
    kind: str                                   # "backup" or "prune"
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.monotonic)
    disks: list[DiskOutcome] = field(default_factory=list)
    chains: Optional[tuple[int, int]] = None    # prune: (kept, removed)

    @classmethod
    def start(cls, path: Optional[Path], target: Path, kind: str) -> Optional[RunMetrics]:
        """The run's metrics, or None without --metrics-file; a file that cannot be is exit 2 now."""
        if path is None:
            return None
        path = Path(os.path.abspath(path))
        if not path.parent.is_dir():
            raise UsageError(f"--metrics-file {path}: folder {path.parent} does not exist")
        if path.is_dir():
            raise UsageError(f"--metrics-file {path} is a folder")
        return cls(path=path, target=Path(os.path.abspath(target)), kind=kind)

    def finish(self, code: int) -> None:
        """Merge this run into the file under its lock and replace it atomically.

        Exit 12 (the images are in use by a running QEMU) records nothing: no
        backup was attempted, and qmpbackup-vm follows it with the live run at
        once; a scrape in between would see a failure that is none.
        """
        if code == ImageInUseError.exit_code:
            return
        lock_path = self.path.parent / f".{self.path.name}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            samples = parse(_read(self.path))
            update = self._update_backup if self.kind == "backup" else self._update_prune
            update(samples, code, time.time())
            write_atomically(self.path, render(samples), mode=0o644)
        finally:
            os.close(fd)

    def _update_prune(self, samples: Samples, code: int, now: float) -> None:
        labels: Labels = (("target", str(self.target)),)
        samples[("qmpbackup_prune_last_attempt_timestamp_seconds", labels)] = self.started
        samples[("qmpbackup_prune_last_exit_code", labels)] = code
        if code == 0 and self.chains is not None:
            samples[("qmpbackup_prune_last_success_timestamp_seconds", labels)] = now
            samples[("qmpbackup_prune_chains_kept", labels)] = self.chains[0]
            samples[("qmpbackup_prune_chains_removed", labels)] = self.chains[1]

    def _update_backup(self, samples: Samples, code: int, now: float) -> None:
        target = str(self.target)
        known = sorted({dict(labels).get("disk", "") for (name, labels) in samples
                        if name in BACKUP_FAMILIES and dict(labels).get("target") == target})
        disks = [d.disk for d in self.disks] if code == 0 else [d for d in known if d] or [""]
        if code == 0:   # a disk-less series of an earlier failure no longer stands for the target
            _drop(samples, {"target": target, "disk": ""})
        for disk in disks:
            labels: Labels = (("disk", disk), ("target", target))
            samples[("qmpbackup_last_attempt_timestamp_seconds", labels)] = self.started
            samples[("qmpbackup_last_exit_code", labels)] = code
            samples[("qmpbackup_last_duration_seconds", labels)] = round(
                time.monotonic() - self.clock, 3)
        if code != 0:
            return
        points = _restore_points(self.target)
        for outcome in self.disks:
            labels = (("disk", outcome.disk), ("target", target))
            samples[("qmpbackup_last_success_timestamp_seconds", labels)] = now
            samples[("qmpbackup_last_written_bytes", labels)] = outcome.bytes_written
            _drop(samples, {"target": target, "disk": outcome.disk}, having="level")
            samples[("qmpbackup_last_success_level_info", (*labels, ("level", outcome.level)))] = 1
            if outcome.disk in points:
                samples[("qmpbackup_restore_points", labels)] = points[outcome.disk]


def _drop(samples: Samples, labels: dict[str, str], having: str = "") -> None:
    """Remove the series with exactly LABELS, or with LABELS and a label named HAVING."""
    def matches(other: dict[str, str]) -> bool:
        if not having:
            return other == labels
        return having in other and other.items() >= labels.items()
    for key in [k for k in samples if matches(dict(k[1]))]:
        del samples[key]


def add_metrics_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-file", type=Path, metavar="FILE",
                        help="after the run, successful or not, merge its outcome into FILE "
                             "(Prometheus node_exporter textfile format, e.g. "
                             "/var/lib/prometheus/node-exporter/qmpbackup.prom)")


def track(args: argparse.Namespace, kind: str) -> Optional[RunMetrics]:
    """The run's --metrics-file record, written by the runner with the final exit code."""
    record = RunMetrics.start(args.metrics_file, args.target, kind)
    if record is not None:
        at_exit(record.finish)
    return record


def _restore_points(target: Path) -> dict[str, int]:
    """Disk id -> backup files recorded for it in TARGET and its month folders."""
    points: dict[str, int] = {}
    for folder, store in read_chain_stores(target):
        if isinstance(store, QmpBackupError):
            log.debug("--metrics-file: not counting the points in %s: %s", folder, store)
            continue
        for chain in store.chains:
            for disk, history in chain.disks.items():
                points[disk] = points.get(disk, 0) + len(history.backups)
    return points
