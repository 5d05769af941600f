"""A version's boot profile is prepared in the background when it gets boot files (issue 26 item 0):
by the command that set them on an embedded repository, by ``blockprov serve`` for its clients, one
at a time, never where qemu is missing, never for a version that inherits one; ``show`` says where it
stands, and the first attach prefetches by it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.conftest import run_cli
from tests.interop.test_profile_inherit import prefetched
from tests.procs import start_agent, start_server

pytestmark = pytest.mark.interop
PREPARE = {"BLOCKPROV_PREPARE": "1"}
CMDLINE = "quiet panic=-1 bp.mode=plain"


def _profile(ref: str, **kw: Any) -> dict[str, Any]:
    return dict(json.loads(run_cli("show", ref, "--json", **kw).stdout)["profile"])


def _wait_ready(ref: str, **kw: Any) -> dict[str, Any]:
    """Until the preparation has ended: the profile is saved a moment before its state says ``done``."""
    for _ in range(900):  # bounded: a TCG boot on a loaded host (the preparation's own limit is 600 s)
        p = _profile(ref, **kw)
        state = (p["preparation"] or {}).get("state")
        if state in ("done", "failed", "skipped") or (p["ready"] and state is None):
            return p
        time.sleep(1)
    raise AssertionError(f"the profile of {ref} was not prepared: {p}")


def test_boot_files_set_prepares_the_profile_in_the_background(tmp_path: Path) -> None:
    img = bootvm.build_image(size="256M", fill_mb=40)
    data = tmp_path / "repo"
    run_cli("import", str(img.disk), "os:v1", data=data)
    assert _profile("os:v1", data=data) == {"ready": False, "own": False, "chunks": 0, "preparation": None}
    out = run_cli("boot-files", "set", "os:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
                  "--cmdline", CMDLINE, data=data, env=PREPARE).stdout
    assert "preparing its boot profile in the background" in out, out
    assert (_profile("os:v1", data=data)["preparation"] or {}).get("state") in ("queued", "running", "done")
    p = _wait_ready("os:v1", data=data)
    assert p["ready"] and p["own"] and p["chunks"] > 50 and p["preparation"]["state"] == "done", p
    assert "ended: poweroff" in p["preparation"]["detail"]
    shown = run_cli("show", "os:v1", data=data).stdout
    assert "profile     ready:" in shown and "its own" in shown, shown
    # its first machine prefetches in that order from the start
    proc, _ = start_agent(tmp_path / "pc", "os:v1", tmp_path / "s.sock", "--readahead", "0", data=data)
    try:
        assert prefetched(tmp_path / "pc")["profile"]["chunks"] == p["chunks"]
    finally:
        assert proc.stop() == 0
    # a snapshot-like v2 (an import over the image sharing most chunks) inherits it: nothing to prepare
    run_cli("import", str(img.disk), "os:v2", data=data)
    out = run_cli("boot-files", "set", "os:v2", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
                  "--cmdline", CMDLINE, data=data, env=PREPARE).stdout
    assert "no boot profile to prepare: it inherits a boot profile" in out, out
    assert _profile("os:v2", data=data)["ready"]


def test_no_qemu_on_the_repositorys_host_skips_and_says_so(tmp_path: Path) -> None:
    img = bootvm.build_image(size="256M", fill_mb=40)
    data = tmp_path / "repo"
    run_cli("import", str(img.disk), "os:v1", data=data)
    bare = tmp_path / "bin"
    bare.mkdir()
    env = PREPARE | {"PATH": f"{bare}:/usr/bin/nonexistent"}
    assert shutil.which("qemu-system-x86_64", path=env["PATH"]) is None
    out = run_cli("boot-files", "set", "os:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
                  data=data, env=env).stdout
    assert "no boot profile prepared: no qemu-system-x86_64 on the repository's host" in out, out
    p = _profile("os:v1", data=data)
    assert not p["ready"] and p["preparation"]["state"] == "skipped", p
    assert "not ready: skipped" in run_cli("show", "os:v1", data=data).stdout
    # --no-prepare: nothing at all
    run_cli("import", str(img.disk), "other:v1", data=data)
    out = run_cli("boot-files", "set", "other:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
                  "--no-prepare", data=data, env=PREPARE).stdout
    assert "boot profile" not in out and _profile("other:v1", data=data)["preparation"] is None


def test_a_server_prepares_what_its_clients_give_boot_files(tmp_path: Path) -> None:
    img = bootvm.build_image(size="256M", fill_mb=40)
    server, url = start_server(tmp_path / "repo", env=PREPARE)
    try:
        run_cli("--repo", url, "import", str(img.disk), "os:v1")
        out = run_cli("--repo", url, "boot-files", "set", "os:v1", "--kernel", str(img.kernel), "--initrd",
                      str(img.initrd), "--cmdline", CMDLINE, env=PREPARE).stdout
        assert "boot profile: queued" in out or "boot profile: running" in out, out
        p = _wait_ready("os:v1", env={"BLOCKPROV_REPO": url})
        assert p["ready"] and p["preparation"]["state"] == "done", p
    finally:
        server.stop()
