"""Caching-friendly chunks: a plain nginx cache between agents and the repository serves repeat reads.

Chunk GETs carry a strong ETag (the chunk id) and ``Cache-Control: public, max-age=31536000,
immutable``. Agents attached with ``--cacheable-fetch`` ask for chunks one GET each (a POST batch is
never cached), through Debian's nginx configured as a caching reverse proxy (written here, on a
free loopback port). The first agent reads the image cold (nginx MISSes and stores), a second
agent with a fresh cache reads it again: every one of its chunk requests is a nginx HIT, and the
repository server sees no chunk request from it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import warnings
from pathlib import Path

from blockprov import codec
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import make_image, run_cli
from tests.procs import Proc, free_port, nbd_uri, start_agent, start_server

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

NGINX = "/usr/sbin/nginx"


def test_chunk_get_is_immutable_with_a_strong_etag(repo: LocalRepository, tmp_path: Path) -> None:
    data = b"cache me " * 4000
    cid = codec.digest(data)
    repo.put_blobs([(cid, codec.encode(data))])
    with TestClient(create_app(repo)) as c:
        r = c.get(f"/v1/chunks/{cid.hex()}")
        assert r.status_code == 200
        assert r.headers["etag"] == f'"{cid.hex()}"'  # strong: no W/ prefix
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert codec.decode(r.content, cid) == data
        again = c.get(f"/v1/chunks/{cid.hex()}", headers={"if-none-match": f'"{cid.hex()}"'})
        assert again.status_code == 304 and again.headers["etag"] == f'"{cid.hex()}"'


def _nginx_conf(prefix: Path, port: int, upstream: str) -> Path:
    for d in ("cache", "tmp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    host = upstream.removeprefix("http://")
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private dirs
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format cache '$request_method $uri $status $upstream_cache_status';
    access_log {prefix}/access.log cache;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=chunks:8m max_size=1g inactive=1d use_temp_path=off;
    upstream repo {{ server {host}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 256m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location /v1/chunks/ {{
            proxy_pass http://repo;
            proxy_cache chunks;
            proxy_cache_lock on;
        }}
        location / {{
            proxy_pass http://repo;
        }}
    }}
}}
""")
    return conf


def _start_nginx(prefix: Path, conf: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([NGINX, "-e", str(prefix / "error.log"), "-c", str(conf), "-p", str(prefix),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("nginx did not start")


def _read_all(cache: Path, url: str, ref: str, out: Path) -> None:
    sock = cache.parent / f"{cache.name}.sock"
    agent: Proc | None = None
    try:
        agent, _ = start_agent(cache, ref, sock, "--cacheable-fetch", repo_url=url)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(sock), str(out)],
                       check=True, capture_output=True, timeout=120)
    finally:
        if agent is not None:
            agent.stop()


def _chunk_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if re.match(r"GET /v1/chunks/[0-9a-f]{64} ", ln)]


def test_second_agent_reads_hit_the_nginx_cache(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    img = make_image(tmp_path / "img", 8 << 20, seed=9, data_fraction=0.8, pattern_every=512 << 10)
    run_cli("import", str(img), "lab:v1", data=data)
    r = LocalRepository(data)
    m = r.resolve("lab:v1")
    wanted = {f"/v1/chunks/{c.hex()}" for c in m.unique_digests() - {codec.ZERO_DIGEST}}
    r.close()
    server, url = start_server(data, "--access-log")
    port = free_port()
    prefix = tmp_path / "nginx"
    conf = _nginx_conf(prefix, port, url)
    nginx = _start_nginx(prefix, conf, port)
    log = prefix / "access.log"
    try:
        proxy = f"http://127.0.0.1:{port}"
        _read_all(tmp_path / "c1", proxy, "lab:v1", tmp_path / "out1")
        first = _chunk_lines(log.read_text())
        _read_all(tmp_path / "c2", proxy, "lab:v1", tmp_path / "out2")
        second = _chunk_lines(log.read_text())[len(first):]
    finally:
        nginx.terminate()
        nginx.wait(10)
        server.stop()
    for out in ("out1", "out2"):
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), str(tmp_path / out)],
                             capture_output=True, text=True, timeout=60)
        assert cmp.returncode == 0, cmp.stdout
    # (a chunk repeated in the image may be asked again by a later batch: a HIT already)
    assert {ln.split()[1] for ln in first} == wanted and all(ln.split()[2] == "200" for ln in first)
    assert sum(ln.endswith(" MISS") for ln in first) == len(wanted), first
    assert {ln.split()[1] for ln in second} == wanted and all(ln.endswith(" 200 HIT") for ln in second), second
    served = "".join(f.read() for f in (server.proc.stdout, server.proc.stderr) if f)
    upstream = re.findall(r'"GET (/v1/chunks/[0-9a-f]{64}) HTTP', served)
    assert sorted(upstream) == sorted(wanted)  # once each, all from the first agent
