"""A FUSE passthrough whose writes can be stalled: a backup target (or fleecing
storage) that hangs like a busy NAS, for tests and the latency benchmark only.

``python -m harness.slowfs SOURCE MOUNTPOINT CONTROL`` serves SOURCE at
MOUNTPOINT.  While the file CONTROL exists, every write, fsync, truncate and
fallocate waits until it is removed (a stalled target); if CONTROL holds a
number, each such call sleeps that many seconds instead (a slow target).
Reads and metadata calls are never delayed.  Unmounting ends the process.

:class:`SlowFS` runs one as a subprocess (root needed: ``/dev/fuse`` and the
mount itself) and unmounts it on exit.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from harness.qemu_vm import reap

POLL = 0.01


def _delay(control: str) -> None:
    """Hold the calling FUSE thread while CONTROL says so."""
    while True:
        try:
            text = Path(control).read_text().strip()
        except FileNotFoundError:
            return
        if text:
            time.sleep(float(text))
            return
        time.sleep(POLL)


FUSE_CAP_POSIX_LOCKS = 1 << 1
FUSE_CAP_FLOCK_LOCKS = 1 << 10


def serve(source: str, mountpoint: str, control: str) -> None:
    import mfusepy as fuse  # test-only dependency (tests/requirements.txt)

    def real(path: str) -> str:
        return os.path.join(source, path.lstrip("/"))

    class Passthrough(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def init_with_config(self, conn: Any, config: Any) -> None:
            # without a lock handler the kernel must keep QEMU's image locks itself
            conn.want &= ~(FUSE_CAP_POSIX_LOCKS | FUSE_CAP_FLOCK_LOCKS)

        def access(self, path: str, mode: int) -> int:
            if not os.access(real(path), mode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(real(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(real(path), uid, gid)
            return 0

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(real(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def getattr(self, path: str, fh: Optional[int] = None) -> dict[str, Any]:
            try:
                st = os.fstat(fh) if fh is not None else os.lstat(real(path))
            except OSError as err:
                raise fuse.FuseOSError(err.errno) from err
            attrs = {k: getattr(st, k) for k in ("st_gid", "st_mode", "st_nlink", "st_size",
                                                 "st_uid", "st_blocks")}
            for name in ("st_atime", "st_ctime", "st_mtime"):
                attrs[name] = getattr(st, name + "_ns")
            return attrs

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(real(path), mode)
            return 0

        def open(self, path: str, flags: int) -> int:
            return os.open(real(path), flags & ~os.O_DIRECT)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(real(path))]

        def rename(self, old: str, new: str) -> int:
            os.rename(real(old), real(new))
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(real(path))
            return 0

        def statfs(self, path: str) -> dict[str, Any]:
            st = os.statvfs(real(path))
            return {k: getattr(st, k) for k in (
                "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")}

        def unlink(self, path: str) -> int:
            os.unlink(real(path))
            return 0

        def utimens(self, path: str, times: Any = None) -> int:
            os.utime(real(path), ns=times)
            return 0

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            _delay(control)
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: Optional[int] = None) -> int:
            _delay(control)
            os.truncate(fh if fh is not None else real(path), length)
            return 0

        def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
            _delay(control)
            if mode:
                raise fuse.FuseOSError(errno.EOPNOTSUPP)
            os.posix_fallocate(fh, offset, size)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            _delay(control)
            (os.fdatasync if datasync else os.fsync)(fh)
            return 0

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

    fuse.FUSE(Passthrough(), mountpoint, foreground=True, nothreads=False,
              allow_other=True, default_permissions=True)


class SlowFS:
    """``with SlowFS(folder) as fs:`` files under ``fs.mount`` live in ``fs.backing``;
    ``fs.stall()`` / ``fs.resume()`` / ``fs.slow(seconds)`` change how writes behave."""

    def __init__(self, folder: Path) -> None:
        self.backing = folder / "backing"
        self.mount = folder / "mnt"
        self.control = folder / "stall"
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @staticmethod
    def unavailable() -> str:
        """Why no SlowFS can run here, or ''."""
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            return "needs root and /dev/fuse"
        try:
            import mfusepy  # noqa: F401
        except (ImportError, OSError) as err:
            return f"mfusepy/libfuse3 unusable: {err}"
        return ""

    def __enter__(self) -> SlowFS:
        self.backing.mkdir(parents=True)
        self.mount.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.slowfs", str(self.backing), str(self.mount),
             str(self.control)], cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.communicate()[1].decode(errors="replace") if self.proc.poll() \
                    is not None else "timeout"
                self.__exit__()
                raise RuntimeError(f"slowfs did not mount: {err}")
            time.sleep(0.02)
        return self

    def stall(self) -> None:
        self.control.write_text("")

    def slow(self, seconds: float) -> None:
        self.control.write_text(str(seconds))

    def resume(self) -> None:
        try:
            self.control.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc: object) -> None:
        self.resume()
        if os.path.ismount(self.mount):
            subprocess.run(["umount", "-l", str(self.mount)], check=False, capture_output=True)
        if self.proc is not None:
            reap(self.proc)   # unmounting ends it
            self.proc = None
        shutil.rmtree(self.mount, ignore_errors=True)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
