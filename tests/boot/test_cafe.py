"""The internet café, for real (seed 001 ¶41–42, issue 5): Linux guests boot from streamed images,
a session's changes (a user's files and a virus) vanish at reset, an administrator's sanctioned
change becomes a new version through a snapshot, a second machine boots that version, and the
first machine is updated to it by fetching only the difference.

Every "pristine" claim is the guest's own: its init checks every golden file's checksum and lists
files that should not be there (tools/bootimage.py, ``bp.mode=check``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockprov.clones.customize import export_as_file
from tests import bootvm
from tests.boot.conftest import IMAGE_REF, attached
from tests.conftest import run_cli

pytestmark = [pytest.mark.interop, pytest.mark.timeout(1800)]  # six TCG boots in one test, on a shared, loaded machine
Built = bootvm.bootimage.Built


def status(cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return out


def boot(img: Built, uri: str, mode: str) -> bootvm.BootResult:
    r = bootvm.boot(img.kernel, img.initrd, uri, mode=mode, readonly=mode == "check")
    assert r.ok, r.tail()
    return r


def admin_file(uri: str) -> str:
    """The sanctioned file as the disk holds it (read through nbdfuse with debugfs: no boot)."""
    with export_as_file(uri, read_only=True) as disk:
        p = subprocess.run(["debugfs", "-R", f"cat {bootvm.bootimage.ADMIN_CHANGE_PATH}", str(disk)],
                           capture_output=True, text=True, timeout=60)
    return p.stdout


@pytest.mark.xdist_group("boot-cafe")
def test_cafe_sessions_reset_snapshot_second_machine_update(boot_image: Built, boot_repo: Path, tmp_path: Path,
                                                            sockdir: Path) -> None:
    data = boot_repo
    pc1, pc2 = tmp_path / "pc1", tmp_path / "pc2"
    with attached(pc1, sockdir / "pc1.sock", data) as (_agent, uri):
        # Session 1: a customer boots lazily, saves files, and a virus replaces a system program.
        dirty = boot(boot_image, uri, "dirty")
        assert status(pc1)["chunks_modified"] > 0
        # The guest powered off: reset between sessions, on the running agent.
        out = json.loads(run_cli("reset", "--cache", str(pc1), "--json").stdout)
        assert out["chunks_reset"] > 0 and status(pc1)["chunks_modified"] == 0
        # Session 2: every golden file is intact, nothing foreign is left (the guest checks).
        r = boot(boot_image, uri, "check")
        assert r.check == "OK", f"{r.check_line}\n(victim of session 1: {dirty.fields.get('victim')})"
        # The administrator's sanctioned change, kept as a new version.
        boot(boot_image, uri, "admin")
        snap = json.loads(run_cli("snapshot", "--cache", str(pc1), "--to", "bootlab:v2", "--json").stdout)
        assert 0 < snap["chunks_sent"] <= snap["chunks_modified"]
        assert snap["bytes_sent"] <= snap["bytes_modified"]
        # Back to v1 for now (the machine is updated below, by diff).
        run_cli("reset", "--cache", str(pc1))
        assert admin_file(uri) == ""

    # A second machine boots the new version from an empty cache.
    with attached(pc2, sockdir / "pc2.sock", data, ref="bootlab:v2") as (_agent, uri2):
        r = boot(boot_image, uri2, "check")
        assert r.check == "OK", r.check_line
        assert admin_file(uri2) == bootvm.bootimage.ADMIN_CHANGE_CONTENT

    # The first machine moves to v2, fetching only the chunks that differ from v1.
    changed = len(json.loads(run_cli("diff", IMAGE_REF, "bootlab:v2", "--json", data=data).stdout)["changed"])
    assert changed > 0
    with attached(pc1, sockdir / "pc1.sock", data, ref=None) as (_agent, uri):
        before = status(pc1)["totals"]["bytes_fetched"]
        up = json.loads(run_cli("update", "--cache", str(pc1), "--to", "bootlab:v2", "--json").stdout)
        assert up["chunks_changed"] == changed and 0 < up["chunks_refetched"] <= changed
        fetched = status(pc1)["totals"]["bytes_fetched"] - before
        assert fetched == up["bytes_fetched"] <= changed * (64 << 10)  # only the difference moved
        r = boot(boot_image, uri, "check")
        assert r.check == "OK", r.check_line
        assert admin_file(uri) == bootvm.bootimage.ADMIN_CHANGE_CONTENT
