"""scripts/setup.sh installs every Debian package the tests need (issue 12: a test command that passes
on a fresh machine): each package tests/conftest.py names for a tool is in its APT_PKGS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import FILE_PACKAGES, TOOL_PACKAGES, missing_tool

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup.sh"


def test_setup_installs_the_package_of_every_tool_the_tests_run() -> None:
    # bash reads the array (comments and line breaks included), as setup.sh itself does.
    script = f'eval "$(sed -n "/^APT_PKGS=(/,/^)/p" {SETUP})"; printf "%s\\n" "${{APT_PKGS[@]}}"'
    listed = set(subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split())
    assert "qemu-utils" in listed  # the array was found
    assert set(TOOL_PACKAGES.values()) - listed == set()
    # the files the tests use: shim-helpers-amd64-signed comes with shim-signed (a dependency)
    assert set(FILE_PACKAGES.values()) - listed - {"shim-helpers-amd64-signed"} == set()


def test_every_tool_the_tests_run_is_installed() -> None:
    """One list of what is missing, rather than one failure per test that runs it."""
    elsewhere = {"initdb", "postgres", "python3"}  # found by tests/pgfixture.pg_bin() and at /usr/bin/python3
    missing = sorted({missing_tool(t) for t in TOOL_PACKAGES if t not in elsewhere and shutil.which(t) is None})
    if not Path("/usr/bin/python3").exists():
        missing.append(missing_tool("python3"))
    missing += [f"{f} is missing: install {pkg}" for f, pkg in FILE_PACKAGES.items() if not Path(f).is_file()]
    assert missing == [], "\n".join(missing)
