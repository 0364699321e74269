"""merge: write a restore point as a new standalone image, leaving the backup untouched.

``qemu-img convert`` reads the point through the backup files the pre-check
opened (read-only descriptors, the chain spelled out), so not a byte (nor a
timestamp) of the backup folder changes.  The image is written into a new,
unique, 0600 ``.<target>.XXXXXX.partial`` created relative to the output
folder's descriptor and renamed when complete: an existing file is never
overwritten nor written through, and an interrupted merge leaves nothing
that looks like a finished restore.

The sources' content digests are checked *while* qemu-img copies them
(:class:`BackgroundCheck`, through the same descriptors; the page cache
makes the second read cheap), not before: a restore then takes about as
long as the copy.  Nothing is renamed to its final name before every
source of every image verified; a mismatch removes all partial output and
exits 11, as the pre-check did when it hashed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from libqmpbackup.errors import QmpBackupError, TargetError, UsageError
from libqmpbackup.json_output import Document
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore import file_steps
from libqmpbackup.restore.folder import open_backup_dir
from libqmpbackup.restore.images import ChainFiles
from libqmpbackup.restore.precheck import check_before_restore, refuse_damaged, remember_verified
from libqmpbackup.restore.rules import RestoreOptions, RestorePoint
from libqmpbackup.store.digests import BackgroundCheck
from libqmpbackup.store.fsutil import make_private_dirs
from libqmpbackup.store.handles import FileHandle, Folder
from libqmpbackup.store.names import PARTIAL_SUFFIX, safe_component

log = logging.getLogger(__name__)

FORMATS = ("qcow2", "raw", "source")
"""``source``: the format the disk had in the VM (raw for pflash and raw disks)."""


@dataclass
class MergeTarget:
    file: Optional[Path] = None         # --targetfile: one disk folder into one image
    directory: Optional[Path] = None    # --targetdir: one image per disk, named by disk id
    fmt: str = "qcow2"


@dataclass
class RestoredImage:
    """One image merge wrote (or, in a dry run, would write)."""

    point: RestorePoint
    path: Path
    fmt: str

    def document(self) -> Document:
        return {"disk": self.point.disk_id, "chain": self.point.chain_id,
                "point": self.point.label, "level": self.point.record.level,
                "time": self.point.record.time, "source": str(self.point.path),
                "image": str(self.path), "format": self.fmt}


def merge_document(images: list[RestoredImage], dry_run: bool) -> Document:
    """The ``merge --json`` document (keys in docs/json.md)."""
    return {"command": "merge", "dry_run": dry_run, "images": [i.document() for i in images]}


def output_format(point: RestorePoint, fmt: str) -> str:
    if fmt != "source":
        return fmt
    source = point.record.source_format
    if source in ("qcow2", "raw"):
        return source
    log.warning("%s: source format %s cannot be written by merge; writing qcow2",
                point.disk_id, source)
    return "qcow2"


def _targets(points: list[RestorePoint], target: MergeTarget) -> list[RestoredImage]:
    plan = []
    for point in points:
        fmt = output_format(point, target.fmt)
        if target.file is not None:
            path = Path(os.path.abspath(target.file))
        else:
            assert target.directory is not None
            path = Path(os.path.abspath(target.directory)) / f"{safe_component(point.disk_id)}.{fmt}"
        if path.exists() or path.is_symlink():
            raise TargetError(f"{path} already exists: merge never overwrites, "
                              "remove it or choose another target")
        plan.append(RestoredImage(point=point, path=path, fmt=fmt))
    return plan


def _prepare_directory(target: MergeTarget, dry_run: bool) -> list[Path]:
    """Create the folder the images go into, and missing parents, 0700; return those created.

    Restores go to fresh places (``/tmp/restore/disk1.qcow2``); refusing a
    missing folder only made the admin type a mkdir with the wrong mode.
    """
    if target.file is not None:
        folder, option = Path(os.path.abspath(target.file)).parent, "--targetfile"
    else:
        assert target.directory is not None
        folder, option = Path(os.path.abspath(target.directory)), "--targetdir"
    if folder.is_dir():
        return []
    if folder.exists() or folder.is_symlink():
        raise TargetError(f"{folder} for {option} exists and is not a directory")
    file_steps.note(f"create folder {folder} (mode 0700)", dry_run=dry_run)
    if dry_run:
        return []
    try:
        return make_private_dirs(folder)
    except OSError as err:
        raise TargetError(f"cannot create {folder} for {option}: {err.strerror}") from err


def merge(opts: RestoreOptions, target: MergeTarget) -> list[RestoredImage]:
    """Restore the chosen point of one disk (--targetfile) or of every disk (--targetdir)."""
    if (target.file is None) == (target.directory is None):
        raise UsageError("merge needs exactly one of --targetfile and --targetdir")
    qemuimg.binary()
    with contextlib.ExitStack() as opened:
        backup = opened.enter_context(open_backup_dir(opts.dir, opts.name_filter))
        if not backup.single_disk() and target.file is not None:
            raise UsageError(f"{backup.root} is a whole backup: restore it with --targetdir OUT "
                             f"(one image per disk), or one disk with --dir {backup.root}/DISK "
                             f"--targetfile FILE (disks: {backup.disk_names()})")
        points = backup.points(opts.until, opts.uuid)
        checked = [opened.enter_context(check_before_restore(
            point, backup, skip_check=opts.skip_check, dry_run=opts.dry_run, key=opts.key,
            verified_within=opts.verified_within, defer_digests=not opts.dry_run))
            for point in points]
        plan = _targets(points, target)
        created = _prepare_directory(target, opts.dry_run)
        copies: list[tuple[Folder, FileHandle, str]] = []
        try:
            for image, files in zip(plan, checked):
                copy = _convert(image, files, opts)
                if copy is not None:
                    copies.append(copy)
            for out, partial, name in copies:   # every source verified: publish them all
                _publish(out, partial, name)
        except BaseException:
            for out, partial, _ in copies:
                _remove_partial(out, partial)
            for folder in reversed(created):   # a failed first restore leaves no empty folders
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        finally:
            for out, partial, _ in copies:
                partial.close()
                out.close()
    return plan


def _convert(image: RestoredImage, files: ChainFiles,
             opts: RestoreOptions) -> Optional[tuple[Folder, FileHandle, str]]:
    """Read the point through the descriptors that were checked; write through a new file's.

    Returns the output folder, the finished and verified partial file, and
    the name it is to get (None in a dry run); on any failure the partial
    file is removed first.

    The chain is always spelled out (:meth:`ChainFiles.spec`): no header's
    backing name is followed.  The output is created ``O_EXCL|O_NOFOLLOW``
    relative to the output folder's descriptor and qemu-img writes into
    ``/dev/fd/N``, so a symlink swapped in at the new name (the folder may
    belong to another user) leads nowhere; the rename checks it is still the
    file written.
    """
    point, path = image.point, image.path
    log.info("%s: restoring %s (%s) into %s", point.disk_id, point.label,
             point.record.file, path)
    source = files.spec([r.file for r in point.segment()])
    encrypt = _encrypt_output(image, files, opts)
    if opts.dry_run:
        qemuimg.convert(source, path.with_name(f".{path.name}.XXXXXX{PARTIAL_SUFFIX}"),
                        out_format=image.fmt, rate_limit=opts.rate_limit, dry_run=True,
                        encrypt=encrypt)
        file_steps.note(f"rename it to {path}", dry_run=True)
        return None
    out = Folder.open_root(path.parent)
    try:
        partial = out.create(f".{path.name}.{secrets.token_hex(8)}{PARTIAL_SUFFIX}",
                             "restored image")
    except BaseException:
        out.close()
        raise
    try:
        check = None if opts.skip_check else BackgroundCheck(files.deferred)
        _copy_verified(source, partial, image.fmt, files, opts, check, encrypt=encrypt)
        os.fsync(partial.fd)
    except BaseException:  # also Interrupted: no half image may stay behind
        _remove_partial(out, partial)
        partial.close()
        out.close()
        raise
    return out, partial, path.name


def _copy_verified(source: str, partial: FileHandle, fmt: str, files: ChainFiles,
                   opts: RestoreOptions, check: Optional[BackgroundCheck], *,
                   encrypt: bool = False) -> None:
    """``qemu-img convert`` into PARTIAL while CHECK hashes the sources; BackupDamaged on damage.

    ENCRYPT (--encrypt-output): PARTIAL is a LUKS qcow2 with the chain's key.

    A copy that failed is explained by the damage when there is some (a
    flipped bit can make qemu-img fail too); an interrupted one stops the
    hashing at once.
    """
    try:
        try:
            qemuimg.convert(source, partial.dev_path, out_format=fmt,
                            rate_limit=opts.rate_limit, pass_fds=[*files.fds, partial.fd],
                            encrypt=encrypt)
        except QmpBackupError:
            if check is not None:
                refuse_damaged(check.result())
            raise
        if check is None:
            return
        started = time.monotonic()
        checks = check.result()
        refuse_damaged(checks)
        remember_verified(files.deferred, checks)
    except BaseException:
        if check is not None:
            check.cancel()     # at once when interrupted; nothing left to stop otherwise
        raise
    log.debug("sources verified %.2f s after the copy ended", time.monotonic() - started)


def _encrypt_output(image: RestoredImage, files: ChainFiles, opts: RestoreOptions) -> bool:
    """--encrypt-output: the restored image is a LUKS qcow2 with the chain's own key."""
    if not opts.encrypt_output:
        return False
    if not files.encrypted:
        raise UsageError(f"--encrypt-output: chain {image.point.chain_id} is not encrypted "
                         "(it keeps an encrypted chain's image encrypted with its key)")
    if image.fmt != "qcow2":
        raise UsageError(f"--encrypt-output writes qcow2, not {image.fmt}")
    return True


def _remove_partial(out: Folder, partial: FileHandle) -> None:
    """Remove the unfinished output, if its name still leads to it (never what was swapped in)."""
    with contextlib.suppress(QmpBackupError):
        info = out.entry(partial.name)
        if info is not None and partial.same_file(info):
            out.remove(partial.name)


def _publish(out: Folder, partial: FileHandle, name: str) -> None:
    """Give the finished image its name; an existing target is never replaced."""
    if out.entry(name) is not None:
        raise TargetError(f"{out.path / name} appeared while restoring: merge never overwrites")
    out.rename(partial.name, name, expect=partial)
