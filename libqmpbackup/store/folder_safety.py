"""The one rule for what a backup folder may make the tools touch.

Backup folders often live on shared storage (NFS, a NAS, a USB disk from
elsewhere) that less trusted users or hosts can write, while qmpbackup and
qmprestore run as root.  So nothing a folder holds — metadata, restore
journal, file names, symlinks, qcow2 headers — may lead the tools to a file
outside it.  The rule, enforced here for every command:

* every path opened, created, renamed or deleted because of folder content is
  a plain name directly inside the folder it belongs to (:mod:`name_rules`
  for names read from the folder), reached relative to the folder's held
  descriptor (:class:`~libqmpbackup.store.backup_folder.BackupFolder`,
  :mod:`handles`); the admin's own ``--dir`` / ``--target`` may be reached
  through symlinks, a folder below it may not;
* it is opened without following symlinks, and it is a regular file or
  directory: never a symlink, device, FIFO or socket;
* an image is used only when its header declares no external data file and
  no backing file but a sibling backup file declared as qcow2
  (:func:`inspect_image`), and it is used through the descriptor it was
  checked on; qemu-img never follows a header's backing name.

A refusal is a :class:`ChainError` (exit 6) naming the file, and nothing
has been changed when it is raised.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from libqmpbackup.errors import ChainError, QemuImgError
from libqmpbackup.printable import escape, has_control
from libqmpbackup.qemu import qemuimg
from libqmpbackup.store.handles import FileHandle, Folder
from libqmpbackup.store.json_shape import malformed
from libqmpbackup.store.names import is_backup_file_name, is_plain_file_name
from libqmpbackup.store.qcow2_header import read_header

MAX_JSON_BYTES = 16 << 20
"""Metadata of thousands of backups is a few MiB; more is not metadata."""


def open_file(folder: Path, name: str, flags: int, mode: int = 0o600,
              what: str = "file") -> int:
    """Open FOLDER/NAME relative to the folder without following a symlink; a regular file only.

    For files named by a path the admin gave (:func:`digests.digest_files`);
    commands reach folder content through their BackupFolder instead.

    An existing file is checked before it is opened for I/O (:meth:`Folder.open`:
    a device or FIFO is never opened); O_CREAT|O_EXCL makes a new private file.
    """
    with Folder.open_root(folder) as opened:
        if flags & os.O_CREAT:
            handle = opened.create(name, what, mode)
        else:
            handle = opened.open(name, what, write=bool(flags & (os.O_WRONLY | os.O_RDWR)))
    return handle.fd

ABSENT = object()
"""What :func:`read_json` returns for a file that does not exist (``null`` is content)."""


def read_bytes(folder: Folder, name: str, what: str, limit: int) -> Optional[bytes]:
    """The content of the regular file NAME in FOLDER (at most LIMIT bytes), or None when absent.

    Opened by :meth:`Folder.open` (relative to the descriptor, the rule checked
    before any I/O), so a FIFO or device named like a record is never opened.
    """
    path = folder.path / name
    try:
        handle = folder.open(name, what)
    except FileNotFoundError:
        return None
    try:
        with os.fdopen(handle.fd, "rb") as stream:
            handle.fd = -1
            data = stream.read(limit + 1)
    except OSError as err:
        raise ChainError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > limit:
        raise ChainError(f"{what} {path} is larger than {limit} bytes: refused")
    return data


def read_json(folder: Folder, name: str, what: str) -> Any:
    """Parsed JSON of NAME in FOLDER, or ABSENT when it does not exist; any damage is a chain error.

    No string in it (names, ids, paths, keys) may hold a control character
    (:func:`refuse_control`): the tools print them.
    """
    data = read_bytes(folder, name, what, MAX_JSON_BYTES)
    if data is None:
        return ABSENT
    try:
        document = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as err:   # RecursionError: nesting a parser cannot follow
        raise ChainError(f"cannot read {what} {folder.path / name}: {type(err).__name__}: "
                         f"{escape(str(err)[:200])}") from err
    refuse_control(document, f"{what} {folder.path / name}")
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
