"""Text from untrusted places (a backup folder, a guest) made safe to print on one line.

A disk id, file name or agent reply may hold a newline or an escape
sequence: printed raw it forges a line on stderr, in ``--logfile`` or in
``list``, or drives the admin's terminal.  Folder readers refuse names with
such characters (:func:`has_control`); whatever is printed anyway goes
through :func:`escape`, which spells each one as ``\\xNN`` / ``\\uNNNN``.
"""

from __future__ import annotations

import re

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""C0 controls, DEL and C1 controls: what a name recorded in a folder may never hold."""

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""Also never printed raw: line/paragraph separators and bidirectional overrides."""


def has_control(text: str) -> bool:
    return CONTROL.search(text) is not None


def escape(text: str, keep: str = "") -> str:
    """TEXT with every control character (but those in KEEP) spelled out: it prints as what it is."""
    def spelled(match: re.Match[str]) -> str:
        char = match.group()
        if char in keep:
            return char
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    return _UNPRINTABLE.sub(spelled, text)
