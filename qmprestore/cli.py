"""Command line of ``qmprestore``: argparse and dispatch into libqmpbackup."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from libqmpbackup import __version__
from libqmpbackup.json_output import JsonResult, add_json_option
from libqmpbackup.keys import Key
from libqmpbackup.restore.inplace import commit, rebase, snapshotrebase
from libqmpbackup.restore.listing import list_document, list_table
from libqmpbackup.restore.merge import FORMATS, MergeTarget, merge, merge_document
from libqmpbackup.restore.mount import MountRequest, describe, mount, mount_document, stay, umount
from libqmpbackup.restore.rules import RestoreOptions
from libqmpbackup.restore.verify import verify_dir
from libqmpbackup.runner import (
    ArgumentParser,
    Command,
    CommandResult,
    add_logging_options,
    byte_rate,
    duration,
    run,
)
from libqmpbackup.store.names import validate_uuid
from libqmpbackup.store.verified import DEFAULT_WITHIN

EXAMPLES = """\
examples:
  qmprestore list --dir /backup/vm1
  qmprestore merge --dir /backup/vm1/virtio0 --targetfile /restore/vm1-disk.qcow2
  qmprestore merge --dir /backup/vm1 --targetdir /restore/vm1 --until INC-1717430400
  qmprestore rebase --dir /backup/vm1/virtio0 --until INC-1717430400
  qmprestore commit --dir /copy-of-backup/vm1/virtio0 --dry-run

Points are named like the backup files: FULL-<time>-<image>.qcow2, or just FULL-<time> /
INC-<time>.  rebase, commit and snapshotrebase change the folder: see docs/restore.md.
"""

COMMAND_EXAMPLES = {
    "list": """\
examples:
  qmprestore list --dir /backup/vm1            # a chain folder
  qmprestore list --dir /backup/vm1/virtio0    # one disk
  qmprestore list --dir /backup/vm1-monthly    # every YYYY-MM chain folder
""",
    "verify": """\
examples:
  qmprestore verify --dir /backup/vm1                  # every chain of the folder
  qmprestore verify --dir /backup/vm1-monthly          # every YYYY-MM chain folder
  qmprestore verify --dir /backup/vm1 --filter virtio0 --json
  # weekly from cron: exit 11 and one error line per damaged or missing file
  0 5 * * 0  qmprestore --quiet verify --dir /backup/vm1 > /dev/null
""",
    "merge": """\
examples:
  # newest point of one disk into a new qcow2 image (the backup is not changed)
  qmprestore merge --dir /backup/vm1/virtio0 --targetfile /restore/virtio0.qcow2
  # one point, as raw, at most 100 MiB/s
  qmprestore merge --dir /backup/vm1/virtio0 --until INC-1717430400 --format raw \\
      --rate-limit 100M --targetfile /restore/virtio0.raw
  # every disk of the chain at one backup run, one image per disk id
  qmprestore merge --dir /backup/vm1 --until INC-1717430400 --format source --targetdir /restore/vm1
""",
    "rebase": """\
examples:
  # in place: DIR/virtio0/image becomes a symlink to the point's file, a usable image
  qmprestore rebase --dir /backup/vm1/virtio0
  qmprestore rebase --dir /backup/vm1/virtio0 --until INC-1717430400
""",
    "commit": """\
examples:
  # in place: the FULL (same file name) holds the point, applied INCs are removed
  qmprestore commit --dir /copy/vm1/virtio0 --until INC-1717430400
  qmprestore commit --dir /copy/vm1/virtio0 --dry-run      # show the qemu-img steps
  # after an interruption: run the same command again to finish
""",
    "mount": """\
examples:
  # the newest point of every disk as MNT/<disk id>.raw, read-only; returns, daemon runs on
  qmprestore mount --dir /backup/vm1 /mnt/restore
  # one point, its filesystems mounted read-only too: MNT/<disk id>/p1/etc/fstab
  qmprestore mount --dir /backup/vm1 --until INC-1717430400 --filesystems /mnt/restore
  cp /mnt/restore/virtio0/p1/etc/fstab /tmp/
  qmprestore umount /mnt/restore
  # a throwaway VM on the point (writes go to a temporary overlay)
  qemu-system-x86_64 -drive file=/mnt/restore/virtio0.raw,format=raw,snapshot=on ...
""",
    "umount": """\
examples:
  qmprestore umount /mnt/restore     # filesystems, loop devices, daemon: all gone
""",
    "snapshotrebase": """\
examples:
  # in place, like commit, but every point stays as an internal snapshot of the FULL
  qmprestore snapshotrebase --dir /copy/vm1/virtio0
  qemu-img snapshot -l /copy/vm1/virtio0/image
  qemu-img convert -l snapshot.name=INC-1717430400 -O qcow2 /copy/vm1/virtio0/image old.qcow2
""",
}

HELP = {
    "list": "show chains, disks and restore points",
    "verify": "check every backup file: checksum, qemu-img check, chain links and sizes",
    "merge": "write a restore point as a new image; the backup stays untouched",
    "rebase": "in place: link DIR/image to the point's file, a usable backing chain",
    "commit": "in place: commit the incrementals up to the point into the FULL",
    "snapshotrebase": "in place: like commit, with an internal snapshot per point",
    "mount": "expose a restore point read-only as raw files (and its filesystems): nothing copied",
    "umount": "end a qmprestore mount: filesystems, loop devices, daemon, files",
}



def _add_selection_options(parser: argparse.ArgumentParser, *, skip_check: bool,
                           top: bool) -> None:
    """Options upstream's qmprestore takes before the command; here also after it.

    On a subcommand they default to SUPPRESS, so that an option given
    before the command is not reset by the subcommand's default.
    """
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument("--filter", dest="name_filter", metavar="STR", default=default,
                        help="only disks whose disk id or image name contains STR")
    if skip_check:
        parser.add_argument("--skip-check", action="store_true",
                            default=False if top else argparse.SUPPRESS,
                            help="do not compare files with the metadata, run qemu-img check "
                                 "nor the checksums (an unfinished in-place restore is refused "
                                 "anyway)")


def _new_command(commands: argparse._SubParsersAction[ArgumentParser],
                 name: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=HELP[name], epilog=COMMAND_EXAMPLES[name],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_logging_options(parser, after_command=True)
    return parser


def _add_command(commands: argparse._SubParsersAction[ArgumentParser],
                 name: str) -> argparse.ArgumentParser:
    parser = _new_command(commands, name)
    parser.add_argument("--dir", required=True, type=Path, metavar="DIR",
                        help="the backup folder (holds qmpbackup.json) or one disk folder in it")
    _add_selection_options(parser, skip_check=name not in ("list", "verify"), top=False)
    if name in ("list", "merge", "verify", "mount"):
        add_json_option(parser)
    if name == "list":
        return parser
    parser.add_argument("--key-file", type=Path, metavar="FILE",
                        help="the key of an encrypted chain (--encrypt-key-file of the backup)"
                             + ("; without it verify checks checksums, headers and chain rules, "
                                "not qemu-img check" if name == "verify" else ""))
    if name == "verify":
        parser.add_argument("--uuid", metavar="ID", help="only this chain")
        return parser
    parser.add_argument("--until", metavar="NAME",
                        help="restore this point instead of the newest: a backup file name, "
                             "with or without extension, or its FULL-<time> / INC-<time> prefix")
    parser.add_argument("--uuid", metavar="ID",
                        help="the chain to use when the folder holds several (default: newest)")
    parser.add_argument("--verified-within", type=duration, default=DEFAULT_WITHIN,
                        metavar="AGE",
                        help="do not hash again a file verified this recently and unchanged "
                             "since (suffixes m, h, d; 0: hash every file; default 24h)")
    if name == "mount":
        return parser
    parser.add_argument("--dry-run", action="store_true",
                        help="check the chain, print the qemu-img steps, change nothing")
    if name in ("merge", "commit", "snapshotrebase"):
        parser.add_argument("--rate-limit", type=byte_rate, default=0, metavar="BYTES_PER_SECOND",
                            help="limit qemu-img's I/O rate (suffixes k, M, G allowed)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qmprestore", description="Restore points of qmpbackup chains as usable disk images.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_logging_options(parser)
    _add_selection_options(parser, skip_check=True, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("list", "verify", "rebase", "commit", "merge", "snapshotrebase", "mount"):
        sub = _add_command(commands, name)
        if name == "mount":
            _add_mount_options(sub)
        if name == "merge":
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--targetfile", type=Path, metavar="FILE",
                                help="the new image (with --dir naming one disk folder)")
            target.add_argument("--targetdir", type=Path, metavar="OUT",
                                help="one new image per disk of the chain: OUT/<disk id>.<format>")
            sub.add_argument("--encrypt-output", action="store_true",
                             help="an encrypted chain's image stays encrypted (LUKS qcow2, "
                                  "the same key); default: a plain image")
            sub.add_argument("--format", dest="fmt", choices=FORMATS, default="qcow2",
                             help="image format to write; source: the disk's format in the VM "
                                  "(default: %(default)s)")
    umount_ = _new_command(commands, "umount")
    umount_.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    return parser


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT",
                        help="an empty folder: gets <disk id>.raw per disk")
    parser.add_argument("--filesystems", action="store_true",
                        help="also mount every filesystem found read-only at "
                             "MOUNTPOINT/<disk id>/p<N>/ (or /disk/ without partition table); "
                             "needs root")
    parser.add_argument("--check-first", action="store_true",
                        help="hash the files not remembered as verified before exposing them "
                             "(default: while they are served; damage ends the mount)")
    parser.add_argument("--foreground", action="store_true",
                        help="stay until SIGINT/SIGTERM, then unmount (default: return, the "
                             "mount stays until qmprestore umount)")


def _options(args: argparse.Namespace) -> RestoreOptions:
    return RestoreOptions(dir=args.dir, until=args.until,
                          uuid=validate_uuid(args.uuid) if args.uuid else None,
                          skip_check=args.skip_check, dry_run=getattr(args, "dry_run", False),
                          rate_limit=getattr(args, "rate_limit", 0),
                          name_filter=args.name_filter, key=_key(args),
                          encrypt_output=getattr(args, "encrypt_output", False),
                          verified_within=getattr(args, "verified_within", DEFAULT_WITHIN))


def _key(args: argparse.Namespace) -> Optional[Key]:
    """--key-file, read after the key file rule before anything else is done."""
    return Key.load(args.key_file) if getattr(args, "key_file", None) else None


def list_command(args: argparse.Namespace) -> CommandResult:
    if args.json:
        return JsonResult(list_document(args.dir, args.name_filter))
    print(list_table(args.dir, args.name_filter))
    return 0


def verify_command(args: argparse.Namespace) -> CommandResult:
    report = verify_dir(args.dir, validate_uuid(args.uuid) if args.uuid else None,
                        args.name_filter, _key(args))
    if not args.json:
        print(report.table())
    report.raise_if_bad(with_document=args.json)
    return JsonResult(report.to_json()) if args.json else 0


def merge_command(args: argparse.Namespace) -> CommandResult:
    images = merge(_options(args), MergeTarget(file=args.targetfile, directory=args.targetdir,
                                               fmt=args.fmt))
    return JsonResult(merge_document(images, args.dry_run)) if args.json else 0


def rebase_command(args: argparse.Namespace) -> int:
    rebase(_options(args))
    return 0


def commit_command(args: argparse.Namespace) -> int:
    commit(_options(args))
    return 0


def snapshotrebase_command(args: argparse.Namespace) -> int:
    snapshotrebase(_options(args))
    return 0


def mount_command(args: argparse.Namespace) -> CommandResult:
    record = mount(_options(args), MountRequest(args.mountpoint, filesystems=args.filesystems,
                                                foreground=args.foreground,
                                                check_first=args.check_first))
    if not args.foreground:
        return JsonResult(mount_document(record)) if args.json else _printed(describe(record))
    if args.json:
        stay(record, lambda: print(json.dumps(mount_document(record), indent=2), flush=True))
    else:
        stay(record, lambda: _printed(describe(record)))
    return 0


def _printed(lines: list[str]) -> int:
    print("\n".join(lines), flush=True)
    return 0


def umount_command(args: argparse.Namespace) -> int:
    umount(args.mountpoint)
    return 0


COMMANDS: dict[str, Command] = {
    "list": list_command,
    "verify": verify_command,
    "merge": merge_command,
    "rebase": rebase_command,
    "commit": commit_command,
    "snapshotrebase": snapshotrebase_command,
    "mount": mount_command,
    "umount": umount_command,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; callable in-process as ``main([...])`` and returning the exit code."""
    return run(build_parser(), lambda args: COMMANDS[args.command], argv, "qmprestore")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
