"""contrib/fsfreeze-hooks on a real guest: SQLite stays consistent in quiesced backups.

The tiny guest runs qemu-ga with Debian's fsfreeze hook runner and has
sqlite3; the test installs the SQLite hook the way the README says and
keeps a writer committing pairs of rows, each transaction held open for a
moment between its two INSERTs (so that a freeze without the hook can
catch a transaction half done, with a hot journal on disk: SQLite then
refuses to open the restored copy read-only, "attempt to write a readonly
database").  Every point of a quiesced FULL + INC chain is restored and
its database, read from the restored ext4 image on the host, must:

* open read-only (a hot journal would make SQLite refuse: it must roll back
  first) with ``PRAGMA integrity_check`` = ok and no hot journal beside it;
* hold both rows of every transaction (no torn pair) and a transaction
  counter that agrees with them;
* hold every transaction the writer logged as committed before the point
  (the log is on the same filesystem, appended after COMMIT returned), and
  at most the one transaction after those whose COMMIT had returned but
  was not yet logged.

A writer at random moments catches an open transaction only now and then;
one test therefore freezes while a transaction is certainly open.  Without
the hook that point holds a hot journal every time; with it the
transaction commits first and is in the point.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libqmpbackup.backup import quiesce
from tests.guestvm import GuestImages, GuestVM, make_data_disk
from tests.helpers import Cli, guest_backup, recorded, restore_point, run

pytestmark = pytest.mark.guest

HOOKS = Path(__file__).resolve().parents[1] / "contrib" / "fsfreeze-hooks"
HOOK_D = "/etc/qemu/fsfreeze-hook.d"
HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
DB = "/mnt/db/app.db"

SCHEMA = ("CREATE TABLE pairs (id INTEGER, half INTEGER, data BLOB, PRIMARY KEY (id, half)); "
          "CREATE TABLE meta (transactions INTEGER); INSERT INTO meta VALUES (0);")
#: The guest's writer.  Transaction ID inserts (ID, 1), counts itself in
#: meta, waits PAUSE seconds, inserts (ID, 2) and commits; then ID goes to
#: /mnt/db/committed.  It waits for the hook's lock through its busy
#: timeout, as applications do.  synchronous = OFF writes the journal
#: header at the first change, so the journal is hot for the whole
#: transaction and a freeze without the hook can catch one (with the
#: default FULL only a freeze inside COMMIT does: the issue measured 1
#: point in 54).  "loop" commits until /mnt/db/stop appears.
WRITER = """\
txn() {
    { echo '.timeout 20000'; echo 'PRAGMA synchronous = OFF;'; echo 'BEGIN IMMEDIATE;'
      echo "INSERT INTO pairs VALUES ($1, 1, randomblob(16384));"
      echo 'UPDATE meta SET transactions = transactions + 1;'
      sleep "$2"
      echo "INSERT INTO pairs VALUES ($1, 2, randomblob(65536));"; echo 'COMMIT;'; } \\
        | sqlite3 -bail /mnt/db/app.db >/dev/null 2>>/run/writer.err && echo "$1" >>/mnt/db/committed
}
case "$1" in
    once) txn "$2" "$3" ;;
    loop) i=0
          while [ ! -e /mnt/db/stop ]; do i=$((i + 1)); txn "$i" 0.3; done
          touch /run/writer.stopped ;;
esac
"""


@pytest.fixture(scope="module")
def vm(guest_images: GuestImages, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    work = tmp_path_factory.mktemp("fsfreeze-guest")
    with GuestVM(guest_images, make_data_disk(work / "data.qcow2"), log_dir=work / "logs") as guest:
        install_sqlite_hook(guest)
        yield guest


def install_sqlite_hook(vm: GuestVM) -> None:
    """The README's install steps, done through the agent."""
    vm.write_file(f"{HOOK_D}/qmpbackup-hooklib.sh", (HOOKS / "qmpbackup-hooklib.sh").read_text())
    vm.write_file(f"{HOOK_D}/qmpbackup-sqlite", (HOOKS / "qmpbackup-sqlite").read_text(), 0o755)
    vm.write_file("/etc/qemu/qmpbackup-fsfreeze.conf",
                  (HOOKS / "qmpbackup-fsfreeze.conf").read_text())
    vm.write_file("/etc/qemu/fsfreeze-sqlite.list",
                  (HOOKS / "fsfreeze-sqlite.list").read_text() + f"{DB}\n")


def guest_ok(vm: GuestVM, cmd: str, timeout: float = 30) -> str:
    code, out, err = vm.exec(cmd, timeout=timeout)
    assert code == 0, f"{cmd!r} failed in the guest ({code}): {err}"
    return out


def committed_count(vm: GuestVM) -> int:
    return int(guest_ok(vm, "cat /mnt/db/committed 2>/dev/null | wc -l").strip())


def wait_for_commits(vm: GuestVM, more_than: int) -> int:
    deadline = time.monotonic() + 30
    while (count := committed_count(vm)) <= more_than:
        assert time.monotonic() < deadline, "the guest writer does not commit"
        time.sleep(0.2)
    return count


def dump(image: Path, path: str, out: Path) -> bool:
    """Copy PATH out of the ext4 IMAGE to OUT; False when the image has no PATH."""
    done = run("debugfs", "-R", f"dump {path} {out}", image)
    if "File not found" in done.stderr:
        return False
    assert "Filesystem not open" not in done.stderr and out.exists(), done.stderr
    return True


def check_database(raw: Path, work: Path, point: int) -> int:
    """The point's database against the module docstring's promises; its number of pairs."""
    db = work / f"point{point}.db"
    assert dump(raw, "/db/app.db", db), f"point {point}: no database"
    journal = Path(f"{db}-journal")
    if dump(raw, "/db/app.db-journal", journal):
        # Only a journal whose header SQLite already invalidated may be left.
        assert journal.read_bytes()[:28].strip(b"\0") == b"", f"point {point}: hot journal"
    logged = work / f"point{point}.committed"
    ids_logged = ({int(x) for x in logged.read_text().split()}
                  if dump(raw, "/db/committed", logged) else set())
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"point {point}"
        torn = conn.execute("SELECT id FROM pairs GROUP BY id HAVING count(*) != 2").fetchall()
        assert torn == [], f"point {point}: torn transactions {torn}"
        ids = {row[0] for row in conn.execute("SELECT DISTINCT id FROM pairs")}
        assert conn.execute("SELECT transactions FROM meta").fetchall() == [(len(ids),)], \
            f"point {point}: the counter disagrees with the rows"
    conn.close()
    assert ids_logged <= ids, f"point {point}: committed transactions lost: {sorted(ids_logged - ids)}"
    unlogged = ids - ids_logged
    assert unlogged <= {max(ids_logged, default=0) + 1}, f"point {point}: {sorted(unlogged)} never committed"
    return len(ids)


def fresh_database(vm: GuestVM) -> None:
    """An empty database, the writer script, and an empty hook log."""
    guest_ok(vm, "mkdir -p /mnt/db && rm -f /mnt/db/* /run/writer.stopped /run/writer.err "
                 f"&& sqlite3 {DB} '{SCHEMA}' && : >{HOOK_LOG}")
    vm.write_file("/run/writer.sh", WRITER)


def restored_points(target: Path, work: Path) -> list[Path]:
    """Every point of the chain, quiesced, restored as a raw image."""
    records = recorded(target)
    assert all(r["quiesced"] for r in records), records
    return [restore_point(target / "virtio0" / r["file"], work / f"point{point}.raw")
            for point, r in enumerate(records)]


def test_sqlite_hook_keeps_quiesced_points_consistent(vm: GuestVM, cli: Cli, tmp_path: Path) -> None:
    fresh_database(vm)
    guest_ok(vm, "sh /run/writer.sh loop </dev/null >/dev/null 2>&1 &")
    target = tmp_path / "backup"
    seen = 0
    try:
        for level in ("full", "inc", "inc"):
            seen = wait_for_commits(vm, seen + 3)
            result = guest_backup(cli, vm, level, target, "--quiesce").ok()
            assert "qmpbackup: froze 1 guest filesystem(s) in " in result.err, result.err
            assert "warning" not in result.err, result.err
        seen = wait_for_commits(vm, seen)
    finally:
        vm.exec("touch /mnt/db/stop; while [ ! -e /run/writer.stopped ]; do sleep 0.05; done")
    assert guest_ok(vm, "cat /run/writer.err 2>/dev/null") == ""
    assert [r["level"] for r in recorded(target)] == ["full", "inc", "inc"]
    pairs = [check_database(raw, tmp_path, point)
             for point, raw in enumerate(restored_points(target, tmp_path))]
    assert pairs == sorted(pairs) and pairs[0] > 0 and pairs[-1] > pairs[0], pairs
    hook_log = guest_ok(vm, f"cat {HOOK_LOG}")
    assert hook_log.count(f"sqlite.1: {DB}: locked (BEGIN IMMEDIATE) after") == 3, hook_log
    assert hook_log.count("sqlite.1: released") == 3, hook_log


def test_transaction_in_progress_commits_before_the_freeze(vm: GuestVM, cli: Cli,
                                                           tmp_path: Path) -> None:
    """The freeze comes while a transaction is open: the hook lets it commit, then locks.

    Without the hook this point holds the transaction's hot journal every time.
    """
    fresh_database(vm)
    guest_ok(vm, "sh /run/writer.sh once 1 4 </dev/null >/dev/null 2>&1 &")
    guest_ok(vm, "i=0; while [ ! -s /mnt/db/app.db-journal ] && [ $i -lt 200 ]; do "
                 "sleep 0.05; i=$((i + 1)); done; [ -s /mnt/db/app.db-journal ]")
    guest_backup(cli, vm, "full", tmp_path / "backup", "--quiesce").ok()
    guest_ok(vm, "while [ -e /mnt/db/app.db-journal ]; do sleep 0.05; done")
    assert guest_ok(vm, "cat /run/writer.err 2>/dev/null") == ""
    [raw] = restored_points(tmp_path / "backup", tmp_path)
    assert check_database(raw, tmp_path, 0) == 1, "the open transaction is in the point"
    waited = [int(line.split(" after ")[1].split(" s")[0])
              for line in guest_ok(vm, f"cat {HOOK_LOG}").splitlines() if "locked (BEGIN IMMEDIATE)" in line]
    assert len(waited) == 1 and waited[0] >= 1, "the hook waited for the open transaction"


def test_stuck_database_does_not_hold_the_freeze(vm: GuestVM, cli: Cli, tmp_path: Path) -> None:
    """A transaction that outlasts HOOK_FREEZE_TIMEOUT: the hook gives up in time, the freeze goes on."""
    conf = (HOOKS / "qmpbackup-fsfreeze.conf").read_text()
    fresh_database(vm)
    vm.write_file("/etc/qemu/qmpbackup-fsfreeze.conf", conf + "HOOK_FREEZE_TIMEOUT=2\n")
    try:
        guest_ok(vm, "sh /run/writer.sh once 1 5 </dev/null >/dev/null 2>&1 &")
        guest_ok(vm, "i=0; while [ ! -s /mnt/db/app.db-journal ] && [ $i -lt 200 ]; do "
                     "sleep 0.05; i=$((i + 1)); done; [ -s /mnt/db/app.db-journal ]")
        result = guest_backup(cli, vm, "full", tmp_path / "backup", "--quiesce").ok()
    finally:
        vm.write_file("/etc/qemu/qmpbackup-fsfreeze.conf", conf)
    froze = [line for line in result.err.splitlines() if " guest filesystem(s) in " in line]
    assert len(froze) == 1 and float(froze[0].split(" in ")[1].rstrip(" s")) < 2 + 3, result.err
    hook_log = guest_ok(vm, f"cat {HOOK_LOG}")
    # sqlite3's busy timeout or, on a slow guest, the hook's deadline ends the wait.
    assert (f"sqlite.1: {DB}: not locked within 2 s: frozen unlocked" in hook_log
            or f"sqlite.1: {DB}: could not lock: Runtime error near line 2: database is locked"
            in hook_log), hook_log
    assert "qmpbackup-sqlite freeze\n" in hook_log and "qmpbackup-sqlite finished with status=1" in hook_log
    guest_ok(vm, "while [ -e /mnt/db/app.db-journal ]; do sleep 0.05; done")
    assert guest_ok(vm, "cat /mnt/db/committed") == "1\n", "the writer was not held up"


def test_slow_freeze_is_reported(vm: GuestVM, cli: Cli, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook that takes long shows in the tool's output: the freeze time, and a warning."""
    monkeypatch.setattr(quiesce, "SLOW_FREEZE", 1.0)
    vm.write_file(f"{HOOK_D}/zz-slow", '#!/bin/sh\n[ "$1" = freeze ] && sleep 2\nexit 0\n', 0o755)
    try:
        result = guest_backup(cli, vm, "full", tmp_path / "backup", "--quiesce").ok()
    finally:
        guest_ok(vm, f"rm -f {HOOK_D}/zz-slow")
    lines = result.err.splitlines()
    froze = [line for line in lines if line.startswith("qmpbackup: froze 1 guest filesystem(s) in ")]
    assert len(froze) == 1 and float(froze[0].split(" in ")[1].rstrip(" s")) >= 2.0, result.err
    warned = [line for line in lines if line.startswith("qmpbackup: warning: ")]
    assert len(warned) == 1, result.err
    took = float(warned[0].split("the guest agent took ")[1].split(" s to freeze")[0])
    assert took >= 2.0 and "(more than 1 s)" in warned[0], warned[0]
    assert HOOK_LOG in warned[0]
    assert [r["quiesced"] for r in recorded(tmp_path / "backup")] == [True]
