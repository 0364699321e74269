"""Command line of ``qmpbackup``: argparse and dispatch into libqmpbackup."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import AsyncContextManager, Awaitable, Optional, Sequence, Union

from libqmpbackup import __version__, keys
from libqmpbackup.backup import fleecing, offload
from libqmpbackup.backup.bitmap_removal import remove_bitmaps, remove_chain_bitmaps
from libqmpbackup.backup.image_disks import (
    ImageSpec,
    chain_disks_without_image,
    chain_stores,
    daemon_images,
    parse_image_spec,
)
from libqmpbackup.backup.jobs import AIO_MODES
from libqmpbackup.backup.plan import LEVELS, BackupOptions, level_help
from libqmpbackup.backup.progress import LOG_INTERVAL
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
from libqmpbackup.json_output import JsonResult, add_json_option
from libqmpbackup.metrics import DiskOutcome, RunMetrics, add_metrics_option, track
from libqmpbackup.qemu.devices import discover
from libqmpbackup.qemu.qmp import QmpSession
from libqmpbackup.runner import (
    ArgumentParser,
    Command,
    CommandResult,
    add_logging_options,
    byte_rate,
    positive_seconds,
    run,
)
from libqmpbackup.store.names import validate_uuid
from libqmpbackup.store.prune import PruneOptions, PruneResult, prune
from libqmpbackup.store.prune_report import prune_document, prune_table

log = logging.getLogger("qmpbackup")

EXAMPLES = """\
examples:
  qmpbackup --socket /run/vm1.qmp backup --level full --target /backup/vm1
  qmpbackup --socket /run/vm1.qmp backup --level inc --target /backup/vm1
  qmpbackup --socket /run/vm1.qmp backup --level auto --monthly --target /backup/vm1
  qmpbackup --socket /run/vm1.qmp info --show bitmaps
  qmpbackup --socket /run/vm1.qmp cleanup --remove-bitmaps
  qmpbackup prune --target /backup/vm1 --keep 2
  # the VM is shut down: its images through a private qemu-storage-daemon
  qmpbackup --image virtio0=/var/lib/vm/vm1.qcow2 backup --level auto --target /backup/vm1
"""

PRUNE_EXAMPLES = """\
examples:
  # keep the 2 newest chains (of DIR and its YYYY-MM folders), show what would go
  qmpbackup prune --target /backup/vm1 --keep 2 --dry-run
  qmpbackup prune --target /backup/vm1 --keep 2
  # also remove the removed chains' bitmaps from the VM
  qmpbackup --socket /run/vm1.qmp prune --target /backup/vm1 --keep 2 --json
"""

BACKUP_EXAMPLES = """\
examples:
  # start a chain in an empty folder, then add incrementals
  qmpbackup --socket /run/vm1.qmp backup --level full --target /backup/vm1
  qmpbackup --socket /run/vm1.qmp backup --level inc --target /backup/vm1
  # everything since the FULL: restoring it reads two files
  qmpbackup --socket /run/vm1.qmp backup --level diff --target /backup/vm1
  # from cron: full on first run (and each month), incremental otherwise
  qmpbackup --socket /run/vm1.qmp --quiet backup --level auto --monthly --target /backup/vm1
  # only the system disk, at most 50 MiB/s per disk
  qmpbackup --socket /run/vm1.qmp backup --level copy --include virtio0 \\
      --speed-limit 50M --target /backup/vm1-copy
"""


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of disk names")
    return names



def _image_spec(text: str) -> ImageSpec:
    try:
        return parse_image_spec(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _refuse_offline(args: argparse.Namespace, *options: str) -> None:
    """Options that act on a guest make no sense for images of a VM that is shut down."""
    if args.image:
        for option in options:
            if getattr(args, option.lstrip("-").replace("-", "_"), None):
                raise UsageError(f"{option} needs a running VM (--socket): an offline backup "
                                 "(--image) has no guest")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qmpbackup",
        description="Full and incremental backups of QEMU VMs over QMP: running (--socket), "
                    "or shut down (--image, through qemu-storage-daemon).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--socket", metavar="PATH",
                      help="the VM's QMP socket: a unix socket path or tcp:HOST:PORT "
                           "(this or --image is needed by every command except prune and "
                           "info --show agent)")
    peer.add_argument("--image", action="append", type=_image_spec, metavar="[ID=]PATH",
                      help="a qcow2 image of a VM that is shut down (repeat for each disk): "
                           "opened by a private qemu-storage-daemon; disk id ID, else the "
                           "chain's disk with this source image, else the file name")
    parser.add_argument("--agent-socket", metavar="PATH",
                        help="the VM's guest agent socket (used for filesystem quiesce)")
    add_logging_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backup = commands.add_parser(
        "backup", help="back up the VM's disks", epilog=BACKUP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(backup, after_command=True)
    backup.add_argument("-l", "--level", required=True, choices=LEVELS,
                        help=level_help())
    backup.add_argument("-t", "--target", required=True, type=Path, metavar="DIR",
                        help="backup folder (holds one chain, or one per month with --monthly)")
    backup.add_argument("--uuid", metavar="ID",
                        help="chain id for a new chain (bitmap qmpbackup-ID); "
                             "for inc/auto the chain in the target must have this id")
    backup.add_argument("--monthly", action="store_true",
                        help="keep chains in DIR/YYYY-MM/, so auto starts a new chain each month")
    select = backup.add_mutually_exclusive_group()
    select.add_argument("-i", "--include", type=_names, default=(), metavar="A,B",
                        help="back up only these disks (disk id, device or node names)")
    select.add_argument("-e", "--exclude", type=_names, default=(), metavar="A,B",
                        help="skip these disks")
    backup.add_argument("--include-raw", action="store_true",
                        help="also back up disks that cannot hold persistent bitmaps "
                             "(raw, ...): copied in full at every level")
    backup.add_argument("--compress", action="store_true",
                        help="write compressed qcow2 clusters (much slower, smaller)")
    backup.add_argument("--speed-limit", type=byte_rate, default=0,
                        metavar="BYTES_PER_SECOND",
                        help="limit each disk's job to this rate (suffixes k, M, G allowed)")
    backup.add_argument("--copy-offload", choices=offload.MODES, default="auto",
                        help="copy with copy_file_range (QEMU's x-perf use-copy-range): "
                             "auto uses it for full copies where QEMU offers it and falls "
                             "back if QEMU refuses it; on insists; off never "
                             "(default auto; never with --compress)")
    backup.add_argument("--no-checksum", action="store_true",
                        help="record no checksum of the written files (they verify as "
                             "unverifiable): for targets whose filesystem checksums data "
                             "itself, such as ZFS or btrfs")
    backup.add_argument("--no-subdir", action="store_true",
                        help="write the backup files into DIR itself, not DIR/<disk id>/")
    backup.add_argument("--no-timestamp", action="store_true",
                        help="name a full/copy backup exactly like the source image, with a "
                             "FULL-<image> (COPY-<image>) symlink beside it")
    backup.add_argument("--no-symlink", action="store_true",
                        help="with --no-timestamp: no FULL-<image> symlink")
    backup.add_argument("--no-progress", action="store_true",
                        help="no progress output while jobs run")
    backup.add_argument("--progress-interval", type=positive_seconds, default=LOG_INTERVAL,
                        metavar="SECONDS",
                        help="seconds between progress log lines when not on a terminal "
                             "(default: %(default)g)")
    backup.add_argument("--pause", action="store_true",
                        help="pause the VM while the jobs copy; it is resumed on every way "
                             "out, unless it was paused already")
    backup.add_argument("--blockdev-disable-cache", action="store_true",
                        help="write the backup files with O_DIRECT, bypassing the host's "
                             "page cache")
    backup.add_argument("--blockdev-aio", choices=AIO_MODES, metavar="{threads,io_uring}",
                        help="QEMU's I/O engine for the backup files (default: QEMU's, threads)")
    backup.add_argument("--remove-delay", type=float, metavar="SECONDS",
                        help="accepted for upstream qmpbackup's command lines and ignored: "
                             "targets are closed only after QEMU has released them")
    backup.add_argument("--quiesce", "--quisce", dest="quiesce", action="store_true",
                        help="freeze the guest filesystems (guest agent, --agent-socket) "
                             "while the backup starts; without an answering agent: warn "
                             "and back up unquiesced")
    backup.add_argument("--quiesce-required", action="store_true",
                        help="like --quiesce, but fail when the guest cannot be frozen")
    backup.add_argument("--fleecing", action="store_true",
                        help="guest writes save old data to a local fleecing image, so a slow "
                             "or hung backup target never makes the guest wait")
    backup.add_argument("--fleecing-dir", type=Path, metavar="DIR",
                        help="fast local storage for the temporary fleecing images "
                             f"(default {fleecing.DEFAULT_DIR}; never the backup target)")
    backup.add_argument("--cbw-timeout", type=int, metavar="SECONDS",
                        help="with --fleecing: a guest write waits at most this long for its "
                             "old data to be saved; then the write goes on and the backup "
                             f"fails (default {fleecing.DEFAULT_CBW_TIMEOUT})")
    backup.add_argument("--encrypt-key-file", type=Path, metavar="FILE",
                        help="encrypt the chain this run starts (qcow2 LUKS) with the key in "
                             "FILE (0600, yours; `qmpbackup genkey FILE` makes one); needed by "
                             "every later run into that chain and by restores. Losing the key "
                             "loses the backups")
    backup.add_argument("--encrypt-iter-time", type=int, default=keys.DEFAULT_ITER_TIME_MS,
                        metavar="MS", help="LUKS key derivation time per file (default "
                                           "%(default)s: for a random genkey key; give 2000 or "
                                           "more for a passphrase a human chose)")
    add_metrics_option(backup)
    add_json_option(backup)

    genkey = commands.add_parser(
        "genkey", help="write a new random key file for --encrypt-key-file (no VM needed)",
        epilog="examples:\n  qmpbackup genkey /root/vm1-backup.key\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(genkey, after_command=True)
    genkey.add_argument("file", type=Path, metavar="FILE",
                        help="the new key file (0600; never overwrites an existing file)")

    info = commands.add_parser(
        "info", help="show the VM's disks or bitmaps",
        epilog="examples:\n  qmpbackup --socket /run/vm1.qmp info --show blockdev\n"
               "  qmpbackup --socket /run/vm1.qmp info --show bitmaps\n"
               "  qmpbackup --socket /run/vm1.qmp --agent-socket /run/vm1.qga info --show agent\n"
               "  # warn about bitmaps of chains none of these folders holds any more\n"
               "  qmpbackup --socket /run/vm1.qmp info --target /backup/vm1 --target /backup/vm1-copy\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(info, after_command=True)
    info.add_argument("--show", choices=("blockdev", "bitmaps", "agent"), default="blockdev",
                      help="disks, dirty bitmaps, or the guest agent (needs --agent-socket)")
    info.add_argument("--target", action="append", type=Path, default=[], metavar="DIR",
                      help="a backup folder of this VM (repeatable): warn about qmpbackup "
                           "bitmaps whose chain is in none of them (nor their YYYY-MM folders)")
    add_json_option(info)

    cleanup = commands.add_parser(
        "cleanup", help="remove qmpbackup's bitmaps from the VM",
        epilog="examples:\n  qmpbackup --socket /run/vm1.qmp cleanup --remove-bitmaps\n"
               "  qmpbackup --socket /run/vm1.qmp cleanup --remove-bitmaps --uuid ID\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(cleanup, after_command=True)
    cleanup.add_argument("--remove-bitmaps", "--remove-bitmap", dest="remove_bitmaps",
                         action="store_true", required=True,
                         help="remove every qmpbackup-* bitmap (or only the chain's with --uuid)")
    cleanup.add_argument("--uuid", metavar="ID", help="only the bitmap of this chain")

    prune_ = commands.add_parser(
        "prune", help="delete old chains whole, keep the newest N (no VM needed)",
        epilog=PRUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(prune_, after_command=True)
    prune_.add_argument("--target", required=True, type=Path, metavar="DIR",
                        help="backup folder; its YYYY-MM month folders count too")
    prune_.add_argument("--keep", required=True, type=int, metavar="N",
                        help="keep the N chains with the newest backups (at least 1)")
    prune_.add_argument("--dry-run", action="store_true",
                        help="print what would be removed, change nothing")
    add_metrics_option(prune_)
    add_json_option(prune_)
    return parser


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
    log.info("%s backup done: %d file(s) in %s%s", result.level, len(result.files), result.root,
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
