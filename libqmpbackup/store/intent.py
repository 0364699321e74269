"""The intent record: which files a backup run is about to make final.

A run renames its ``.partial`` files to their final names and then commits
the chain metadata.  Between the two, a SIGKILL would leave finished-looking
files that no metadata lists: restores would refuse the folder and no later
run would know whether to keep them.  So before the first rename the run
writes ``qmpbackup-intent.json`` (atomically) naming every file it will
rename, and removes it only after the metadata commit.  That gives, by
construction, at every instant:

* every backup file of the folder is listed in the metadata, is a
  ``.partial``, or is named by the intent record;
* a file named by the intent record but not by the metadata was never
  recorded: restores ignore it (the last recorded point is intact, its files
  are never touched by a run), and the next run deletes it — its changes are
  still in the dirty bitmaps (see :mod:`libqmpbackup.backup.bitmaps`), so the
  next backup holds them;
* a file named by both was recorded: the commit happened, the record is
  just stale and is removed.

The record is untrusted input like the rest of the folder: only plain
file names in the chain folder or one folder below it are accepted, never
a reserved name, so a forged record cannot make a run delete anything else
than backup files the metadata does not list.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.store import folder_safety
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import INTENT_NAME

log = logging.getLogger(__name__)


@dataclass
class RunIntent:
    """What one run is about to make final: files of the chain, by disk folder and name."""

    time: int
    files: list[ChainFile] = field(default_factory=list)

    def text(self) -> str:
        """The record as written: ``<disk folder>/<file>``, or ``<file>`` for the chain folder."""
        return json.dumps({"time": self.time, "files": [f.text() for f in self.files]},
                          indent=2) + "\n"

    def save(self, folder: Folder) -> None:
        """Write the record into the chain folder FOLDER (relative to its descriptor)."""
        folder.write_atomically(INTENT_NAME, self.text())

    def unrecorded(self, store: ChainStore) -> list[ChainFile]:
        """The files of this record that the metadata does not list: a killed run's."""
        recorded = {ChainFile(c.folder_of(disk_id), r.file) for c in store.chains
                    for disk_id, d in c.disks.items() for r in d.backups}
        return [file for file in self.files if file not in recorded]


def read_intent(folder: Folder) -> Optional[RunIntent]:
    """The intent record a run left in the chain folder FOLDER, or None.

    Read like the metadata (relative to the descriptor, no symlinks); every
    name must be a recorded file in the chain folder or one disk folder below
    it (:meth:`ChainFile.parse`), so a forged record names nothing else.
    """
    raw = folder_safety.read_json(folder, INTENT_NAME, "intent record")
    if raw is folder_safety.ABSENT:
        return None
    where = f"intent record {folder.path / INTENT_NAME}"
    try:
        if (not isinstance(raw, dict) or not isinstance(raw.get("time"), int)
                or not isinstance(raw.get("files"), list)):
            raise ChainError("it is not a record qmpbackup wrote")
        files = [ChainFile.parse(name, "file") for name in raw["files"]]
    except ChainError as err:
        raise ChainError(f"{where} is malformed: {err}; move it away once no backup "
                         "runs") from err
    return RunIntent(time=raw["time"], files=files)


def remove_intent(folder: Folder) -> None:
    folder.remove(INTENT_NAME, "intent record")
