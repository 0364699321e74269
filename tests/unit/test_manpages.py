"""The man pages and completion scripts in contrib/ are the parsers' current output."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.manpage import manpage
from tools.parsers import PROGRAMS, all_option_strings

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_man_page_names_every_option_and_is_current(program: str) -> None:
    page = (CONTRIB / "man" / f"{program}.1").read_text()
    assert page == manpage(program), "stale: run `make man`"
    missing = [o for o in all_option_strings(PROGRAMS[program]())
               if o.replace("-", "\\-") not in page]
    assert missing == []


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_completion_scripts_are_current(program: str) -> None:
    completion = pytest.importorskip("tools.completion")
    for shell, name in completion.FILES.items():
        script = (CONTRIB / "completion" / name.format(program)).read_text()
        assert script == completion.completion(program, shell), "stale: run `make completion`"
        for option in all_option_strings(PROGRAMS[program]()):
            assert option in script, (shell, option)
