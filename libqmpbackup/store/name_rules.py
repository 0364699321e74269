"""One validator per kind of name read from a backup folder.

Folder content is untrusted (see :mod:`folder_safety`): every name in the
metadata, the intent record, the restore journal or a ``pruning`` list is
checked here, by the one rule for its kind, before anything opens, renames
or deletes it:

* a **backup file** a run names by level and time (:func:`backup_file`);
* a **recorded file**: a backup file, or one named like its source image
  (``--no-timestamp``) (:func:`recorded_file`);
* a **disk folder**: :data:`~libqmpbackup.store.names.CHAIN_FOLDER` or one
  plain folder name (:func:`disk_folder`);
* a **file of a chain**, ``[<disk folder>/]<file>``, as the intent record
  and the ``pruning`` list spell it (:meth:`ChainFile.parse`).

Chain ids and bitmap names follow :func:`~libqmpbackup.store.names.is_chain_id`.
A refusal is a :class:`ChainError` (exit 6) naming what was refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from libqmpbackup.errors import ChainError
from libqmpbackup.store.handles import plain_name
from libqmpbackup.store.names import (
    CHAIN_FOLDER,
    PRUNING_CHAIN_FOLDER,
    is_backup_file_name,
    is_plain_file_name,
)


def backup_file(name: object, what: str) -> str:
    """NAME when it follows the backup-file grammar (``FULL-<time>-<image>``, ...)."""
    if not isinstance(name, str) or not is_backup_file_name(name):
        raise ChainError(f"{what} {name!r} is not a backup file name: refused")
    return _qemu_plain(plain_name(name, what), what)


def recorded_file(name: object, what: str) -> str:
    """NAME as a chain may record it: a backup file name, or (--no-timestamp) a plain file name."""
    if not isinstance(name, str) or not (is_backup_file_name(name) or is_plain_file_name(name)):
        raise ChainError(f"{what} {name!r} is not a backup file name: refused")
    return _qemu_plain(plain_name(name, what), what)


def _qemu_plain(name: str, what: str) -> str:
    """A backup file name may end up in a qcow2 header, where QEMU reads ``x:…`` as a protocol
    (``json:{…}`` as a whole block spec): the tool never writes such names, so none is read."""
    if ":" in name:
        raise ChainError(f"{what} {name!r} holds a ':', which QEMU would read as a protocol or "
                         "block spec, not a file: refused")
    return name


def disk_folder(name: object, what: str) -> str:
    """NAME when it is a disk folder: the chain folder itself (``""``) or one plain folder name."""
    if name == CHAIN_FOLDER:
        return CHAIN_FOLDER
    try:
        return plain_name(name, what)
    except ChainError as err:
        raise ChainError(f"{what} {name!r} is not a folder name: refused") from err


@dataclass(frozen=True)
class ChainFile:
    """One file of a chain, relative to the chain folder: its disk folder and its name.

    ``folder`` is :data:`~libqmpbackup.store.names.CHAIN_FOLDER` for a disk
    kept in the chain folder itself (``--no-subdir``); that is the only
    spelling in the code.  On disk the intent record writes such a file as
    ``<file>`` and the ``pruning`` list (a format kept since it was first
    written) as ``./<file>``: :meth:`parse` reads both, :meth:`text` and
    :meth:`pruning_text` write them.
    """

    folder: str
    name: str

    @classmethod
    def parse(cls, value: object, what: str) -> ChainFile:
        """``[<disk folder>/]<recorded file>``; anything that could lead elsewhere is refused."""
        if not isinstance(value, str):
            raise ChainError(f"{what} {value!r} is not <disk folder>/<file>: refused")
        folder, sep, name = value.rpartition("/")
        if sep and folder == PRUNING_CHAIN_FOLDER:
            folder = CHAIN_FOLDER
        elif sep:
            disk_folder(folder, what)
        return cls(folder, recorded_file(name, what))

    def path(self, root: Path) -> Path:
        """Where the file is below the chain folder ROOT (for messages and sizes: never opened)."""
        return root / self.folder / self.name

    def text(self) -> str:
        """``<disk folder>/<file>``, or ``<file>`` in the chain folder (the intent record's spelling)."""
        return f"{self.folder}/{self.name}" if self.folder != CHAIN_FOLDER else self.name

    def pruning_text(self) -> str:
        """``<disk folder>/<file>``, ``./<file>`` in the chain folder (the ``pruning`` list's spelling)."""
        return f"{self.folder or PRUNING_CHAIN_FOLDER}/{self.name}"
