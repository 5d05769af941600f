"""Prometheus metrics of real processes, scraped with curl and parsed with prometheus_client's
parser: an agent (`attach --metrics 127.0.0.1:0`) while a client reads and writes, and the
repository server it fetched from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_image, run_cli
from tests.procs import nbdsh, start_agent, start_server

pytestmark = pytest.mark.interop

CS = 65536


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    p = subprocess.run(["curl", "-sf", "--max-time", "20", url], capture_output=True, text=True, timeout=60, check=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(p.stdout) for s in fam.samples}


def one(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def test_agent_and_server_metrics(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "a.raw", 8 << 20, seed=9, data_fraction=1.0)
    run_cli("import", str(src), "lab:v1", data=data)
    server, url = start_server(data)
    sock = tmp_path / "a.sock"
    agent, banner = start_agent(tmp_path / "cache", "lab:v1", sock, "--metrics", "127.0.0.1:0", "--readahead", "0",
                                repo_url=url)
    try:
        murl = str(banner["metrics"])
        assert murl.startswith("http://127.0.0.1:") and murl.endswith("/metrics")
        before = scrape(murl)
        assert one(before, "blockprov_agent_chunks", state="missing") == 128
        assert one(before, "blockprov_agent_local_ratio") == 0.0
        info = [k for k in before if k[0] == "blockprov_agent_info"]
        assert info and ("image", "lab") in info[0][1]
        # read the first 2 MiB, write one chunk
        p = nbdsh(f"""
import nbd
h = nbd.NBD(); h.connect_uri("nbd+unix:///?socket={sock}")
h.pread(2 << 20, 0)
h.pwrite(b"x" * {CS}, 4 << 20)
h.flush()
h.shutdown()
""")
        assert p.returncode == 0, p.stderr
        after = scrape(murl)
        assert one(after, "blockprov_agent_chunks", state="present") >= 33
        assert one(after, "blockprov_agent_chunks", state="modified") == 1
        assert 0.25 < one(after, "blockprov_agent_local_ratio") < 0.5
        assert one(after, "blockprov_agent_fetched_chunks_total") == 32
        batches = one(after, "blockprov_agent_fetch_batches_total")
        assert batches >= 1 and one(after, "blockprov_agent_fetch_latency_seconds_count") == batches
        assert one(after, "blockprov_agent_fetch_latency_seconds_bucket", le="+Inf") == batches
        assert one(after, "blockprov_agent_fetch_latency_seconds_sum") > 0
        assert one(after, "blockprov_agent_nbd_requests_total") >= 3
        assert one(after, "blockprov_agent_nbd_read_bytes_total") == 2 << 20
        assert one(after, "blockprov_agent_nbd_written_bytes_total") == CS
        assert one(after, "process_cpu_seconds_total") > 0
        # the control socket's status names the metrics URL; other paths are 404
        st = json.loads(run_cli("status", "--cache", str(tmp_path / "cache"), "--json").stdout)
        assert st["agent"]["metrics"] == murl
        p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", murl.replace("/metrics", "/x")],
                           capture_output=True, text=True, timeout=60)
        assert p.stdout == "404"
        # the repository's side of the same reads
        srv = scrape(f"{url}/metrics")
        fetch = {"method": "POST", "route": "/v1/chunks/fetch"}
        assert one(srv, "blockprov_http_requests_total", status="200", **fetch) == batches
        assert one(srv, "blockprov_chunks_served_total") == 32
        assert one(srv, "blockprov_http_sent_bytes_total", route="/v1/chunks/fetch") == one(
            after, "blockprov_agent_fetch_wire_bytes_total") + 4 * 32
    finally:
        assert agent.stop() == 0
        server.stop()
