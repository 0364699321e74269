"""merge: write a restore point as a new standalone image, leaving the backup untouched.

``qemu-img convert`` opens the backup files read-only and reads the point
through its backing chain, so not a byte (nor a timestamp) of the backup
folder changes.  The image is written into a new, unique, 0600
``.<target>.XXXXXX.partial`` and renamed when complete: an existing file is
never overwritten nor written through, and an interrupted merge leaves
nothing that looks like a finished restore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from libqmpbackup.errors import TargetError, UsageError
from libqmpbackup.json_output import Document
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore import file_steps
from libqmpbackup.restore.folder import check_before_restore, open_backup_dir
from libqmpbackup.restore.rules import RestoreOptions, RestorePoint
from libqmpbackup.store.fsutil import fsync_dir, make_private_dirs
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
    backup = open_backup_dir(opts.dir, opts.name_filter)
    if not backup.single_disk() and target.file is not None:
        raise UsageError(f"{backup.root} is a whole backup: restore it with --targetdir OUT "
                         f"(one image per disk), or one disk with --dir {backup.root}/DISK "
                         f"--targetfile FILE (disks: {backup.disk_names()})")
    points = backup.points(opts.until, opts.uuid)
    for point in points:
        check_before_restore(point, backup.store, skip_check=opts.skip_check)
    plan = _targets(points, target)
    created = _prepare_directory(target, opts.dry_run)
    try:
        for image in plan:
            _convert(image.point, image.path, image.fmt, opts)
    except BaseException:
        for folder in reversed(created):   # a failed first restore leaves no empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return plan


def _source(point: RestorePoint) -> Union[Path, str]:
    """The point's file, or its chain spelled out when a header names no backing file."""
    segment = point.segment()
    if all(r.backed for r in segment):
        return point.path
    return qemuimg.chain_source([point.folder / r.file for r in segment])


def _convert(point: RestorePoint, path: Path, fmt: str, opts: RestoreOptions) -> None:
    log.info("%s: restoring %s (%s) into %s", point.disk_id, point.label,
             point.record.file, path)
    if opts.dry_run:
        qemuimg.convert(_source(point), path.with_name(f".{path.name}.XXXXXX{PARTIAL_SUFFIX}"),
                        out_format=fmt, rate_limit=opts.rate_limit, dry_run=True)
        file_steps.note(f"rename it to {path}", dry_run=True)
        return
    partial = _new_partial(path)
    try:
        qemuimg.convert(_source(point), partial, out_format=fmt, rate_limit=opts.rate_limit)
        _publish(partial, path)
    except BaseException:  # also Interrupted: no half image may stay behind
        partial.unlink(missing_ok=True)
        raise


def _new_partial(path: Path) -> Path:
    """A new, unique, 0600 file next to PATH for qemu-img to write into.

    Never an existing name: a ``<target>.partial`` left behind (or planted as
    a symlink) is not reused, and the image is private from the first byte.
    """
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                    suffix=PARTIAL_SUFFIX)
    except OSError as err:
        raise TargetError(f"cannot create a file next to {path}: {err.strerror}") from err
    os.close(fd)
    return Path(name)


def _publish(partial: Path, path: Path) -> None:
    """Give the finished image its name; an existing target is never replaced."""
    if os.path.lexists(path):
        raise TargetError(f"{path} appeared while restoring: merge never overwrites")
    try:
        os.rename(partial, path)
    except OSError as err:
        raise TargetError(f"cannot rename {partial} to {path}: {err.strerror}") from err
    fsync_dir(path.parent)
