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
from typing import Any, Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.store import folder_safety, name_rules
from libqmpbackup.store import json_shape as shape
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.names import JOURNAL_NAME, is_chain_id

__all__ = ["JOURNAL_NAME", "Journal", "unfinished_error"]

OPERATIONS = ("commit", "snapshotrebase")


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

    def save(self, folder: Folder) -> None:
        """Write the journal into the disk folder FOLDER (relative to its descriptor)."""
        folder.write_atomically(JOURNAL_NAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Folder) -> Optional[Journal]:
        """The journal in the disk folder FOLDER, or None; a damaged or unsafe one is a chain error.

        The journal is folder content, so untrusted: every name in it must be
        a backup file name (a plain name in FOLDER) before a resumed restore
        renames, commits or deletes anything because of it.
        """
        try:
            return _journal_from_dict(folder_safety.read_json(folder, JOURNAL_NAME,
                                                              "restore journal"),
                                      f"restore journal {folder.path / JOURNAL_NAME}")
        except ChainError as err:
            raise ChainError(f"{err}; an in-place restore was interrupted there or the journal "
                             "was tampered with: use a fresh copy of the backup") from err

    @staticmethod
    def remove(folder: Folder) -> None:
        folder.remove(JOURNAL_NAME, "restore journal")


def _journal_from_dict(raw: Any, where: str) -> Optional[Journal]:
    if raw is folder_safety.ABSENT:
        return None
    fields = shape.as_object(raw, where)
    operation = shape.text(fields, "operation", where)
    if operation not in OPERATIONS:
        raise shape.malformed(where, f"operation {operation[:80]!r} is not one of "
                                     f"{', '.join(OPERATIONS)}")
    chain = shape.text(fields, "chain", where)
    if not is_chain_id(chain):
        raise shape.malformed(where, f"chain {chain[:80]!r} is not a chain id")
    # the FULL (base, and result: it keeps its name) may be untimestamped (--no-timestamp),
    # named like its source image
    names = {key: name_rules.recorded_file(fields.get(key), f"{where}: {key}")
             for key in ("base", "result")}
    names["point"] = name_rules.backup_file(fields.get("point"), f"{where}: point")
    steps = [name_rules.backup_file(step, f"{where}: step")
             for step in shape.array(fields, "steps", where)]
    done = shape.integer(fields, "done", where, default=0)
    if not steps or done > len(steps):
        raise shape.malformed(where, f"{done} of {len(steps)} steps done")
    return Journal(operation=operation, chain=chain, disk=shape.text(fields, "disk", where),
                   base=names["base"], result=names["result"], point=names["point"],
                   point_time=shape.integer(fields, "point_time", where), steps=steps,
                   snapshots=shape.flag(fields, "snapshots", where, default=False), done=done)


def unfinished_error(folder: Path, journal: Journal) -> ChainError:
    return ChainError(
        f"{folder} holds an unfinished qmprestore {journal.operation} (up to {journal.point}, "
        f"see {JOURNAL_NAME}): run `{journal.rerun_command(folder)}` to finish it first")
