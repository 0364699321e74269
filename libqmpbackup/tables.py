"""Text tables for the listing commands.

``tabulate`` (and the ``importlib.metadata`` it loads) costs tens of
milliseconds at start-up; a backup from cron prints no table, so the import
happens only when one is printed.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    return str(tabulate(rows, headers=headers))
