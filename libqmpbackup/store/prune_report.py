"""What ``qmpbackup prune`` prints: a table for admins, or one JSON document for scripts.

Both are read from the same :class:`PruneResult`, so ``--json`` never says
something the table does not.  The keys are documented in docs/json.md; keep them stable.
"""

from __future__ import annotations

from typing import Any

from libqmpbackup.store.prune import PruneResult
from libqmpbackup.store.retention import ChainSummary
from libqmpbackup.tables import table
from libqmpbackup.units import local_time

HEADERS = ("chain", "first point", "last point", "files", "size", "status")


def _chain_name(result: PruneResult, summary: ChainSummary) -> str:
    """Chains of month folders are told apart by the folder, as in ``qmprestore list``."""
    return summary.chain.uuid if summary.root == result.target else \
        f"{summary.root.name}/{summary.chain.uuid}"


def _status(result: PruneResult, summary: ChainSummary) -> str:
    return "kept" if result.plan.is_kept(summary) else "removed"


def _point(label: str, timestamp: int) -> str:
    return f"{label} ({local_time(timestamp)})" if label else ""


def prune_table(result: PruneResult) -> str:
    def status(summary: ChainSummary) -> str:
        text = _status(result, summary)
        return "would be removed" if result.dry_run and text == "removed" else text

    rows = [(_chain_name(result, s),
             _point(s.first_point, s.first.time) if s.first else "",
             _point(s.last_point, s.last.time) if s.last else "",
             len(s.files), result.chain_size(s), status(s))
            for s in result.plan.chains]
    lines = [table(rows, headers=HEADERS)]
    verb = "would remove" if result.dry_run else "removed"
    if result.dry_run:
        lines += [f"{verb} {path}" for path in [*result.leftover_files, *result.removed_files]]
    lines += [f"{verb} bitmap {name}" for name in result.bitmaps]
    files = len(result.removed_files) + len(result.leftover_files)
    if result.dry_run:
        lines.append(f"dry run, nothing changed: would remove {files} file(s), "
                     f"{result.bytes_freed} bytes")
    else:
        lines.append(f"removed {files} file(s), {result.bytes_freed} bytes freed")
    return "\n".join(lines)


def _chain_document(result: PruneResult, summary: ChainSummary) -> dict[str, Any]:
    return {
        "id": summary.chain.uuid,
        "folder": str(summary.root),
        "first_point": summary.first_point or None,
        "first_time": summary.first.time if summary.first else None,
        "last_point": summary.last_point or None,
        "last_time": summary.last.time if summary.last else None,
        "files": [str(f.path(summary.root)) for f in summary.files],
        "size": result.chain_size(summary),
        "status": _status(result, summary),
    }


def prune_document(result: PruneResult) -> dict[str, Any]:
    return {
        "target": str(result.target),
        "keep": result.keep,
        "dry_run": result.dry_run,
        "chains": [_chain_document(result, s) for s in result.plan.chains],
        "removed_files": [str(p) for p in result.removed_files],
        "leftover_files": [str(p) for p in result.leftover_files],
        "removed_bitmaps": result.bitmaps,
        "bytes_freed": result.bytes_freed,
    }
