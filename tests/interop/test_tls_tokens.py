"""TLS and tokens with real processes: `blockprov serve --tls-cert/--tls-key`, curl, the CLI and
agents (both fetch paths: the batched http.client POST and the cacheable per-chunk GET)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli
from tests.procs import start_agent, start_server, wait_for
from tests.tlsfixture import make_tls

pytestmark = pytest.mark.interop


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True, text=True, timeout=60)


def test_tls_tokens_cli_curl_agents(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    data = tmp_path / "repo"
    src = make_image(tmp_path / "a.raw", 8 << 20, seed=7)
    run_cli("import", str(src), "lab:v1", data=data)
    write = run_cli("token", "create", "--scope", "write", "--name", "ci", data=data).stdout.strip()
    agent_token = run_cli("token", "create", "--scope", "agent", "--name", "pc1", data=data).stdout.strip()
    read = run_cli("token", "create", "--scope", "read", data=data).stdout.strip()
    listed = json.loads(run_cli("token", "list", "--json", data=data).stdout)
    assert [t["scope"] for t in listed] == ["write", "agent", "read"] and all("token" not in t for t in listed)
    assert run_cli("--repo", "http://127.0.0.1:1", "token", "list", data=data, check=False).returncode == 2

    server, url = start_server(data, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
    try:
        assert url.startswith("https://127.0.0.1:")
        # curl: trusts the server with --cacert, needs a token, refuses it without the CA
        p = curl("-f", "--cacert", str(tls.ca), "-H", f"Authorization: Bearer {read}", f"{url}/v1/images")
        assert p.returncode == 0 and json.loads(p.stdout)["images"][0]["name"] == "lab"
        p = curl("--cacert", str(tls.ca), "-o", "/dev/null", "-w", "%{http_code}", f"{url}/v1/images")
        assert p.stdout == "401"
        assert curl("--cacert", str(tls.ca), "-f", f"{url}/v1/health").returncode == 0  # health stays open
        assert curl(f"{url}/v1/health").returncode == 60  # 60: peer certificate cannot be authenticated

        env = {"BLOCKPROV_REPO": url, "BLOCKPROV_CA": str(tls.ca), "BLOCKPROV_TOKEN": read}
        assert json.loads(run_cli("images", "--json", env=env).stdout)[0]["name"] == "lab"
        # no CA: one clear line, exit 7, pointing at --ca
        p = run_cli("--repo", url, "--token", read, "images", check=False)
        assert p.returncode == 7, p.stderr
        assert "untrusted TLS certificate" in p.stderr and "--ca" in p.stderr and len(p.stderr.splitlines()) == 1
        # no token / bad token: 10; a read token that tries to write: 11
        p = run_cli("--repo", url, "--ca", str(tls.ca), "images", check=False)
        assert p.returncode == 10 and "access denied" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
        p = run_cli("--repo", url, "--ca", str(tls.ca), "--token", "bpt_nope", "images", check=False)
        assert p.returncode == 10 and "not valid" in p.stderr
        p = run_cli("tag", "lab:v1", "lab:prod", env=env, check=False)
        assert p.returncode == 11 and "read token cannot" in p.stderr, p.stderr
        p = run_cli("tag", "lab:v1", "lab:prod", env=env | {"BLOCKPROV_TOKEN": agent_token}, check=False)
        assert p.returncode == 11
        run_cli("tag", "lab:v1", "lab:prod", env=env | {"BLOCKPROV_TOKEN": write})

        # agents over TLS with a token: the fast POST path, and the cacheable GET path
        for n, extra in enumerate(([], ["--cacheable-fetch"])):
            sock = tmp_path / f"a{n}.sock"
            agent, _banner = start_agent(tmp_path / f"cache{n}", "lab:prod", sock, "--instance", f"pc-{n}", *extra,
                                        repo_url=url, env={"BLOCKPROV_CA": str(tls.ca),
                                                           "BLOCKPROV_TOKEN": agent_token})
            try:
                out = tmp_path / f"out{n}.raw"
                subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(out)], check=True, timeout=120)
                assert out.read_bytes() == src.read_bytes()
                # an agent token may register: the write token sees it in the agent list
                assert wait_for(lambda n=n: f"pc-{n}" in run_cli(
                    "agents", "--json", env=env | {"BLOCKPROV_TOKEN": write}).stdout, timeout=60)
            finally:
                assert agent.stop() == 0
            st = json.loads(run_cli("status", "--cache", str(tmp_path / f"cache{n}"), "--json").stdout)
            assert st["totals"]["chunks_fetched"] > 0
    finally:
        server.stop()

    # the same repository served again, open for reading without a token (plain HTTP, loopback)
    server, url = start_server(data, "--anonymous-read")
    try:
        assert json.loads(run_cli("--repo", url, "images", "--json").stdout)[0]["name"] == "lab"
        p = run_cli("--repo", url, "tag", "lab:v1", "lab:x", check=False)
        assert p.returncode == 10
        run_cli("--repo", url, "--token", write, "tag", "lab:v1", "lab:x")
    finally:
        server.stop()


def test_serve_refuses_bad_tls_files(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    data = tmp_path / "repo"
    for args, what in ((["--tls-cert", str(tmp_path / "nope.pem")], "no such file"),
                       (["--tls-cert", str(tls.ca), "--tls-key", str(tls.key)], "cannot use the TLS certificate"),
                       (["--tls-key", str(tls.key)], "--tls-key needs --tls-cert")):
        p = run_cli("--data", str(data), "serve", "--listen", "127.0.0.1:0", *args, check=False)
        assert p.returncode == 2 and what in p.stderr, p.stderr
