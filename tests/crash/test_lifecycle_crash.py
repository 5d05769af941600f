"""kill -9 the agent during a snapshot and during hydration (bounded: a few rounds, each killed
within a second or so).

- Snapshot: after the crash the snapshot is simply run again; the new version then equals the
  disk byte for byte, and the target has nothing unsynced.
- Hydration: a restarted agent continues with what is still missing and fetches nothing twice.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.procs import VENV_BIN, nbd_uri, start_agent, start_server, wait_for

pytestmark = pytest.mark.crash
SIZE = 32 << 20
ROUNDS = 3


def status(cache: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return out


def test_kill9_during_snapshot_then_snapshot_again(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    r = LocalRepository(data)
    import_image(r, make_image(tmp_path / "g.img", SIZE, seed=71, data_fraction=0.5), "lab:v1")
    r.close()
    server, url = start_server(data)
    cache, sock = tmp_path / "cache", tmp_path / "s.sock"
    rnd = random.Random(7)
    try:
        for n in range(ROUNDS):
            proc, _ = start_agent(cache, "lab:v1" if n == 0 else None, sock, "--no-register", repo_url=url)
            offset = rnd.randrange(0, SIZE - (8 << 20), 1 << 20)
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {0x30 + n} {offset} 8m",
                            "-c", f"write -P {0x60 + n} {rnd.randrange(0, SIZE - 65536)} 3000",
                            nbd_uri(sock)], check=True, capture_output=True, timeout=60)
            snap = subprocess.Popen([str(VENV_BIN / "blockprov"), "--repo", url, "snapshot", "--cache", str(cache),
                                     "--to", f"lab:s{n}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rnd.uniform(0.05, 0.6))
            proc.kill9()
            _out, err = snap.communicate(timeout=60)
            assert "Traceback" not in err
            # Restart, snapshot again: the version equals the disk, nothing left unsynced.
            proc, _ = start_agent(cache, None, sock, "--no-register", repo_url=url)
            try:
                out = json.loads(run_cli("--repo", url, "snapshot", "--cache", str(cache), "--to", f"lab:s{n}",
                                         "--json").stdout)
                run_cli("--repo", url, "export", f"lab:s{n}", str(tmp_path / "s.raw"), "--force")
                subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "s.raw"),
                                nbd_uri(sock)], check=True, capture_output=True, timeout=60)
                targets = status(cache)["targets"]
                assert isinstance(targets, dict) and targets["default"]["unsynced_chunks"] == 0
                assert out["version"]
            finally:
                proc.stop()
    finally:
        server.stop()


def test_kill9_during_hydration_resumes_without_refetching(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    r = LocalRepository(data)
    import_image(r, make_image(tmp_path / "g.img", SIZE, seed=72, data_fraction=1.0), "lab:v1")
    r.close()
    cache, sock = tmp_path / "cache", tmp_path / "s.sock"
    rnd = random.Random(8)
    for n in range(2):  # each run copies one 8 MiB batch, then waits (rate limit) and is killed
        proc, _ = start_agent(cache, "lab:v1" if n == 0 else None, sock, "--hydrate", "--hydrate-rate", "2M",
                              "--no-register", data=data)
        time.sleep(rnd.uniform(0.3, 0.8))
        proc.kill9()
    before = status(cache)
    assert 0 < int(before["chunks_present"]) < int(before["chunks_total"])  # progress survived the crashes
    proc, _ = start_agent(cache, None, sock, "--hydrate", "--no-register", data=data)
    try:
        assert wait_for(lambda: status(cache).get("hydration", {}).get("state") == "done", 60)  # type: ignore[union-attr]
        after = status(cache)
        assert after["chunks_missing"] == 0
        assert after["chunks_fetched"] == before["chunks_missing"]  # this run fetched only what was missing
    finally:
        proc.stop()
