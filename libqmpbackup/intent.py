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

The record is untrusted input like the rest of the folder: only names of
the form ``<disk folder>/<backup file name>`` are accepted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from libqmpbackup.errors import ChainError
from libqmpbackup.fsutil import write_atomically
from libqmpbackup.metadata import ChainStore
from libqmpbackup.names import INTENT_NAME, PARTIAL_SUFFIX, parse_backup_name, safe_component

log = logging.getLogger(__name__)


@dataclass
class RunIntent:
    """What one run is about to make final: ``<disk folder>/<file>`` names below the chain folder."""

    time: int
    files: list[str] = field(default_factory=list)

    def save(self, root: Path) -> None:
        write_atomically(root / INTENT_NAME, json.dumps(asdict(self), indent=2) + "\n")

    def paths(self, root: Path) -> list[Path]:
        return [root / name for name in self.files]

    def unrecorded(self, store: ChainStore) -> list[str]:
        """The files of this record that the metadata does not list: a killed run's."""
        recorded = {f"{safe_component(disk_id)}/{r.file}" for c in store.chains
                    for disk_id, d in c.disks.items() for r in d.backups}
        return [name for name in self.files if name not in recorded]

    def unrecorded_in(self, store: ChainStore, folder_name: str) -> set[str]:
        """File names in one disk folder that a killed run left unrecorded."""
        return {name.split("/", 1)[1] for name in self.unrecorded(store)
                if name.split("/", 1)[0] == folder_name}


def _valid_name(name: Any) -> bool:
    if not isinstance(name, str) or name.count("/") != 1:
        return False
    folder, file = name.split("/")
    return (folder == safe_component(folder) and parse_backup_name(file) is not None
            and file == safe_component(file) and not file.endswith(PARTIAL_SUFFIX))


def load_intent(root: Path) -> Optional[RunIntent]:
    """The intent record a run left in ROOT, or None."""
    path = root / INTENT_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ChainError(f"cannot read {path}: {err}") from err
    if (not isinstance(raw, dict) or not isinstance(raw.get("time"), int)
            or not isinstance(raw.get("files"), list)
            or not all(_valid_name(n) for n in raw["files"])):
        raise ChainError(f"{path} is malformed: it is not a record qmpbackup wrote; "
                         "move it away once no backup runs")
    return RunIntent(time=raw["time"], files=list(raw["files"]))


def remove_intent(root: Path) -> None:
    (root / INTENT_NAME).unlink(missing_ok=True)
