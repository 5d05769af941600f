"""Real Linux boots (qemu, TCG) of the test image: from a raw file, and lazily from blockprov's agent.

Why: only an operating system booting proves the product's promise — a guest runs before the image
is copied (the agent fetches just what the boot reads), and a check inside the guest sees every
change a session made (so the reset tests built on it mean something). Each boot takes ~10 s under
TCG; tests are grouped so pytest-xdist (``--dist loadgroup``) runs the raw-file boots and the agent
boots on different workers, and never assert wall time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import bootvm
from tests.boot.conftest import attached
from tests.conftest import run_cli

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]  # TCG boots, on a shared, loaded machine
Built = bootvm.bootimage.Built


def _status(cache: Path) -> dict[str, object]:
    return dict(json.loads(run_cli("status", "--cache", str(cache), "--json").stdout))


@pytest.mark.xdist_group("boot-local")
def test_boot_from_local_raw_file_checks_golden(boot_image: Built) -> None:
    """The image itself boots, reads its files and finds every golden file intact."""
    r = bootvm.boot(boot_image.kernel, boot_image.initrd, boot_image.disk, mode="check", readonly=True)
    assert r.ok, r.tail()
    assert r.check == "OK", r.check_line or r.tail()
    assert int(r.fields["files"]) > 1000  # the boot really read a realistic set of files
    assert r.guest_read_bytes > 10 << 20


@pytest.mark.xdist_group("boot-local")
def test_admin_change_keeps_check_passing(boot_image: Built, tmp_path: Path) -> None:
    """A sanctioned change (mode=admin) updates the golden list: the next check passes and the file is there."""
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(boot_image.disk), str(disk)], check=True)
    r = bootvm.boot(boot_image.kernel, boot_image.initrd, disk, mode="admin")
    assert r.ok, r.tail()
    r = bootvm.boot(boot_image.kernel, boot_image.initrd, disk, mode="check", readonly=True)
    assert r.ok, r.tail()
    assert r.check == "OK", r.check_line or r.tail()
    listing = subprocess.run(["debugfs", "-R", f"cat {bootvm.bootimage.ADMIN_CHANGE_PATH}", str(disk)],
                             capture_output=True, text=True, check=True).stdout
    assert listing == bootvm.bootimage.ADMIN_CHANGE_CONTENT


@pytest.mark.xdist_group("boot-agent")
def test_lazy_boot_from_agent_fetches_a_fraction(boot_image: Built, boot_repo: Path, tmp_path: Path,
                                                 sockdir: Path) -> None:
    """A cold cache boots straight from the agent's NBD export; only what the boot read was fetched."""
    cache = tmp_path / "cache"
    with attached(cache, sockdir / "nbd.sock", boot_repo) as (_agent, uri):
        r = bootvm.boot(boot_image.kernel, boot_image.initrd, uri, mode="plain")
        assert r.ok, r.tail()
        st = _status(cache)
    total = int(st["chunks_total"])  # type: ignore[call-overload]
    present = int(st["chunks_present"])  # type: ignore[call-overload]
    zero = int(st["chunks_zero"])  # type: ignore[call-overload]
    # Read-ahead may fetch more than the guest read, but never the whole image: some data chunks stay
    # missing, and well under half of the disk is local.
    assert 0 < present < total - zero, st
    assert present < 0.5 * total, st
    assert r.guest_read_bytes > 10 << 20


@pytest.mark.xdist_group("boot-agent")
def test_dirty_session_through_agent_is_detected_by_check(boot_image: Built, boot_repo: Path, tmp_path: Path,
                                                          sockdir: Path) -> None:
    """A session that changes files (a user's and a virus's) through the agent; the next boot's check
    names each change — the proof the café scenario's "pristine after reset" check can fail."""
    cache = tmp_path / "cache"
    with attached(cache, sockdir / "nbd.sock", boot_repo) as (_agent, uri):
        r = bootvm.boot(boot_image.kernel, boot_image.initrd, uri, mode="dirty")
        assert r.ok, r.tail()
        victim = r.fields["victim"]
        st = _status(cache)
        assert int(st["chunks_modified"]) > 0, st  # type: ignore[call-overload]
        r = bootvm.boot(boot_image.kernel, boot_image.initrd, uri, mode="check", readonly=True)
        assert r.ok, r.tail()
    assert r.check == "FAIL", r.tail()
    assert f"./{victim}" in r.check_line
    assert "./usr/bin/bp-virus" in r.check_line
    assert "./home/user/Documents/notes.txt" in r.check_line
