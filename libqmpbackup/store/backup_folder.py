"""One chain folder, opened once per command: the only way code reaches its records and files.

A command used to re-read the folder piecemeal: the metadata in one
module, the intent record in another, every disk folder's journal in a
third, each opening the folder by its path again.  A :class:`BackupFolder`
holds the chain folder's directory descriptor from the moment the command
found it, opens each disk folder once (``O_NOFOLLOW`` relative to it), and
reads the metadata, the intent record and each journal at most once; every
write goes through the same descriptors.  Files are handed out by the
held :class:`~libqmpbackup.store.handles.Folder` objects, so they pass
the folder rule and reach qemu-img and QEMU as descriptors.

Records read before the command held the chain lock may be stale by the
time it does: :meth:`BackupFolder.locked` takes the lock through the held
descriptor and reads them again only when the metadata file was replaced
in between (an atomic replace always gives it a new inode).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from libqmpbackup.errors import ChainError, QmpBackupError, TargetError
from libqmpbackup.store import upstream
from libqmpbackup.store.handles import Folder
from libqmpbackup.store.intent import RunIntent, read_intent, remove_intent
from libqmpbackup.store.journal import Journal, unfinished_error
from libqmpbackup.store.layout import chain_folder_names
from libqmpbackup.store.locks import chain_lock_in
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import CHAIN_FOLDER, DISK_METADATA_NAME, METADATA_NAME

log = logging.getLogger(__name__)

_UNREAD = object()


def _identity(info: Optional[os.stat_result]) -> Optional[tuple[int, int, int, int]]:
    return None if info is None else (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class BackupFolder:
    """A chain folder held open for one command, with its records read once.

    METADATA_NAME: ``qmpbackup.json`` for a chain folder, ``qmpbackup-disk.json``
    for a disk folder copied on its own (its records say which chain it
    belongs to), None for a folder of upstream qmpbackup (its file names are
    its record, nothing is ever written back).
    """

    def __init__(self, folder: Folder, metadata_name: Optional[str] = METADATA_NAME) -> None:
        self.folder = folder
        self.metadata_name = metadata_name
        self._store: Optional[ChainStore] = None
        self._store_identity: Optional[tuple[int, int, int, int]] = None
        self._intent: object = _UNREAD
        self._journals: dict[str, Optional[Journal]] = {}
        self._subfolders: dict[str, Folder] = {}

    @classmethod
    def open(cls, path: Path, metadata_name: Optional[str] = METADATA_NAME) -> BackupFolder:
        """The admin's folder PATH (``--dir``, ``--target``: the admin's symlinks are followed)."""
        return cls(Folder.open_root(path), metadata_name)

    @classmethod
    def below(cls, top: Folder, name: str) -> BackupFolder:
        """The chain folder NAME of the held target TOP: TOP itself for CHAIN_FOLDER (then
        closing it closes TOP), else its ``--monthly`` month folder, never through a symlink."""
        return cls(top) if name == CHAIN_FOLDER else cls(top.sub(name, "month folder"))

    @property
    def path(self) -> Path:
        return self.folder.path

    def close(self) -> None:
        self.close_disk_folders()
        self.folder.close()

    def __enter__(self) -> BackupFolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- records, each read once ---------------------------------------------------------------

    @property
    def store(self) -> ChainStore:
        """The chain metadata (an upstream folder's, from its names), read on first use."""
        if self._store is None:
            if self.metadata_name is None:
                self._store = upstream.read_folder(self.folder)
            else:
                self._store_identity = _identity(self.folder.entry(self.metadata_name))
                self._store = ChainStore.read(self.folder, self.metadata_name)
        return self._store

    def replace_store(self, store: ChainStore) -> None:
        """Use STORE as this folder's records from now on (adopting an upstream folder)."""
        self._store = store

    @property
    def intent(self) -> Optional[RunIntent]:
        """The intent record a killed run left (see :mod:`intent`), read on first use."""
        if self._intent is _UNREAD:
            self._intent = read_intent(self.folder)
        return self._intent if isinstance(self._intent, RunIntent) else None

    def journal(self, folder: str = CHAIN_FOLDER) -> Optional[Journal]:
        """The restore journal of the disk folder FOLDER, read on first use."""
        if folder not in self._journals:
            self._journals[folder] = Journal.read(self.disk_folder(folder))
        return self._journals[folder]

    # -- folders -------------------------------------------------------------------------------

    def disk_folder(self, name: str = CHAIN_FOLDER) -> Folder:
        """The disk folder NAME (the chain folder itself for CHAIN_FOLDER), opened once.

        A symlink, or anything that is not a real folder, is refused
        (:meth:`Folder.sub`); the descriptor stays open until :meth:`close`.
        """
        if name == CHAIN_FOLDER:
            return self.folder
        if name not in self._subfolders:
            self._subfolders[name] = self.folder.sub(name, "disk folder")
        return self._subfolders[name]

    def close_disk_folders(self) -> None:
        """Close the disk folders opened so far (before removing one that was emptied)."""
        for sub in self._subfolders.values():
            sub.close()
        self._subfolders.clear()

    def disk_folder_names(self) -> list[str]:
        """CHAIN_FOLDER and every real sub-folder (a symlinked one is never one)."""
        return [CHAIN_FOLDER, *self.folder.subfolder_names()]

    # -- writing -------------------------------------------------------------------------------

    def save(self, before_replace: Optional[Callable[[], None]] = None) -> None:
        """Commit :attr:`store`; any failure is a TargetError naming the metadata file.

        A chain folder: every disk folder's records, then the folder's
        metadata (the commit point), all through the held descriptors (a
        symlinked disk folder is never written through).  A disk folder no
        chain uses any more (a prune dropped it) loses its records file, so the
        prune can remove the emptied folder.  A disk folder on its own rewrites
        only its own records; an upstream folder's names are its record, so
        nothing is written there.
        """
        name = self.metadata_name
        if name is None:
            return
        where = self.path / name
        try:
            self._write_records(name, before_replace)
        except TargetError as err:
            raise TargetError(f"cannot write chain metadata {where}: {err}") from err
        except OSError as err:
            raise TargetError(f"cannot write chain metadata {where}: {err.strerror}") from err
        self._store_identity = _identity(self.folder.entry(name))

    def _write_records(self, name: str, before_replace: Optional[Callable[[], None]]) -> None:
        store = self.store
        if name == METADATA_NAME:
            for disk in sorted({*store.folders(), *self._folders_with_records()}):
                try:
                    folder = self.disk_folder(disk)
                except ChainError:
                    continue    # missing, or a symlink: never written through
                records = store.for_folder(disk)
                if records.chains:
                    folder.write_atomically(DISK_METADATA_NAME, records.text(DISK_METADATA_NAME))
                else:
                    folder.remove(DISK_METADATA_NAME, "records file")
        self.folder.write_atomically(name, store.text(name), before_replace)

    def _folders_with_records(self) -> list[str]:
        found = []
        for name in self.folder.subfolder_names():
            with contextlib.suppress(ChainError):
                if self.disk_folder(name).entry(DISK_METADATA_NAME) is not None:
                    found.append(name)
        return found

    def record_intent(self, intent: RunIntent) -> None:
        intent.save(self.folder)
        self._intent = intent

    def drop_intent(self) -> None:
        remove_intent(self.folder)
        self._intent = None

    def save_journal(self, folder: str, journal: Journal) -> None:
        journal.save(self.disk_folder(folder))
        self._journals[folder] = journal

    def drop_journal(self, folder: str) -> None:
        Journal.remove(self.disk_folder(folder))
        self._journals[folder] = None

    # -- rules ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[BackupFolder]:
        """Hold the chain lock (through the descriptor); records are current while it is held.

        The metadata read before the lock is read again only when it was
        replaced since (another command committed in between).  The intent
        record and the journals are only ever read under the lock by the
        commands that take it; any read before it is forgotten here, because
        a killed run can leave or drop them without touching the metadata.
        """
        with chain_lock_in(self.folder):
            self._intent = _UNREAD
            self._journals.clear()
            if self._store is not None and self.metadata_name is not None:
                now = _identity(self.folder.entry(self.metadata_name))
                if now != self._store_identity:
                    log.debug("%s changed before the lock was taken: read again", self.path)
                    self._store = None
            yield self

    def refuse_unfinished_restores(self) -> None:
        """A backup must not extend a chain whose files an in-place restore is rewriting."""
        for name in self.disk_folder_names():
            self.refuse_unfinished_restore(name)

    def refuse_unfinished_restore(self, name: str) -> None:
        """A half-done in-place restore in the disk folder NAME: nothing may read or extend it."""
        journal = self.journal(name)
        if journal is not None:
            raise unfinished_error(self.disk_folder(name).path, journal)


def _every_chain_folder(top: Folder) -> list[str]:
    return chain_folder_names(top, warn=False)   # a reader that only looks warns of nothing


def read_chain_stores(target: Path, names: Callable[[Folder], list[str]] = _every_chain_folder
                      ) -> list[tuple[Path, Union[ChainStore, QmpBackupError]]]:
    """The metadata of the chain folders NAMES(top) picks in TARGET (CHAIN_FOLDER: TARGET itself;
    by default every chain folder, :func:`~libqmpbackup.store.layout.chain_folder_names`).

    For readers that only look (``info``, the ``--image`` disk ids,
    ``--metrics-file``): TARGET is opened once and each month folder through
    it, never through a symlink; a folder that cannot be read gives its error
    in place of its metadata, and an unusable TARGET gives nothing.
    """
    try:
        top = Folder.open_root(target)
    except QmpBackupError:
        return []
    found: list[tuple[Path, Union[ChainStore, QmpBackupError]]] = []
    with top:
        for name in names(top):
            try:
                chain_folder = BackupFolder.below(top, name)
            except QmpBackupError as err:
                found.append((target / name, err))
                continue
            try:
                found.append((chain_folder.path, chain_folder.store))
            except QmpBackupError as err:
                found.append((chain_folder.path, err))
            finally:
                if name != CHAIN_FOLDER:    # TOP itself closes with the block
                    chain_folder.close()
    return found
