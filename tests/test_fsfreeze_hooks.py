"""contrib/fsfreeze-hooks: the freeze/thaw logic of the database hooks, on the host.

The SQLite hook runs against real databases here and in the guest
(tests/test_guest_fsfreeze.py).  PostgreSQL and MySQL are not in the test
guest, so their hooks run against stub ``psql`` / ``mysql`` commands on PATH
that record what they were asked and can hang: that proves the freeze
sends the right statements, holds the session until the thaw, stays inside
its time bound when the database hangs (and cleans up after itself), and
that every thaw can be repeated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[1] / "contrib" / "fsfreeze-hooks"
#: HOOK_FREEZE_TIMEOUT for the tests; stopping a client may add up to 3 s.
TIMEOUT = 2
BOUND = TIMEOUT + 3

#: psql: records its arguments and input lines; runs ``\\!`` lines as psql
#: does; STUB_MODE=hang hangs on the statement that needs the database.
STUB_PSQL = r"""#!/bin/sh
echo "$$" >>"$STUB_DIR/pids"
echo "psql $*" >>"$STUB_DIR/record"
hang() { [ "$STUB_MODE" = hang ] && exec sleep 600; }
fail() { [ "$STUB_MODE" = fail ] && { echo "ERROR: boom" >&2; exit 3; }; }
for arg; do
    [ "$arg" = CHECKPOINT ] && { hang; fail; exit 0; }
done
while IFS= read -r line; do
    echo "psql< $line" >>"$STUB_DIR/record"
    case "$line" in
        *pg_backup_start*) hang ;;
        '\! '*) sh -c "${line#\\! }" ;;
    esac
done
echo "psql exit" >>"$STUB_DIR/record"
"""

#: mysql: the same for FLUSH TABLES WITH READ LOCK; answers the SELECTs.
STUB_MYSQL = r"""#!/bin/sh
echo "$$" >>"$STUB_DIR/pids"
echo "mysql $*" >>"$STUB_DIR/record"
case "$*" in *" -e "*) exit 0 ;; esac
while IFS= read -r line; do
    echo "mysql< $line" >>"$STUB_DIR/record"
    case "$line" in
        *CONNECTION_ID*) echo "qmpbackup-connection 42" ;;
        "FLUSH TABLES WITH READ LOCK;") [ "$STUB_MODE" = hang ] && exec sleep 600 ;;
        "SELECT 'qmpbackup-held';") echo qmpbackup-held ;;
    esac
done
echo "mysql exit" >>"$STUB_DIR/record"
"""


def shells() -> list[list[str]]:
    found = [["sh"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


@dataclass
class Hooks:
    """The hooks run with stubs first on PATH, all state and logs under one folder."""

    root: Path
    shell: list[str]
    mode: str = "ok"

    @property
    def record(self) -> list[str]:
        path = self.root / "stub" / "record"
        return path.read_text().splitlines() if path.exists() else []

    @property
    def log(self) -> str:
        path = self.root / "hook.log"
        return path.read_text() if path.exists() else ""

    def configure(self, **settings: str) -> None:
        lines = [f"HOOK_LOG={self.root}/hook.log", f"HOOK_STATE={self.root}/state",
                 f"HOOK_FREEZE_TIMEOUT={TIMEOUT}", "PG_RUN_AS="]
        lines += [f"{key}={value}" for key, value in settings.items()]
        (self.root / "hooks.conf").write_text("\n".join(lines) + "\n")

    def run(self, hook: str, action: str) -> tuple[int, float]:
        """Run HOOK with ACTION; its exit status and how long it took."""
        env = dict(os.environ, QMPBACKUP_FSFREEZE_CONF=str(self.root / "hooks.conf"),
                   PATH=f"{self.root / 'stub'}:{os.environ['PATH']}",
                   STUB_DIR=str(self.root / "stub"), STUB_MODE=self.mode)
        started = time.monotonic()
        done = subprocess.run([*self.shell, str(HOOKS / f"qmpbackup-{hook}"), action], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.stdout == "" and done.stderr == "", "hooks log to their file only"
        return done.returncode, time.monotonic() - started

    def stub_alive(self) -> list[int]:
        """Stub processes still running (not zombies)."""
        path = self.root / "stub" / "pids"
        alive = []
        for pid in map(int, path.read_text().split()) if path.exists() else []:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                continue
            if state != "Z":
                alive.append(pid)
        return alive

    def wait_stubs_gone(self) -> None:
        deadline = time.monotonic() + 5
        while self.stub_alive():
            assert time.monotonic() < deadline, f"stub processes left: {self.stub_alive()}"
            time.sleep(0.05)

    def state_left(self) -> list[str]:
        state = self.root / "state"
        return sorted(p.name for p in state.iterdir()) if state.exists() else []


@pytest.fixture(params=shells(), ids=lambda s: "-".join(s))
def hooks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hooks]:
    stub = tmp_path / "stub"
    stub.mkdir()
    for name, text in (("psql", STUB_PSQL), ("mysql", STUB_MYSQL)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    h = Hooks(tmp_path, request.param)
    h.configure()
    yield h
    for pid in h.stub_alive():
        os.kill(pid, 9)


def test_postgresql_checkpoint(hooks: Hooks) -> None:
    assert hooks.run("postgresql", "freeze")[0] == 0
    assert hooks.record == ["psql -X -q -v ON_ERROR_STOP=1 -c CHECKPOINT"]
    assert "CHECKPOINT done in" in hooks.log
    assert hooks.run("postgresql", "thaw")[0] == 0
    assert len(hooks.record) == 1


@pytest.mark.parametrize("mode, logged", [("hang", f"CHECKPOINT not done within {TIMEOUT} s"),
                                          ("fail", "CHECKPOINT failed (status 3): ERROR: boom")])
def test_postgresql_checkpoint_bounded_and_reported(hooks: Hooks, mode: str, logged: str) -> None:
    hooks.mode = mode
    rc, took = hooks.run("postgresql", "freeze")
    assert rc == 1 and took < BOUND
    assert logged in hooks.log
    hooks.wait_stubs_gone()
    assert hooks.run("postgresql", "thaw")[0] == 0


def test_postgresql_backup_mode_held_until_thaw(hooks: Hooks) -> None:
    hooks.configure(PG_MODE="backup", PSQL_ARGS='"-p 5433"')
    assert hooks.run("postgresql", "freeze")[0] == 0
    assert "backup mode started (pg_backup_start)" in hooks.log
    assert hooks.record[0] == "psql -X -q -v ON_ERROR_STOP=1 -p 5433"
    assert any("pg_backup_start('qmpbackup', true)" in line for line in hooks.record)
    assert not any("pg_backup_stop" in line for line in hooks.record)
    assert hooks.stub_alive(), "the session must stay open across the freeze"
    assert hooks.run("postgresql", "thaw")[0] == 0
    assert any("pg_backup_stop(false)" in line for line in hooks.record)
    assert hooks.record[-1] == "psql exit"
    assert hooks.stub_alive() == [] and hooks.state_left() == []
    # Thawing again (the tool retries, or thaws a guest it never froze) is harmless.
    count = len(hooks.record)
    assert hooks.run("postgresql", "thaw")[0] == 0
    assert len(hooks.record) == count


def test_postgresql_backup_mode_hang_is_bounded(hooks: Hooks) -> None:
    hooks.configure(PG_MODE="backup")
    hooks.mode = "hang"
    rc, took = hooks.run("postgresql", "freeze")
    assert rc == 1 and took < BOUND, took
    assert f"backup mode not started within {TIMEOUT} s" in hooks.log
    hooks.wait_stubs_gone()
    assert hooks.state_left() == []


def test_mysql_lock_held_until_thaw(hooks: Hooks) -> None:
    assert hooks.run("mysql", "freeze")[0] == 0
    assert "tables locked (FLUSH TABLES WITH READ LOCK)" in hooks.log
    assert hooks.record[0] == "mysql --batch --skip-column-names --unbuffered"
    assert "mysql< FLUSH TABLES WITH READ LOCK;" in hooks.record
    assert "mysql< UNLOCK TABLES;" not in hooks.record
    assert hooks.stub_alive(), "the locking session must stay open across the freeze"
    assert hooks.run("mysql", "thaw")[0] == 0
    assert hooks.record[-2:] == ["mysql< UNLOCK TABLES;", "mysql exit"]
    assert hooks.stub_alive() == [] and hooks.state_left() == []
    count = len(hooks.record)
    assert hooks.run("mysql", "thaw")[0] == 0
    assert len(hooks.record) == count


def test_mysql_hang_is_bounded_and_killed_on_the_server(hooks: Hooks) -> None:
    hooks.mode = "hang"
    rc, took = hooks.run("mysql", "freeze")
    assert rc == 1 and took < BOUND, took
    assert f"tables not locked within {TIMEOUT} s" in hooks.log
    assert f"SET SESSION lock_wait_timeout = {TIMEOUT - 1};" in " ".join(hooks.record)
    assert hooks.record[-1] == "mysql --batch --skip-column-names --unbuffered -e KILL 42"
    hooks.wait_stubs_gone()
    assert hooks.state_left() == []


@pytest.mark.parametrize("hook", ["sqlite", "postgresql", "mysql"])
def test_thaw_without_freeze_is_a_no_op(hooks: Hooks, hook: str) -> None:
    assert hooks.run(hook, "thaw")[0] == 0
    assert hooks.record == []


@pytest.mark.skipif(not shutil.which("sqlite3"), reason="sqlite3 missing (make system-deps)")
def test_sqlite_locked_database_is_bounded(hooks: Hooks, tmp_path: Path) -> None:
    """A writer keeps its transaction open past the deadline: the hook gives up in time."""
    db = tmp_path / "app.db"
    subprocess.run(["sqlite3", str(db), "CREATE TABLE t(x)"], check=True)
    (tmp_path / "dbs.list").write_text(f"# databases\n\n{db}\n{tmp_path / 'absent.db'}\n")
    hooks.configure(SQLITE_LIST=str(tmp_path / "dbs.list"))
    writer = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE, text=True)
    try:
        assert writer.stdin is not None
        writer.stdin.write("BEGIN IMMEDIATE;\nINSERT INTO t VALUES (1);\n")
        writer.stdin.flush()
        time.sleep(0.3)
        rc, took = hooks.run("sqlite", "freeze")
        assert rc == 1 and took < BOUND, took
        assert "database is locked" in hooks.log
        assert "absent.db: no such file, skipped" in hooks.log
        assert not (tmp_path / "absent.db").exists()
        assert hooks.state_left() == []
    finally:
        writer.communicate("COMMIT;\n", timeout=10)
    # Free again: the lock is taken and held until the thaw.
    assert hooks.run("sqlite", "freeze")[0] == 0
    blocked = subprocess.run(["sqlite3", str(db), "INSERT INTO t VALUES (2)"],
                             capture_output=True, text=True, check=False)
    assert "database is locked" in blocked.stderr
    assert hooks.run("sqlite", "thaw")[0] == 0
    subprocess.run(["sqlite3", str(db), "INSERT INTO t VALUES (3)"], check=True)
    assert hooks.state_left() == []
