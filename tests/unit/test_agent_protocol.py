"""The pure parts of the guest agent client: framing and reply decoding.

The conversation itself (resync, timeouts, fsfreeze) is tested against a real
qemu-ga in test_guest_smoke.py.  A hostile guest is played here by a socket
peer that speaks qemu-ga's documented framing (``guest-sync-delimited``
answered after a 0xFF byte, one JSON line per reply) and then sends what a
real agent never would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from typing import Awaitable, Callable

import pytest

from libqmpbackup.backup.quiesce import Quiescer
from libqmpbackup.errors import AgentError, QmpBackupError
from libqmpbackup.qemu.agent import (
    READ_LIMIT,
    GuestAgent,
    decode_reply,
    encode_command,
    sync_reply_id,
)

DEEP = b"[" * 200_000 + b"]" * 200_000
"""400 KB of nesting, under the agent's line limit: the JSON parser raises RecursionError on it."""


def test_encode_command_is_one_compact_line() -> None:
    data = encode_command("guest-fsfreeze-freeze")
    assert data == b'{"execute":"guest-fsfreeze-freeze"}\n'
    assert data.count(b"\n") == 1


def test_encode_command_with_arguments() -> None:
    data = encode_command("guest-exec", {"path": "/bin/sh", "arg": ["-c", "echo 'a\nb'"]})
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data) == {
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", "echo 'a\nb'"]},
    }


def test_encode_command_omits_empty_arguments() -> None:
    assert json.loads(encode_command("guest-ping", {})) == {"execute": "guest-ping"}


@pytest.mark.parametrize(
    "line, value",
    [
        (b'{"return": 1}\n', 1),
        (b'{"return": {}}\n', {}),
        (b'{"return": "frozen"}\r\n', "frozen"),
        (b'{"return": [{"mountpoint": "/mnt"}]}\n', [{"mountpoint": "/mnt"}]),
    ],
)
def test_decode_reply_returns_the_return_value(line: bytes, value: object) -> None:
    assert decode_reply("cmd", line) == value


def test_decode_reply_error_names_command_class_and_description() -> None:
    line = (
        b'{"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze'
        b' has been disabled: the agent is in frozen state"}}\n'
    )
    with pytest.raises(AgentError) as info:
        decode_reply("guest-fsfreeze-freeze", line)
    message = str(info.value)
    assert message.startswith("guest agent refused guest-fsfreeze-freeze: ")
    assert "frozen state" in message and "(CommandNotFound)" in message
    assert "\n" not in message
    assert isinstance(info.value, QmpBackupError) and info.value.exit_code == 10


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b"[1, 2]\n", b'{"event": "x"}\n', b"\xfe\xff\n"],
)
def test_decode_reply_rejects_non_replies(line: bytes) -> None:
    with pytest.raises(AgentError, match=r"unexpected reply to guest-ping|unreadable reply to guest-ping"):
        decode_reply("guest-ping", line)


def test_decode_reply_keeps_the_json_error_as_cause() -> None:
    with pytest.raises(AgentError) as info:
        decode_reply("guest-ping", b"{oops\n")
    assert isinstance(info.value.__cause__, ValueError)


def test_decode_reply_shortens_huge_garbage() -> None:
    with pytest.raises(AgentError) as info:
        decode_reply("guest-ping", b"x" * 10000 + b"\n")
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    "line, expected",
    [
        (b'{"return": 12345}\n', 12345),
        (b'{"return": true}\n', None),
        (b'{"return": "12345"}\n', None),
        (b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n', None),
        (b"garbage\n", None),
        (b"[]\n", None),
    ],
)
def test_sync_reply_id(line: bytes, expected: object) -> None:
    assert sync_reply_id(line) == expected


@pytest.mark.parametrize("line", [
    DEEP + b"\n", b'{"return": ' + DEEP + b"}\n", b"\xff\xfe{}\n", b'{"return": 1}\xc3\n',
    '{"return": 1}'.encode("utf-16") + b"\n",
])
def test_every_decode_failure_is_an_unreadable_reply(line: bytes) -> None:
    with pytest.raises(AgentError, match="unreadable reply to guest-ping") as info:
        decode_reply("guest-ping", line)
    assert len(str(info.value)) < 200
    assert sync_reply_id(line) is None


def test_reply_text_is_printed_escaped() -> None:
    line = b'{"error": {"class": "X\\u001b[2J", "desc": "forged\\nqmpbackup: error: other"}}\n'
    with pytest.raises(AgentError) as info:
        decode_reply("guest-ping", line)
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "forged\\x0aqmpbackup" in str(info.value)


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def hostile_agent(answers: dict[str, bytes]) -> Serve:
    """A peer framing like qemu-ga; ANSWERS[command] is sent instead of a real reply.

    ``guest-sync-delimited`` is answered with 0xFF and its id, after
    ANSWERS["guest-sync-delimited"] when given (a hostile line sent first).
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line.lstrip(b"\xff"))
            command = request["execute"]
            if command == "guest-sync-delimited":
                sync = answers.get(command, b"")
                writer.write(sync + b"\xff" + json.dumps(
                    {"return": request["arguments"]["id"]}).encode() + b"\n")
            else:
                writer.write(answers.get(command, b'{"return": {}}\n'))
            await writer.drain()
    return serve


def with_hostile_agent(answers: dict[str, bytes],
                       scenario: Callable[[str], Awaitable[None]]) -> None:
    async def main(path: str) -> None:
        server = await asyncio.start_unix_server(hostile_agent(answers), path, limit=4 * READ_LIMIT)
        try:
            await scenario(path)
        finally:
            server.close()
            await server.wait_closed()

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(main(os.path.join(folder, "qga.sock")))


@pytest.mark.parametrize("required", [False, True])
@pytest.mark.parametrize("where", ["guest-sync-delimited", "guest-fsfreeze-status"])
def test_a_deeply_nested_agent_reply_is_a_warning_or_a_clean_refusal(
        where: str, required: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 20, finding 9: \\xff + 400 KB of [[…]] ended `backup --quiesce` with a RecursionError."""
    answers = {"guest-sync-delimited": b"\xff" + DEEP + b"\n",
               "guest-fsfreeze-status": DEEP + b"\n",
               "guest-fsfreeze-freeze": b'{"return": 1}\n', "guest-fsfreeze-thaw": b'{"return": 1}\n'}
    if where == "guest-sync-delimited":
        answers["guest-fsfreeze-status"] = b'{"return": "thawed"}\n'
    outcome: list[object] = []

    async def scenario(path: str) -> None:
        try:
            async with Quiescer(path, required=required, timeout=2) as quiescer:
                outcome.append(quiescer.frozen)
        except Exception as err:   # what escapes is what the test is about
            outcome.append(err)

    with caplog.at_level(logging.WARNING):
        with_hostile_agent(answers, scenario)
    if where == "guest-sync-delimited":
        assert outcome == [True], "a hostile line before the sync reply is skipped like stale data"
    elif required:
        assert isinstance(outcome[0], AgentError), outcome
        assert "unreadable reply to guest-fsfreeze-status" in str(outcome[0])
    else:
        assert outcome == [False], outcome
        assert "backing up without filesystem quiesce" in caplog.text
        assert "unreadable reply to guest-fsfreeze-status" in caplog.text


@pytest.mark.parametrize("status", [b'"thawing\\u001b[2J"', b"1", b"[]"])
def test_an_fsfreeze_status_outside_the_documented_two_is_an_unexpected_reply(status: bytes) -> None:
    async def scenario(path: str) -> None:
        async with GuestAgent(path, timeout=2) as agent:
            with pytest.raises(AgentError, match="unexpected reply to guest-fsfreeze-status") as err:
                await agent.fsfreeze_status()
        assert "\x1b" not in str(err.value)

    with_hostile_agent({"guest-fsfreeze-status": b'{"return": ' + status + b"}\n"}, scenario)
