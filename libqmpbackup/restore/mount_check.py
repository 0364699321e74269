"""The checksums of a mount, computed while the point is already served.

``mount`` must not read the whole chain before the first byte, so the files
not remembered as verified (:mod:`libqmpbackup.store.verified`) are hashed
by this process, started by ``mount`` with the same open descriptors the
daemon got and detached like it.  Damage ends the mount loudly: the
daemon is killed (its FUSE mounts stay, dead: every read of the exposed
files fails with "Transport endpoint is not connected" from then on), the
finding goes into the mount record and its log, and ``umount`` and ``list``
report it (``umount`` exits 11).  Files found intact are remembered.

Run as ``python -m libqmpbackup.restore.mount_check SPEC`` (JSON: the
mountpoint and, per file, descriptor, recorded digest and path).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from libqmpbackup.errors import QmpBackupError
from libqmpbackup.store import mounts
from libqmpbackup.store.digests import check_handles
from libqmpbackup.store.handles import FileHandle
from libqmpbackup.store.locks import hold
from libqmpbackup.store.verified import Verified

log = logging.getLogger("qmprestore mount")


def spec(mountpoint: str, files: Sequence[tuple[FileHandle, Optional[str]]]) -> str:
    return json.dumps({"mountpoint": mountpoint, "files": [
        {"fd": h.fd, "digest": d, "path": str(h.path)} for h, d in files]})


def _handles(data: Any) -> list[tuple[FileHandle, Optional[str]]]:
    return [(FileHandle(fd=f["fd"], name=Path(f["path"]).name, path=Path(f["path"]),
                        info=os.fstat(f["fd"])), f["digest"]) for f in data["files"]]


def _end_mount(mountpoint: str, damaged: list[str]) -> None:
    """Kill the daemon (the exposed files fail from now on) and record why, for umount and list.

    A read-only daemon has nothing to save, and a SIGTERM would unmount the
    exports cleanly: the empty files below them would then read as nothing.
    """
    try:
        with hold(mounts.lock_path(mountpoint), f"mountpoint {mountpoint}", mountpoint):
            record = mounts.load(mountpoint)
            if record is None or record.checker != os.getpid():
                return   # unmounted meanwhile
            record.damaged = damaged
            mounts.save(record)
            if mounts.alive(record):   # SIGKILL: the export stays, dead, every read fails
                os.kill(record.pid, signal.SIGKILL)
    except QmpBackupError as err:   # an umount holds the lock: it ends the daemon anyway
        log.error("%s", err)


def main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = json.loads(argv[0])
    pairs = _handles(data)
    checks = check_handles(pairs)
    Verified().remember((h.fd, d) for (h, d), c in zip(pairs, checks) if c.status == "ok")
    damaged = [f"{c.path}: {c.detail}" for c in checks if c.status not in ("ok", "unrecorded")]
    if not damaged:
        log.info("checksums of %d file(s) verified while mounted", len(pairs))
        return 0
    for line in damaged:
        log.error("DAMAGED, mount %s ended: %s", data["mountpoint"], line)
    _end_mount(data["mountpoint"], damaged)
    return 11


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
