"""contrib/systemd's unit files (issue 16): ``systemd-analyze verify`` accepts each one without a
warning, and each ExecStart is a command line blockprov parses.

The units name ``/usr/local/bin/blockprov`` (where ``pip install`` puts it); the one line an
operator edits is that path, so the test does the same edit, to this checkout's blockprov, and
nothing else. ``systemd-analyze verify`` reads unit files and needs no running systemd (this
machine's PID 1 may be something else)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.procs import VENV_BIN

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "contrib" / "systemd"
INSTALLED = "/usr/local/bin/blockprov"


@pytest.fixture
def units(tmp_path: Path) -> Path:
    out = tmp_path / "units"
    out.mkdir()
    for f in UNITS.iterdir():
        (out / f.name).write_text(f.read_text().replace(INSTALLED, str(VENV_BIN / "blockprov")))
    return out


def test_the_units_are_shipped() -> None:
    assert sorted(f.name for f in UNITS.iterdir()) == ["blockprov-agent@.service", "blockprov-agent@.socket",
                                                       "blockprov.service"]
    for f in UNITS.iterdir():
        assert f"ExecStart={INSTALLED} " in f.read_text() or f.suffix == ".socket", f


@pytest.mark.parametrize("names", [["blockprov.service"],
                                   ["blockprov-agent@lab1.socket", "blockprov-agent@lab1.service"],
                                   ["blockprov-agent@.service"]])
def test_systemd_analyze_verify(units: Path, names: list[str]) -> None:
    tool = require_tool("systemd-analyze")
    p = subprocess.run([tool, "verify", *[f"./{n}" for n in names]], cwd=units, capture_output=True, text=True,
                       timeout=60, env=os.environ | {"SYSTEMD_LOG_LEVEL": "notice"})
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_each_exec_start_parses(units: Path, tmp_path: Path) -> None:
    """The unit's command line, its variables and specifiers filled as systemd would, given --help:
    click checks every option and stops before doing anything."""
    values = {"${LISTEN}": "127.0.0.1:8420", "$IMAGE": "lab:v1", "$ATTACH_OPTIONS": "--hydrate", "%i": "lab1"}
    seen = 0
    for f in units.iterdir():
        for line in re.findall(r"^ExecStart=(.+)$", f.read_text(), re.MULTILINE):
            for k, v in values.items():
                line = line.replace(k, v)
            argv = shlex.split(line.replace("/var/lib", str(tmp_path / "var")))
            assert shutil.which(argv[0]), argv
            p = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and "Usage: blockprov" in p.stdout, (line, p.stderr)
            seen += 1
    assert seen == 2
