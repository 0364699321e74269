"""What a backup run did, as it reports it: per file and per disk, for people and ``--json``.

A run reports only what it recorded (the run returns it): the summary line
counts the levels actually done per disk, never the level asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from libqmpbackup.backup.jobs import BackupJob
from libqmpbackup.json_output import Document


@dataclass
class BackupFile:
    """One file a run wrote, as reported to scripts (``--json``)."""

    disk_id: str
    path: Path
    level: str
    time: int
    bytes_written: int      # what QEMU's job copied (for a full: the whole disk)
    duration: float        # seconds from the transaction to this disk's job completing
    note: str = ""          # why LEVEL differs from the run's level ("hot-added")

    @classmethod
    def of(cls, job: BackupJob, timestamp: int) -> BackupFile:
        return cls(disk_id=job.disk.disk_id, path=job.final_path, level=job.level,
                   time=timestamp, bytes_written=job.bytes_copied, duration=job.duration,
                   note=job.note)

    def document(self) -> Document:
        try:
            size: Optional[int] = self.path.stat().st_size
        except OSError:
            size = None
        return {"disk": self.disk_id, "file": str(self.path), "level": self.level,
                "time": self.time, "bytes_written": self.bytes_written, "file_size": size,
                "duration": round(self.duration, 3), "note": self.note}


@dataclass
class BackupResult:
    level: str
    root: Path
    chain_id: Optional[str]
    time: int
    files: list[BackupFile] = field(default_factory=list)
    reason: str = ""
    quiesced: bool = False

    def document(self) -> Document:
        """The ``backup --json`` document (keys in docs/json.md)."""
        return {"command": "backup", "level": self.level, "reason": self.reason,
                "summary": self.summary(),
                "chain": self.chain_id, "target": str(self.root), "time": self.time,
                "quiesced": self.quiesced, "files": [f.document() for f in self.files]}

    def summary(self) -> str:
        """What the run did per disk: ``inc: 1 disk incremental, 1 disk new full (hot-added)``."""
        return f"{self.level}: {self.per_disk()}"

    def per_disk(self) -> str:
        return per_disk_levels([(f.level, f.note) for f in self.files])


LEVEL_WORDS = {"full": "full", "inc": "incremental", "diff": "differential", "copy": "copy"}


def per_disk_levels(done: list[tuple[str, str]]) -> str:
    """Per (level, note) actually done, how many disks: a run never claims more than it did."""
    counts: dict[tuple[str, str], int] = {}
    for item in done:
        counts[item] = counts.get(item, 0) + 1
    parts = []
    for (done_level, note), count in counts.items():
        word = LEVEL_WORDS.get(done_level, done_level)
        if note:
            word = f"new {word} ({note})" if done_level == "full" else f"{word} ({note})"
        parts.append(f"{count} disk{'s' if count != 1 else ''} {word}")
    return ", ".join(parts)
