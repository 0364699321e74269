"""Run qmpbackup with the run stopped at a named step: the kill-anywhere tests' wrapper.

    python -m tests.paused_run STEP READY_FILE [SIGNAL] -- QMPBACKUP-ARGS...

Sets :data:`libqmpbackup.backup.run_steps.PAUSE` in this process only,
then calls the CLI's ``main``.  At STEP the run creates READY_FILE and either
waits there to be SIGKILLed, or (with SIGNAL, e.g. ``TERM``) sends itself
that signal and goes on.  The tool itself has no way to set the hook.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from libqmpbackup.backup import run_steps
from qmpbackup.cli import main


def run(argv: list[str]) -> int:
    split = argv.index("--")
    own, tool_args = argv[:split], argv[split + 1:]
    step, ready = own[0], Path(own[1])
    signum = int(signal.Signals[f"SIG{own[2]}"]) if len(own) > 2 else None
    if step not in run_steps.STEPS:
        raise SystemExit(f"unknown step {step!r}: {', '.join(run_steps.STEPS)}")
    run_steps.PAUSE = run_steps.Pause(step=step, ready=ready, signum=signum)
    return main(tool_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
