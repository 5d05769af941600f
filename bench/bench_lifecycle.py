"""Instance lifecycle benchmarks (issue 4), each against its peer in the same run, medians of repeats:

- reset vs re-imaging: an image (sparse raw, ~35% data: text-like, random and structured blocks)
  imported into an embedded repository, served by ``blockprov serve`` on 127.0.0.1, attached by an
  agent (``--repo URL --no-register``) and fully hydrated; then 1% and 10% of its chunks get random
  chunk-aligned 64 KiB writes over NBD (libnbd) and ``blockprov reset --cache DIR [--eager]`` is
  timed — on the running agent and on the stopped cache — against re-imaging the whole disk with
  ``qemu-img convert -f raw -O raw RAW_URL target.raw`` from the repository's raw view
  (goal ≤ 0.01× at 1%, and reset time flat in image size);
- snapshot bytes: 1% of the chunks rewritten with random (incompressible) and with text-like
  (compressible) data, ``blockprov snapshot --to NAME:TAG --json`` → bytes_sent / bytes_modified
  (goal ≤ 1.0), then a second snapshot at once (goal: 0 bytes);
- read latency during hydration: QD1 random 4 KiB reads of distinct data chunks of a cold cache,
  each ``pread`` timed by a libnbd client, without and with ``attach --hydrate`` running (p50/p99).

Run: ``.venv/bin/python bench/bench_lifecycle.py [--sizes 4G,16G] [--repeat 3] [--quick]``.
Results: bench/out/lifecycle.{json,md}, bench/results/lifecycle-reset.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN
from tests.procs import NBDSH_PY, Proc, nbd_uri, start_agent, start_server

from blockprov.humanize import parse_size

BP = str(VENV_BIN / "blockprov")
MiB = 1 << 20
CHUNK = 64 << 10
RESULTS = ROOT / "bench" / "results"

# -- libnbd clients (Debian's python3 has the bindings) ---------------------------------------------

# Chunk-aligned 64 KiB writes at queue depth 32 (so the agent's journal group commit is exercised as a
# guest's writeback would), each chunk's content unique: a 16-byte stamp, then a slice of a pool at a
# random byte offset. "random" is incompressible; "text" compresses like prose (~3×).
WRITE_SCRIPT = r"""
import json, os, random, struct, sys, nbd
uri, kind, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
offs = json.load(sys.stdin)
rnd = random.Random(seed)
if kind == "random":
    pool = os.urandom(8 << 20)
else:
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    vocab = ["".join(rnd.choices(letters, weights=range(26, 0, -1), k=rnd.randint(2, 10))) for _ in range(3000)]
    vocab += ["\n"] * 200 + ["the", "of", "and", "to", "in"] * 100
    pool = " ".join(rnd.choices(vocab, k=1_500_000)).encode()[: 8 << 20]
h = nbd.NBD()
h.connect_uri(uri)
inflight = {}
def reap():
    for c in [c for c in inflight if h.aio_command_completed(c)]:
        del inflight[c]
for off in offs:
    while len(inflight) >= 32:
        h.poll(-1)
        reap()
    start = rnd.randrange(len(pool) - 65536)
    data = struct.pack("<QQ", off, rnd.getrandbits(64)) + pool[start:start + 65536 - 16]
    buf = nbd.Buffer.from_bytearray(bytearray(data))
    inflight[h.aio_pwrite(buf, off)] = buf
while inflight:
    h.poll(-1)
    reap()
h.flush()
h.shutdown()
"""

# QD1 4 KiB reads, each timed; stops early when the stop file appears (hydration finished).
READ_SCRIPT = r"""
import json, os, sys, time, nbd
uri, stop = sys.argv[1], sys.argv[2]
offs = json.load(sys.stdin)
h = nbd.NBD()
h.connect_uri(uri)
h.pread(4096, 0)  # the connection's first request, not timed
lat = []
for k, off in enumerate(offs):
    if k % 16 == 0 and os.path.exists(stop):
        break
    t = time.perf_counter_ns()
    h.pread(4096, off)
    lat.append(time.perf_counter_ns() - t)
h.shutdown()
print(json.dumps(lat))
"""


def nbd_write(sock: Path, chunks: list[int], kind: str, seed: int) -> None:
    subprocess.run([NBDSH_PY, "-c", WRITE_SCRIPT, nbd_uri(sock), kind, str(seed)],
                   input=json.dumps([i * CHUNK for i in chunks]), text=True, check=True, timeout=1800)


def nbd_read_latencies(sock: Path, offsets: list[int], stop: Path) -> list[float]:
    """Seconds of each QD1 4 KiB read."""
    out = subprocess.run([NBDSH_PY, "-c", READ_SCRIPT, nbd_uri(sock), str(stop)], input=json.dumps(offsets),
                         text=True, check=True, capture_output=True, timeout=1800).stdout
    return [ns / 1e9 for ns in json.loads(out)]


# -- the image --------------------------------------------------------------------------------------

def make_image(path: Path, size: int, seed: int, data_fraction: float = 0.35) -> list[int]:
    """A sparse raw image like a golden disk: runs of data (files) between holes, ``data_fraction``
    of it data — 60% text-like (compresses ~3×), 25% random (binaries already compressed), 15%
    structured records (compresses ~2×). Returns the indices of the MiB that hold data."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz", dtype=np.uint8)
    p = np.arange(26, 0, -1, dtype=float)
    vocab = [bytes(rng.choice(letters, size=int(rng.integers(2, 11)), p=p / p.sum())) for _ in range(4000)]
    vocab += [b"\n"] * 300 + [b"the", b"of", b"and", b"to", b"in", b"a", b"is"] * 60
    pick = rng.integers(0, len(vocab), size=6_000_000)
    text = b" ".join(vocab[i] for i in pick)[: 32 * MiB]
    records = (rng.integers(0, 24, size=8 * MiB, dtype=np.uint8) * np.uint8(rng.integers(0, 2, size=8 * MiB))
               ).tobytes()
    n = size // MiB
    data: list[int] = []
    mean_run = 8.0
    mean_hole = mean_run * (1 - data_fraction) / data_fraction
    with open(path, "wb") as f:
        f.truncate(size)
        fd = f.fileno()
        k = int(rng.integers(0, 64))  # the first MiB (boot sector, partition table) holds data too
        data.append(0)
        while k < n:
            run = min(n - k, max(1, int(rng.exponential(mean_run))))
            for m in range(k, k + run):
                r = rng.random()
                if r < 0.60:
                    o = int(rng.integers(0, len(text) - MiB))
                    block: bytes = text[o:o + MiB]
                elif r < 0.85:
                    block = rng.bytes(MiB)
                else:
                    o = int(rng.integers(0, len(records) - MiB))
                    block = records[o:o + MiB]
                os.pwrite(fd, block, m * MiB)
                data.append(m)
            k += run + max(1, int(rng.exponential(mean_hole)))
        os.pwrite(fd, rng.bytes(MiB), 0)
    return sorted(set(data))


# -- commands ---------------------------------------------------------------------------------------

def bp_json(*args: str, timeout: float = 3600) -> tuple[dict[str, Any], float]:
    """Run ``blockprov ARGS --json``; its parsed answer and the command's wall seconds."""
    t = time.perf_counter()
    p = subprocess.run([BP, *args, "--json"], capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"blockprov {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return json.loads(p.stdout), wall


def control(cache: Path, op: str, **args: Any) -> dict[str, Any]:
    """One request on a running agent's control socket (cheaper than a CLI process while measuring)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(cache / "control.sock"))
        s.sendall((json.dumps({"op": op, "args": args}) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            got = s.recv(1 << 20)
            if not got:
                break
            buf += got
    ans = json.loads(buf)
    if not ans.get("ok"):
        raise RuntimeError(f"control {op}: {ans}")
    return dict(ans["result"])


HANGS: list[dict[str, Any]] = []  # peer runs that stopped making progress (see reimage_seconds)


def reimage_seconds(raw_url: str, target: Path, log: Callable[[str], None]) -> float:
    """Seconds of ``qemu-img convert`` re-imaging the disk from the raw view.

    ``-m 1`` (one coroutine, as bench_agent.py): with qemu 7.2's default 8 coroutines the copy from
    the raw view hung for good, repeatedly, at 0.5–4.5 GiB of a 16 GiB image (qemu in ppoll without
    timeout, every request answered by the server, later its connections in CLOSE-WAIT); -m 1 was
    as fast here and did not hang. A run that still makes no progress for 60 s is killed, recorded
    in HANGS and run again (up to 3 times)."""
    for attempt in range(3):
        target.unlink(missing_ok=True)
        t = time.perf_counter()
        p = subprocess.Popen(["qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "raw", raw_url, str(target)])
        last, stalled = -1, time.perf_counter()
        while p.poll() is None:
            time.sleep(0.5)
            got = target.stat().st_blocks if target.exists() else 0
            if got != last:
                last, stalled = got, time.perf_counter()
            elif time.perf_counter() - stalled > 60:
                p.kill()
                p.wait()
                HANGS.append({"url": raw_url, "attempt": attempt, "bytes_written": got * 512,
                              "after_seconds": round(time.perf_counter() - t, 1)})
                log(f"  re-image hung ({got * 512 / MiB:.0f} MiB written); killed, running it again")
                break
        else:
            d = time.perf_counter() - t
            target.unlink(missing_ok=True)
            if p.returncode != 0:
                raise RuntimeError(f"qemu-img convert exited {p.returncode}")
            return d
    raise RuntimeError(f"qemu-img convert from {raw_url} hung 3 times")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


class Instance:
    """An agent attached to the repository on loopback, on a unix socket; restartable on its cache."""

    def __init__(self, cache: Path, sock: Path, url: str, ref: str) -> None:
        self.cache, self.sock, self.url, self.ref = cache, sock, url, ref
        self.proc: Proc | None = None

    def start(self, *extra: str, fresh: bool = False) -> None:
        ref = self.ref if fresh or not self.cache.exists() else None
        self.proc, _ = start_agent(self.cache, ref, self.sock, "--no-register", "--no-profile", *extra,
                                   repo_url=self.url)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def status(self) -> dict[str, Any]:
        return bp_json("status", "--cache", str(self.cache))[0]


# -- the benchmarks ---------------------------------------------------------------------------------

MODES = [("lazy", "running agent"), ("eager", "running agent"), ("lazy", "stopped cache"),
         ("eager", "stopped cache")]


def bench_reset(inst: Instance, count: int, cases: list[tuple[str, int]], repeat: int, seed: int,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Samples of reset wall / op seconds for each (case: label and number of modified chunks, mode)."""
    out = []
    for case, k in cases:
        for mode, where in MODES:
            if where == "stopped cache" and case == "10%":
                continue  # the 1% and fixed-count cases show the stopped path; keeps the run short
            walls, ops, n_reset = [], [], []
            for r in range(repeat):
                chunks = random.Random(seed * 1000 + r).sample(range(count), k)
                nbd_write(inst.sock, chunks, "random", seed + r)
                st = inst.status()
                if st["chunks_modified"] != k or st["chunks_missing"] != 0:
                    raise RuntimeError(f"before reset: {k} chunks written, status says modified "
                                       f"{st['chunks_modified']}, missing {st['chunks_missing']}")
                if where == "stopped cache":
                    inst.stop()
                args = ["--repo", inst.url, "reset", "--cache", str(inst.cache)]
                ans, wall = bp_json(*args, *(["--eager"] if mode == "eager" else []))
                if where == "stopped cache":
                    inst.start()
                walls.append(wall)
                ops.append(float(ans["seconds"]))
                n_reset.append(int(ans["chunks_reset"]))
                st = inst.status()
                if st["chunks_modified"] != 0:
                    raise RuntimeError(f"after reset: {st['chunks_modified']} chunks still modified")
                if mode == "eager" and st["chunks_missing"] != 0:
                    raise RuntimeError(f"after an eager reset: {st['chunks_missing']} chunks missing")
                if st["chunks_missing"]:
                    bp_json("hydrate", "--cache", str(inst.cache))  # back to fully local, untimed
                log(f"  reset {mode:5} ({where}) {case}: {wall:.3f} s wall, {ans['seconds']:.4f} s op, "
                    f"{ans['chunks_reset']} chunks, {ans.get('chunks_refetched', 0)} refetched")
            out.append({"case": case, "chunks": k, "mode": mode, "where": where, "wall": walls, "op": ops,
                        "chunks_reset": n_reset})
    return out


def bench_snapshot(inst: Instance, count: int, repeat: int, seed: int, tag: str,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    k = max(1, round(0.01 * count))
    for kind in ("random", "text"):
        runs = []
        for r in range(repeat):
            chunks = random.Random(seed * 7 + r).sample(range(count), k)
            nbd_write(inst.sock, chunks, kind, seed * 31 + r)
            first, w1 = bp_json("snapshot", "--cache", str(inst.cache), "--to", f"bench:snap-{tag}-{kind}-{r}")
            second, w2 = bp_json("snapshot", "--cache", str(inst.cache), "--to", f"bench:snap-{tag}-{kind}-{r}-again")
            runs.append({"first": first, "second": second, "wall_first": w1, "wall_second": w2})
            log(f"  snapshot {kind}: sent {first['bytes_sent']} of {first['bytes_modified']} modified bytes "
                f"({first['chunks_sent']} chunks) in {first['seconds']:.2f} s; again: {second['bytes_sent']} bytes")
            bp_json("reset", "--cache", str(inst.cache), "--eager")
        out.append({"kind": kind, "chunks": k, "runs": runs})
    return out


def bench_latency(tmp: Path, url: str, ref: str, data_chunks: list[int], reads: int, repeat: int, seed: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """QD1 random 4 KiB reads of distinct data chunks of a fresh cache, without / with hydration."""
    res: dict[str, Any] = {"without": [], "with": []}
    for r in range(repeat):
        rnd = random.Random(seed + r)
        chunks = rnd.sample(data_chunks, min(reads, len(data_chunks)))
        offsets = [i * CHUNK + rnd.randrange(CHUNK // 4096) * 4096 for i in chunks]
        for case in ("without", "with"):
            cache, sock, stop = tmp / f"lat-{case}", tmp / f"lat-{case}.sock", tmp / "lat.stop"
            shutil.rmtree(cache, ignore_errors=True)
            stop.unlink(missing_ok=True)
            inst = Instance(cache, sock, url, ref)
            inst.start(*(["--hydrate"] if case == "with" else []), fresh=True)
            done = threading.Event()
            hyd: dict[str, Any] = {}

            def watch(inst: Instance = inst, stop: Path = stop, done: threading.Event = done,
                      hyd: dict[str, Any] = hyd) -> None:
                while not done.wait(0.2):
                    h = control(inst.cache, "status").get("hydration") or {}
                    hyd.update(h)
                    if h.get("state") == "done":
                        stop.touch()
                        return

            w = threading.Thread(target=watch, daemon=True)
            if case == "with":
                w.start()
            try:
                lat = nbd_read_latencies(sock, offsets, stop)
                done.set()
                if case == "with":
                    w.join()
                    hyd.update(control(cache, "status").get("hydration") or {})
            finally:
                done.set()
                inst.stop()
                shutil.rmtree(cache, ignore_errors=True)
            row = {"reads": len(lat), "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                   "mean_ms": statistics.fmean(lat) * 1e3, "hydration_percent_at_end": hyd.get("percent"),
                   "hydration_state_at_end": hyd.get("state")}
            res[case].append(row)
            log(f"  latency {case:7} hydration: {row['reads']} reads, p50 {row['p50_ms']:.2f} ms, "
                f"p99 {row['p99_ms']:.2f} ms" + (f", hydration {hyd.get('percent')}% ({hyd.get('state')})"
                                                 if case == "with" else ""))
    return res


def run_size(label: str, size: int, tmp: Path, repeat: int, reads: int, fixed: int | None,
             log: Callable[[str], None], only_latency: bool = False) -> dict[str, Any]:
    d = tmp / label
    d.mkdir()
    seed = size // MiB
    image = d / "image.raw"
    t = time.perf_counter()
    data_mib = make_image(image, size, seed)
    log(f"{label}: image made in {time.perf_counter() - t:.1f} s, {len(data_mib)} MiB of data "
        f"({len(data_mib) * MiB / size:.0%})")
    repo = d / "repo"
    t = time.perf_counter()
    subprocess.run([BP, "--data", str(repo), "import", str(image), "bench:v1"], check=True,
                   stdout=subprocess.DEVNULL)
    import_s = time.perf_counter() - t
    image.unlink()
    repo_bytes = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
    log(f"{label}: imported in {import_s:.1f} s; repository {repo_bytes / MiB:.0f} MiB")
    server, url = start_server(repo)
    inst: Instance | None = None
    try:
        show, _ = bp_json("--repo", url, "show", "bench:v1")
        count, raw_url = int(show["chunks"]), str(show["raw_url"])
        if only_latency:  # --only latency: the hydration-latency runs alone
            data_chunks = [m * (MiB // CHUNK) + j for m in data_mib for j in range(MiB // CHUNK)]
            lat = bench_latency(d, url, "bench:v1", data_chunks, reads, repeat, seed, log)
            return {"size": label, "bytes": size, "chunks": count, "data_fraction": len(data_mib) * MiB / size,
                    "repository_bytes": repo_bytes, "import_seconds": import_s, "hydrate_seconds": 0.0,
                    "reimage": [0.0], "resets": [], "snapshots": [], "latency": lat}
        # peer: re-imaging the whole disk from the repository's raw view
        reimage = []
        for _ in range(repeat):
            reimage.append(reimage_seconds(raw_url, d / "target.raw", log))
            log(f"{label}: re-image (qemu-img convert from the raw view) {reimage[-1]:.2f} s")
        inst = Instance(d / "cache", d / "agent.sock", url, "bench:v1")
        inst.start(fresh=True)
        hyd, hyd_wall = bp_json("hydrate", "--cache", str(inst.cache))
        log(f"{label}: hydrated in {hyd_wall:.1f} s ({hyd.get('bytes_fetched', 0) / MiB:.0f} MiB)")
        cases = [("1%", max(1, round(0.01 * count))), ("10%", max(1, round(0.10 * count)))]
        if fixed:
            cases.append((f"{fixed} chunks", fixed))
        resets = bench_reset(inst, count, cases, repeat, seed, log)
        snaps = bench_snapshot(inst, count, repeat, seed, label.lower(), log)
        inst.stop()
        inst = None
        shutil.rmtree(d / "cache", ignore_errors=True)
        data_chunks = [m * (MiB // CHUNK) + j for m in data_mib for j in range(MiB // CHUNK)]
        lat = bench_latency(d, url, "bench:v1", data_chunks, reads, repeat, seed, log)
    finally:
        if inst is not None:
            inst.stop()
        server.stop()
    return {"size": label, "bytes": size, "chunks": count, "data_fraction": len(data_mib) * MiB / size,
            "repository_bytes": repo_bytes, "import_seconds": import_s, "hydrate_seconds": hyd_wall,
            "reimage": reimage, "resets": resets, "snapshots": snaps, "latency": lat}


# -- report -----------------------------------------------------------------------------------------

def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(not measured in this run)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report(sizes: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    reset_rows, snap_rows, lat_rows = [], [], []
    for s in sizes:
        re = med(s["reimage"])
        for r in s["resets"]:
            wall, op = med(r["wall"]), med(r["op"])
            reset_rows.append({"image": s["size"], "modified": f"{r['case']} ({r['chunks']} chunks)"
                               if r["case"][-1] == "%" else r["case"],
                               "reset": f"{r['mode']}, {r['where']}", "reset wall s": wall, "reset op s": op,
                               "op µs / chunk": op / r["chunks"] * 1e6,
                               "re-image s": re, "ratio (wall)": wall / re, "ratio (op)": op / re,
                               "goal": "≤ 0.01" if r["case"] == "1%" else "—"})
        for sn in s["snapshots"]:
            sent = [x["first"]["bytes_sent"] for x in sn["runs"]]
            mod = [x["first"]["bytes_modified"] for x in sn["runs"]]
            again = [x["second"]["bytes_sent"] for x in sn["runs"]]
            snap_rows.append({"image": s["size"], "modified data": f"{sn['kind']}, 1% ({sn['chunks']} chunks)",
                              "bytes modified (MiB)": med(mod) / MiB, "bytes sent (MiB)": med(sent) / MiB,
                              "sent / modified": f"{med([a / b for a, b in zip(sent, mod, strict=True)]):.5f}",
                              "snapshot s": med([x["first"]["seconds"] for x in sn["runs"]]),
                              "2nd snapshot bytes sent": max(again), "goal": "≤ 1.0; 2nd: 0"})
        lat = s["latency"]
        for q in ("p50", "p99"):
            wo, wi = med([x[f"{q}_ms"] for x in lat["without"]]), med([x[f"{q}_ms"] for x in lat["with"]])
            lat_rows.append({"image": s["size"], "cold QD1 4 KiB random read": q, "without hydration (ms)": wo,
                             "with hydration (ms)": wi, "ratio": wi / wo,
                             "hydration % at end": med([float(x["hydration_percent_at_end"] or 0)
                                                        for x in lat["with"]]),
                             "reads": med([x["reads"] for x in lat["with"]])})
    flat = []
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        for a, b in zip(small["resets"], big["resets"], strict=True):
            flat.append({"reset": f"{a['mode']}, {a['where']}", "modified": a["case"],
                         f"{small['size']} wall s": med(a["wall"]), f"{big['size']} wall s": med(b["wall"]),
                         "wall ratio": med(b["wall"]) / med(a["wall"]), f"{small['size']} op s": med(a["op"]),
                         f"{big['size']} op s": med(b["op"]), "op ratio": med(b["op"]) / med(a["op"]),
                         "re-image ratio": med(big["reimage"]) / med(small["reimage"])})
    parts = ["### lifecycle: reset vs re-imaging", table(reset_rows)]
    if flat:
        parts += ["### lifecycle: reset time vs image size (a % of chunks is more chunks on the larger image; "
                  "'N chunks' is the same number on both)", table(flat)]
    parts += ["### lifecycle: snapshot bytes", table(snap_rows), "### lifecycle: read latency during hydration",
              table(lat_rows), "\n".join(f"- {k}: {v}" for k, v in meta.items())]
    return "\n\n".join(parts) + "\n", {"reset": reset_rows, "flat": flat, "snapshot": snap_rows, "latency": lat_rows}


def plot(sizes: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["bytes"] / (1 << 30) for s in sizes]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    colors = {"lazy": "tab:blue", "eager": "tab:orange"}
    styles = {"1%": "-", "10%": "--"}
    for ax, key, title in ((axes[0], "wall", "whole `blockprov reset` command"),
                           (axes[1], "op", "the reset itself (agent's seconds)")):
        ax.plot(xs, [med(s["reimage"]) for s in sizes], "k-s", label="re-image: qemu-img convert ← raw view")
        for i, r0 in enumerate(sizes[0]["resets"]):
            if r0["where"] != "running agent":
                continue
            ax.plot(xs, [med(s["resets"][i][key]) for s in sizes], styles.get(r0["case"], ":"), marker="o",
                    color=colors[r0["mode"]], label=f"reset {r0['mode']}, {r0['case']} modified")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [s["size"] for s in sizes])
        ax.set_xlabel("image size")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds (log scale)")
    axes[1].legend(fontsize=7, loc="center right")
    fig.suptitle("reset (running agent) vs re-imaging the disk, repository on 127.0.0.1")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "lifecycle-reset.png"
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4G,16G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reads", type=int, default=1500, help="4 KiB reads per latency run (default 1500)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1G only, repeat 1")
    ap.add_argument("--only", choices=["latency"], help="run only this part (latency: cold reads with and "
                    "without background hydration); results go to bench/out/lifecycle-latency.{json,md}")
    ap.add_argument("--tmp", default="/var/tmp", help="where the temporary directory goes (needs ~1.5× the "
                    "largest size free)")
    a = ap.parse_args()
    labels = ["1G"] if a.quick else [x.strip() for x in a.sizes.split(",") if x.strip()]
    repeat = 1 if a.quick else a.repeat
    reads = min(a.reads, 300) if a.quick else a.reads
    cmd = "python bench/bench_lifecycle.py " + (" ".join(sys.argv[1:]) or "(defaults)")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(dir=a.tmp, prefix="bp-lifecycle-"))
    sizes: list[dict[str, Any]] = []
    # the same number of modified chunks on every size (1% of the smallest): is reset flat in image size?
    fixed = round(0.01 * min(parse_size(x) for x in labels) / CHUNK) if len(labels) > 1 else None
    try:
        for label in labels:
            sizes.append(run_size(label, parse_size(label), tmp, repeat, reads, fixed, log,
                                  only_latency=a.only == "latency"))
            shutil.rmtree(tmp / label, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"command": cmd, "repeats": repeat, "cpus": os.cpu_count(), "chunk size": "64K",
            "image": "sparse raw, ~35% data in runs (60% text-like, 25% random, 15% structured)",
            "modifications": "random chunk-aligned 64 KiB writes over NBD (libnbd, QD 32), random data",
            "repository": "blockprov serve on 127.0.0.1 (embedded store), agent attach --repo URL --no-register",
            "reset wall": "whole `blockprov reset` command (process start included); op: the reset's own seconds",
            "re-image": "qemu-img convert -m 1 -f raw -O raw RAW_URL target.raw (target sparse, same disk)",
            "stopped cache": "agent stopped, reset opens the cache in-process, agent re-attached (untimed)",
            "latency": f"QD1 4 KiB reads of distinct data chunks of a fresh cache (libnbd), repository warm; "
                       f"'with' = attach --hydrate, reads stop when hydration is done; {reads} reads max",
            "re-image hangs (killed after 60 s without progress, run again)": len(HANGS),
            "total seconds": round(time.perf_counter() - t0, 1)}
    md, tables = report(sizes, meta)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.only == "latency":
        md = "### lifecycle: read latency during hydration\n\n" + table(tables["latency"]) + "\n\n" + \
            "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n"
        (OUT / "lifecycle-latency.json").write_text(json.dumps({"meta": meta, "latency": tables["latency"],
                                                              "sizes": sizes}, indent=2))
        (OUT / "lifecycle-latency.md").write_text(md)
        print(md)
        return
    (OUT / "lifecycle.json").write_text(json.dumps({"meta": meta, "tables": tables, "sizes": sizes,
                                                  "reimage_hangs": HANGS}, indent=2))
    (OUT / "lifecycle.md").write_text(md)
    png = plot(sizes)
    print(md)
    print(f"wrote {OUT / 'lifecycle.json'}, {OUT / 'lifecycle.md'}, {png}")


if __name__ == "__main__":
    main()
