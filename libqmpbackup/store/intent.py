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
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.store import folder_safety
from libqmpbackup.store.fsutil import write_atomically
from libqmpbackup.store.metadata import ChainStore, is_folder_name
from libqmpbackup.store.names import INTENT_NAME, PARTIAL_SUFFIX, RESERVED_FILE_NAMES

log = logging.getLogger(__name__)


@dataclass
class RunIntent:
    """What one run is about to make final: paths relative to the chain folder.

    ``<disk folder>/<file>``, or just ``<file>`` for disks kept in the chain
    folder itself (``--no-subdir``).
    """

    time: int
    files: list[str] = field(default_factory=list)

    def save(self, root: Path) -> None:
        write_atomically(root / INTENT_NAME, json.dumps(asdict(self), indent=2) + "\n")

    def unrecorded(self, store: ChainStore) -> list[str]:
        """The files of this record that the metadata does not list: a killed run's."""
        recorded = {posixpath.join(c.folder_of(disk_id), r.file) for c in store.chains
                    for disk_id, d in c.disks.items() for r in d.backups}
        return [name for name in self.files if name not in recorded]

    def unrecorded_paths(self, store: ChainStore) -> list[Path]:
        return [store.root / name for name in self.unrecorded(store)]


def _valid_name(name: Any) -> bool:
    """One plain file name, below at most one plain folder: nothing else may be deleted."""
    if not isinstance(name, str) or not 1 <= len(name.split("/")) <= 2:
        return False
    parts = name.split("/")
    return (all(part and is_folder_name(part) for part in parts)
            and not parts[-1].endswith(PARTIAL_SUFFIX)
            and parts[-1] not in RESERVED_FILE_NAMES)


def load_intent(root: Path) -> Optional[RunIntent]:
    """The intent record a run left in ROOT, or None (read like the metadata: no symlinks)."""
    raw = folder_safety.read_json(root, INTENT_NAME, "intent record")
    if raw is folder_safety.ABSENT:
        return None
    if (not isinstance(raw, dict) or not isinstance(raw.get("time"), int)
            or not isinstance(raw.get("files"), list)
            or not all(_valid_name(n) for n in raw["files"])):
        raise ChainError(f"{root / INTENT_NAME} is malformed: it is not a record qmpbackup wrote; "
                         "move it away once no backup runs")
    return RunIntent(time=raw["time"], files=list(raw["files"]))


def remove_intent(root: Path) -> None:
    folder_safety.remove(root, INTENT_NAME)
