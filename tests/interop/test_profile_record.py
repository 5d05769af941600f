"""`blockprov profile record NAME:TAG` on the project's boot test image (tools/bootimage.py): one
headless TCG boot next to the repository records the version's boot profile, and the first
attach of the version then prefetches in that order (issue 15 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import bootvm
from tests.conftest import run_cli
from tests.interop.test_profile_inherit import prefetched
from tests.procs import start_agent

pytestmark = pytest.mark.interop


def test_profile_record_boots_the_version_once_and_saves_its_profile(tmp_path: Path) -> None:
    img = bootvm.build_image(size="256M", fill_mb=40)
    data = tmp_path / "repo"
    run_cli("import", str(img.disk), "os:v1", data=data)
    bad = run_cli("profile", "record", "os:v1", "--idle", "3", "--timeout", "60", data=data, check=False)
    # No boot files and no boot loader on this disk: SeaBIOS finds nothing to boot; a clear error.
    assert bad.returncode == 1 and "no boot loader" in bad.stderr and "boot-files set" in bad.stderr, bad.stderr
    assert json.loads(run_cli("profile", "show", "os:v1", "--json", data=data).stdout)["chunks"] is None
    run_cli("boot-files", "set", "os:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
            "--cmdline", "quiet panic=-1 bp.mode=plain", data=data)
    out = json.loads(run_cli("profile", "record", "os:v1", "--json", data=data).stdout)
    assert out["ended"] == "poweroff" and out["direct_kernel"] and out["saved"], out
    order = json.loads(run_cli("profile", "show", "os:v1", "--json", data=data).stdout)["chunks"]
    assert len(order) == out["chunks"] > 50  # the boot reads hundreds of files
    assert order[0] == 0  # the superblock first
    proc, _ = start_agent(tmp_path / "pc", "os:v1", tmp_path / "s.sock", "--readahead", "0", data=data)
    try:
        st = prefetched(tmp_path / "pc")
        assert st["profile"] == {"chunks": len(order), "inherited": False, "first": order[:16]}
    finally:
        assert proc.stop() == 0
    # A second version gets its boot files and, in the same command, its profile.
    run_cli("import", str(img.disk), "os:v2", data=data)
    got = json.loads(run_cli("boot-files", "set", "os:v2", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
                             "--cmdline", "quiet panic=-1 bp.mode=plain", "--record-profile", "--json",
                             data=data).stdout)
    assert got["profile"]["ended"] == "poweroff" and got["profile"]["chunks"] > 50, got
    shown = json.loads(run_cli("profile", "show", "os:v2", "--json", data=data).stdout)
    assert shown["inherited"] is False and len(shown["chunks"]) >= got["profile"]["chunks"]
    missing = run_cli("profile", "record", "os:nope", data=data, check=False)
    assert missing.returncode == 3 and "os:nope" in missing.stderr, missing.stderr
