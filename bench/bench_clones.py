"""Clones and pools benchmarks (issue 6), each against its peer in the same run, medians of repeats:

1. hand-out time: ``blockprov pool acquire`` from a served pool (``pool create --customize
   builtin:identity`` + ``pool serve``) — the CLI's wall time, and the acquire itself timed by
   talking to the pool server's control socket (``control.call(DIR, "pool-acquire", host=…)``, what
   the CLI does) — vs making and customizing one instance from scratch (``blockprov clone IMG:TAG
   --dir NEW --customize builtin:identity``, wall time). Goal: hand-out < 50 ms. Before each
   acquire the pool is back to its full size (steady state: no refill running while timed).
2. disk used by N (default 50) clones vs N full copies: ``blockprov clone --count N``, each clone
   writes ``--write-mib`` MiB through ``qemu-io`` over the clones agent, the base cache is hydrated,
   then ``du --block-size=1 -s`` of the clones directory (base included) vs N sparse full copies of
   the raw image (``cp --sparse=always --reflink=never``, real copies when the disk has room, else
   one copy × N; the same writes applied) and vs N qcow2 overlays over the raw image
   (``qemu-img create -b``: qemu's own linked clones; the base file counted once).
3. repository bytes served for N clones reading the same working set vs one clone (goal ≤ 1.1×):
   ``blockprov serve --access-log`` on 127.0.0.1 behind a counting TCP proxy (bench/wanproxy.py, no
   delay, no cap); a fresh clones directory (``--repo URL``) with one clone reads the working set,
   then another fresh one with N clones all read it, 8 at a time. Bytes from the repository are
   the base cache's ``totals.wire_bytes`` (``blockprov status --cache DIR/bases/IMG@ID --json``),
   cross-checked with the proxy's server→client bytes and the access log's chunk-fetch requests (the
   server has no /metrics). Working set ``ranges``: a fixed (seeded) set of 64 KiB–1 MiB ranges
   inside the image's data, 10% of the disk, read with ``qemu-io``; ``full``: ``nbdcopy`` of the
   whole export to ``null:``.

The golden image: an ext4 file system (``mkfs.ext4 -d``) holding /etc/hostname, /etc/machine-id and
real files from /usr, imported into an embedded repository with 64 KiB chunks.

Run: ``.venv/bin/python bench/bench_clones.py [--size 1G] [--count 50] [--repeat 3] [--quick]``.
Results: bench/out/clones.{json,md}, bench/results/clones.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN, WORK, realistic_image, write_results
from tests.procs import Proc
from wanproxy import ProxyThread

from blockprov.agent import control
from blockprov.humanize import parse_size

BP = str(VENV_BIN / "blockprov")
REF = "bench:v1"
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
POOL = "bench"


# -- helpers --------------------------------------------------------------------------------------------------------
def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("BLOCKPROV_REPO", "BLOCKPROV_DATA")}


def bp(*args: str, data: Path | None = None, repo: str | None = None, check: bool = True,
       timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    cmd = [BP, *(["--data", str(data)] if data else []), *(["--repo", repo] if repo else []), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr.strip()[-2000:]}")
    return p


def wall(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def du(*paths: Path) -> int:
    out = subprocess.run(["du", "--block-size=1", "-s", "-c", *map(str, paths)], check=True, capture_output=True,
                         text=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def sh(*cmd: str, timeout: float = 1800) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}: {(p.stderr or p.stdout).strip()[-1000:]}")
    return p.stdout


def start_bg(args: list[str], log: Path, *, timeout: float = 120) -> Proc:
    """A long-running blockprov process that prints one line when ready. Its stdout goes to ``LOG.out`` (uvicorn's
    access log goes to stdout, whatever ``serve --help`` says: a pipe nobody drains would stall the server), its
    stderr to ``LOG.err``."""
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([BP, *args], stdout=o, stderr=e, text=True, env=env())
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None and b"\n" not in out.read_bytes():
        time.sleep(0.02)
    first = out.read_bytes().split(b"\n", 1)
    if len(first) < 2:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(args[:5])} did not start\n{err.read_text()[-2000:]}")
    return Proc(proc, first[0].decode())


def fuse_mounts() -> set[str]:
    return {ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if "blockprov-fuse-" in ln}


def uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# -- the golden image and the working set ---------------------------------------------------------------------------
def golden_image(size: int, fill: int, label: str) -> Path:
    """An ext4 root (``mkfs.ext4 -d``) with /etc/hostname, /etc/machine-id and ``fill`` bytes of files from /usr."""
    return realistic_image(WORK / f"clones-{label}.img", size, ["/usr/lib", "/usr/share", "/usr/bin"], fill,
                           files={"etc/hostname": "golden\n", "etc/machine-id": "0" * 32 + "\n"})


def data_extents(path: Path) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    with open(path, "rb") as f:
        fd, end, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < end:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, stop))
            off = stop
    return out


def working_set(image: Path, fraction: float, seed: int = 6) -> list[tuple[int, int]]:
    """A fixed set of 64 KiB–1 MiB ranges starting in the image's data, ``fraction`` of the disk, in a fixed
    shuffled order (every clone reads the same ranges in the same order: the worst case for sharing)."""
    g = 64 << 10
    size = image.stat().st_size
    granules = sorted({k for a, b in data_extents(image) for k in range(a // g, (b + g - 1) // g)})
    rng = random.Random(seed)
    want = int(size * fraction)
    taken: set[int] = set()
    ranges: list[tuple[int, int]] = []
    total = 0
    for k in rng.sample(granules, len(granules)):
        if total >= want:
            break
        n = rng.randint(1, 16)
        span = [j for j in range(k, min(k + n, size // g)) if j not in taken]
        if not span or span[0] != k:
            continue
        run = 0
        while run < len(span) and span[run] == k + run:
            run += 1
        taken.update(range(k, k + run))
        ranges.append((k * g, run * g))
        total += run * g
    return ranges


def read_ranges(u: str, ranges: list[tuple[int, int]]) -> None:
    args = ["qemu-io", "-r", "-f", "raw"]
    for off, n in ranges:
        args += ["-c", f"read -q {off} {n}"]
    sh(*args, u)


def read_full(u: str) -> None:
    sh("nbdcopy", "--request-size=1048576", u, "null:")


# -- 1. hand-out time -----------------------------------------------------------------------------------------------
def wait_ready(pool_dir: Path, size: int, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = control.call(pool_dir, "pool-status")
        if sum(v["state"] == "ready" for v in st["instances"].values()) >= size:
            return
        if st["server"].get("last_error"):
            raise RuntimeError(f"pool refill failed: {st['server']['last_error']}")
        time.sleep(0.1)
    raise RuntimeError(f"the pool did not refill to {size} within {timeout:.0f} s")


def bench_handout(data: Path, tmp: Path, repeat: int, pool_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    pool_dir = tmp / "pool"
    create_s = wall(lambda: bp("pool", "create", POOL, "--from", REF, "--size", str(pool_size), "--customize",
                               "builtin:identity", "--dir", str(pool_dir), data=data))
    cli_s: list[float] = []
    direct_s: list[float] = []
    server = start_bg(["--data", str(data), "pool", "serve", POOL, "--dir", str(pool_dir), "--json"],
                      tmp / "pool-serve")
    try:
        for i in range(repeat):
            wait_ready(pool_dir, pool_size)
            t = time.perf_counter()
            got = json.loads(bp("pool", "acquire", POOL, "--host", f"cli-{i}", "--dir", str(pool_dir),
                                "--json").stdout)
            cli_s.append(time.perf_counter() - t)
            sh("nbdinfo", "--size", got["uri"])  # it is served (outside the timing)
            wait_ready(pool_dir, pool_size)
            t = time.perf_counter()
            got = control.call(pool_dir, "pool-acquire", host=f"direct-{i}")
            direct_s.append(time.perf_counter() - t)
            sh("nbdinfo", "--size", got["uri"])
        # The hostname the customizer wrote, read back through the export (sanity check, not timed).
        out = tmp / "acquired.raw"
        sh("nbdcopy", got["uri"], str(out))
        hostname = sh("debugfs", "-R", "cat /etc/hostname", str(out)).strip()
        out.unlink()
        if hostname != got["instance"]:
            raise RuntimeError(f"acquired {got['instance']} but its /etc/hostname is {hostname!r}")
    finally:
        server.stop()
    scratch_s: list[float] = []
    plain_s: list[float] = []
    for i in range(repeat):
        d = tmp / f"scratch-{i}"
        scratch_s.append(wall(lambda d=d: bp("clone", REF, "--dir", str(d), "--customize", "builtin:identity",
                                             data=data)))
        shutil.rmtree(d)
        plain_s.append(wall(lambda d=d: bp("clone", REF, "--dir", str(d), data=data)))
        shutil.rmtree(d)
    floor = statistics.median(wall(lambda: bp("--version")) for _ in range(max(3, repeat)))
    med = statistics.median
    rows = [
        {"benchmark": "hand out one instance (ms): pool-acquire on the control socket",
         "blockprov": med(direct_s) * 1e3,
         "peer": med(scratch_s) * 1e3, "peer name": "blockprov clone --customize builtin:identity (new dir)",
         "ratio": med(direct_s) / med(scratch_s), "goal": "< 50 ms"},
        {"benchmark": "hand out one instance (ms): `blockprov pool acquire` CLI wall", "blockprov": med(cli_s) * 1e3,
         "peer": med(scratch_s) * 1e3, "peer name": "blockprov clone --customize builtin:identity (new dir)",
         "ratio": med(cli_s) / med(scratch_s), "goal": "< 50 ms"},
    ]
    meta = {"pool size": pool_size, "pool create seconds (incl. customizing every instance)": round(create_s, 2),
            "acquire via control socket ms": [round(x * 1e3, 2) for x in direct_s],
            "acquire CLI ms": [round(x * 1e3, 1) for x in cli_s],
            "clone + customize from scratch ms": [round(x * 1e3, 1) for x in scratch_s],
            "clone without customize (new dir) ms": [round(x * 1e3, 1) for x in plain_s],
            "CLI start-up floor (`blockprov --version`) ms": round(floor * 1e3, 1)}
    return rows, meta


# -- 2. disk used ---------------------------------------------------------------------------------------------------
def write_offsets(size: int, count: int, nbytes: int) -> list[int]:
    """Each clone writes its own ``nbytes`` at a distinct place (spread over the disk, chunk-aligned)."""
    step = max(nbytes, ((size - nbytes) // count) // (64 << 10) * (64 << 10))
    return [min(k * step, size - nbytes) for k in range(count)]


def bench_disk(data: Path, image: Path, tmp: Path, count: int, write_mib: int) -> tuple[list[dict[str, Any]],
                                                                                          dict[str, Any]]:
    size = image.stat().st_size
    nbytes = write_mib * MIB
    offs = write_offsets(size, count, nbytes)
    root, sock = tmp / "disk-clones", tmp / "disk.sock"
    made_s = wall(lambda: bp("clone", REF, "--count", str(count), "--dir", str(root), data=data))
    before_hydrate = du(root)
    server = start_bg(["--data", str(data), "clones", "serve", "--dir", str(root), "--socket", str(sock), "--json"],
                      tmp / "disk-serve")
    try:
        names = sorted(json.loads(server.line)["instances"], key=lambda n: int(n.rsplit("-", 1)[1]))
        if nbytes:
            for k, name in enumerate(names):
                sh("qemu-io", "-f", "raw", "-c", f"write -q -P {k % 250 + 1} {offs[k]} {nbytes}", uri(sock, name))
        base = next((root / "bases").iterdir())
        bp("hydrate", "--cache", str(base), "--json", data=data)
    finally:
        server.stop()
    ours = du(root)
    base_bytes = du(base)
    listing = json.loads(bp("clones", "list", "--dir", str(root), "--json").stdout)
    shutil.rmtree(root)

    golden_alloc = du(image)
    free = shutil.disk_usage(tmp).free
    need = count * (golden_alloc + nbytes)
    real = free > need * 1.5 + (5 << 30)
    copies = tmp / "copies"
    copies.mkdir()
    n_made = count if real else 1

    def make_copies() -> None:
        for k in range(n_made):
            sh("cp", "--sparse=always", "--reflink=never", str(image), str(copies / f"copy-{k}.raw"))

    copy_s = wall(make_copies)
    if nbytes:
        for k in range(n_made):
            sh("qemu-io", "-f", "raw", "-c", f"write -q -P {k % 250 + 1} {offs[k]} {nbytes}",
               str(copies / f"copy-{k}.raw"))
    peer = du(copies) if real else du(copies) * count
    shutil.rmtree(copies)

    ovl = tmp / "qcow2"
    ovl.mkdir()

    def make_overlays() -> None:
        for k in range(count):
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "raw", str(ovl / f"o-{k}.qcow2"))

    ovl_s = wall(make_overlays)
    if nbytes:
        for k in range(count):
            sh("qemu-io", "-f", "qcow2", "-c", f"write -q -P {k % 250 + 1} {offs[k]} {nbytes}",
               str(ovl / f"o-{k}.qcow2"))
    qcow = du(ovl) + golden_alloc
    shutil.rmtree(ovl)

    g = 1 << 30
    rows = [
        {"benchmark": f"disk used by {count} clones, {write_mib} MiB written each (GiB)", "blockprov": ours / g,
         "peer": peer / g, "peer name": f"{count} sparse full copies ({'made' if real else '1 made × ' + str(count)})",
         "ratio": ours / peer, "goal": "≪ 1"},
        {"benchmark": f"disk used by {count} clones, {write_mib} MiB written each (GiB)", "blockprov": ours / g,
         "peer": qcow / g, "peer name": f"{count} qcow2 overlays (qemu-img create -b) + the raw base",
         "ratio": ours / qcow, "goal": "≈ 1"},
        {"benchmark": f"time to make {count} instances (s)", "blockprov": made_s, "peer": copy_s * count / n_made,
         "peer name": "cp --sparse=always" + ("" if real else f" (1 made × {count})"),
         "ratio": made_s / (copy_s * count / n_made), "goal": "≪ 1"},
    ]
    meta = {"disk: image allocated bytes (du of the raw file)": golden_alloc,
            "disk: clones dir before hydration (du)": before_hydrate,
            "disk: base cache after hydration (du)": base_bytes,
            "disk: clones dir after writes + hydration (du, base included)": ours,
            "disk: overlays' chunks modified (sum)": sum(int(x["chunks_modified"]) for x in listing),
            "disk: full copies": "made" if real else f"one copy made, × {count} (free space {free >> 30} GiB)",
            f"disk: time for {count} qcow2 overlays (s)": round(ovl_s, 2)}
    return rows, meta


# -- 3. repository bytes --------------------------------------------------------------------------------------------
class Repo:
    """``blockprov serve --access-log`` on 127.0.0.1 behind a counting proxy (no delay, no cap)."""

    def __init__(self, data: Path, tmp: Path) -> None:
        self.server = start_bg(["--data", str(data), "serve", "--listen", "127.0.0.1:0", "--access-log"],
                               tmp / "serve", timeout=60)
        self.log = tmp / "serve.out"  # the access log
        host, port = self.server.line.split()[1].removeprefix("http://").split(":")
        self.proxy = ProxyThread((host, int(port)), rtt=0.0, rate=None)
        self.proxy.start()
        self.url = self.proxy.url

    def mark(self) -> int:
        self.proxy.reset()
        return self.log.stat().st_size

    def since(self, mark: int) -> dict[str, int]:
        with open(self.log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        st = self.proxy.stats()
        return {"proxy_down_bytes": st["down_bytes"], "proxy_up_bytes": st["up_bytes"],
                "fetch_requests": sum(1 for ln in lines if "/v1/chunks/fetch" in ln),
                "requests": sum(1 for ln in lines if '"' in ln and "HTTP/" in ln)}

    def close(self) -> None:
        try:
            self.proxy.close()
        finally:
            self.server.stop()


def read_phase(repo: Repo, tmp: Path, tag: str, count: int, reader: Callable[[str], None],
               parallel: int) -> dict[str, Any]:
    root, sock = tmp / f"read-{tag}", tmp / f"read-{tag}.sock"
    mark = repo.mark()
    bp("clone", REF, "--count", str(count), "--dir", str(root), repo=repo.url)
    server = start_bg(["--repo", repo.url, "clones", "serve", "--dir", str(root), "--socket", str(sock), "--json"],
                      tmp / f"read-{tag}")
    try:
        names = list(json.loads(server.line)["instances"])
        t = time.perf_counter()
        with ThreadPoolExecutor(parallel) as ex:
            for f in [ex.submit(reader, uri(sock, n)) for n in names]:
                f.result()
        seconds = time.perf_counter() - t
        base = next((root / "bases").iterdir())
        st = json.loads(bp("status", "--cache", str(base), "--json").stdout)
    finally:
        server.stop()
    offline = json.loads(bp("status", "--cache", str(base), "--json").stdout)
    shutil.rmtree(root)
    return {"wire_bytes": int(st["totals"]["wire_bytes"]), "bytes_fetched": int(st["totals"]["bytes_fetched"]),
            "chunks_fetched": int(st["totals"]["chunks_fetched"]),
            "wire_bytes_after_stop": int(offline["totals"]["wire_bytes"]), "seconds": seconds, **repo.since(mark)}


def bench_repo_bytes(data: Path, image: Path, tmp: Path, count: int, repeat: int, sets: list[str],
                     parallel: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    repo = Repo(data, tmp)
    try:
        for ws in sets:
            if ws == "ranges":
                ranges = working_set(image, 0.10)
                meta["working set 'ranges'"] = (f"{len(ranges)} ranges, {sum(n for _, n in ranges) / MIB:.0f} MiB "
                                                f"(10% of the disk) inside its data, qemu-io reads")

                def reader(u: str, ranges: list[tuple[int, int]] = ranges) -> None:
                    read_ranges(u, ranges)
            else:
                reader = read_full
            one: list[dict[str, Any]] = []
            many: list[dict[str, Any]] = []
            for i in range(repeat):
                one.append(read_phase(repo, tmp, f"{ws}-1-{i}", 1, reader, 1))
                many.append(read_phase(repo, tmp, f"{ws}-{count}-{i}", count, reader, parallel))
                print(f"  {ws} #{i + 1}: 1 clone {one[-1]}\n  {ws} #{i + 1}: {count} clones {many[-1]}", flush=True)
            samples += [{"working set": ws, "clones": 1, **s} for s in one]
            samples += [{"working set": ws, "clones": count, **s} for s in many]

            def med(xs: list[dict[str, Any]], k: str) -> float:
                return float(statistics.median(x[k] for x in xs))

            ratio = statistics.median(m["wire_bytes"] / o["wire_bytes"] for o, m in zip(one, many, strict=True))
            pratio = statistics.median(m["proxy_down_bytes"] / o["proxy_down_bytes"]
                                       for o, m in zip(one, many, strict=True))
            rows.append({"benchmark": f"repository bytes, working set '{ws}' (MiB): base totals.wire_bytes",
                         "blockprov": med(many, "wire_bytes") / MIB, "peer": med(one, "wire_bytes") / MIB,
                         "peer name": "1 clone reading the same", "ratio": ratio, "goal": "≤ 1.1"})
            rows.append({"benchmark": f"repository bytes, working set '{ws}' (MiB): counting proxy, server → client",
                         "blockprov": med(many, "proxy_down_bytes") / MIB, "peer": med(one, "proxy_down_bytes") / MIB,
                         "peer name": "1 clone reading the same", "ratio": pratio, "goal": "≤ 1.1"})
            rows.append({"benchmark": f"chunk fetch requests (access log), working set '{ws}'",
                         "blockprov": med(many, "fetch_requests"), "peer": med(one, "fetch_requests"),
                         "peer name": "1 clone reading the same",
                         "ratio": med(many, "fetch_requests") / max(1.0, med(one, "fetch_requests")), "goal": "≈ 1"})
            meta[f"read seconds '{ws}': 1 clone / {count} clones ({parallel} at a time)"] = (
                round(med(one, "seconds"), 2), round(med(many, "seconds"), 2))
    finally:
        repo.close()
    return rows, meta, samples


# -- picture --------------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("hand out one instance", "ms (log)", [r for r in rows if r["benchmark"].startswith("hand out")]),
              (f"disk used by {count} instances", "GiB", [r for r in rows if r["benchmark"].startswith("disk used")]),
              ("repository bytes", "MiB", [r for r in rows if "totals.wire_bytes" in r["benchmark"]])]
    panels = [p for p in panels if p[2]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for ax, (title, unit, rs) in zip(axes if len(panels) > 1 else [axes], panels, strict=True):
        labels: list[str] = []
        values: list[float] = []
        colors: list[str] = []
        if title.startswith("hand out"):
            for r in rs:
                labels.append("acquire\n(socket)" if "socket" in r["benchmark"] else "acquire\n(CLI)")
                values.append(r["blockprov"])
                colors.append("tab:blue")
            labels.append("clone +\ncustomize")
            values.append(rs[0]["peer"])
            colors.append("tab:gray")
            ax.set_yscale("log")
            ax.axhline(50, color="tab:red", ls="--", lw=1)
        elif title.startswith("disk"):
            labels.append(f"{count} clones")
            values.append(rs[0]["blockprov"])
            colors.append("tab:blue")
            for r in rs:
                labels.append("full copies" if "full" in r["peer name"] else "qcow2\noverlays")
                values.append(r["peer"])
                colors.append("tab:gray")
        else:
            for r in rs:
                ws = r["benchmark"].split("'")[1]
                labels += [f"1 clone\n({ws})", f"{count} clones\n({ws})"]
                values += [r["peer"], r["blockprov"]]
                colors += ["tab:gray", "tab:blue"]
        ax.bar(labels, values, color=colors)
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("blockprov clones and pools (blue) vs peers (gray)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="golden image size (256M–1G)")
    ap.add_argument("--fill", type=float, default=0.4, help="fraction of the image filled with files")
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pool-size", type=int, default=3)
    ap.add_argument("--write-mib", type=int, default=4, help="MiB each clone writes in the disk benchmark")
    ap.add_argument("--working-set", default="ranges,full", help="comma list of: ranges,full")
    ap.add_argument("--parallel", type=int, default=8, help="clones reading at the same time")
    ap.add_argument("--skip", default="", help="comma list of: handout,disk,bytes")
    ap.add_argument("--quick", action="store_true", help="256M image, --count 10, --repeat 1, ranges only")
    a = ap.parse_args()
    if a.quick:
        a.size, a.count, a.repeat, a.working_set = "256M", 10, 1, "ranges"
    skip = set(filter(None, a.skip.split(",")))
    sets = [s for s in a.working_set.split(",") if s]
    if not set(sets) <= {"ranges", "full"}:
        ap.error("--working-set takes ranges and/or full")
    size = parse_size(a.size)
    WORK.mkdir(parents=True, exist_ok=True)
    image = golden_image(size, int(size * a.fill), f"{a.size}-{int(a.fill * 100)}")
    mounts_before = fuse_mounts()
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="clones-"))
    command = " ".join(["python bench/bench_clones.py", *sys.argv[1:]])
    meta: dict[str, Any] = {
        "image": f"{a.size} ext4 (mkfs.ext4 -d), {a.fill:.0%} full of files from /usr, /etc/hostname + machine-id; "
                 f"{du(image) / MIB:.0f} MiB allocated; 64 KiB chunks",
        "clones": a.count, "repeats": a.repeat, "cpus": os.cpu_count(), "command": command}
    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    try:
        data = tmp / "repo"
        bp("import", str(image), REF, "--chunk-size", "64K", data=data)
        if "handout" not in skip:
            r, m = bench_handout(data, tmp, a.repeat, a.pool_size)
            rows += r
            meta |= m
            print(r, m, flush=True)
        if "disk" not in skip:
            r, m = bench_disk(data, image, tmp, a.count, a.write_mib)
            rows += r
            meta |= m
            print(r, m, flush=True)
        if "bytes" not in skip:
            r, m, samples = bench_repo_bytes(data, image, tmp, a.count, a.repeat, sets, a.parallel)
            rows += r
            meta |= m
        write_results("clones", rows, meta)
        doc = json.loads((OUT / "clones.json").read_text())
        doc["samples"] = samples
        (OUT / "clones.json").write_text(json.dumps(doc, indent=2))
        plot(rows, RESULTS / "clones.png", a.count)
        print(f"wrote {OUT / 'clones.json'}, {OUT / 'clones.md'}, {RESULTS / 'clones.png'}")
    finally:
        for m in sorted(fuse_mounts() - mounts_before):  # a customizer interrupted mid-way
            subprocess.run(["umount", "-l", m], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on SIGTERM too
    main()
