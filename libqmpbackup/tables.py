"""Text tables for the listing commands.

``tabulate`` (and the ``importlib.metadata`` it loads) costs tens of
milliseconds at start-up; a backup from cron prints no table, so the import
happens only when one is printed.

Cells hold names the tool does not control (files and folders of a backup
folder, guest mount points from the agent): every text cell is printed
escaped (:func:`~libqmpbackup.printable.escape`), so no name forges a row or
sends escape sequences to the terminal (tabulate would print a newline in a
cell as a second line).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from libqmpbackup.printable import escape


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    printable = [[escape(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    return str(tabulate(printable, headers=headers))
