"""Typed reading of JSON that came from a backup folder (metadata, restore journal).

Those files are untrusted input: anyone who can write the folder can put any
JSON there.  A value of the wrong type, a huge number or a missing key must
end as one chain error naming the file, never as a TypeError deep inside a
restore (exit 1 "unexpected …") or as a number that later overflows a
conversion.  Each reader takes the object, the key and a description of the
file for the message.
"""

from __future__ import annotations

from typing import Any, Optional

from libqmpbackup.errors import ChainError

MAX_INT = (1 << 63) - 1
"""Sizes and times beyond a signed 64-bit integer are not real ones."""
MAX_TEXT = 4096
_MISSING = object()


def malformed(where: str, problem: str) -> ChainError:
    return ChainError(f"{where} is malformed: {problem}")


def as_object(value: Any, where: str, what: str = "the top level") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise malformed(where, f"{what} must be an object, not {type(value).__name__}")
    return value


def _get(raw: dict[str, Any], key: str, where: str, default: Any) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise malformed(where, f"{key!r} is missing")
        return default
    return value


def text(raw: dict[str, Any], key: str, where: str, default: Any = _MISSING, *,
         empty_ok: bool = False) -> str:
    value = _get(raw, key, where, default)
    if (not isinstance(value, str) or not (value or empty_ok) or len(value) > MAX_TEXT
            or "\0" in value):
        raise malformed(where, f"{key!r} must be a{'' if empty_ok else ' non-empty'} string "
                               f"of at most {MAX_TEXT} characters")
    return value


def integer(raw: dict[str, Any], key: str, where: str, default: Any = _MISSING) -> int:
    value = _get(raw, key, where, default)
    # bool is an int subclass, but never a time or a size
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise malformed(where, f"{key!r} must be an integer from 0 to {MAX_INT}")
    return value


def flag(raw: dict[str, Any], key: str, where: str, default: Any = _MISSING) -> bool:
    value = _get(raw, key, where, default)
    if not isinstance(value, bool):
        raise malformed(where, f"{key!r} must be true or false")
    return value


def array(raw: dict[str, Any], key: str, where: str, default: Optional[list[Any]] = None) -> list[Any]:
    value = _get(raw, key, where, _MISSING if default is None else default)
    if not isinstance(value, list):
        raise malformed(where, f"{key!r} must be a list")
    return value


def mapping(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return as_object(_get(raw, key, where, _MISSING), where, repr(key))
