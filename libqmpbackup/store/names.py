"""Every name the tool reserves or writes: files, folders, bitmaps, nodes, jobs.

One place for the file-name grammar (``FULL-<unix time>-<image>`` and its
siblings) and the ``qmpbackup-`` prefix, so that what a run writes and what
the next run, a restore or a cleanup recognises can never drift apart.

Layout of a chain folder::

    DIR/qmpbackup.json
    DIR/qmpbackup-intent.json  (while a run makes its files final; left by a killed run)
    DIR/.qmpbackup.lock      (while a run holds it, or left by a killed run; not data)
    DIR/<disk id>/FULL-<unix time>-<image name>
    DIR/<disk id>/INC-<unix time>-<image name>     (backing file: the previous backup)
    DIR/<disk id>/DIFF-<unix time>-<image name>    (backing file: the chain's FULL)
    DIR/<disk id>/COPY-<unix time>-<image name>    (level copy, no chain)
    DIR/<disk id>/qmpbackup-disk.json              (this folder's chain records)

``--no-subdir`` puts the files in DIR itself; ``--no-timestamp`` names a
FULL/COPY exactly like the source image, with a ``FULL-<image>`` symlink
beside it for people (restores never follow it).  Folders written by
upstream qmpbackup 0.67 hold ``DIR/uuid`` and ``DIR/<image>.config`` as well.
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from libqmpbackup.errors import UsageError

METADATA_NAME = "qmpbackup.json"
INTENT_NAME = "qmpbackup-intent.json"   # a run's files before they are recorded (see intent.py)
DISK_METADATA_NAME = "qmpbackup-disk.json"   # a disk folder's own copy of its chain records
UPSTREAM_UUID_NAME = "uuid"                  # upstream 0.67: the chain id of DIR
UPSTREAM_CONFIG_SUFFIX = ".config"           # upstream 0.67: DIR/<image>.config
JOURNAL_NAME = "qmprestore-journal.json"     # an in-place restore at work (see journal)
IMAGE_LINK = "image"
"""Symlink in a disk folder to the image of the last restored point."""
LOCK_NAME = ".qmpbackup.lock"
PARTIAL_SUFFIX = ".partial"
TOOL_PREFIX = "qmpbackup-"          # reserved: block nodes, jobs and bitmaps of the tool
BITMAP_PREFIX = TOOL_PREFIX
CHAIN_FOLDER = ""
"""The disk folder of a disk kept in the chain folder itself (``--no-subdir``, or a disk
folder copied on its own): the one spelling of it in the code (see :class:`name_rules.ChainFile`)."""
PRUNING_CHAIN_FOLDER = "."
"""How a ``pruning`` entry (an on-disk format) spells :data:`CHAIN_FOLDER`."""


class WordEnum(str, Enum):
    """An enum whose members are the words files, JSON and users spell (``"full"``, ``"ok"``).

    A ``str`` enum: a member compares, hashes and serialises as its word, so
    ``Level.FULL == "full"`` and JSON output is unchanged; ``str()`` and
    f-strings print the word too (a plain ``(str, Enum)`` prints ``Level.FULL``).
    """

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Level(WordEnum):
    """A backup's level as metadata, JSON and ``--level`` spell it; in capitals it starts the file name."""

    FULL = "full"
    INC = "inc"
    DIFF = "diff"
    COPY = "copy"

    @property
    def prefix(self) -> str:
        """``FULL``, ``INC``, ``DIFF``, ``COPY``: how the level starts a backup file's name."""
        return str(self.value).upper()

    @property
    def description(self) -> str:
        return LEVEL_DESCRIPTIONS[self]


LEVEL_DESCRIPTIONS: dict[str, str] = {
    Level.FULL: "new chain in an empty folder",
    Level.INC: "changes since the last backup of the chain",
    Level.DIFF: "changes since the chain's FULL",
    Level.COPY: "standalone full copy, no bitmap",
}
"""The one description of each level (``--level`` help; the README's table says more)."""
LEVEL_PREFIX = {level.value: level.prefix for level in Level}
PREFIX_LEVEL = {level.prefix: level for level in Level}
MAX_TIMESTAMP_DIGITS = 18          # below 2**63: an untrusted name never makes a giant int
BACKUP_NAME_RE = re.compile(rf"({'|'.join(PREFIX_LEVEL)})-(\d{{1,{MAX_TIMESTAMP_DIGITS}}})-(.+)")
"""Matched with fullmatch: a trailing newline is not part of a name."""
FLEECING_FOLDER_PREFIX = f"{TOOL_PREFIX}fleecing-"   # + "<pid>-<random>" in --fleecing-dir
_FLEECING_FOLDER_RE = re.compile(r"qmpbackup-fleecing-(\d{1,10})-[A-Za-z0-9_]+")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_chain_id(value: str) -> bool:
    """1-64 letters, digits, '.', '_' or '-', no '..': safe in a file name and a bitmap name."""
    return bool(_NAME_RE.fullmatch(value)) and ".." not in value


def _checked_name(value: str, what: str) -> str:
    if not is_chain_id(value):
        raise UsageError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return value


def validate_uuid(value: str) -> str:
    """Reject chain ids that could escape a folder or break a bitmap name."""
    return _checked_name(value, "--uuid")


def validate_disk_id(value: str) -> str:
    """A disk id given by the user (``--image ID=PATH``) names a folder: same rule as chain ids."""
    return _checked_name(value, "--image disk id")


def new_chain_id() -> str:
    return str(uuidlib.uuid4())


def bitmap_name(chain_id: str) -> str:
    return f"{BITMAP_PREFIX}{chain_id}"


def fleecing_folder_prefix(pid: int) -> str:
    """Prefix of a run's private folder of fleecing images: the pid tells whether it is stale."""
    return f"{FLEECING_FOLDER_PREFIX}{pid}-"


def fleecing_folder_pid(name: str) -> Optional[int]:
    match = _FLEECING_FOLDER_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def safe_component(name: str) -> str:
    """Turn a disk id into one safe path component (qdev ids may hold '/' or '[')."""
    cleaned = _UNSAFE_CHARS.sub("_", name).strip(".")
    return cleaned or "disk"


def image_name(source_image: str) -> str:
    """The source image's own file name, made safe: what --no-timestamp names a FULL."""
    return safe_component(os.path.basename(source_image) or "disk")


def backup_file_name(level: str, timestamp: int, source_image: str) -> str:
    """FULL-<time>-<image>, always ending in .qcow2 because every target is qcow2."""
    base = image_name(source_image)
    if not base.endswith(".qcow2"):
        base += ".qcow2"
    return f"{LEVEL_PREFIX[level]}-{timestamp}-{base}"


def link_name(level: str, file_name: str) -> str:
    """``FULL-<image>`` / ``COPY-<image>``: the convenience symlink beside an untimestamped file."""
    return f"{LEVEL_PREFIX[level]}-{file_name}"


RESERVED_FILE_NAMES = frozenset({METADATA_NAME, INTENT_NAME, DISK_METADATA_NAME, LOCK_NAME,
                                 UPSTREAM_UUID_NAME, IMAGE_LINK, JOURNAL_NAME})
"""Every fixed name the tool writes or reads in a folder: the one list planning, the intent
record and the name rules use.  An untimestamped backup file may never take one (a FULL named
``qmpbackup-intent.json`` would be deleted with the intent record right after its commit)."""


def is_plain_file_name(name: str) -> bool:
    """A --no-timestamp file (named like its source image) read from untrusted metadata:
    one path component, and no name the tool reserves."""
    return (bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")
            and name not in RESERVED_FILE_NAMES and not name.endswith(PARTIAL_SUFFIX))


@dataclass(frozen=True)
class ParsedName:
    level: Level
    timestamp: int
    image: str


def parse_backup_name(name: str) -> Optional[ParsedName]:
    match = BACKUP_NAME_RE.fullmatch(name)
    if not match:
        return None
    return ParsedName(level=PREFIX_LEVEL[match.group(1)], timestamp=int(match.group(2)),
                      image=match.group(3))


def is_backup_file_name(name: str) -> bool:
    """A name read from untrusted metadata that may be joined to a disk folder and deleted.

    The grammar alone allows ``FULL-1-../../etc``: only a single path
    component named like a finished backup file qualifies.
    """
    return ("/" not in name and "\0" not in name and not name.endswith(PARTIAL_SUFFIX)
            and parse_backup_name(name) is not None)


def point_label(file_name: str) -> str:
    """``FULL-<time>`` / ``INC-<time>`` / ``DIFF-<time>``: a point (and its snapshot) as users see it."""
    parsed = parse_backup_name(file_name)
    if parsed is None:
        return file_name
    return f"{LEVEL_PREFIX[parsed.level]}-{parsed.timestamp}"
