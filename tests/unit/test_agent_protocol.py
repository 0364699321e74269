"""The pure parts of the guest agent client: framing and reply decoding.

The conversation itself (resync, timeouts, fsfreeze) is tested against a real
qemu-ga in test_guest_smoke.py; a fake server would only test our own idea
of the protocol.
"""

from __future__ import annotations

import json

import pytest

from libqmpbackup.errors import AgentError, QmpBackupError
from libqmpbackup.qemu.agent import decode_reply, encode_command, sync_reply_id


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
