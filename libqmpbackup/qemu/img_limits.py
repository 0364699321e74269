"""Resource limits for every qemu-img run: a crafted image is damage, never a hang.

The images qemu-img reads come from backup folders, which may be owned by
an unprivileged user or copied back from elsewhere.  A 34 MB qcow2 whose
millions of L1 entries share one L2 table keeps ``qemu-img check`` busy for
most of an hour; fuzzed images have made ``qemu-img info`` allocate
gigabytes (why libguestfs and OpenStack limit it too).  So each run gets, in
the child before qemu-img starts, an address-space limit (RLIMIT_AS) and,
fitting the kind of call:

* **inspection** (``info``, ``check``, listing snapshots) reads metadata
  only: a tight CPU budget (RLIMIT_CPU) and a wall-clock timeout;
* **data** (``convert``, ``commit``, ``create``, ``rebase``) moves guest
  data, which legitimately takes long: no CPU limit, and a wall-clock
  budget of a base plus one second per :data:`DATA_MIN_RATE` bytes of the
  input files (their size on disk: a real image stores each cluster once).

What qemu-img prints is kept up to :data:`OUTPUT_LIMIT` per stream: an
image can make ``check`` print an error per cluster reference, hundreds of
MB a second, which must not fill this process's memory; past the limit the
child is killed.  A run stopped at any limit raises
:class:`~libqmpbackup.errors.QemuImgLimitError` (``verify`` lists the file
as damaged, other commands refuse in one line).  A killed child is always
reaped.

Admins and tests override the defaults through the environment (whole
numbers; ``0`` switches that limit off; the memory takes ``512M``, ``4G``):

========================================  ========  ==============================================
variable                                  default   limits
========================================  ========  ==============================================
``QMPBACKUP_QEMU_IMG_CPU_SECONDS``        60        CPU seconds of an inspection call
``QMPBACKUP_QEMU_IMG_TIMEOUT``            300       wall-clock seconds of an inspection call
``QMPBACKUP_QEMU_IMG_DATA_TIMEOUT``       3600      base wall-clock seconds of a data call
``QMPBACKUP_QEMU_IMG_MEMORY``             2G        address space of every call
========================================  ========  ==============================================
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import IO, Collection, Optional, Sequence, Union

from libqmpbackup.errors import UsageError
from libqmpbackup.units import parse_size

CPU_SECONDS = 60
TIMEOUT = 300
DATA_TIMEOUT = 3600
MEMORY = 2 << 30
#: the slowest rate a data call is allowed on top of DATA_TIMEOUT (bytes of input per second)
DATA_MIN_RATE = 4 << 20
#: bytes of stdout and of stderr kept; more ends the run (``info`` of a real image prints KiBs)
OUTPUT_LIMIT = 16 << 20
#: after the soft CPU limit's SIGXCPU, the kernel's SIGKILL follows this many seconds later
CPU_GRACE = 5

ENV_CPU_SECONDS = "QMPBACKUP_QEMU_IMG_CPU_SECONDS"
ENV_TIMEOUT = "QMPBACKUP_QEMU_IMG_TIMEOUT"
ENV_DATA_TIMEOUT = "QMPBACKUP_QEMU_IMG_DATA_TIMEOUT"
ENV_MEMORY = "QMPBACKUP_QEMU_IMG_MEMORY"

#: how qemu-img reports an allocation refused by RLIMIT_AS (it then exits 1 or aborts):
#: "Cannot allocate memory" (ENOMEM), GLib's and qemu_memalign's "failed to allocate N bytes",
#: or no room for a new thread's stack
_OUT_OF_MEMORY = ("Cannot allocate memory", "failed to allocate", "qemu_thread_create")


def _setting(name: str, default: int, *, size: bool = False) -> int:
    """The environment's value for NAME (read at each call, so tests can set it), else DEFAULT."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = parse_size(text) if size else int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{name}={text!r}: not a whole number"
                         f"{' or size (512M, 4G)' if size else ''}; 0 switches the limit off")
    return value


@dataclass(frozen=True)
class Budget:
    """What one qemu-img run may use; 0 means no limit of that kind."""

    kind: str
    cpu_seconds: int
    timeout: float
    memory: int

    def apply(self) -> None:
        """Set the limits on the current process: run in the child between fork and exec.

        No core file either: a qemu-img killed at its CPU limit or aborted on
        a refused allocation would otherwise dump gigabytes into the working directory.
        """
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.memory:
            resource.setrlimit(resource.RLIMIT_AS, (self.memory, self.memory))
        if self.cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU,
                               (self.cpu_seconds, self.cpu_seconds + CPU_GRACE))

    def exceeded(self, returncode: int, stderr: str) -> Optional[str]:
        """Which limit ended a run that exited with RETURNCODE, or None if none did."""
        if self.cpu_seconds and returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return f"its limit of {self.cpu_seconds} CPU seconds ({ENV_CPU_SECONDS})"
        # by its message only: qemu-img also aborts on a failed assertion, which is no limit
        if self.memory and any(text in stderr for text in _OUT_OF_MEMORY):
            return f"its limit of {self.memory >> 20} MiB of address space ({ENV_MEMORY})"
        return None

    def timed_out(self) -> str:
        env = ENV_TIMEOUT if self.kind == "inspection" else ENV_DATA_TIMEOUT
        return f"its time limit of {self.timeout:.0f} s ({env})"


@dataclass
class Finished:
    """How a limited run ended: exit code, the output kept, and LIMIT: the time or output
    limit that stopped it (CPU and memory show in the exit: :meth:`Budget.exceeded`)."""

    returncode: int
    stdout: str
    stderr: str
    limit: Optional[str] = None


def run(argv: Sequence[str], budget: Budget, pass_fds: Collection[int] = ()) -> Finished:
    """Run ARGV under BUDGET (limits set in the child between fork and exec); never raises at a limit.

    OSError when the program cannot be started.  However the run ends, the
    child is gone when this returns: killed if still running, always reaped.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
                            preexec_fn=budget.apply)
    deadline = time.monotonic() + budget.timeout if budget.timeout else None
    try:
        out, err, limit = _collect(proc, budget, deadline)
        if limit is None:
            try:
                proc.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                limit = budget.timed_out()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    stdout, stderr = (data.decode("utf-8", "surrogateescape") for data in (out, err))
    return Finished(proc.returncode, stdout, stderr, limit)


def _collect(proc: subprocess.Popen[bytes], budget: Budget, deadline: Optional[float]
             ) -> tuple[bytes, bytes, Optional[str]]:
    """PROC's stdout and stderr until both close, or the limit (time, output) hit first."""
    streams: list[IO[bytes]] = [s for s in (proc.stdout, proc.stderr) if s is not None]
    kept = {stream.fileno(): bytearray() for stream in streams}
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return b"", b"", budget.timed_out()
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                kept[key.fd] += chunk
                if len(kept[key.fd]) > OUTPUT_LIMIT:
                    return b"", b"", f"its limit of {OUTPUT_LIMIT >> 20} MiB of output"
    stdout, stderr = (bytes(kept[stream.fileno()]) for stream in streams)
    return stdout, stderr, None


def inspection() -> Budget:
    """The budget of a call that reads only metadata (``info``, ``check``, snapshot lists)."""
    return Budget("inspection", _setting(ENV_CPU_SECONDS, CPU_SECONDS),
                  _setting(ENV_TIMEOUT, TIMEOUT), _setting(ENV_MEMORY, MEMORY, size=True))


def data(input_bytes: int, rate_limit: int = 0) -> Budget:
    """The budget of a call that moves INPUT_BYTES of guest data (at most RATE_LIMIT per second)."""
    base = _setting(ENV_DATA_TIMEOUT, DATA_TIMEOUT)
    rate = min(DATA_MIN_RATE, rate_limit) if rate_limit else DATA_MIN_RATE
    return Budget("data", 0, base + input_bytes / rate if base else 0,
                  _setting(ENV_MEMORY, MEMORY, size=True))


def input_bytes(args: Sequence[str], pass_fds: Collection[int] = ()) -> int:
    """Bytes on disk of the files a qemu-img call names: the scale of a data call's time budget.

    Files reach qemu-img as passed descriptors (``/dev/fd/N``), as paths or
    inside a ``json:`` chain; each one counted is measured with ``fstat`` or
    ``stat`` and never opened.
    """
    files: list[Union[int, str]] = list(pass_fds)
    for arg in args:
        if arg.startswith("json:"):
            files += _json_filenames(arg[5:])
        elif _named_file(arg):
            files.append(arg)
    return sum(_stored_bytes(f) for f in files)


def _named_file(name: str) -> bool:
    """An absolute path other than a passed descriptor (those are counted by their fd)."""
    return os.path.isabs(name) and not name.startswith("/dev/fd/")


def _stored_bytes(file: Union[int, str]) -> int:
    """Bytes FILE really stores: a sparse file cannot buy itself a longer budget."""
    try:
        info = os.stat(file)
    except (OSError, ValueError):
        return 0
    if not stat.S_ISREG(info.st_mode):
        return 0
    return min(info.st_size, info.st_blocks * 512)


def _json_filenames(text: str) -> list[str]:
    try:
        node = json.loads(text)
    except ValueError:
        return []
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            name = item.get("filename")
            if isinstance(name, str) and _named_file(name):
                found.append(name)
            stack += item.values()
    return found
