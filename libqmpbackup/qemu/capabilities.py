"""What the running QEMU offers beyond the QEMU 7.2 baseline, read from its QMP schema.

Unstable (``x-``) arguments such as ``blockdev-backup``'s ``x-perf`` may
change or vanish between QEMU releases, so the tool asks the QEMU it talks to
instead of guessing from a version number: ``query-qmp-schema`` names every
command's arguments.  The schema is large (≈200 KB of JSON, ≈0.04 s of QEMU's
CPU: a fifth of a ``qemu-img convert`` of a 4 GiB disk holding 400 MiB), so it
is read once per session, only when a run would use what it tells, and not
at all for the releases in KNOWN_X_PERF: their schema was read on a real QEMU
of that release, and ``tests/test_copy_path.py`` checks the table against the
QEMU the suite runs.  A QEMU that still refuses ``x-perf`` (for example one
started with ``-compat unstable-input=reject``) is covered by the run's retry
without it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from libqmpbackup.qemu.qmp import QmpCommandError, QmpSession

log = logging.getLogger(__name__)

# (major, minor) -> the members of blockdev-backup's x-perf in that release's schema
KNOWN_X_PERF: dict[tuple[int, int], frozenset[str]] = {
    (7, 2): frozenset({"use-copy-range", "max-workers", "max-chunk"}),
}


@dataclass(frozen=True)
class Capabilities:
    """Optional features of one QEMU process."""

    x_perf_members: frozenset[str] = frozenset()   # members of blockdev-backup's x-perf

    @property
    def copy_range(self) -> bool:
        """blockdev-backup can copy with copy_file_range (``x-perf.use-copy-range``)."""
        return "use-copy-range" in self.x_perf_members


def _members(entity: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    if not isinstance(entity, dict) or entity.get("meta-type") != "object":
        return []
    members = entity.get("members")
    return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []


def from_schema(schema: Any) -> Capabilities:
    """Capabilities from a ``query-qmp-schema`` reply; anything unexpected means "not offered".

    Type names in the schema are opaque (numbers in 7.2); commands and
    argument members keep their real names, so the path is
    command → arg-type → member ``x-perf`` → its type's members.
    """
    if not isinstance(schema, list):
        return Capabilities()
    entities = {e["name"]: e for e in schema if isinstance(e, dict) and isinstance(e.get("name"), str)}
    command = entities.get("blockdev-backup")
    if not command or command.get("meta-type") != "command":
        return Capabilities()
    x_perf = next((m for m in _members(entities.get(str(command.get("arg-type"))))
                   if m.get("name") == "x-perf"), None)
    if x_perf is None:
        return Capabilities()
    names = frozenset(str(m.get("name")) for m in _members(entities.get(str(x_perf.get("type")))))
    return Capabilities(x_perf_members=names)


_probed: weakref.WeakKeyDictionary[QmpSession, Capabilities] = weakref.WeakKeyDictionary()


async def probe(session: QmpSession) -> Capabilities:
    """The capabilities of the QEMU behind SESSION (at most one ``query-qmp-schema`` per session)."""
    known = _probed.get(session)
    if known is None:
        release = session.qemu_version
        if release in KNOWN_X_PERF:
            known = Capabilities(x_perf_members=KNOWN_X_PERF[release])
            source = f"known for QEMU {release[0]}.{release[1]}"
        else:
            known = await _from_running_schema(session)
            source = "from query-qmp-schema"
        log.debug("blockdev-backup x-perf members (%s): %s", source,
                  ", ".join(sorted(known.x_perf_members)) or "none")
        _probed[session] = known
    return known


async def _from_running_schema(session: QmpSession) -> Capabilities:
    try:
        return from_schema(await session.execute("query-qmp-schema"))
    except QmpCommandError as err:   # an optional feature never fails a backup
        log.debug("query-qmp-schema refused (%s): assuming no optional features", err.desc)
        return Capabilities()
