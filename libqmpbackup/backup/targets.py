"""The backup files of one run, held as descriptors from their creation to their final name.

A target folder may be writable by another user (a shared backup share, a
user's own folder root backs up into).  Checking a name and then letting
qemu-img or QEMU open that name again would let that user swap the new
``.partial`` for a symlink to a host file (root truncates it) or for a file
they can read (root writes the guest's disk into it).  So each target is

1. created ``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600, relative to its disk folder's
   descriptor (:meth:`Folder.create`), the disk folder opened without
   following symlinks relative to the chain folder's descriptor;
2. formatted by ``qemu-img create`` on ``/dev/fd/N``;
3. handed to QEMU by descriptor: ``add-fd`` puts it in an fdset and
   ``blockdev-add`` opens ``/dev/fdset/N``; the fdset goes when the node does.
   The private qemu-storage-daemon of an ``--image`` run has no ``add-fd``;
   it runs as this user and opens ``/proc/<our pid>/fd/N``, the same inode;
4. renamed ``.partial`` -> final only while that name still is the inode
   created (:meth:`Folder.rename` with ``expect``): a swapped name is never
   published, and a swap can redirect neither qemu-img's nor QEMU's writes;
5. on failure removed only where a name still is that inode.

When the run is recorded the renames are announced first in the intent record
(:mod:`libqmpbackup.store.intent`), so a kill between rename and metadata commit
leaves files the next run knows to remove and restores know to ignore.

QMP over ``tcp:`` cannot carry descriptors (SCM_RIGHTS needs a unix socket):
QEMU then opens the ``.partial`` by name.  That is allowed only where nobody
but root and this user can change a name on the way (:func:`require_private`):
the chain folder and its disk folders (checked on their descriptors) and every
folder above them; else the run is refused (exit 5) before any backup file is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from libqmpbackup.backup.jobs import BackupJob, TargetIO, add_target_node, remove_node
from libqmpbackup.backup.run_steps import reached
from libqmpbackup.errors import ChainError, QmpBackupError, TargetError
from libqmpbackup.qemu import qemuimg
from libqmpbackup.qemu.qmp import QmpSession
from libqmpbackup.store.backup_folder import BackupFolder
from libqmpbackup.store.digests import digest_handles
from libqmpbackup.store.fsutil import TEMP_SUFFIX
from libqmpbackup.store.handles import FileHandle, Folder, trusted_owner
from libqmpbackup.store.intent import RunIntent
from libqmpbackup.store.name_rules import ChainFile
from libqmpbackup.store.names import CHAIN_FOLDER
from libqmpbackup.store.verified import remember_written

log = logging.getLogger(__name__)

FDSET_PATH = "/dev/fdset/{}"


@dataclass
class Target:
    """One backup file: where it is and the descriptor that was created there."""

    job: BackupJob
    folder: Folder          # its disk folder (the chain folder itself with --no-subdir)
    handle: FileHandle      # the .partial as created: all that qemu-img and QEMU write
    folder_name: str = CHAIN_FOLDER   # its disk folder's name in the chain folder

    @property
    def final(self) -> ChainFile:
        """The file the run makes final, as the intent record names it."""
        return ChainFile(self.folder_name, self.job.final_path.name)

    def is_at(self, name: str) -> bool:
        """NAME in the folder is still the file this run created."""
        info = self.folder.entry(name)
        return info is not None and self.handle.same_file(info)


def require_private(path: Path, info: os.stat_result, *, sticky_ok: bool = False) -> None:
    """Refuse a folder another user could change names in: QEMU is about to get a name there."""
    writable = info.st_mode & 0o022 and not (sticky_ok and info.st_mode & stat.S_ISVTX)
    if trusted_owner(info) and not writable:
        return
    why = (f"owned by uid {info.st_uid}" if not trusted_owner(info)
           else "writable by group or others")
    raise TargetError(f"{path} is {why}: with QMP over tcp: QEMU opens the backup files by "
                      "name, so the target and every folder above it must be changeable only "
                      "by root or this user (or use a unix QMP socket, which passes descriptors)")


@dataclass
class TargetFiles:
    """The backup files of one run: created as .partial, renamed when complete, else deleted."""

    jobs: list[BackupJob]
    chain_folder: BackupFolder  # the run's chain folder (--target or its month), held open
    recorded: bool = True       # False: nothing is recorded, so no intent record
    names_for_qemu: bool = False   # tcp: QMP, QEMU opens names (see the module docstring)
    targets: list[Target] = field(default_factory=list)
    created_folders: list[str] = field(default_factory=list)
    checked_folders: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.names_for_qemu:
            top = self.chain_folder.folder
            require_private(self.root, os.fstat(top.fd))
            for above in Path(os.path.realpath(self.root)).parents:
                require_private(above, os.stat(above), sticky_ok=True)

    @property
    def root(self) -> Path:
        return self.chain_folder.path

    def close(self) -> None:
        for target in self.targets:
            target.handle.close()

    def __enter__(self) -> TargetFiles:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _disk_folder(self, name: str) -> Folder:
        """The disk folder NAME, created 0700 when missing; never a symlink to elsewhere."""
        if name == CHAIN_FOLDER or name in self.checked_folders:
            return self.chain_folder.disk_folder(name)
        top = self.chain_folder.folder
        if top.entry(name) is None:
            try:
                os.mkdir(name, 0o700, dir_fd=top.fd)
            except OSError as err:
                raise TargetError(f"cannot create folder {self.root / name}: "
                                  f"{err.strerror}") from err
            self.created_folders.append(name)
        folder = self.chain_folder.disk_folder(name)
        self.checked_folders.add(name)
        if self.names_for_qemu:
            require_private(folder.path, os.fstat(folder.fd))
        return folder

    def create(self, job: BackupJob) -> Target:
        parent = job.partial_path.parent
        name = CHAIN_FOLDER if parent == self.root else parent.name
        folder = self._disk_folder(name)
        # 0600 from the first byte: the file will hold a whole disk
        target = Target(job, folder, folder.create(job.partial_path.name, "backup file"), name)
        self.targets.append(target)
        qemuimg.create_fd(target.handle.fd, job.disk.virtual_size, backing=job.backing)
        return target

    def require_unchanged(self) -> None:
        """Every .partial name still is the file this run created and QEMU wrote."""
        for target in self.targets:
            if not target.is_at(target.job.partial_path.name):
                raise ChainError(f"{target.job.partial_path} was replaced while the tool wrote "
                                 "it: refused (someone else can write the target folder)")

    async def compute_digests(self) -> None:
        """Hash every file now, while QEMU's writes are still in the page cache.

        Through the inodes QEMU wrote: whatever the names in the folder have
        become meanwhile, the checksum is of the file that gets recorded.  Each
        is reopened first: QEMU shares the open file description it got by
        add-fd and may have set O_DIRECT on it (``--target-cache direct``),
        which unaligned reads would fail with EINVAL.
        """
        started, cpu = time.monotonic(), time.process_time()
        with contextlib.ExitStack() as opened:
            handles = [opened.enter_context(t.handle.reopen()) for t in self.targets]
            digests = await asyncio.to_thread(digest_handles, handles)
        for target, digest in zip(self.targets, digests):
            target.job.digest = digest
        log.info("checksums of %d file(s) in %.3f s (%.3f CPU s)", len(digests),
                 time.monotonic() - started, time.process_time() - cpu)

    def finish(self) -> None:
        self.require_unchanged()
        if self.recorded:
            self.chain_folder.record_intent(RunIntent(time=int(time.time()),
                                                      files=[t.final for t in self.targets]))
            reached("intent-written")
        for target in self.targets:
            job = target.job
            target.folder.rename(job.partial_path.name, job.final_path.name, expect=target.handle)
            log.info("%s: %s backup %s", job.disk.disk_id, job.level, job.final_path)
        remember_written([(t.handle.fd, t.job.digest) for t in self.targets])

    def link(self) -> None:
        """The FULL-<image> symlinks of --no-timestamp: for people, so a failure only warns."""
        for target in self.targets:
            link, folder = target.job.link, target.folder
            if link is None:
                continue
            info = folder.entry(link)
            if info is not None and not stat.S_ISLNK(info.st_mode):
                log.warning("%s exists and is not a symlink: not linking it to %s",
                            folder.path / link, target.job.final_path.name)
                continue
            temporary = f".{link}{TEMP_SUFFIX}"
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=folder.fd)
                os.symlink(target.job.final_path.name, temporary, dir_fd=folder.fd)
                os.rename(temporary, link, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
                folder.fsync()
            except OSError as err:
                log.warning("cannot create symlink %s: %s", folder.path / link, err.strerror)

    def discard(self) -> None:
        """Nothing of a failed run may look like a finished backup; nobody else's file goes."""
        for target in self.targets:
            for name in (target.job.partial_path.name, target.job.final_path.name):
                with contextlib.suppress(QmpBackupError):
                    if target.is_at(name) and target.folder.remove(name):
                        log.info("removed unfinished %s", target.folder.path / name)
        if self.recorded:
            # the renamed files must be gone for good before the record that names them
            for folder in {id(t.folder): t.folder for t in self.targets}.values():
                with contextlib.suppress(OSError):
                    folder.fsync()     # once per folder (disks may share the chain folder)
            self.chain_folder.drop_intent()
        for name in self.created_folders:
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=self.chain_folder.folder.fd)


@dataclass
class TargetNodes:
    """The target images as QEMU block nodes, each opened from its descriptor's fdset."""

    session: QmpSession
    secret: Optional[str] = None    # the key's secret object: the targets are encrypted
    names: list[str] = field(default_factory=list)
    fdsets: list[int] = field(default_factory=list)

    async def open(self, target: Target, io: TargetIO) -> None:
        job = target.job
        if not self.session.has_guest:
            # our own qemu-storage-daemon (same user, no add-fd in its QMP): it reopens
            # this process's descriptor through procfs, the same inode, no folder name
            filename = f"/proc/{os.getpid()}/fd/{target.handle.fd}"
        elif self.session.passes_fds:
            # the node's name (qmpbackup-…) as opaque: the next run removes a killed run's fdset
            fdset = await self.session.add_fd(target.handle.fd, job.target_node)
            self.fdsets.append(fdset)
            filename = FDSET_PATH.format(fdset)
        else:
            filename = str(job.partial_path)   # tcp: allowed in private folders only
        await add_target_node(self.session, job, filename, io, self.secret)
        self.names.append(job.target_node)

    async def close(self) -> list[str]:
        """Close every target (QEMU flushes an image as it closes it); return those left open."""
        left_open = []
        while self.names:
            name = self.names.pop()
            if not await remove_node(self.session, name):
                left_open.append(name)
        while self.fdsets:
            await self.session.remove_fdset(self.fdsets.pop())
        return left_open

