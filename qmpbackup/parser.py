"""The argparse parser of ``qmpbackup``: every option, its help and the examples.

Kept apart from the commands (:mod:`qmpbackup.cli`) so that the man page and
completion generators (tools/) and the docs test read the same parser the
tool runs, and neither module grows past one sitting.
"""


from __future__ import annotations

import argparse
from pathlib import Path

from libqmpbackup import __version__, keys
from libqmpbackup.backup import fleecing, offload
from libqmpbackup.backup.image_disks import (
    ImageSpec,
    parse_image_spec,
)
from libqmpbackup.backup.jobs import AIO_MODES
from libqmpbackup.backup.plan import LEVELS, level_help
from libqmpbackup.backup.progress import LOG_INTERVAL
from libqmpbackup.errors import UsageError
from libqmpbackup.json_output import add_json_option
from libqmpbackup.metrics import add_metrics_option
from libqmpbackup.runner import (
    ArgumentParser,
    add_logging_options,
    byte_rate,
    positive_seconds,
)

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
