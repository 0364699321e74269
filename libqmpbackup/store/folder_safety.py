"""The one rule for what a backup folder may make the tools touch.

Backup folders often live on shared storage (NFS, a NAS, a USB disk from
elsewhere) that less trusted users or hosts can write, while qmpbackup and
qmprestore run as root.  So nothing a folder holds — metadata, restore
journal, file names, symlinks, qcow2 headers — may lead the tools to a file
outside it.  The rule, enforced here for every command:

* every path opened, created, renamed or deleted because of folder content is
  a plain name directly inside the folder it belongs to (:func:`plain_name`,
  and :func:`backup_file` / :func:`recorded_file` for names of backup files);
  the admin's own ``--dir`` / ``--target`` may be reached through symlinks,
  a folder below it may not (:func:`require_content_folder`);
* it is opened without following symlinks (``O_NOFOLLOW``, ``lstat``, and
  operations relative to a descriptor of the folder), and it is a regular
  file or directory: never a symlink, device, FIFO or socket;
* an image is used only when its header declares no external data file and
  no backing file but a sibling backup file declared as qcow2
  (:func:`inspect_image`), and it is used through the descriptor it was
  checked on; qemu-img never follows a header's backing name.

A refusal is a :class:`ChainError` (exit 6) naming the file, and nothing
has been changed when it is raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Optional

from libqmpbackup.errors import ChainError, QemuImgError, TargetError
from libqmpbackup.printable import escape, has_control
from libqmpbackup.qemu import qemuimg
from libqmpbackup.store.fsutil import fsync_dir
from libqmpbackup.store.handles import FileHandle, Folder
from libqmpbackup.store.handles import kind as kind  # the name rule lives with the handles
from libqmpbackup.store.handles import plain_name as plain_name
from libqmpbackup.store.json_shape import malformed
from libqmpbackup.store.names import is_backup_file_name, is_plain_file_name
from libqmpbackup.store.qcow2_header import read_header

MAX_JSON_BYTES = 16 << 20
"""Metadata of thousands of backups is a few MiB; more is not metadata."""


def backup_file(name: object, what: str) -> str:
    """NAME when it follows the backup-file grammar (``FULL-<time>-<image>``, ...)."""
    if not isinstance(name, str) or not is_backup_file_name(name):
        raise ChainError(f"{what} {name!r} is not a backup file name: refused")
    return _qemu_plain(plain_name(name, what), what)


def recorded_file(name: object, what: str) -> str:
    """NAME as a chain may record it: a backup file name, or (--no-timestamp) a plain file name."""
    if not isinstance(name, str) or not (is_backup_file_name(name) or is_plain_file_name(name)):
        raise ChainError(f"{what} {name!r} is not a backup file name: refused")
    return _qemu_plain(plain_name(name, what), what)


def _qemu_plain(name: str, what: str) -> str:
    """A backup file name may end up in a qcow2 header, where QEMU reads ``x:…`` as a protocol
    (``json:{…}`` as a whole block spec): the tool never writes such names, so none is read."""
    if ":" in name:
        raise ChainError(f"{what} {name!r} holds a ':', which QEMU would read as a protocol or "
                         "block spec, not a file: refused")
    return name


@contextlib.contextmanager
def opened_folder(folder: Path) -> Iterator[int]:
    """A descriptor of FOLDER, for operations relative to it.

    FOLDER itself may be reached through the admin's own symlinks (``--dir``,
    ``--target``); a folder that is folder content is checked with
    :func:`require_folder` first.
    """
    with Folder.open_root(folder) as opened:
        yield opened.fd


def require_folder(folder: Path) -> None:
    """FOLDER, named by folder content, must be a real directory: a symlink could lead anywhere."""
    try:
        info = os.lstat(folder)
    except FileNotFoundError as err:
        raise ChainError(f"folder {folder} is missing") from err
    except OSError as err:
        raise TargetError(f"cannot read {folder}: {err.strerror}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise ChainError(f"{folder} is {kind(info)}, not a folder: refused")


def require_content_folder(folder: Path, root: Path) -> None:
    """:func:`require_folder` for a folder below ROOT; ROOT itself is the admin's path."""
    if os.path.normpath(folder) != os.path.normpath(root):
        require_folder(folder)


def entry(folder: Path, name: str) -> Optional[os.stat_result]:
    """lstat of FOLDER/NAME (never followed), or None when there is no such entry."""
    plain_name(name, "file")
    with opened_folder(folder) as fd:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise TargetError(f"cannot read {folder / name}: {err.strerror}") from err


def require_regular(folder: Path, name: str, what: str = "backup file") -> os.stat_result:
    """FOLDER/NAME must exist and be a regular file, not a symlink, device or FIFO."""
    info = entry(folder, name)
    if info is None:
        raise ChainError(f"{what} {folder / name} is missing")
    if not stat.S_ISREG(info.st_mode):
        raise ChainError(f"{what} {folder / name} is {kind(info)}, not a regular file: refused")
    return info


def open_file(folder: Path, name: str, flags: int, mode: int = 0o600,
              what: str = "file") -> int:
    """Open FOLDER/NAME relative to the folder without following a symlink; a regular file only.

    An existing file is checked before it is opened for I/O (:meth:`Folder.open`:
    a device or FIFO is never opened); O_CREAT|O_EXCL makes a new private file.
    """
    with Folder.open_root(folder) as opened:
        if flags & os.O_CREAT:
            handle = opened.create(name, what, mode)
        else:
            handle = opened.open(name, what, write=bool(flags & (os.O_WRONLY | os.O_RDWR)))
    return handle.fd

def create_exclusive(folder: Path, name: str, mode: int = 0o600, what: str = "file") -> None:
    """Create FOLDER/NAME as a new empty file, private from the first byte; never an existing path."""
    try:
        os.close(open_file(folder, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode, what))
    except OSError as err:
        raise TargetError(f"cannot create {what} {folder / name}: {err.strerror}") from err


ABSENT = object()
"""What :func:`read_json` returns for a file that does not exist (``null`` is content)."""


def read_bytes(folder: Path, name: str, what: str, limit: int) -> Optional[bytes]:
    """The content of the regular file FOLDER/NAME (at most LIMIT bytes), or None when absent."""
    path = folder / name
    try:
        fd = open_file(folder, name, os.O_RDONLY, what=what)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ChainError(f"cannot read {what} {path}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise ChainError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > limit:
        raise ChainError(f"{what} {path} is larger than {limit} bytes: refused")
    return data


def read_json(folder: Path, name: str, what: str) -> Any:
    """Parsed JSON of FOLDER/NAME, or ABSENT when it does not exist; any damage is a chain error.

    No string in it (names, ids, paths, keys) may hold a control character
    (:func:`refuse_control`): the tools print them.
    """
    data = read_bytes(folder, name, what, MAX_JSON_BYTES)
    if data is None:
        return ABSENT
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:   # RecursionError: nesting a parser cannot follow
        raise ChainError(f"cannot read {what} {folder / name}: {type(err).__name__}: "
                         f"{escape(str(err)[:200])}") from err
    refuse_control(document, f"{what} {folder / name}")
    return document


def refuse_control(document: Any, where: str) -> None:
    """Refuse a document any of whose strings holds a C0/C1 control character or DEL.

    The tool never writes one; printed, a newline or ESC in a disk id or file
    name forges a line of the log or ``list``, or drives the admin's terminal.
    """
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str) and has_control(item):
            raise malformed(where, f"it holds a control character in '{escape(item[:80])}'")


def remove(folder: Path, name: str) -> bool:
    """Delete the regular file FOLDER/NAME; False when it is already gone."""
    info = entry(folder, name)
    if info is None:
        return False
    if not stat.S_ISREG(info.st_mode):
        raise ChainError(f"{folder / name} is {kind(info)}, not a file the tool wrote: "
                         "refused to remove it")
    with opened_folder(folder) as fd:
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise TargetError(f"cannot remove {folder / name}: {err.strerror}") from err
    return True


def rename(folder: Path, old: str, new: str) -> None:
    """Rename the regular file OLD to NEW inside FOLDER (a regular NEW is replaced), then fsync."""
    require_regular(folder, old)
    target = entry(folder, plain_name(new, "file"))
    if target is not None and not stat.S_ISREG(target.st_mode):
        raise ChainError(f"{folder / new} is {kind(target)}: refused to replace it")
    with opened_folder(folder) as fd:
        try:
            os.rename(old, new, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError as err:
            raise TargetError(f"cannot rename {folder / old} to {new}: {err.strerror}") from err
    fsync_dir(folder)


# -- images ---------------------------------------------------------------------------------

def sibling_name(folder: Path, backing: object) -> Optional[str]:
    """The backup file in FOLDER that the backing name BACKING spells, or None if it leads elsewhere.

    qmpbackup writes plain relative names; absolute or ``./`` spellings of
    the same sibling are accepted (``rebase`` rewrites them), FOLDER being a
    real directory (:func:`require_folder`).
    """
    if not isinstance(backing, str) or not backing or "\0" in backing or ":" in backing:
        return None     # "json:{…}", "nbd:…": qemu reads a colon as a protocol, not a file
    resolved = os.path.normpath(os.path.join(folder, backing))
    if os.path.dirname(resolved) != os.path.normpath(folder):
        return None
    name = os.path.basename(resolved)
    return name if is_backup_file_name(name) or is_plain_file_name(name) else None


def image_problems(folder: Path, name: str, info: Any) -> list[str]:
    """One image's ``qemu-img info`` (without its chain) against the rule; empty when safe.

    An external data file makes qemu-img read and write a file the header
    names, anywhere on the host; a backing file must be a sibling backup file
    opened as qcow2 (a probed or raw backing file could be any host file).
    """
    if not isinstance(info, dict):
        return [f"{name}: qemu-img info gave no image description"]
    problems = []
    if info.get("format") != "qcow2":
        problems.append(f"{name} is {info.get('format')}, not qcow2")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and ("data-file" in data or data.get("data-file-raw")):
        problems.append(f"{name} has an external data file ({data.get('data-file')!r}): refused")
    backing = info.get("backing-filename")
    if backing is not None:
        if sibling_name(folder, backing) is None:
            problems.append(f"{name} has backing file {backing!r}, which is not a backup file "
                            "next to it: refused")
        elif info.get("backing-filename-format") != "qcow2":
            problems.append(f"{name} does not declare its backing file {backing} as qcow2 "
                            f"({info.get('backing-filename-format')!r}): refused")
    return problems


def inspect_image(handle: FileHandle, folder: Path) -> Any:
    """``qemu-img info`` of the open backup file HANDLE alone, after the rule allowed it."""
    info, problems = image_report(handle, folder)
    if problems:
        raise ChainError(f"{folder}: {'; '.join(problems)}")
    return info


def image_report(handle: FileHandle, folder: Path) -> tuple[Any, list[str]]:
    """``qemu-img info`` of the open backup file HANDLE alone, and what the rule finds wrong.

    The header is read from the same descriptor first: an external data file
    is refused before qemu-img could open the name it gives, and the backing
    name reported is the header's exact one (qemu-img shows invalid UTF-8 as
    U+FFFD, which made two names look alike).  qemu-img reads the file as
    ``/dev/fd/N`` with ``backing: null``: a header's backing name is
    compared with the metadata, never opened.
    """
    name = handle.name
    try:
        header = read_header(handle.fd)
    except OSError as err:
        return None, [f"{name} is unreadable ({err.strerror})"]
    if header is None:
        return None, [f"{name} is not in qcow2 format: refused"]
    if header.data_file:
        return None, [f"{name} has an external data file: refused"]
    try:
        info = qemuimg.info_alone(handle.dev_path, pass_fds=[handle.fd])
    except QemuImgError as err:
        return None, [f"{name} is unreadable ({err})"]
    if not isinstance(info, dict):
        return None, [f"{name}: qemu-img info gave no image description"]
    info.pop("backing-filename", None)
    if header.backing is not None:
        info["backing-filename"] = header.backing
    return info, image_problems(folder, name, info)
