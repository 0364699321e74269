"""The single way qmpbackup runs qemu-img.

Every call goes through :func:`run`: an argv list (never a shell, so file
names with spaces or quotes are safe), stderr captured, and a failure turned
into :class:`QemuImgError` naming the command and qemu-img's own message.
Keeping one wrapper means dry-run, logging and error wording are the same
for backup and restore.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Optional, Sequence, Union

from libqmpbackup.errors import ChainError, QemuImgError, QemuImgLimitError
from libqmpbackup.keys import SECRET_PREFIX, Key
from libqmpbackup.qemu import img_limits

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
# A new LUKS header times PBKDF2 on the thread's CPU clock; on a busy host that clock
# can read 0 for the first measurement and QEMU gives up: the create is simply run again.
PBKDF_MEASURE_FAILED = "Unable to get accurate CPU usage"
PBKDF_RETRIES = 3
BACKUP_CLUSTER_SIZE = 65536


_KEY: ContextVar[Optional[Key]] = ContextVar("qemuimg_key", default=None)
"""The key of the encrypted chain being worked on: a chain is encrypted as a whole, so every
qemu-img call on it needs the key, and every layer it names the encrypt options (which also
refuse a clear file swapped into an encrypted chain).  One context instead of a key argument
through every restore step."""


@contextmanager
def using_key(key: Optional[Key]) -> Iterator[None]:
    """Within the block, qemu-img calls open images as encrypted with KEY (None: as clear)."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


def active_key() -> Optional[Key]:
    return _KEY.get()


def _encrypt_options() -> Optional[dict[str, str]]:
    key = _KEY.get()
    return None if key is None else {"format": "luks", "key-secret": SECRET_PREFIX}


def command_line(args: Sequence[str]) -> str:
    """A copy-pasteable rendering of a qemu-img call, for logs and --dry-run."""
    return shlex.join([QEMU_IMG, *[str(a) for a in args]])


def binary() -> str:
    """Locate qemu-img up front so a missing binary is one clear error, not ENOENT later."""
    found = shutil.which(QEMU_IMG)
    if not found:
        raise QemuImgError(
            f"{QEMU_IMG} not found on PATH (install the qemu-utils package)")
    return found


def run(args: Sequence[str], *, dry_run: bool = False,
        accepted: Collection[int] = (0,), pass_fds: Collection[int] = (),
        budget: Optional[img_limits.Budget] = None) -> str:
    """Run qemu-img with ARGS and return its stdout; raise with its stderr.

    ACCEPTED lists the exit codes that still carry a usable answer (``check``
    reports leaked clusters with 3, which is not a failure of the image).
    PASS_FDS are descriptors the arguments name as ``/dev/fd/N``: files of a
    backup folder reach qemu-img only that way (:mod:`libqmpbackup.store.handles`).
    BUDGET limits the run (:mod:`img_limits`); without one it is a data call
    whose time scales with the size of the files it is given.  A run stopped
    at a limit raises :class:`QemuImgLimitError`.
    """
    key = _KEY.get()
    if key is not None and args:
        # the secret by descriptor (a sealed memfd): never the key in argv
        args = [args[0], "--object", f"secret,id={SECRET_PREFIX},file={key.dev_path}",
                *args[1:]]
        pass_fds = (*pass_fds, key.fd)
    argv = [binary(), *[str(a) for a in args]]
    cmd = command_line(args)
    if dry_run:
        print(cmd)
        return ""
    if budget is None:
        budget = img_limits.data(img_limits.input_bytes(argv[1:], pass_fds))
    log.debug("running: %s (%s)", cmd, budget)
    try:
        done = img_limits.run(argv, budget, pass_fds)
        for _ in range(PBKDF_RETRIES if key is not None else 0):
            if done.returncode == 0 or PBKDF_MEASURE_FAILED not in done.stderr:
                break
            log.debug("%s: QEMU's PBKDF speed measurement failed, again", cmd)
            done = img_limits.run(argv, budget, pass_fds)
    except OSError as err:
        raise QemuImgError(f"cannot run {cmd}: {err}") from err
    failed = done.returncode not in accepted
    limit = done.limit or (budget.exceeded(done.returncode, done.stderr) if failed else None)
    if limit:
        raise QemuImgLimitError(f"{cmd}: stopped at {limit}: a crafted or damaged image, "
                                "or a limit set too low for it")
    if failed:
        message = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
        raise QemuImgError(f"{cmd}: {message}")
    return done.stdout


def create(path: Path, size: int, *, backing: Optional[str] = None) -> None:
    """Create a qcow2 backup target of exactly SIZE bytes.

    The size must match the source disk exactly or blockdev-backup refuses
    the target; 64 KiB clusters keep incremental backups small.
    """
    run(_create_args(str(path), size, backing))


def create_fd(fd: int, size: int, *, backing: Optional[str] = None) -> None:
    """:func:`create` into the file open as FD (``/dev/fd/N``): the name is never looked up."""
    run(_create_args(f"/dev/fd/{fd}", size, backing), pass_fds=(fd,))


def _create_args(target: str, size: int, backing: Optional[str]) -> list[str]:
    options = f"cluster_size={BACKUP_CLUSTER_SIZE}"
    key = _KEY.get()
    if key is not None:
        options += (f",encrypt.format=luks,encrypt.key-secret={SECRET_PREFIX}"
                    f",encrypt.iter-time={key.iter_time}")
    args: list[str] = ["create", "-q", "-f", "qcow2", "-o", options]
    if backing is not None:
        # every backup file is qcow2: never probe; -u: the name is only written, the
        # previous backup is never opened here
        args += ["-u", "-b", backing, "-F", "qcow2"]
    return [*args, target, str(size)]


def info(path: Path, *, backing_chain: bool = False, fmt: Optional[str] = None,
         pass_fds: Collection[int] = ()) -> Any:
    """qemu-img info as parsed JSON (a list of images with backing_chain).

    Give FMT for files whose format is known: a probed format lets a
    damaged or hostile image pass itself off as something else.
    """
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    if backing_chain:
        args.append("--backing-chain")
    args.append(str(path))
    return _parse_json(args, run(args, pass_fds=pass_fds, budget=img_limits.inspection()))


def info_alone(layer: str, *, pass_fds: Collection[int] = ()) -> Any:
    """``qemu-img info`` of one qcow2 LAYER (``/dev/fd/N``) by itself: ``backing: null``.

    The header's backing name is reported, never opened: which file backs a
    layer is the chain metadata's decision (:func:`chain_source`).
    """
    args = ["info", "--output=json", chain_source([layer])]
    return _parse_json(args, run(args, pass_fds=pass_fds, budget=img_limits.inspection()))


def _parse_json(args: Sequence[str], out: str) -> Any:
    try:
        return json.loads(out)
    except ValueError as err:
        raise QemuImgError(f"{command_line(args)}: unparsable output") from err


@dataclass(frozen=True)
class CheckResult:
    """What ``qemu-img check`` found; leaks waste space but lose no data."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0

    @property
    def damaged(self) -> bool:
        return bool(self.corruptions or self.check_errors)


CHECK_FOUND_CORRUPTION = 2
CHECK_FOUND_LEAKS = 3


def check(path: Union[Path, str], *, fmt: Optional[str] = None, without_backing: bool = False,
          pass_fds: Collection[int] = ()) -> CheckResult:
    """Run qemu-img check (read-only) and report corruptions and leaks.

    Findings come back as numbers for the caller to judge (leaked clusters,
    left by a killed writer, cost space but no data); an image qemu-img
    cannot even open raises QemuImgError.  WITHOUT_BACKING checks the file by
    itself (a ``json:`` image spec with ``backing: null``), so a missing or
    damaged predecessor is not blamed on it.
    """
    args = ["check", "--output=json"]
    if without_backing:
        node: dict[str, Any] = {"driver": fmt or "qcow2", "backing": None,
                                "file": {"driver": "file", "filename": str(path)}}
        encrypt = _encrypt_options()
        if encrypt:
            node["encrypt"] = encrypt
        args.append("json:" + json.dumps(node))
    else:
        if fmt:
            args += ["-f", fmt]
        args.append(str(path))
    report = _parse_json(args, run(args, accepted=(0, CHECK_FOUND_CORRUPTION, CHECK_FOUND_LEAKS),
                                   pass_fds=pass_fds, budget=img_limits.inspection()))
    return CheckResult(corruptions=int(report.get("corruptions", 0)),
                       leaks=int(report.get("leaks", 0)),
                       check_errors=int(report.get("check-errors", 0)))


def header_name(name: str) -> str:
    """NAME when QEMU reads it, written as a backing file name, as a plain sibling file.

    A ``:`` before any ``/`` makes QEMU parse a name as a protocol (``nbd:``)
    or a whole block spec (``json:{…}``): such a name is never written.
    """
    if not name or "/" in name or ":" in name or "\0" in name or name in (".", ".."):
        raise ChainError(f"backing name {name!r} is not a plain file name QEMU reads as a "
                         "file: refused")
    return name


def rebase_unsafe(path: Union[Path, str], backing: str, *, backing_format: str = "qcow2",
                  dry_run: bool = False, pass_fds: Collection[int] = ()) -> None:
    """Rewrite only the backing file name in PATH's header (``rebase -u``).

    Only valid when BACKING holds exactly the data PATH was written against;
    the restore code knows that from the chain metadata, and ``-u`` neither
    reads nor writes guest data, so it is quick and can be repeated.
    """
    image = (["--image-opts", image_opts(path)] if _KEY.get() is not None
             else ["-f", "qcow2", str(path)])
    run(["rebase", "-q", "-u", "-b", header_name(backing), "-F", backing_format, *image],
        dry_run=dry_run, pass_fds=pass_fds)


def commit(path: Union[Path, str], *, base: Union[Path, str, None] = None, rate_limit: int = 0,
           dry_run: bool = False, pass_fds: Collection[int] = ()) -> None:
    """Copy the data of PATH (and of images between it and BASE) into BASE.

    ``-d`` keeps PATH as it is: an interrupted commit can then simply be run
    again, because every cluster it writes comes unchanged from PATH's chain.
    PATH may be a :func:`chain_source` spec; BASE is then named as in it
    (``/dev/fd/N``), which qemu-img finds in the chain it was given.
    """
    args = ["commit", "-q", "-f", "qcow2", "-d"]
    if base is not None:
        args += ["-b", str(base)]
    if rate_limit:
        args += ["-r", str(rate_limit)]
    args.append(str(path))
    run(args, dry_run=dry_run, pass_fds=pass_fds, budget=_rated(args, rate_limit, pass_fds))


def _rated(args: Sequence[str], rate_limit: int,
           pass_fds: Collection[int] = ()) -> Optional[img_limits.Budget]:
    """A data call's budget slowed to RATE_LIMIT bytes/s (None: run's default budget)."""
    if not rate_limit:
        return None
    return img_limits.data(img_limits.input_bytes(args, pass_fds), rate_limit)


def chain_source(files: Sequence[Union[Path, str]]) -> str:
    """A qcow2 chain given explicitly, oldest first, for images whose headers name no backing file.

    Upstream qmpbackup writes its incrementals without backing files; this
    ``json:`` filename makes qemu-img read the point through exactly the
    files the chain metadata lists (the last one ends the chain), never
    through a header.  FILES are ``/dev/fd/N`` of opened backup files (or,
    in dry runs, their names, for the admin to read).
    """
    node: Optional[dict[str, Any]] = None
    encrypt = _encrypt_options()
    for path in files:
        node = {"driver": "qcow2", "file": {"driver": "file", "filename": os.path.abspath(path)},
                "backing": node}
        if encrypt:
            node["encrypt"] = encrypt
    return "json:" + json.dumps(node)


def convert(source: Union[Path, str], target: Union[Path, str], *, out_format: str = "qcow2",
            rate_limit: int = 0, dry_run: bool = False, pass_fds: Collection[int] = (),
            encrypt: bool = False) -> None:
    """Write SOURCE (read through its backing chain, opened read-only) as a standalone TARGET.

    ENCRYPT: TARGET is a LUKS qcow2 with the active key (:func:`using_key`).
    """
    args = ["convert", "-q", "-f", "qcow2", "-O", out_format]
    key = _KEY.get()
    if encrypt and key is not None:
        args += ["-o", f"encrypt.format=luks,encrypt.key-secret={SECRET_PREFIX},"
                       f"encrypt.iter-time={key.iter_time}"]
    if rate_limit:
        args += ["-r", str(rate_limit)]
    args += [str(source), str(target)]
    run(args, dry_run=dry_run, pass_fds=pass_fds, budget=_rated(args, rate_limit, pass_fds))


def snapshot_names(layer: str, *, pass_fds: Collection[int] = ()) -> list[str]:
    """Tags of LAYER's internal snapshots (qemu-img happily creates duplicates)."""
    return [s.get("name", "") for s in info_alone(layer, pass_fds=pass_fds).get("snapshots", [])]


def snapshot_create(path: Union[Path, str], tag: str, *, dry_run: bool = False,
                    pass_fds: Collection[int] = ()) -> None:
    """Add internal snapshot TAG.

    qemu-img snapshot has no -f: the format is given in --image-opts, so the
    image is never probed (a probed format is how a file passes itself off
    as something else).
    """
    run(["snapshot", "-q", "--image-opts", "-c", tag, image_opts(path)], dry_run=dry_run,
        pass_fds=pass_fds)


def image_opts(path: Union[Path, str], fmt: str = "qcow2") -> str:
    """PATH as --image-opts with an explicit format (commas in option values are doubled)."""
    opts = f"driver={fmt},file.driver=file,file.filename={str(path).replace(',', ',,')}"
    if _KEY.get() is not None:
        opts += f",encrypt.format=luks,encrypt.key-secret={SECRET_PREFIX}"
    return opts
