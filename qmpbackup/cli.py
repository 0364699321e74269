"""Command line of ``qmpbackup``: argparse and dispatch into libqmpbackup."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import AsyncContextManager, Awaitable, Optional, Sequence, Union

from libqmpbackup import keys
from libqmpbackup.backup import fleecing, offload
from libqmpbackup.backup.bitmap_removal import remove_bitmaps, remove_chain_bitmaps
from libqmpbackup.backup.image_disks import (
    chain_disks_without_image,
    chain_stores,
    daemon_images,
)
from libqmpbackup.backup.plan import BackupOptions
from libqmpbackup.backup.quiesce import check_quiesce_options
from libqmpbackup.backup.run import run_backup
from libqmpbackup.backup.session import image_session, locked_session
from libqmpbackup.backup.vm_info import (
    agent_report,
    bitmaps_document,
    bitmaps_table,
    blockdev_document,
    blockdev_table,
    warn_orphan_bitmaps,
)
from libqmpbackup.errors import UsageError
from libqmpbackup.json_output import JsonResult
from libqmpbackup.metrics import DiskOutcome, RunMetrics, track
from libqmpbackup.qemu.devices import discover
from libqmpbackup.qemu.qmp import QmpSession
from libqmpbackup.runner import (
    Command,
    CommandResult,
    run,
)
from libqmpbackup.store.names import validate_uuid
from libqmpbackup.store.prune import PruneOptions, PruneResult, prune
from libqmpbackup.store.prune_report import prune_document, prune_table
from qmpbackup.parser import build_parser

log = logging.getLogger("qmpbackup")

def _refuse_offline(args: argparse.Namespace, *options: str) -> None:
    """Options that act on a guest make no sense for images of a VM that is shut down."""
    if args.image:
        for option in options:
            if getattr(args, option.lstrip("-").replace("-", "_"), None):
                raise UsageError(f"{option} needs a running VM (--socket): an offline backup "
                                 "(--image) has no guest")



def _fleecing_options(args: argparse.Namespace) -> Optional[fleecing.FleecingOptions]:
    if not args.fleecing:
        for given, option in ((args.fleecing_dir, "--fleecing-dir"),
                              (args.cbw_timeout, "--cbw-timeout")):
            if given is not None:
                raise UsageError(f"{option} only applies with --fleecing")
        return None
    return fleecing.check_options(
        args.fleecing_dir if args.fleecing_dir is not None else fleecing.DEFAULT_DIR,
        args.cbw_timeout if args.cbw_timeout is not None else fleecing.DEFAULT_CBW_TIMEOUT,
        args.target)


def _session(args: argparse.Namespace,
             backup: Optional[BackupOptions] = None) -> AsyncContextManager[QmpSession]:
    """The VM's QMP socket, or a private qemu-storage-daemon on the --image files.

    A backup's target metadata may know the images' disk ids (see image_disks).
    """
    if args.image:
        stores = chain_stores(backup.target, backup.monthly) if backup else []
        images = daemon_images(args.image, stores)
        left_out = chain_disks_without_image(images, stores)
        if backup and left_out and not (backup.include or backup.exclude):
            log.warning("the chain also has disk(s) %s, which no --image names: this backup "
                        "leaves them out (a whole-VM restore of this point lacks them); give "
                        "--image for each (or --include the disks meant)", ", ".join(left_out))
        return image_session(images)
    if not args.socket:
        raise UsageError(f"{args.command} needs --socket PATH (the VM's QMP socket), or "
                         "--image [ID=]PATH (its images, when it is shut down)")
    return locked_session(args.socket)


async def backup_command(args: argparse.Namespace) -> CommandResult:
    metrics = track(args, "backup")
    # Checked here, before planning creates folders or retires bitmaps.
    _refuse_offline(args, "--quiesce", "--quiesce-required", "--pause", "--fleecing")
    check_quiesce_options(args.agent_socket, args.quiesce_required)
    offload.check_options(args.copy_offload, args.compress)
    if args.uuid and args.level == "copy":
        raise UsageError("--uuid names a chain, and --level copy makes none: drop one of them")
    fleecing_options = _fleecing_options(args)
    opts = BackupOptions(
        level=args.level, target=args.target,
        uuid=validate_uuid(args.uuid) if args.uuid else None,
        monthly=args.monthly, include=args.include, exclude=args.exclude,
        include_raw=args.include_raw, compress=args.compress,
        speed_limit=args.speed_limit, progress=not args.no_progress,
        quiesce=args.quiesce or args.quiesce_required, quiesce_required=args.quiesce_required,
        agent_socket=args.agent_socket, pause=args.pause,
        progress_interval=args.progress_interval,
        target_cache_direct=args.blockdev_disable_cache, target_aio=args.blockdev_aio,
        no_subdir=args.no_subdir, no_timestamp=args.no_timestamp, no_symlink=args.no_symlink,
        fleecing=fleecing_options, copy_offload=args.copy_offload,
        checksum=not args.no_checksum,
        key=(keys.Key.load(args.encrypt_key_file, keys.check_iter_time(args.encrypt_iter_time))
             if args.encrypt_key_file else None))
    if args.remove_delay is not None:
        log.warning("--remove-delay is not needed and is ignored: qmpbackup closes a backup "
                    "file only after QEMU has ended the job that wrote it")
    async with _session(args, opts) as session:
        result = await run_backup(session, opts)
    if metrics is not None:
        metrics.disks = [DiskOutcome(f.disk_id, f.level, f.bytes_written) for f in result.files]
    log.info("%s backup done: %s in %s%s", result.level, result.per_disk(), result.root,
             f" (chain {result.chain_id})" if result.chain_id else "")
    return JsonResult(result.document()) if args.json else 0


async def info_command(args: argparse.Namespace) -> CommandResult:
    if args.show == "agent":
        if not args.agent_socket:
            raise UsageError("info --show agent needs --agent-socket")
        report = await agent_report(args.agent_socket)
        if args.json:
            return JsonResult(report.document())
        print(report.text())
        return 0
    async with _session(args) as session:
        disks = await discover(session)
    if args.target:
        warn_orphan_bitmaps(disks, args.target)
    if args.json:
        return JsonResult(blockdev_document(disks) if args.show == "blockdev"
                          else bitmaps_document(disks))
    print(blockdev_table(disks) if args.show == "blockdev" else bitmaps_table(disks))
    return 0


async def cleanup_command(args: argparse.Namespace) -> int:
    chain_id = validate_uuid(args.uuid) if args.uuid else None
    async with _session(args) as session:
        removed = await remove_bitmaps(session, chain_id)
    for name in removed:
        print(f"removed {name}")
    return 0


def _prune_output(result: PruneResult, args: argparse.Namespace,
                  metrics: Optional[RunMetrics]) -> CommandResult:
    if metrics is not None:
        metrics.chains = (len(result.plan.kept), len(result.plan.removed))
    if args.json:
        return JsonResult(prune_document(result))
    print(prune_table(result))
    return 0


def _prune_options(args: argparse.Namespace) -> PruneOptions:
    return PruneOptions(target=args.target, keep=args.keep, dry_run=args.dry_run)


async def _prune_with_bitmaps(args: argparse.Namespace,
                              metrics: Optional[RunMetrics]) -> CommandResult:
    async with _session(args) as session:
        result = prune(_prune_options(args))
        result.bitmaps = await remove_chain_bitmaps(
            session, result.plan.removed_chain_ids(), result.plan.kept_bitmaps(),
            dry_run=args.dry_run)
    return _prune_output(result, args, metrics)


def prune_command(args: argparse.Namespace) -> Union[CommandResult, Awaitable[CommandResult]]:
    """Without --socket/--image the folder alone decides, and no VM (nor event loop) is involved."""
    metrics = None if args.dry_run else track(args, "prune")
    if args.socket or args.image:
        return _prune_with_bitmaps(args, metrics)
    result = prune(_prune_options(args))
    if result.plan.removed:
        log.info("the VM may still hold the removed chains' bitmaps: prune with --socket, or "
                 "qmpbackup cleanup --remove-bitmaps --uuid ID")
    return _prune_output(result, args, metrics)


def genkey_command(args: argparse.Namespace) -> int:
    keys.generate(args.file)
    log.info("wrote a new random key to %s: keep a copy apart from the backups, "
             "without it they cannot be restored", args.file)
    return 0


COMMANDS: dict[str, Command] = {
    "genkey": genkey_command,
    "backup": backup_command,
    "info": info_command,
    "cleanup": cleanup_command,
    "prune": prune_command,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; callable in-process as ``main([...])`` and returning the exit code."""
    return run(build_parser(), _command, argv, "qmpbackup")


def _command(args: argparse.Namespace) -> Command:
    _refuse_offline(args, "--agent-socket")
    return COMMANDS[args.command]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
