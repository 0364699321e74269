"""Backup folder contents and guest agent replies are untrusted: the pure checks, without a VM.

The fuzz test mutates valid metadata and journals at random (fixed seed, so a
failure reproduces): whatever the shape, loading either succeeds with
well-typed values or raises ChainError naming the file — never another
exception, which the runner would report as exit 1 "unexpected …".
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import random
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from libqmpbackup.errors import AgentError, ChainError, QmpBackupError
from libqmpbackup.logsetup import configure
from libqmpbackup.qemu import qemuimg
from libqmpbackup.qemu.agent import READ_LIMIT, GuestAgent
from libqmpbackup.restore import file_steps
from libqmpbackup.store import folder_safety, name_rules
from libqmpbackup.store.fsutil import make_private_dirs
from libqmpbackup.store.handles import Folder, plain_name
from libqmpbackup.store.journal import JOURNAL_NAME
from libqmpbackup.store.metadata import ChainStore
from libqmpbackup.store.names import INTENT_NAME, METADATA_NAME
from libqmpbackup.store.qcow2_header import read_header
from libqmpbackup.tables import table
from tests.helpers import read_intent_at, read_journal, read_store

VALID_METADATA: dict[str, Any] = {"version": 1, "chains": [{
    "uuid": "c1", "bitmap": "qmpbackup-c1", "created": 100,
    "disks": {"virtio0": {"backups": [
        {"file": "FULL-100-d.qcow2", "level": "full", "time": 100, "virtual_size": 1048576,
         "source_image": "/vm/d.qcow2", "source_format": "qcow2", "compressed": False,
         "quiesced": False},
        {"file": "INC-200-d.qcow2", "level": "inc", "time": 200, "virtual_size": 1048576,
         "source_image": "/vm/d.qcow2"}]}}}]}

VALID_JOURNAL: dict[str, Any] = {
    "operation": "commit", "chain": "c1", "disk": "virtio0", "base": "FULL-100-d.qcow2",
    "result": "FULL-200-d.qcow2", "point": "INC-200-d.qcow2", "point_time": 200,
    "steps": ["INC-200-d.qcow2"], "snapshots": False, "done": 0}

ODD_VALUES: list[Any] = [None, True, False, 0, -1, 2**64, 10**400, 1.5, float("inf"), "",
                         "../../etc/passwd", "/etc/shadow", "a/b", "x" * 5000, "\0", [], {},
                         [1, [2, [3]]], {"a": {"b": {}}}, "FULL-1-x.qcow2\n"]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside VALUE that a mutation can hit."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _mutate(document: Any, rng: random.Random) -> Any:
    document = copy.deepcopy(document)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(_paths(document))
        if not where:
            return rng.choice(ODD_VALUES)
        parent = document
        for step in where[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and rng.random() < 0.25:
            del parent[where[-1]]
        else:
            parent[where[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    return document


def _write(folder: Path, name: str, document: Any) -> None:
    text = json.dumps(document) if not isinstance(document, str) else document
    (folder / name).unlink(missing_ok=True)   # a new file: truncating is slow on some filesystems
    (folder / name).write_text(text)


@pytest.mark.parametrize("name, valid, load", [
    (METADATA_NAME, VALID_METADATA, read_store),
    (JOURNAL_NAME, VALID_JOURNAL, read_journal),
], ids=["metadata", "journal"])
def test_fuzzed_documents_load_or_raise_a_chain_error(tmp_path: Path, name: str, valid: Any,
                                                      load: Any) -> None:
    rng = random.Random(15)
    _write(tmp_path, name, valid)
    assert load(tmp_path) is not None
    for _ in range(400):
        _write(tmp_path, name, _mutate(valid, rng))
        try:
            loaded = load(tmp_path)
        except ChainError as err:
            assert name in str(err)
            continue
        names = ([r.file for c in loaded.chains for d in c.disks.values() for r in d.backups]
                 if isinstance(loaded, ChainStore)
                 else [loaded.base, loaded.result, loaded.point, *loaded.steps])
        # whatever loads names only plain files inside the folder
        assert all(n not in ("", ".", "..") and "/" not in n and "\0" not in n for n in names), names


@pytest.mark.parametrize("text", ["[" * 50000, "{" * 10 + "}", '{"chains": [' * 3000, "",
                                  "null", "1e999", '"x"'])
def test_unparsable_metadata_is_a_chain_error(tmp_path: Path, text: str) -> None:
    (tmp_path / METADATA_NAME).write_text(text)
    with pytest.raises(ChainError, match=METADATA_NAME):
        read_store(tmp_path)


def test_metadata_and_journal_are_never_read_through_a_symlink(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(VALID_METADATA))
    (tmp_path / METADATA_NAME).symlink_to(elsewhere)
    (tmp_path / JOURNAL_NAME).symlink_to(elsewhere)
    with pytest.raises(ChainError, match="is a symlink"):
        read_store(tmp_path)
    with pytest.raises(ChainError, match="is a symlink"):
        read_journal(tmp_path)


# -- control characters (issue 20, finding 10) -------------------------------------------------

FORGED = "\nqmprestore: error: forged\x1b[2J"


def _with(document: dict[str, Any], path: tuple[Any, ...], value: Any, *, key: bool = False) -> Any:
    """A copy of DOCUMENT with the value (or with KEY, the key) at PATH replaced by VALUE."""
    changed = copy.deepcopy(document)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    if key:
        parent[value] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return changed


DISKS = ("chains", 0, "disks", "virtio0")
RECORD = (*DISKS[:-1], "virtio0", "backups", 0)


@pytest.mark.parametrize("name, document, load", [
    (METADATA_NAME, _with(VALID_METADATA, DISKS, "virtio0" + FORGED, key=True), read_store),
    (METADATA_NAME, _with(_with(VALID_METADATA, (*RECORD, "timestamped"), False),
                          (*RECORD, "file"), "d\x1b[31m.qcow2"), read_store),
    (METADATA_NAME, _with(VALID_METADATA, (*RECORD, "source_image"), "/vm/d\x85.qcow2"),
     read_store),
    (JOURNAL_NAME, {**VALID_JOURNAL, "disk": "virtio0\x7f"}, read_journal),
    (INTENT_NAME, {"time": 1, "files": ["virtio0/FULL-1-x\x9b"]}, read_intent_at),
], ids=["disk-id", "file", "source-image", "journal-disk", "intent-file"])
def test_names_and_ids_with_control_characters_are_refused(tmp_path: Path, name: str,
                                                           document: Any, load: Any) -> None:
    _write(tmp_path, name, document)
    with pytest.raises(ChainError, match=f"{name} is malformed: it holds a control character") as info:
        load(tmp_path)
    assert not any(c in str(info.value) for c in "\n\x1b\x7f\x85\x9b")


def test_list_refuses_a_disk_id_that_would_forge_a_line(cli, tmp_path: Path) -> None:
    _write(tmp_path, METADATA_NAME, _with(VALID_METADATA, DISKS, "virtio0" + FORGED, key=True))
    result = cli("qmprestore", "list", "--dir", tmp_path).failed(6, "control character")
    lines = (result.out + result.err).splitlines()
    assert not any(line.startswith("qmprestore: error: forged") for line in lines), lines
    assert "\x1b" not in result.out + result.err


def test_log_lines_escape_names_from_the_folder(cli, tmp_path: Path) -> None:
    """A file name (read from the folder, not its metadata) is printed escaped: one line each."""
    folder = tmp_path / "backup"
    (folder / "virtio0").mkdir(parents=True)
    _write(folder, METADATA_NAME, VALID_METADATA)
    (folder / "virtio0" / f"INC-300-d.qcow2{FORGED}.partial").write_text("")
    log = tmp_path / "log"
    result = cli("qmprestore", "--logfile", log, "list", "--dir", folder).ok()
    logged = log.read_text()
    for text in (result.err, logged):
        assert "\x1b" not in text
        assert [line for line in text.splitlines() if "forged" in line] == [
            line for line in text.splitlines() if "unfinished backup file" in line], text
    assert "INC-300-d.qcow2\\x0aqmprestore: error: forged\\x1b[2J.partial" in result.err


def test_table_cells_are_printed_escaped() -> None:
    """Every table (list, verify, prune, info) prints a name from a folder or guest on its row."""
    printed = table([("virtio0", f"FULL-1-x{FORGED}", 5), ("ide0", "y", None)], ("disk", "file", "n"))
    assert len(printed.splitlines()) == 4 and "\x1b" not in printed
    assert "FULL-1-x\\x0aqmprestore: error: forged\\x1b[2J" in printed


def test_debug_log_keeps_only_the_line_breaks_of_qmp_json(tmp_path: Path) -> None:
    """--debug prints QMP messages as indented JSON (data escaped inside its strings): kept."""
    log = tmp_path / "log"
    configure(debug=True, logfile=str(log))
    try:
        logging.getLogger("qemu.qmp.protocol").debug("<-- %s", '{\n  "return": "a\\nb"\n}')
        logging.getLogger("libqmpbackup.test").warning("file %s", "x" + FORGED)
    finally:
        configure()
    lines = log.read_text().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].endswith("DEBUG qemu.qmp.protocol: <-- {")
    assert lines[1:3] == ['  "return": "a\\nb"', "}"]
    assert lines[3].endswith("WARNING libqmpbackup.test: file x\\x0aqmprestore: error: forged\\x1b[2J")


# -- the folder rule --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc/passwd", "x\0y", "x" * 256])
def test_plain_names_only(name: str) -> None:
    with pytest.raises(ChainError, match="not a plain file name"):
        plain_name(name, "file")


def test_backup_file_names_follow_the_grammar() -> None:
    assert name_rules.backup_file("INC-1717430400-disk.qcow2", "f") == "INC-1717430400-disk.qcow2"
    for bad in ("FULL-1-", "FULL-1-x\n", "SNAP-1-x", "FULL-" + "1" * 19 + "-x", 5, "FULL-1-a/b",
                "INC-1-x.qcow2.partial"):
        with pytest.raises(ChainError, match="not a backup file name"):
            name_rules.backup_file(bad, "f")


def test_sibling_names() -> None:
    folder = Path("/b/vm1/virtio0")
    assert folder_safety.sibling_name(folder, "FULL-1-x") == "FULL-1-x"
    assert folder_safety.sibling_name(folder, "./FULL-1-x") == "FULL-1-x"
    assert folder_safety.sibling_name(folder, "/b/vm1/virtio0/FULL-1-x") == "FULL-1-x"
    assert folder_safety.sibling_name(folder, "disk.qcow2") == "disk.qcow2"   # --no-timestamp
    for elsewhere in ("../FULL-1-x", "/etc/FULL-1-x", "../other/FULL-1-x", "sub/FULL-1-x",
                      "json:{}", 'json:{"driver":"file","filename":"\\u002fetc"}',
                      "nbd:localhost:10809", "nbd://host/FULL-1-x", ""):
        assert folder_safety.sibling_name(folder, elsewhere) is None, elsewhere


def test_image_problems() -> None:
    folder = Path("/b/virtio0")
    good = {"format": "qcow2", "backing-filename": "FULL-1-x", "backing-filename-format": "qcow2"}
    assert folder_safety.image_problems(folder, "INC-2-x", good) == []
    data_file = {"format": "qcow2", "format-specific": {"type": "qcow2", "data": {
        "data-file": "/etc/shadow", "data-file-raw": True}}}
    assert "external data file" in folder_safety.image_problems(folder, "FULL-1-x", data_file)[0]
    raw = {**good, "backing-filename-format": "raw"}
    assert "as qcow2" in folder_safety.image_problems(folder, "INC-2-x", raw)[0]
    probed = {key: value for key, value in good.items() if key != "backing-filename-format"}
    assert "as qcow2" in folder_safety.image_problems(folder, "INC-2-x", probed)[0]
    outside = {**good, "backing-filename": "/var/lib/vm/other.qcow2"}
    assert "not a backup file next to it" in folder_safety.image_problems(folder, "I", outside)[0]
    assert "not qcow2" in folder_safety.image_problems(folder, "F", {"format": "raw"})[0]


@pytest.mark.parametrize("name", ['json:{"driver":"file"}', "nbd:localhost:10809",
                                  "FULL-1-a:b.qcow2", "disk:1.qcow2"])
def test_names_qemu_reads_as_a_protocol_are_never_recorded_nor_written(name: str) -> None:
    """Finding 4: with no '/', any ':' makes QEMU read a name as a protocol or a JSON spec."""
    with pytest.raises(ChainError, match="protocol"):
        name_rules.recorded_file(name, "file")
    with pytest.raises(ChainError, match="not a plain file name QEMU reads as a file"):
        qemuimg.header_name(name)
    assert qemuimg.header_name("FULL-1-disk.qcow2") == "FULL-1-disk.qcow2"


def test_the_header_gives_the_exact_backing_name_and_the_data_file_bit(tmp_path: Path) -> None:
    """Finding 2: qemu-img prints b'\\xff' as U+FFFD; the header's bytes tell the names apart."""
    image = tmp_path / "INC-2-x.qcow2"
    subprocess.run([b"qemu-img", b"create", b"-q", b"-f", b"qcow2", b"-u", b"-b", b"\xffULL-1-x",
                    b"-F", b"qcow2", bytes(image), b"1M"], check=True)
    with Folder.open_root(tmp_path) as folder, folder.open(image.name) as handle:
        header = read_header(handle.fd)
        assert header is not None and header.backing == "\udcffULL-1-x" and not header.data_file
        info = folder_safety.inspect_image(handle, tmp_path)
        assert info["backing-filename"] == "\udcffULL-1-x" != "\ufffdULL-1-x"
    with_data = tmp_path / "FULL-1-x.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'host.raw'}", str(with_data), "1M"], check=True)
    with Folder.open_root(tmp_path) as folder, folder.open(with_data.name) as handle:
        header = read_header(handle.fd)
        assert header is not None and header.data_file
        with pytest.raises(ChainError, match="external data file"):
            folder_safety.inspect_image(handle, tmp_path)


def test_file_steps_refuse_symlinks_devices_and_fifos(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "d").mkdir()
    with Folder.open_root(tmp_path / "d") as folder:
        (folder.path / "link").symlink_to(victim)
        os.mkfifo(folder.path / "fifo")
        for name in ("link", "fifo"):
            with pytest.raises(ChainError, match="refused"):
                file_steps.remove(folder, name)
            with pytest.raises(ChainError, match="refused"):
                file_steps.rename(folder, name, "FULL-1-x")
            with pytest.raises(ChainError, match="refused"):
                folder.open(name)
        (tmp_path / "linked-folder").symlink_to(folder.path)
        with Folder.open_root(tmp_path) as top, \
                pytest.raises(ChainError, match="is a symlink, not a folder"):
            top.sub("linked-folder")
        assert victim.read_text() == "keep" and (folder.path / "link").is_symlink()
        (folder.path / "plain").write_text("x")
        file_steps.rename(folder, "plain", "FULL-1-x")
        assert folder.remove("FULL-1-x") and not folder.remove("FULL-1-x")


def test_new_folders_and_their_parents_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        created = make_private_dirs(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in created)
    assert make_private_dirs(tmp_path / "a") == []


# -- the guest agent ----------------------------------------------------------------------------

def test_agent_line_limit_is_small_and_enforced() -> None:
    assert READ_LIMIT <= 1 << 20

    async def scenario(path: str) -> None:
        async def flood(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"x" * (4 * READ_LIMIT))   # no delimiter, no newline: a hostile guest
            await writer.drain()
            await asyncio.sleep(5)
        server = await asyncio.start_unix_server(flood, path)
        try:
            with pytest.raises(AgentError) as err:
                async with GuestAgent(path, timeout=5):
                    pass
            assert isinstance(err.value, QmpBackupError) and "guest agent" in str(err.value)
        finally:
            server.close()

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "qga.sock")
        asyncio.run(scenario(path))
