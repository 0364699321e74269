"""Sizes, rates and times the way admins write and read them (``50M``, ``1G``, local time)."""

from __future__ import annotations

import re
import time

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64k``, ``50M``, ``1GiB`` (binary multiples); ValueError otherwise."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(match.group(1)) * _FACTORS[match.group(2).lower()]


def local_time(timestamp: int) -> str:
    """A backup time as the admin's clock shows it (tables sort it as text, too)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
    except (OverflowError, ValueError, OSError):   # metadata is untrusted: any integer may come
        return f"invalid time {timestamp}"
