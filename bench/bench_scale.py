"""Scale benchmark (issue 7): 16 agents reading one image cold, at once, from

(a) one ``blockprov serve`` over the local pack store, and
(b) two ``blockprov serve`` over SeaweedFS (S3, ``weed mini`` started as tests/s3fixture.py does),
    each with a data directory of its own and the catalog in PostgreSQL (``--catalog``, started as
    tests/pgfixture.py does), as two hosts would run them; every agent is given ``--repo URL1,URL2``
    (reads spread round-robin).

Each agent is a real ``blockprov attach`` process on its own empty cache; each is read whole by its
own ``nbdcopy … null:``, all 16 started together. Figures:

- aggregate throughput: 16 × image size / wall time from the first nbdcopy start to the last end;
- p99 fetch latency: each agent's ``status --json`` ``fetch_latency_ms.p99`` (one fetch *batch*:
  round trip + verification), reported as the median and the worst over the agents;
- repository CPU per GiB served: CPU seconds (user + system, psutil) the server processes used
  during the reads, divided by the GiB their ``/metrics`` say they sent on ``/v1/chunks/fetch``;
  for (b) also SeaweedFS's CPU per GiB.

Everything runs on this one machine (2 cores): agents, nbdcopy, servers and SeaweedFS share them,
so these are figures of contention on one host, not of a fleet.

(c) is (b) with the servers' chunk cache off (``serve --chunk-cache 0``): every agent's read of a
chunk is then a GET to the bucket.

Run: ``.venv/bin/python bench/bench_scale.py [--size 256M] [--agents 16] [--skip a,b,c]``.
Results: bench/out/scale.json and bench/out/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import VENV_BIN, WORK, drop_caches, write_results
from prometheus_client.parser import text_string_to_metric_families
from tests.pgfixture import running_postgres
from tests.procs import first_line
from tests.s3fixture import SeaweedFS

from blockprov.humanize import parse_size

BP = str(VENV_BIN / "blockprov")
GiB = float(1 << 30)


def make_image(path: Path, size: int) -> Path:
    """Incompressible data in every chunk: every byte read is a byte fetched and sent."""
    if path.exists() and path.stat().st_size == size:
        return path
    rnd = random.Random(77)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(rnd.randbytes(1 << 20))
    return path


def env_with(extra: dict[str, str]) -> dict[str, str]:
    e = dict(os.environ)
    for k in ("BLOCKPROV_REPO", "BLOCKPROV_TOKEN", "BLOCKPROV_STORE", "BLOCKPROV_CATALOG"):
        e.pop(k, None)
    e.update(extra)
    return e


def stop(proc: subprocess.Popen[str], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def server(data: Path, env: dict[str, str], store: str | None = None, catalog: str | None = None,
           *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    args = [BP, "--data", str(data), *(["--store", store] if store else []),
            *(["--catalog", catalog] if catalog else []), "serve", "--listen", "127.0.0.1:0", "--auth", "off", *extra]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    m = re.match(r"serving (http://\S+)", first_line(p, 60))
    if m is None:
        stop(p)
        raise RuntimeError("server did not start")
    try:
        yield p, m.group(1)
    finally:
        stop(p)


@contextmanager
def agents(n: int, repo: str, ref: str, where: Path,
           fetch_timeout: float) -> Iterator[list[tuple[subprocess.Popen[str], Path, Path]]]:
    out: list[tuple[subprocess.Popen[str], Path, Path]] = []
    try:
        for i in range(n):
            cache, sock = where / f"cache{i}", where / f"a{i}.sock"
            shutil.rmtree(cache, ignore_errors=True)
            p = subprocess.Popen([BP, "--repo", repo, "attach", ref, "--cache", str(cache), "--socket", str(sock),
                                  "--no-register", "--no-profile", "--fetch-timeout", str(fetch_timeout), "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_with({}))
            out.append((p, cache, sock))
            json.loads(first_line(p, 60))  # started
        yield out
    finally:
        for p, _c, _s in out:
            stop(p)


def sent_bytes(url: str) -> float:
    text = subprocess.run(["curl", "-sf", f"{url}/metrics"], capture_output=True, text=True, check=True).stdout
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "blockprov_http_sent_bytes_total" and s.labels.get("route") == "/v1/chunks/fetch")


def cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def run_case(name: str, urls: list[str], server_pids: list[int], extra_pids: dict[str, int], n: int, size: int,
             ref: str, where: Path, fetch_timeout: float) -> dict[str, Any]:
    drop_caches()
    with agents(n, ",".join(urls), ref, where, fetch_timeout) as ags:
        sent0 = sum(sent_bytes(u) for u in urls)
        cpu0 = sum(cpu(p) for p in server_pids)
        extra0 = {k: cpu(p) for k, p in extra_pids.items()}
        t0 = time.perf_counter()
        copies = [subprocess.Popen(["nbdcopy", f"nbd+unix:///?socket={s}", "null:"]) for _p, _c, s in ags]
        for c in copies:
            if c.wait(1800) != 0:
                raise RuntimeError("nbdcopy failed")
        wall = time.perf_counter() - t0
        cpu1 = sum(cpu(p) for p in server_pids)
        extra1 = {k: cpu(p) for k, p in extra_pids.items()}
        served = sum(sent_bytes(u) for u in urls) - sent0
        p99s, p50s, batches = [], [], 0
        for _p, cache, _s in ags:
            st = json.loads(subprocess.run([BP, "status", "--cache", str(cache), "--json"], capture_output=True,
                                           text=True, check=True).stdout)
            assert st["chunks_missing"] == 0, "an agent did not read everything"
            lat = st["fetch_latency_ms"]
            p99s.append(lat["p99"])
            p50s.append(lat["p50"])
            batches += st["batches"]
    p99s.sort()
    p50s.sort()
    row: dict[str, Any] = {
        "case": name, "servers": len(urls), "agents": n, "image_MiB": size >> 20,
        "seconds": round(wall, 2), "aggregate_MiB_s": round(n * size / wall / (1 << 20), 1),
        "fetch_batches": batches, "p50_ms_median": p50s[len(p50s) // 2],
        "p99_ms_median": p99s[len(p99s) // 2], "p99_ms_worst": p99s[-1],
        "served_GiB": round(served / GiB, 3),
        "server_cpu_s": round(cpu1 - cpu0, 1),
        "server_cpu_s_per_GiB": round((cpu1 - cpu0) / (served / GiB), 2) if served else None,
    }
    row["object_store_cpu_s_per_GiB"] = "-"
    for k in extra_pids:  # SeaweedFS, in case (b)
        row["object_store_cpu_s_per_GiB"] = round((extra1[k] - extra0[k]) / (served / GiB), 2) if served else None
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="256M")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--skip", default="")
    ap.add_argument("--fetch-timeout", type=float, default=600.0,
                    help="agents' --fetch-timeout: how long a read waits out an overloaded repository before EIO")
    a = ap.parse_args()
    size, n, skip = parse_size(a.size), a.agents, set(a.skip.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    img = make_image(WORK / f"scale-{a.size}.raw", size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=WORK, prefix="scale-") as t:
        tmp = Path(t)
        if "a" not in skip:
            data = tmp / "local"
            subprocess.run([BP, "--data", str(data), "import", str(img), "bench:v1", "--json"], check=True,
                           stdout=subprocess.DEVNULL, env=env_with({}))
            with server(data, env_with({})) as (p, url):
                rows.append(run_case("a: 1 server, local packs", [url], [p.pid], {}, n, size, "bench:v1",
                                     tmp / "agents-a", a.fetch_timeout))
        if not {"b", "c"} <= skip:
            sw = SeaweedFS(tmp / "seaweed")
            sw.start()
            try:
                bucket = sw.new_bucket()
                store = f"s3://{bucket}/bench"
                senv = env_with(sw.env())
                with ExitStack() as stack:
                    catalog = stack.enter_context(running_postgres()).create_database()
                    subprocess.run([BP, "--data", str(tmp / "host-1"), "--store", store, "--catalog", catalog,
                                    "import", str(img), "bench:v1", "--json"],
                                   check=True, stdout=subprocess.DEVNULL, env=senv)
                    assert sw.proc is not None
                    for case, extra in (("b", ()), ("c", ("--chunk-cache", "0"))):
                        if case in skip:
                            continue
                        with ExitStack() as servers:
                            srv = [servers.enter_context(server(tmp / f"host-{i}", senv, store, catalog, *extra))
                                   for i in (1, 2)]
                            name = ("b: 2 servers, SeaweedFS, PostgreSQL catalog" if not extra
                                    else "c: as b, without the servers' chunk cache")
                            rows.append(run_case(name, [u for _p, u in srv], [p.pid for p, _u in srv],
                                                 {"seaweedfs": sw.proc.pid}, n, size, "bench:v1",
                                                 tmp / f"agents-{case}", a.fetch_timeout))
            finally:
                sw.stop()
    meta = {"command": " ".join([".venv/bin/python", "bench/bench_scale.py", *sys.argv[1:]]),
            "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total >> 30} GiB",
            "chunk_size": "64 KiB (default)", "image": "incompressible random data, every chunk stored",
            "p99": "per agent, of fetch batches (round trip + verification), from status --json",
            "cpu": "server processes' user+system seconds during the reads / GiB sent on /v1/chunks/fetch"}
    write_results("scale", rows, meta)


if __name__ == "__main__":
    main()
