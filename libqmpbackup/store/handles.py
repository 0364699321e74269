"""Descriptors, not names: the only way code reaches a file or folder inside a backup folder.

A name is checked and then used again by somebody else (``qemu-img``, QEMU,
a later ``open``): in a folder another user can write, that name may lead
elsewhere by then.  So every folder is held as an open directory descriptor
(:class:`Folder`), every file in it is reached *relative* to that
descriptor without following symlinks, and a file that passed the rule is
handed on as its descriptor (:class:`FileHandle`, ``/dev/fd/N`` for
qemu-img, an fdset for QEMU), never by name again.

The rule for a file (:meth:`Folder.open`), checked on the descriptor itself:

* a plain name, one path component, opened ``O_NOFOLLOW`` relative to the folder;
* first opened ``O_PATH`` (which opens no device and blocks on no FIFO),
  its type checked, and only a regular file is then opened for I/O through
  ``/proc/self/fd``: the same inode, never a second look-up of the name;
* one link (a hard link to a host file would make writes land there), and
  owned by the running user or root (another user could rewrite a checked
  file under us).

A sub-folder (:meth:`Folder.sub`) is opened ``O_DIRECTORY | O_NOFOLLOW``:
a symlinked disk folder is refused, not followed.  The admin's own
``--dir`` / ``--target`` is opened with :meth:`Folder.open_root` and may be
reached through the admin's symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from libqmpbackup.errors import ChainError, TargetError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
TEMP_SUFFIX = ".tmp"
O_PATH = getattr(os, "O_PATH", 0o10000000)


def kind(info: os.stat_result) -> str:
    """What a directory entry is, in the words of a refusal."""
    mode = info.st_mode
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def plain_name(name: object, what: str) -> str:
    """NAME when it is one path component that stays in its folder; else a chain error."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name
            or len(name.encode(errors="surrogateescape")) > 255):
        raise ChainError(f"{what} {name!r} is not a plain file name: refused")
    return name


def trusted_owner(info: os.stat_result) -> bool:
    """Owned by the running user or root: nobody else can rewrite it after it was checked."""
    return info.st_uid in (0, os.geteuid())


def fd_path(fd: int) -> str:
    """How a child process that inherited FD (``pass_fds``) names it."""
    return f"/dev/fd/{fd}"


@dataclass
class FileHandle:
    """One file of a folder, open and checked: its descriptor is what gets used.

    ``path`` is for messages only; nothing opens it again.
    """

    fd: int
    name: str
    path: Path
    info: os.stat_result

    @property
    def dev_path(self) -> str:
        return fd_path(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def reopen(self) -> FileHandle:
        """The same inode read through a new open file description (its own flags and offset)."""
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return FileHandle(fd, self.name, self.path, os.fstat(fd))

    def same_file(self, info: os.stat_result) -> bool:
        return (info.st_dev, info.st_ino) == (self.info.st_dev, self.info.st_ino)


class Folder:
    """An open directory: every entry in it is reached relative to this descriptor."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open_root(cls, path: Path) -> Folder:
        """The admin's own folder (``--dir``, ``--target``): symlinks on the way are the admin's."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise ChainError(f"folder {path} is missing") from err
        except NotADirectoryError as err:
            raise TargetError(f"{path} is not a directory") from err
        except OSError as err:
            raise TargetError(f"cannot open folder {path}: {err.strerror}") from err
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- looking -------------------------------------------------------------------------------

    def entry(self, name: str) -> Optional[os.stat_result]:
        """lstat of NAME (never followed), or None when there is no such entry."""
        plain_name(name, "file")
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise TargetError(f"cannot read {self.path / name}: {err.strerror}") from err

    def names(self) -> list[str]:
        """Every entry's name, sorted (read through the descriptor, not the path)."""
        try:
            return sorted(os.listdir(self.fd))
        except OSError as err:
            raise TargetError(f"cannot read folder {self.path}: {err.strerror}") from err

    def subfolder_names(self) -> list[str]:
        """The real sub-folders (a symlink to a folder is not one)."""
        return [n for n in self.names()
                if (info := self.entry(n)) is not None and stat.S_ISDIR(info.st_mode)]

    # -- opening -------------------------------------------------------------------------------

    def sub(self, name: str, what: str = "folder") -> Folder:
        """The real sub-folder NAME; a symlink (which could lead anywhere) is refused."""
        plain_name(name, what)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError as err:
            raise ChainError(f"{what} {self.path / name} is missing") from err
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                info = self.entry(name)
                shown = kind(info) if info is not None else "not a folder"
                raise ChainError(f"{what} {self.path / name} is {shown}, not a folder: "
                                 "refused") from err
            raise TargetError(f"cannot open {self.path / name}: {err.strerror}") from err
        return Folder(fd, self.path / name)

    def open(self, name: str, what: str = "file", *, write: bool = False) -> FileHandle:
        """NAME opened for reading (or reading and writing) after the rule (module docstring).

        Raises FileNotFoundError when there is no such entry, ChainError when
        the entry breaks the rule; nothing has been opened for I/O then.
        """
        plain_name(name, what)
        try:
            probe = os.open(name, O_PATH | _NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise TargetError(f"cannot open {what} {self.path / name}: {err.strerror}") from err
        try:
            info = os.fstat(probe)
            self._require_usable(name, what, info)
            flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
            fd = os.open(f"/proc/self/fd/{probe}", flags)
        except OSError as err:
            raise TargetError(f"cannot open {what} {self.path / name}: {err.strerror}") from err
        finally:
            os.close(probe)
        return FileHandle(fd, name, self.path / name, os.fstat(fd))

    def _require_usable(self, name: str, what: str, info: os.stat_result) -> None:
        path = self.path / name
        if not stat.S_ISREG(info.st_mode):
            raise ChainError(f"{what} {path} is {kind(info)}, not a regular file: refused")
        if info.st_nlink != 1:
            raise ChainError(f"{what} {path} has {info.st_nlink} hard links: a link to a file "
                             "outside the folder is refused")
        if not trusted_owner(info):
            raise ChainError(f"{what} {path} is owned by uid {info.st_uid}, not by this user "
                             "or root: another user could change it after it was checked; "
                             "refused (chown it if you trust it)")

    def open_existing(self, name: str, what: str = "backup file", *,
                      write: bool = False) -> FileHandle:
        """:meth:`open`, with a missing file a chain error."""
        try:
            return self.open(name, what, write=write)
        except FileNotFoundError as err:
            raise ChainError(f"{what} {self.path / name} is missing") from err

    def create(self, name: str, what: str = "file", mode: int = 0o600) -> FileHandle:
        """A new empty file NAME, private from the first byte; never an existing path."""
        plain_name(name, what)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode,
                         dir_fd=self.fd)
        except OSError as err:
            raise TargetError(f"cannot create {what} {self.path / name}: {err.strerror}") from err
        return FileHandle(fd, name, self.path / name, os.fstat(fd))

    # -- changing ------------------------------------------------------------------------------

    def remove(self, name: str, what: str = "file") -> bool:
        """Delete the regular file NAME; False when it is already gone."""
        info = self.entry(name)
        if info is None:
            return False
        if not stat.S_ISREG(info.st_mode):
            raise ChainError(f"{self.path / name} is {kind(info)}, not a {what} the tool wrote: "
                             "refused to remove it")
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as err:
            raise TargetError(f"cannot remove {self.path / name}: {err.strerror}") from err
        return True

    def rename(self, old: str, new: str, *, expect: Optional[FileHandle] = None) -> None:
        """Rename the regular file OLD to NEW (a regular NEW is replaced), then fsync.

        EXPECT: the file OLD must still be (the inode checked after the rename
        too, so a swap in between is caught rather than published).
        """
        info = self.entry(old)
        if info is None or not stat.S_ISREG(info.st_mode):
            shown = "missing" if info is None else kind(info)
            raise ChainError(f"{self.path / old} is {shown}, not a file the tool wrote: refused")
        if expect is not None and not expect.same_file(info):
            raise ChainError(f"{self.path / old} was replaced while the tool wrote it: refused")
        target = self.entry(plain_name(new, "file"))
        if target is not None and not stat.S_ISREG(target.st_mode):
            raise ChainError(f"{self.path / new} is {kind(target)}: refused to replace it")
        try:
            os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as err:
            raise TargetError(f"cannot rename {self.path / old} to {new}: {err.strerror}") from err
        if expect is not None:
            landed = self.entry(new)
            if landed is None or not expect.same_file(landed):
                raise ChainError(f"{self.path / new} was replaced while the tool renamed it")
        self.fsync()

    def write_atomically(self, name: str, text: str,
                         before_replace: Optional[Callable[[], None]] = None, *,
                         mode: int = 0o600) -> None:
        """Replace NAME with TEXT so that readers see the old or the new file, never a mix.

        The temporary ``.NAME.<random>.tmp`` is created O_EXCL relative to this
        folder and renamed over NAME there: no path is looked up again, so a
        folder swapped for a symlink meanwhile cannot redirect the write.
        BEFORE_REPLACE runs when the new text is safely on disk but not yet in
        place (the tests stop a run there, to prove a kill at that instant).
        """
        plain_name(name, "file")
        temporary = self.create(f".{name}.{secrets.token_hex(4)}{TEMP_SUFFIX}", "temporary file")
        try:
            os.fchmod(temporary.fd, mode)     # exactly MODE, whatever the umask
            with os.fdopen(temporary.fd, "w", closefd=False) as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            if before_replace is not None:
                before_replace()
            self.rename(temporary.name, name, expect=temporary)
        except BaseException:
            with contextlib.suppress(OSError, ChainError, TargetError):
                self.remove(temporary.name)
            raise
        finally:
            temporary.close()

    def fsync(self) -> None:
        os.fsync(self.fd)
