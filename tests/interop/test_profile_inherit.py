"""No version starts cold that need not (issue 15 item 1), with real agents and the CLI: a v2
snapshotted from a v1 that has a boot profile is prefetched, on its first attach, in v1's order;
so is a new image imported with v1's chunks; v2's own first session is then merged in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.interop.test_lifecycle_agent import first_session, sh
from tests.procs import nbd_uri, start_agent, wait_for

pytestmark = pytest.mark.interop
CS = 64 << 10
SIZE = 16 << 20


def status(cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return out


def profile(ref: str, data: Path) -> list[int]:
    chunks: list[int] = json.loads(run_cli("profile", "show", ref, "--json", data=data).stdout)["chunks"]
    return chunks


def prefetched(cache: Path) -> dict[str, Any]:
    """Wait for the profile prefetch of a fresh attach to finish; the agent's status then."""
    assert wait_for(lambda: status(cache).get("hydration", {}).get("state") == "done", 30)
    return status(cache)


def test_a_snapshot_and_a_sharing_import_start_with_the_parents_profile(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "golden.img", SIZE, seed=41, data_fraction=1.0, pattern_every=CS)
    r = LocalRepository(data)
    import_image(r, src, "lab:v1")
    r.close()
    sock = tmp_path / "s.sock"
    v1_order = first_session(tmp_path / "pc1", data, sock)  # v1's read order becomes v1's profile
    assert v1_order == [80, 16, 144, 145]
    # v2: a snapshot of an instance of v1 where chunk 16 (in the profile) and 200 changed.
    proc, _ = start_agent(tmp_path / "pc2", "lab:v1", sock, "--readahead", "0", "--no-profile", data=data)
    try:
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x77 1m 4k", "-c", "write -P 0x78 200k 64k", nbd_uri(sock))
        run_cli("snapshot", "--cache", str(tmp_path / "pc2"), "--to", "lab:v2", data=data)
    finally:
        assert proc.stop() == 0
    v2 = json.loads(run_cli("show", "lab:v2", "--json", data=data).stdout)
    assert v2["parent"] == json.loads(run_cli("show", "lab:v1", "--json", data=data).stdout)["id"]
    assert profile("lab:v2", data) == v1_order  # inherited, translated (same chunks here)
    shown = json.loads(run_cli("profile", "show", "lab:v2", "--json", data=data).stdout)
    assert shown["inherited"] is True and "inherited from" in run_cli("profile", "show", "lab:v2", data=data).stdout
    # v2's first attach prefetches in v1's order: the agent says which order it follows, and
    # exactly those chunks became local before any client read.
    proc, _ = start_agent(tmp_path / "pc3", "lab:v2", sock, "--readahead", "0", data=data)
    try:
        st = prefetched(tmp_path / "pc3")
        assert st["profile"] == {"chunks": 4, "inherited": True, "first": v1_order}
        assert st["hydration"]["profile_only"] and st["hydration"]["chunks_fetched"] == 4
        assert st["chunks_present"] == 4
        out = run_cli("status", "--cache", str(tmp_path / "pc3"), data=data).stdout
        assert "4 chunk(s) prefetched in boot order (inherited" in out, out
        sh("qemu-io", "-f", "raw", "-c", "read -P 0x77 1m 4k", "-c", "read 2m 64k", nbd_uri(sock))
    finally:
        assert proc.stop() == 0
    # v2's own first session (chunks 16 and 32) is kept, merged with what it inherited.
    assert profile("lab:v2", data) == [16, 32, 80, 144, 145]
    # A new image imported with v1's content inherits too (labelled with its donor).
    run_cli("import", str(src), "copy:v1", data=data)
    assert json.loads(run_cli("show", "copy:v1", "--json", data=data).stdout)["labels"]["profile-from"].startswith(
        "lab@")
    proc, _ = start_agent(tmp_path / "pc4", "copy:v1", sock, "--readahead", "0", data=data)
    try:
        st = prefetched(tmp_path / "pc4")
        assert st["profile"]["inherited"] and st["profile"]["first"][:4] in (v1_order, [16, 32, 80, 144])
    finally:
        assert proc.stop() == 0
