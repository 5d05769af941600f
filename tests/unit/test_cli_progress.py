"""The CLI's progress bar (cli/_common.py): binary units as the summaries use, a percentage and an
ETA once the total is known, and nothing at all when stderr is not a terminal (issue 17)."""

from __future__ import annotations

import pytest

from blockprov.cli._common import Bar, progress_bar


def test_the_line_says_mib_percent_and_eta() -> None:
    bar = Bar(None, "import x:v1")
    bar.set_total(200 << 20)
    bar.done = 50 << 20
    line = bar.line(bar._t0 + 5.0)  # 10 MiB/s: 150 MiB to go is 15 s
    assert "25.0%" in line and "50.0 MiB / 200.0 MiB" in line and "10.0 MiB/s" in line and "ETA 00:15" in line
    assert " MB" not in line


def test_without_a_total_it_counts() -> None:
    bar = Bar(None, "check")
    bar.done = 3 << 10
    assert bar.line(bar._t0 + 1.0) == "check: 3.0 KiB  3.0 KiB/s"


def test_things_other_than_bytes() -> None:
    bar = Bar(10, "clone", unit="instances")
    bar.done = 4
    assert "4 instances / 10 instances" in bar.line(bar._t0 + 2.0)


def test_quiet_when_piped(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(100, "x", True) as bar:  # pytest's stderr is no terminal
        bar.set_total(200)
        bar(50)
    assert capsys.readouterr().err == ""
