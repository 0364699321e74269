"""rebase, commit and snapshotrebase: restores that change the backup folder itself.

How each stays safe when interrupted (and what re-running does):

* rebase only rewrites backing-file names that differ from the metadata
  (``qemu-img rebase -u``, a header update, no guest data) and then replaces
  the ``image`` symlink atomically.  Every step is idempotent: run it again.
* commit and snapshotrebase first write a journal (:mod:`journal`).  The
  incrementals are copied into the FULL with ``qemu-img commit -d``, which
  leaves them intact, so an interrupted copy is redone from the same data;
  snapshotrebase goes one incremental at a time and records each finished
  one.  Then the metadata is rewritten (the FULL keeps its name, as
  upstream documents, and records the point it holds), the applied
  incrementals deleted (their data is in the FULL
  now, and older points read through the changed FULL would be wrong), the
  next incremental re-based onto the FULL, and the journal removed.  While
  the journal exists every command refuses the folder, except the same
  operation, which finishes the work.  So the folder never offers a point
  whose content silently differs from its backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Optional

from libqmpbackup.errors import ChainError, QmpBackupError, UsageError
from libqmpbackup.qemu import qemuimg
from libqmpbackup.restore import file_steps
from libqmpbackup.restore.folder import BackupDir, open_backup_dir
from libqmpbackup.restore.images import ChainFiles
from libqmpbackup.restore.precheck import chain_key, check_before_restore, note_partial
from libqmpbackup.restore.rules import (
    RestoreOptions,
    RestorePoint,
    last_full,
    matches,
    needs_rebase,
    parent,
    parent_record,
    segment,
)
from libqmpbackup.store.digests import digest_handles
from libqmpbackup.store.journal import Journal, unfinished_error
from libqmpbackup.store.metadata import BackupRecord
from libqmpbackup.store.mounts import refuse_if_mounted
from libqmpbackup.store.names import IMAGE_LINK, parse_backup_name, point_label

log = logging.getLogger(__name__)

BASE_SNAPSHOT = "FULL-BACKUP"
"""Internal snapshot snapshotrebase takes of the FULL before applying anything."""


def _disk_point(backup: BackupDir, command: str,
                opts: RestoreOptions) -> tuple[RestorePoint, ChainFiles]:
    """The point and its chain's files, checked and open for writing (the caller closes them)."""
    backup.require_disk_folder(command)
    point = backup.points(opts.until, opts.uuid)[0]
    files = check_before_restore(point, backup, skip_check=opts.skip_check,
                                 whole_chain=command in ("commit", "snapshotrebase"),
                                 writable=True, dry_run=opts.dry_run, key=opts.key,
                                 verified_within=opts.verified_within)
    return point, files


def _back_by_metadata(backup: BackupDir, point: RestorePoint, files: ChainFiles,
                      dry_run: bool) -> None:
    """Give each file from the point's FULL up to it its parent in the metadata, by relative name.

    After the pre-check this only rewrites equivalent names (absolute, ``./``);
    with --skip-check it also repairs wrong ones, so what is restored follows
    the metadata, never a header that disagrees with it.
    """
    records = point.records
    rewritten = []
    for index in range(last_full(records, point.index) + 1, point.index + 1):
        backing = parent_record(records, index)
        assert backing is not None   # only the FULL has none, and it is not in this range
        if _rebase_if_needed(files, records[index].file, backing.file, dry_run):
            rewritten.append(records[index].file)
    if rewritten and not dry_run:
        _record_new_digests(backup, point, files, rewritten)


def _rebase_if_needed(files: ChainFiles, name: str, backing: str, dry_run: bool) -> bool:
    """True when NAME's header had to be rewritten (its checksum changes with it).

    The header's exact bytes are compared (:func:`folder_safety.inspect_image`):
    a name that only looks like BACKING in qemu-img's output is rewritten.
    """
    if needs_rebase(files.inspect(name), backing):
        qemuimg.rebase_unsafe(files.layer(name), backing, dry_run=dry_run, pass_fds=files.fds)
        files.header_changed(name)
        return True
    log.debug("%s is already backed by %s", name, backing)
    return False


def _record_new_digests(backup: BackupDir, point: RestorePoint, files: ChainFiles,
                        names: list[str]) -> None:
    """Files this command changed on purpose get new checksums, or they would look damaged.

    The records are current: the command holds the chain lock (:func:`_exclusive`).
    """
    chain = backup.store.find(point.chain_id)
    if chain is None or point.disk_id not in chain.disks:
        return
    records = [r for r in chain.disks[point.disk_id].backups if r.file in names]
    for record, digest in zip(records, digest_handles([files.handle(r.file) for r in records])):
        record.digest = digest
    backup.backup_folder.save()


@contextlib.contextmanager
def _exclusive(backup: BackupDir, command: str, dry_run: bool) -> Iterator[None]:
    """In-place restores change files a backup run would extend: never both at once.

    Nor while a ``qmprestore mount`` of the folder reads them (busy, exit 4,
    naming the mount), checked before anything is written.  A dry run
    changes nothing, not even the lock file, so it takes no lock.  The lock
    is taken through the held chain folder, whose records are read again
    only if a command committed since they were read.
    """
    if dry_run:
        yield
        return
    with backup.backup_folder.locked():
        refuse_if_mounted(backup.root, command)
        yield


def rebase(opts: RestoreOptions) -> Path:
    """Make the point's file a usable image through relative backing files; link ``image`` to it."""
    qemuimg.binary()
    with open_backup_dir(opts.dir, opts.name_filter) as backup, \
            _exclusive(backup, "rebase", opts.dry_run):
        return _rebase(backup, opts)


def _rebase(backup: BackupDir, opts: RestoreOptions) -> Path:
    point, files = _disk_point(backup, "rebase", opts)
    with files:
        _back_by_metadata(backup, point, files, opts.dry_run)
        file_steps.link(files.folder, IMAGE_LINK, point.record.file, dry_run=opts.dry_run)
    log.info("%s: %s/%s -> %s (%s)", point.disk_id, point.folder, IMAGE_LINK,
             point.record.file, "dry run" if opts.dry_run else "ready to use")
    return point.path


def commit(opts: RestoreOptions) -> Path:
    """Copy the incrementals up to the point into the FULL, which then holds that point."""
    return _consolidate(opts, "commit", snapshots=False)


def snapshotrebase(opts: RestoreOptions) -> Path:
    """Like commit, keeping every point as an internal snapshot of the FULL."""
    return _consolidate(opts, "snapshotrebase", snapshots=True)


def _ensure_snapshot(files: ChainFiles, name: str, tag: str, dry_run: bool) -> bool:
    """Create snapshot TAG unless it exists (qemu-img would add a duplicate on a re-run).

    True when it was created (or would be, in a dry run).
    """
    image = files.handle(name)
    if tag in qemuimg.snapshot_names(image.dev_path, pass_fds=[image.fd]):
        log.debug("%s already has snapshot %s", name, tag)
        return False
    qemuimg.snapshot_create(files.layer(name), tag, dry_run=dry_run, pass_fds=[image.fd])
    return True


def _consolidate(opts: RestoreOptions, operation: str, *, snapshots: bool) -> Path:
    qemuimg.binary()
    with open_backup_dir(opts.dir, opts.name_filter) as backup, \
            _exclusive(backup, operation, opts.dry_run):
        name = backup.folder_name_of(backup.require_disk_folder(operation))
        journal = backup.backup_folder.journal(name)
        if journal is None:
            point, files = _disk_point(backup, operation, opts)
            name = point.folder_name
        else:
            point, files = None, ChainFiles.open(backup.disk_folder(name), writable=True,
                                                 dry_run=opts.dry_run)
            files.use_key(*chain_key(backup.store, journal.chain, opts.key, files.path))
        with files:
            return _consolidate_locked(_Work(backup, name, files), opts, operation, snapshots,
                                       point)


@dataclasses.dataclass
class _Work:
    """The chain folder, the name of the disk folder worked on, and its open files."""

    backup: BackupDir
    name: str
    files: ChainFiles

    def save_journal(self, journal: Journal, dry_run: bool) -> None:
        if not dry_run:
            self.backup.backup_folder.save_journal(self.name, journal)


def _consolidate_locked(work: _Work, opts: RestoreOptions, operation: str, snapshots: bool,
                        point: Optional[RestorePoint]) -> Path:
    backup, files = work.backup, work.files
    folder = files.path
    journal = backup.backup_folder.journal(work.name)
    if journal is not None:
        if journal.operation != operation:
            raise unfinished_error(folder, journal)
        if opts.until and not matches(journal.point, opts.until):
            raise UsageError(f"--until {opts.until}: the interrupted {operation} in {folder} "
                             f"restores {journal.point}; re-run it without --until")
        note_partial(folder, files.names())
        _check_resumable(journal, work)
        log.warning("%s: finishing the interrupted %s up to %s", folder, operation, journal.point)
    else:
        assert point is not None    # no journal: _consolidate checked the point
        consumed = point.span()
        base = folder / consumed[0].file
        if len(consumed) == 1:
            if (snapshots and _ensure_snapshot(files, base.name, BASE_SNAPSHOT, opts.dry_run)
                    and not opts.dry_run):
                _record_new_digests(backup, point, files, [base.name])
            log.info("%s: %s is a FULL backup: nothing to apply", point.disk_id, point.label)
            file_steps.link(files.folder, IMAGE_LINK, base.name, dry_run=opts.dry_run)
            return base
        # the FULL keeps its name, as upstream qmpbackup documents (`qemu-img
        # snapshot -l DIR/FULL-<time>-…` after snapshotrebase); the metadata
        # records which point it holds
        journal = Journal(operation=operation, chain=point.chain_id, disk=point.disk_id,
                          base=consumed[0].file, result=consumed[0].file,
                          point=point.record.file, point_time=point.record.point_time,
                          steps=[r.file for r in consumed[1:]], snapshots=snapshots)
        _back_by_metadata(backup, point, files, opts.dry_run)
        work.save_journal(journal, opts.dry_run)
    try:
        _apply(journal, work, _applied_chain(backup, journal), opts)
        _finish(journal, work, opts.dry_run)
    except QmpBackupError:
        if not opts.dry_run:
            log.warning("%s stopped before it finished; %s keeps the progress: fix the cause, "
                        "then run `%s` (see docs/restore.md)", operation, folder,
                        journal.rerun_command(folder))
        raise
    log.info("%s: %s %s %s", journal.disk, folder / journal.result,
             "would hold" if opts.dry_run else "now holds", point_label(journal.point))
    return folder / journal.result


def _check_resumable(journal: Journal, work: _Work) -> None:
    """A journal found in the folder must describe this folder's chain before it is acted on.

    Its names are backup file names already (see :meth:`Journal.read`); here
    they must also be the files the metadata lists, in order, and every file
    still present must pass the image rule before qemu-img touches it.
    """
    backup, files, folder = work.backup, work.files, work.files.path
    chain = backup.store.find(journal.chain)
    disk = chain.disks.get(journal.disk) if chain is not None else None
    if disk is None or backup.folder_name_of(journal.disk) != work.name:
        raise _journal_mismatch(folder, f"chain {journal.chain} has no disk {journal.disk!r} here")
    recorded = [r.file for r in disk.backups]
    if journal.base in recorded:       # the metadata is not rewritten yet
        start = recorded.index(journal.base)
        stop = start + len(journal.steps)
        # an older version renamed the FULL to FULL-<point time>-…; now it keeps its name
        renamed = parse_backup_name(journal.result)
        result_ok = journal.result == journal.base or (
            renamed is not None and renamed.level == "full"
            and renamed.timestamp == journal.point_time)
        if (recorded[start + 1:stop + 1] != journal.steps or journal.point != journal.steps[-1]
                or not result_ok or journal.point_time != disk.backups[stop].point_time):
            raise _journal_mismatch(folder, "its steps are not the chain's recorded after "
                                    f"{journal.base}")
    elif journal.result not in recorded:
        raise _journal_mismatch(folder, f"neither {journal.base} nor {journal.result} is in the "
                                "chain metadata")
    entries = files.names()
    for name in (journal.base, journal.result, *journal.steps):
        if name in entries:
            files.inspect(name)


def _journal_mismatch(folder: Path, why: str) -> ChainError:
    return ChainError(f"the restore journal in {folder} does not match the chain metadata "
                      f"({why}): refused; use a fresh copy of the backup")


def _applied_chain(backup: BackupDir, journal: Journal) -> list[str]:
    """The files the journal's point is read from, oldest first: what commit copies into the FULL.

    qemu-img gets this chain spelled out by descriptor; the files' headers
    are never followed (a DIFF among the steps makes the INCs before it
    unnecessary, exactly as when it is read).
    """
    chain = backup.store.find(journal.chain)
    records = chain.disks[journal.disk].backups if chain and journal.disk in chain.disks else []
    names = [r.file for r in records]
    if journal.applied or journal.base not in names or journal.point not in names:
        return [journal.base, *journal.steps]     # nothing left to copy, or in the journal's order
    return [r.file for r in segment(records, names.index(journal.point))]


def _apply(journal: Journal, work: _Work, chain: list[str], opts: RestoreOptions) -> None:
    """Copy the incrementals into the FULL; safe to repeat from the last recorded step."""
    files = work.files
    if journal.applied:
        return
    if not journal.snapshots and not files.encrypted:
        qemuimg.commit(files.spec(chain), base=files.layer(journal.base),
                       rate_limit=opts.rate_limit, dry_run=opts.dry_run, pass_fds=files.fds)
        _advance(journal, work, len(journal.steps), opts.dry_run)
        return
    # an encrypted chain goes one INC at a time too: with encrypt options the layers have
    # json: names, so `commit -b BASE` cannot find the FULL by its /dev/fd name
    if journal.snapshots:
        _ensure_snapshot(files, journal.base, BASE_SNAPSHOT, opts.dry_run)
    for index in range(journal.done, len(journal.steps)):
        step = journal.steps[index]
        # the FULL holds the previous point now, exactly what this INC was
        # written against: it is committed on top of the FULL directly
        # (the chain given explicitly; its header is not rewritten)
        qemuimg.commit(files.spec([journal.base, step]), rate_limit=opts.rate_limit,
                       dry_run=opts.dry_run, pass_fds=files.fds)
        if journal.snapshots:
            _ensure_snapshot(files, journal.base, point_label(step), opts.dry_run)
        _advance(journal, work, index + 1, opts.dry_run)


def _advance(journal: Journal, work: _Work, done: int, dry_run: bool) -> None:
    journal.done = done
    work.save_journal(journal, dry_run)


def _rebase_later_points(records: list[BackupRecord], result: str, files: ChainFiles,
                         dry_run: bool) -> list[str]:
    """Back every later point whose parent is now the consolidated FULL onto it by name; return them.

    That is the INC right after the restored point (it held the changes since
    that point, which the FULL now is) and every later DIFF (it holds every
    change since the old FULL, so it is right on top of any point between).
    """
    names = [r.file for r in records]
    if result not in names:
        return []
    anchor = names.index(result)
    on_top = [records[i].file for i in range(anchor + 1, len(records)) if parent(records, i) == anchor]
    for name in on_top:
        _rebase_if_needed(files, name, result, dry_run)
    return on_top


def _finish(journal: Journal, work: _Work, dry_run: bool) -> None:
    """Turn the folder into a consistent chain again: FULL at the point, later INCs on top."""
    backup, files = work.backup, work.files
    store = backup.store   # current: the command holds the chain lock (or changes nothing)
    chain = store.find(journal.chain)
    if chain is None or journal.disk not in chain.disks:
        raise ChainError(f"chain {journal.chain} of disk {journal.disk} vanished from "
                         f"{store.path}: cannot finish the {journal.operation}")
    records = chain.disks[journal.disk].backups
    consolidated = [_consolidated(r, journal) if r.file == journal.base else r
                    for r in records if r.file not in journal.steps]
    later = _rebase_later_points(consolidated, journal.result, files, dry_run)
    if journal.result != journal.base and files.folder.entry(journal.base) is not None:
        # a journal of an older version, which renamed the FULL for the point
        file_steps.rename(files.folder, journal.base, journal.result, dry_run=dry_run)
    if journal.base in [r.file for r in records]:
        # the FULL now holds the point and the points on top of it may have
        # been re-based: all get new checksums, also when a resumed run finds
        # the rebase already done
        changed = [journal.result, *later]
        digests = dict(zip(changed, [None] * len(changed) if dry_run else
                           digest_handles([files.handle(name) for name in changed])))
        chain.disks[journal.disk].backups = [
            dataclasses.replace(r, digest=digests.get(r.file, r.digest)) for r in consolidated]
        file_steps.note(f"update {store.path}: {journal.result} holds {point_label(journal.point)}, "
                        f"{len(journal.steps)} incremental(s) dropped", dry_run=dry_run)
        if not dry_run:
            backup.backup_folder.save()
    for step in journal.steps:
        file_steps.remove(files.folder, step, dry_run=dry_run)
    file_steps.link(files.folder, IMAGE_LINK, journal.result, dry_run=dry_run)
    if not dry_run:
        backup.backup_folder.drop_journal(work.name)


def _consolidated(record: BackupRecord, journal: Journal) -> BackupRecord:
    """The FULL's record once it holds the journal's point: same name and time, ``holds`` set."""
    parsed = parse_backup_name(journal.result)
    named = parsed.timestamp if parsed else record.time
    return dataclasses.replace(record, file=journal.result, time=named,
                               holds=None if journal.point_time == named else journal.point_time)
