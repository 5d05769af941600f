"""Agent failover: ``attach --repo URL1,URL2`` keeps serving when one repository server dies mid-run.

Two ``blockprov serve`` over one data directory (the embedded store supports several processes), or
as on two hosts: each with a data directory of its own over one S3 bucket (SeaweedFS) and one
PostgreSQL catalog. An agent attached with both reads the image cold through NBD (``qemu-img convert``, rate-limited so
the copy is still running when) one server is killed with SIGKILL. The copy must complete without an
error and equal the image (``qemu-img compare``), and both servers must have answered chunk fetches
(reads are spread), so the killed one really was in use.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli
from tests.procs import nbd_uri, start_agent, start_server, wait_for

# at -r 8M the copy takes ~6 s: time to see it running (each status check is a process) and kill a server
SIZE = 48 << 20


def _present(cache: Path) -> tuple[int, int]:
    st = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return int(st["chunks_present"]), int(st["chunks_total"])


@pytest.mark.parametrize("layout", ["one-directory", "two-hosts"])
def test_agent_survives_a_server_killed_mid_copy(layout: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data_a = data_b = tmp_path / "repo"
    env: dict[str, str] = {}
    if layout == "two-hosts":
        data_a, data_b = tmp_path / "host-a", tmp_path / "host-b"
        seaweed = request.getfixturevalue("seaweed")
        env = {**request.getfixturevalue("s3_env"), "BLOCKPROV_STORE": f"s3://{seaweed.new_bucket()}/repo",
               "BLOCKPROV_CATALOG": request.getfixturevalue("pg_url")}
    img = make_image(tmp_path / "img", SIZE, seed=5, data_fraction=1.0, pattern_every=1 << 20)
    run_cli("import", str(img), "lab:v1", data=data_a, env=env)
    a, url_a = start_server(data_a, "--access-log", env=env)
    b, url_b = start_server(data_b, "--access-log", env=env)
    agent = None
    copy = None
    try:
        sock = tmp_path / "nbd.sock"
        agent, _banner = start_agent(tmp_path / "cache", "lab:v1", sock, "--readahead", "1M",
                                     "--fetch-timeout", "20", repo_url=f"{url_a},{url_b}")
        out = tmp_path / "out.raw"
        copy = subprocess.Popen(["qemu-img", "convert", "-r", "8M", "-f", "raw", "-O", "raw",
                                 nbd_uri(sock), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cache = tmp_path / "cache"
        assert wait_for(lambda: _present(cache)[0] >= 64, timeout=30), "the copy fetched nothing"
        present, total = _present(cache)
        assert copy.poll() is None and present < total, "the copy ended before a server could be killed"
        a.kill9()
        _o, err = copy.communicate(timeout=120)
        assert copy.returncode == 0, err
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(out)],
                             capture_output=True, text=True, timeout=60)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        assert agent.proc.poll() is None  # and the agent still serves
    finally:
        if copy is not None and copy.poll() is None:
            copy.kill()
            copy.communicate()
        if agent is not None:
            agent.stop()
        a.kill9()
        b.stop()
    a_log, b_log = ("".join(f.read() for f in (p.proc.stdout, p.proc.stderr) if f) for p in (a, b))
    assert "POST /v1/chunks/fetch" in a_log and "POST /v1/chunks/fetch" in b_log  # reads were spread
