"""The backup files a restore reads: each opened once, checked on its descriptor, used through it.

A name checked and then opened again by qemu-img can lead elsewhere by
then (a file swapped between the checksum and qemu-img's open, a header's
backing name that only *looks* like the recorded one).  So a restore opens
every file it reads by its recorded name, relative to the disk folder's
descriptor (:mod:`libqmpbackup.store.handles`), checks and hashes that
descriptor, and hands the same descriptors to qemu-img as ``/dev/fd/N``
with the whole chain spelled out (:func:`qemuimg.chain_source`): what was
checked is what is read, and no header chooses a file.

:func:`image_findings` is the one image check, used by ``verify`` and by
every restore's pre-check alike.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from pathlib import Path
from typing import Any, Optional, Sequence

from libqmpbackup.errors import ChainError, QemuImgError, UsageError
from libqmpbackup.keys import Key
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore.rules import image_problems
from libqmpbackup.store import folder_safety, name_rules
from libqmpbackup.store.handles import FileHandle, Folder
from libqmpbackup.store.metadata import BackupRecord

log = logging.getLogger(__name__)


def _allow_open_files() -> None:
    """Every file of a chain stays open from its check to its use: a year of daily INCs on
    several disks needs more descriptors than the usual soft limit of 1024 (the hard limit is
    the admin's)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class ChainFiles:
    """Backup files of one disk folder, open and checked, kept open from the check to their use.

    FOLDER is the disk folder the command's
    :class:`~libqmpbackup.store.backup_folder.BackupFolder` opened: it owns
    the descriptor, :meth:`close` closes only the files.
    WRITABLE: the files are opened for writing too (in-place restores).
    DRY_RUN: commands are shown with the files' names, for the admin to read,
    while every check still reads the descriptors.
    """

    def __init__(self, folder: Folder, *, writable: bool = False, dry_run: bool = False) -> None:
        self.folder = folder
        self.writable = writable
        self.dry_run = dry_run
        self.handles: dict[str, FileHandle] = {}
        self.infos: dict[str, Any] = {}
        # the chain's files are LUKS-encrypted; KEY opens them (None: only what needs no key)
        self.encrypted = False
        self.key: Optional[Key] = None
        self._keyed = contextlib.ExitStack()
        #: files whose checksum the caller checks later (``mount`` hashes while it serves)
        self.deferred: list[tuple[FileHandle, Optional[str]]] = []

    def use_key(self, encrypted: bool, key: Optional[Key]) -> ChainFiles:
        """Say whether the chain is encrypted and with which key qemu-img opens its files."""
        self.encrypted = encrypted
        self.key = key if encrypted else None
        return self

    def keyed(self) -> contextlib.AbstractContextManager[None]:
        """qemu-img calls in the block open these files with the chain's key (if encrypted)."""
        return qemuimg.using_key(self.key)

    @classmethod
    def open(cls, folder: Folder, *, writable: bool = False, dry_run: bool = False) -> ChainFiles:
        """The files of the held disk folder FOLDER (see the class), with room to keep them open."""
        _allow_open_files()
        return cls(folder, writable=writable, dry_run=dry_run)

    @property
    def path(self) -> Path:
        return self.folder.path

    def names(self) -> list[str]:
        return self.folder.names()

    def handle(self, name: str) -> FileHandle:
        """NAME (a recorded file name) opened after the rule, once: later calls return it."""
        if name not in self.handles:
            name_rules.recorded_file(name, "backup file")
            self.handles[name] = self.folder.open_existing(name, write=self.writable)
        return self.handles[name]

    def inspect(self, name: str) -> Any:
        """``qemu-img info`` of NAME alone, checked against the folder rule (cached)."""
        if name not in self.infos:
            self.infos[name] = folder_safety.inspect_image(self.handle(name), self.path)
        return self.infos[name]

    def header_changed(self, name: str) -> None:
        """NAME's header was rewritten on purpose: the next :meth:`inspect` reads it again."""
        self.infos.pop(name, None)

    def layer(self, name: str) -> str:
        """How a qemu-img command line names NAME: its descriptor (its name in a dry run)."""
        return str(self.path / name) if self.dry_run else self.handle(name).dev_path

    def spec(self, names: Sequence[str]) -> str:
        """The chain NAMES (oldest first) as one ``json:`` image: every layer by descriptor.

        Each layer passed the image rule on its descriptor first.
        """
        for name in names:
            self.inspect(name)
        return qemuimg.chain_source([self.layer(name) for name in names])

    @property
    def fds(self) -> list[int]:
        return [handle.fd for handle in self.handles.values()]

    def close(self) -> None:
        self._keyed.close()
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()     # the folder is the BackupFolder's: it stays open

    def __enter__(self) -> ChainFiles:
        self._keyed.enter_context(self.keyed())   # the restore's qemu-img calls use the key
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def image_findings(files: ChainFiles, record: BackupRecord,
                   previous: Optional[BackupRecord]) -> list[str]:
    """Everything wrong with one backup file by itself; empty when it may be read.

    The folder rule (a regular file of the folder, qcow2, no data file, a
    backing name that is a sibling declared qcow2), the metadata's facts
    (size, backing name = PREVIOUS's file) and ``qemu-img check`` of the
    file alone.  ``verify`` reports the findings per file; a restore
    refuses the chain when there are any.
    """
    try:
        handle = files.handle(record.file)
    except ChainError as err:
        return [str(err)]
    info, problems = folder_safety.image_report(handle, files.path)
    if problems:
        return problems
    files.infos[record.file] = info
    problems = image_problems(record, previous, info, files.path)
    if bool(info.get("encrypted")) != files.encrypted:
        # a clear file in an encrypted chain (or the reverse) was put there by someone else
        return [*problems, f"{record.file} is {'not ' if files.encrypted else ''}encrypted, "
                           f"but its chain is {'' if files.encrypted else 'not '}encrypted"]
    if files.encrypted and files.key is None:
        return problems   # qemu-img check needs the key: verify says it did not run
    try:
        result = qemuimg.check(handle.dev_path, fmt="qcow2", without_backing=True,
                               pass_fds=[handle.fd])
    except QemuImgError as err:
        if files.key is not None and "Invalid password" in str(err):
            raise UsageError(f"key file {files.key.source} is not the key of the encrypted "
                             f"chain in {files.path} ({record.file} does not open with it)"
                             ) from err
        return [*problems, f"qemu-img cannot check {record.file} ({err})"]
    if result.damaged:
        problems.append(f"qemu-img check found {result.corruptions} corruption(s) and "
                        f"{result.check_errors} error(s) in {record.file}")
    elif result.leaks:
        log.warning("%s: %d leaked cluster(s) (wasted space, no data lost; "
                    "`qemu-img check -r leaks` reclaims them)", handle.path, result.leaks)
    return problems
