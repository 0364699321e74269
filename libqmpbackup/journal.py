"""The progress record of an in-place restore (commit, snapshotrebase).

Those operations change the FULL file, then rename it, rewrite the chain
metadata and delete the applied incrementals.  Between the first write and
the last step the folder is neither the old chain nor the new one, so the
plan and how far it got are written to ``qmprestore-journal.json`` in the
disk folder first (atomically, like the metadata).  While it exists every
qmprestore command refuses that folder, except the same operation, which
reads the journal and finishes the job: each step is safe to repeat.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.fsutil import write_atomically
from libqmpbackup.names import JOURNAL_NAME

__all__ = ["JOURNAL_NAME", "Journal", "refuse_unfinished_restores", "unfinished_error"]


@dataclass
class Journal:
    operation: str          # "commit" or "snapshotrebase"
    chain: str              # chain uuid
    disk: str               # disk id
    base: str               # the FULL file the incrementals go into
    result: str             # the FULL's name once it holds the point
    point: str              # the restored point's file
    point_time: int
    steps: list[str] = field(default_factory=list)   # INC/DIFF files after the FULL up to the point
    snapshots: bool = False
    done: int = 0           # steps applied so far (snapshotrebase applies them one by one)

    @property
    def applied(self) -> bool:
        return self.done >= len(self.steps)

    def rerun_command(self, folder: Path) -> str:
        return shlex.join(["qmprestore", self.operation, "--dir", str(folder)])

    def save(self, folder: Path) -> None:
        write_atomically(folder / JOURNAL_NAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Optional[Journal]:
        path = folder / JOURNAL_NAME
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as err:
            raise ChainError(f"cannot read the restore journal {path}: {err}; an in-place restore "
                             "was interrupted there: use a fresh copy of the backup") from err

    @staticmethod
    def remove(folder: Path) -> None:
        (folder / JOURNAL_NAME).unlink(missing_ok=True)


def unfinished_error(folder: Path, journal: Journal) -> ChainError:
    return ChainError(
        f"{folder} holds an unfinished qmprestore {journal.operation} (up to {journal.point}, "
        f"see {JOURNAL_NAME}): run `{journal.rerun_command(folder)}` to finish it first")


def refuse_unfinished_restores(root: Path) -> None:
    """A backup must not extend a chain whose files an in-place restore is rewriting."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        journal = Journal.load(folder)
        if journal is not None:
            raise unfinished_error(folder, journal)
