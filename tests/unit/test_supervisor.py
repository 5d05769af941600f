"""The in-machine supervisor's restarts of the resident agent (netboot/supervisor.py), with the real
agent program: on this host its resident mode fails for a real reason (the kernel command line has
no ``blockprov.repo=``), as it would on a PC whose plan or disk is gone. It used to be started again
every 30 s for ever with no word of why; now the pause doubles to a cap and each failure says why,
what the PC lacks meanwhile, and that it keeps trying."""

from __future__ import annotations

import os
import re
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from blockprov.netboot import supervisor

SRC = Path(__file__).resolve().parents[2] / "src"


def test_a_resident_that_does_not_start_is_tried_again_less_and_less_often(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for where in ("/dev", "/proc", "/sys"):  # else the supervisor would mount its own there (a PC's initramfs)
        assert os.path.ismount(where), f"{where} is not a mount point on this machine: the test would change it"
    # the agent runs as `python -S` (the initramfs's python): it finds blockprov and its libraries this way
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), sysconfig.get_paths()["purelib"]]))
    monkeypatch.setattr(supervisor, "RESIDENT_PAUSE", (10.0, 40.0))
    slept: list[float] = []
    # the supervisor's pauses are recorded, not waited (its own clock otherwise)
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    sup = supervisor.Supervisor({})
    first = sup.start_resident()
    assert first.startswith("ERROR") and "blockprov.repo= is missing" in first, first
    for _ in range(4):
        assert sup.agent is not None and sup.agent.wait(timeout=60) is not None
        sup.restart()
    assert sup.agent is not None and sup.agent.wait(timeout=60) is not None
    assert slept == [10.0, 20.0, 40.0, 40.0]  # doubled, then capped
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("blockprov-supervisor: ")]
    assert len(lines) == 4, lines
    for line, pause in zip(lines, slept, strict=True):
        assert re.search(r"the resident agent did not start: .*blockprov\.repo= is missing", line), line
        assert "not registered, shows no state on the console and takes no snapshot" in line, line
        assert f"Starting it again in {pause:g} s" in line and "keeps trying as long as the PC runs" in line, line
