"""kill -9 around the shared catalog: a server over PostgreSQL (``--catalog``) and S3 (SeaweedFS).

* The server is killed at a random moment of a stream of imports through it (a few rounds): after a
  restart every version the catalog lists exports byte for byte as its source, every tag resolves,
  every import that reported success is there, and the interrupted import simply runs again.
* PostgreSQL itself is killed in the middle of an import: the import fails with one line naming the
  catalog (exit 7); meanwhile the server still serves chunks it has (200) and answers catalog requests
  with 503 and a JSON error naming the catalog; once PostgreSQL is back the same server process works
  again, the import runs again, and the repository is consistent.

The ``postgres`` fixture is shared by this worker's other tests: whatever happens, it is started again.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from blockprov import codec
from blockprov.imaging.exporter import export_image
from blockprov.repo.remote import RemoteRepository
from tests.conftest import VENV_BIN, make_image, run_cli
from tests.pgfixture import Postgres
from tests.procs import Proc, _env, start_server, wait_for
from tests.s3fixture import SeaweedFS

pytestmark = pytest.mark.crash
ROUNDS = 3
MAX_IMPORTS = 8  # per round: the stream is bounded even if the kill came late


def serve(data: Path, store: str, catalog: str) -> tuple[Proc, str]:
    """``blockprov serve`` with the store and the catalog in its environment (clients use --repo only)."""
    return start_server(data, env={"BLOCKPROV_STORE": store, "BLOCKPROV_CATALOG": catalog})


def assert_consistent(url: str, sources: dict[str, Path], scratch: Path) -> dict[str, str]:
    """Every listed version has a tag naming its source and exports as that source, byte for byte;
    every tag resolves to a listed version. Returns tag → version id."""
    repo = RemoteRepository(url)
    try:
        images = repo.images()
        if not images:  # killed before any import committed
            return {}
        (image,) = images
        listed = {v.id: v.tags for v in repo.versions("lab")}
        assert image.versions == len(listed)
        for vid, tags in listed.items():
            assert tags, f"lab@{vid} has no tag: every import commits with its tag"
            srcs = {sources[t] for t in tags}
            assert len(srcs) == 1, (vid, tags)
            export_image(repo, f"lab@{vid}", scratch, force=True)
            assert scratch.read_bytes() == srcs.pop().read_bytes(), f"lab@{vid} ({tags}) differs from its source"
        for tag, vid in image.tags.items():
            assert vid in listed and tag in listed[vid]
            assert repo.resolve(f"lab:{tag}").id == vid
        return dict(image.tags)
    finally:
        repo.close()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockprov: error: "), stderr
    return lines[0]


def test_server_killed_during_imports(tmp_path: Path, seaweed: SeaweedFS, s3_env: dict[str, str], pg_url: str) -> None:
    store = f"s3://{seaweed.new_bucket()}/crash"
    data = tmp_path / "host"
    rnd = random.Random(41)
    sources: dict[str, Path] = {}
    succeeded: set[str] = set()
    server, url = serve(data, store, pg_url)
    try:
        for n in range(ROUNDS):
            results: list[tuple[str, int, str]] = []
            stop = threading.Event()

            def stream(n: int = n, url: str = url, results: list[tuple[str, int, str]] = results,
                       stop: threading.Event = stop) -> None:
                for k in range(MAX_IMPORTS):
                    if stop.is_set():
                        return
                    tag = f"r{n}-{k}"
                    sources[tag] = make_image(tmp_path / f"{tag}.img", 2 << 20, seed=1000 * n + k,
                                              data_fraction=1.0, pattern_every=128 << 10)
                    p = run_cli("--repo", url, "import", str(sources[tag]), f"lab:{tag}", check=False)
                    results.append((tag, p.returncode, p.stderr))

            t = threading.Thread(target=stream, daemon=True)
            t.start()
            time.sleep(rnd.uniform(0.3, 2.5))
            stop.set()  # no import starts after this one: the one in flight is the one killed, if any
            server.kill9()
            t.join(timeout=300)
            assert not t.is_alive()
            assert results, "no import started"
            *before, (last, rc, err) = results
            assert all(r == 0 for _t, r, _e in before), before  # the server was up for all of those
            succeeded |= {tag for tag, _r, _e in before}
            if rc == 0:
                succeeded.add(last)
            else:
                assert rc == 7 and "unreachable" in one_line(err), (rc, err)

            server, url = serve(data, store, pg_url)
            tags = assert_consistent(url, sources, tmp_path / "out.raw")
            assert succeeded <= tags.keys(), f"acknowledged imports lost: {succeeded - tags.keys()}"
            if rc != 0:  # the interrupted import, simply run again
                run_cli("--repo", url, "import", str(sources[last]), f"lab:{last}")
                succeeded.add(last)
                out = tmp_path / "again.raw"
                run_cli("--repo", url, "export", f"lab:{last}", str(out), "--force")
                assert out.read_bytes() == sources[last].read_bytes()
        assert_consistent(url, sources, tmp_path / "out.raw")
    finally:
        server.stop()


def test_postgres_killed_mid_import(tmp_path: Path, seaweed: SeaweedFS, s3_env: dict[str, str], postgres: Postgres,
                                    pg_url: str) -> None:
    bucket = seaweed.new_bucket()
    server, url = serve(tmp_path / "host", f"s3://{bucket}/crash", pg_url)
    try:
        v1 = make_image(tmp_path / "v1.img", 2 << 20, seed=51, data_fraction=1.0, pattern_every=256 << 10)
        run_cli("--repo", url, "import", str(v1), "lab:v1")
        probe = RemoteRepository(url)
        try:
            chunk = next(d for d in probe.resolve("lab:v1").digests() if d != codec.ZERO_DIGEST)
        finally:
            probe.close()
        big = tmp_path / "big.img"
        with open(big, "wb") as f:  # incompressible and unique: every chunk is a new PUT
            for i in range(32):
                f.write(hashlib.shake_256(b"pg" + i.to_bytes(4, "little")).digest(1 << 20))
        s3 = seaweed.client()

        def objects() -> int:
            return sum(p.get("KeyCount", 0) for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket))

        before = objects()
        proc = subprocess.Popen([str(VENV_BIN / "blockprov"), "--repo", url, "import", str(big), "lab:v2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(None))
        try:
            try:
                assert wait_for(lambda: objects() > before + 32, timeout=60), "the import stored nothing"
                assert proc.poll() is None, "the import finished before PostgreSQL could be killed"
                postgres.kill9()
                out, err = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 7, (out, err)
            line = one_line(err)
            assert "catalog" in line and "unreachable" in line, line

            with httpx.Client(timeout=60) as http, ThreadPoolExecutor(1) as pool:
                # A catalog request answers 503 with a JSON error naming the catalog; meanwhile (it may
                # wait for a connection) chunks, which need no catalog, keep coming, also past the
                # server's 5 s token-check cache.
                catalog_answer = pool.submit(httpx.get, f"{url}/v1/images", timeout=60)
                end = time.monotonic() + 6
                served = 0
                while time.monotonic() < end and served < 1000:  # bounded both ways
                    r = http.get(f"{url}/v1/chunks/{chunk.hex()}")
                    assert r.status_code == 200, (served, r.status_code, r.text)
                    codec.decode(r.content, chunk)
                    served += 1
                    time.sleep(0.2)
                r = catalog_answer.result(timeout=60)
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["error"] == "CatalogUnavailable" and "catalog" in body["message"], body
        finally:
            if postgres.proc is None:
                postgres.start()

        # The same server process answers again, with no restart.
        assert server.proc.poll() is None
        assert wait_for(lambda: run_cli("--repo", url, "images", check=False).returncode == 0, timeout=30)
        run_cli("--repo", url, "import", str(big), "lab:v2")  # simply run again
        tags = assert_consistent(url, {"v1": v1, "v2": big}, tmp_path / "out.raw")
        assert tags.keys() == {"v1", "v2"}
    finally:
        if postgres.proc is None:
            postgres.start()
        server.stop()
