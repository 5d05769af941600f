"""A full disk, for real: a small tmpfs under the repository and under an agent's cache.

The operation that needs space fails with a clear message (CLI) or ENOSPC (NBD); what was stored
before stays intact and the agent keeps serving. (Mounting needs root, which CI has.)
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.procs import nbd_uri, start_agent

pytestmark = pytest.mark.interop


def test_import_into_a_full_repository(tmp_path: Path, small_fs: Callable[[str], Path]) -> None:
    data = small_fs("12m") / "repo"
    small = make_image(tmp_path / "small.img", 2 << 20, seed=61, data_fraction=1.0)
    run_cli("import", str(small), "keep:v1", data=data)
    big = make_image(tmp_path / "big.img", 32 << 20, seed=62, data_fraction=1.0)  # random: incompressible
    p = run_cli("import", str(big), "big:v1", data=data, check=False)
    assert p.returncode != 0
    assert "no space left" in p.stderr and "Traceback" not in p.stderr
    images = json.loads(run_cli("images", "--json", data=data).stdout)
    assert [i["name"] for i in images] == ["keep"]  # the failed import committed nothing
    run_cli("export", "keep:v1", str(tmp_path / "out.img"), data=data)
    assert (tmp_path / "out.img").read_bytes() == small.read_bytes()


def test_agent_cache_on_a_full_disk(tmp_path: Path, small_fs: Callable[[str], Path]) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "g.img", 32 << 20, seed=63, data_fraction=1.0)
    r = LocalRepository(data)
    import_image(r, src, "full:v1")
    r.close()
    cache = small_fs("6m") / "cache"
    sock = tmp_path / "s"
    agent, _ = start_agent(cache, "full:v1", sock, "--readahead", "0", data=data)
    try:
        # reading the whole disk needs more cache than there is: reads still succeed, with the right
        # bytes (what cannot be stored is served as fetched and fetched again next time)
        out = tmp_path / "o"
        subprocess.run(["nbdcopy", nbd_uri(sock), str(out)], check=True, timeout=120)
        assert out.read_bytes() == src.read_bytes()
        # a write that needs new space gets ENOSPC; the agent lives on and keeps serving
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 30M 1M", nbd_uri(sock)],
                           capture_output=True, text=True, timeout=60)
        assert "No space left on device" in w.stdout + w.stderr
        assert agent.proc.poll() is None
        subprocess.run(["nbdcopy", nbd_uri(sock), str(out)], check=True, timeout=120)
        got, want = out.read_bytes(), src.read_bytes()
        lo, hi = 30 << 20, 31 << 20  # a failed write may leave its own range either way, nothing else
        assert got[:lo] == want[:lo] and got[hi:] == want[hi:]
    finally:
        agent.stop()
    st = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    assert 0 < st["chunks_present"] < st["chunks_total"]
