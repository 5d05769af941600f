"""Thirty PCs at nine o'clock (issue 26): N agents start the same version at once, each replaying a
real boot's read trace through its NBD export, the repository behind one shared slow link.

What runs, and why:

- **The trace** (``capture``, cached): the project's test image (tools/bootimage.py) boots once under
  qemu from ``nbdkit --filter=log file`` (a server we did not write, which logs every request with
  its submit and completion time); every read — offset, length, when it was submitted, when it
  completed — goes into the trace. A boot profile has no timing; a trace does.
- **The replay** (bench/storm_replay.py, under Debian's python3 with libnbd): one thread per agent,
  up to ``REPLAY_PER_PROCESS`` agents a process (their GIL is not the storm's bottleneck), all
  starting at the same instant; each read waits for the read the boot had waited for, plus the
  guest's think time (so a slow miss delays what depends on it), reads that were in flight together
  are in flight together, and every byte read is compared with the image.
- **The link**: the repository (``blockprov serve``) sits behind bench/wanproxy.py with one cap for
  all connections (default 100 Mbit/s, 2 ms): a site's uplink. Agents, the site cache and nginx
  reach each other over loopback: the site's LAN.
- **The set-ups**, each with N = 1, 10, 30 agents (``blockprov attach … --no-profile``: nothing is
  fetched before the replay starts; every fetch follows the replayed reads):
  ``alone`` (today: each agent fetches from the repository itself), ``nginx`` (today's site cache:
  ``attach --cacheable-fetch`` through nginx's proxy_cache, proxy_cache_lock on), ``sitecache``
  (``blockprov serve --upstream``), ``peers`` (``attach --site``: chunks from the site's agents,
  one owner per chunk fetching it from the repository; with ``--liar`` one lying peer is in the site);
  ``before`` (``--before`` another tree's blockprov, e.g. the commit before peers landed: its agents
  alone, for an A/B of a lone agent with ``alone``); ``sitecache-before`` (that tree's agents behind
  this tree's site cache: an A/B of the agents in a storm, in one run).
- **Time-to-ready** of an agent: from the common start to its last read's completion. **Repository
  egress**: the bytes the link carried from the repository during the run (chunks, registrations,
  joins: everything).
- **The v2 rollout** (``--rollout``): after each set-up's N = 30 run, its 30 agents (now holding
  v1's working set) are moved to a v2 at once (``blockprov update``: by diff, the changed chunks they
  held fetched again at once); the repository's egress (everything: chunks, v2's manifest, tag
  lookups, joins) is compared with the wire bytes of the changed chunks the agents held (each once).
  With peers, v2's manifest comes from the repository once, to its owner, and from that peer to the
  others (the agents' status counts where each manifest came from).

Run: ``.venv/bin/python bench/bench_storm.py [--counts 1,10,30] [--setups alone,nginx,sitecache,peers]
[--rollout] [--liar]``. Results: bench/out/storm.{json,md}, bench/results/storm.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN, WORK, write_results
from tests import bootvm
from tests.procs import Proc, first_line, free_port, start_server
from wanproxy import ProxyThread, parse_duration, parse_rate

from blockprov.agent import control
from blockprov.repo.remote import RemoteRepository

BP = str(VENV_BIN / "blockprov")
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with the libnbd bindings
NGINX = "/usr/sbin/nginx"
SITE = "storm"
REF = "lab:v1"


# -- the trace ---------------------------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^(\S+ \S+) connection=\d+ (\.\.\.)?Read id=(\d+)(?: offset=0x([0-9a-f]+) count=0x([0-9a-f]+))?")


def parse_nbdkit_log(text: str) -> list[list[float]]:
    """nbdkit's log filter → reads as [submit, complete, offset, length], times from the first submit."""
    import datetime

    started: dict[str, tuple[float, int, int]] = {}
    reads: list[list[float]] = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m is None:
            continue
        t = datetime.datetime.fromisoformat(m.group(1)).timestamp()
        if m.group(2) is None:
            started[m.group(3)] = (t, int(m.group(4), 16), int(m.group(5), 16))
        elif m.group(3) in started:
            s, off, n = started.pop(m.group(3))
            reads.append([s, t, off, n])
    reads.sort()
    t0 = reads[0][0]
    return [[round(s - t0, 6), round(c - t0, 6), off, n] for s, c, off, n in reads]


def capture(image: bootvm.bootimage.Built, path: Path, timeout: float, again: bool = False) -> dict[str, Any]:
    """Boot the test image once from nbdkit's log filter and keep its reads (module docstring). The
    guest's think times are the capture's: capture on a quiet machine (``--recapture``)."""
    if path.exists() and not again:
        return dict(json.loads(path.read_text()))
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bpcap", dir="/tmp"))
    sock, log = tmp / "nbd.sock", tmp / "nbdkit.log"
    nbdkit = subprocess.Popen(["nbdkit", "-r", "-f", "-U", str(sock), "--filter=log", "file", str(image.disk),
                               f"logfile={log}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        r = bootvm.boot(image.kernel, image.initrd, f"nbd+unix:///?socket={sock}", mode="plain", readonly=True,
                        timeout=timeout)
        if not r.ok:
            raise RuntimeError(f"the capture boot failed:\n{r.tail(25)}")
    finally:
        nbdkit.send_signal(signal.SIGTERM)
        nbdkit.wait(10)
    reads = parse_nbdkit_log(log.read_text())
    shutil.rmtree(tmp, ignore_errors=True)
    trace = {"image": str(image.disk), "boot_seconds": r.seconds, "reads": reads, "load": load,
             "bytes": sum(n for *_x, n in reads), "span": max(c for _s, c, _o, _n in reads),
             "most_in_flight": _most_in_flight(reads)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))
    return trace


def _most_in_flight(reads: list[list[float]]) -> int:
    events = sorted([(s, 1) for s, _c, _o, _n in reads] + [(c, -1) for _s, c, _o, _n in reads])
    depth = most = 0
    for _t, d in events:
        depth += d
        most = max(most, depth)
    return most


# -- the site: repository, link, caches, agents -----------------------------------------------------------------------
@dataclass
class Site:
    data: Path
    direct: str  # the repository without the link (setup, not measured)
    link: ProxyThread
    tmp: Path
    short: Path
    server_pid: int = 0
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.link.url


def nginx_conf(prefix: Path, port: int, upstream: str) -> Path:
    for d in ("cache", "tmp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=chunks:16m max_size=8g inactive=1d use_temp_path=off;
    upstream repo {{ server {upstream.removeprefix("http://")}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 256m;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location /v1/chunks/ {{ proxy_pass http://repo; proxy_cache chunks; proxy_cache_lock on;
                               proxy_cache_lock_timeout 60s; }}
        location / {{ proxy_pass http://repo; proxy_read_timeout 120s; }}
    }}
}}
""")
    return conf


@contextmanager
def front(setup: str, site: Site) -> Iterator[tuple[str, list[str], int | None]]:
    """What the agents of a set-up talk to, their extra attach options, and the pid of the site
    cache or nginx between them and the link (None: none)."""
    if setup == "sitecache-before":
        setup = "sitecache"
    if setup in ("alone", "peers", "before"):
        extra = ["--site", SITE, "--peer-listen", "127.0.0.1:0"] if setup == "peers" else []
        yield site.url, extra, None
        return
    if setup == "sitecache":
        proc, url = start_server(site.tmp / "sitecache", "--upstream", site.url, "--cache-size", "8G")
        drain(proc.proc, site.tmp / "sitecache.err")
        try:
            yield url, [], proc.proc.pid
        finally:
            proc.stop()
            shutil.rmtree(site.tmp / "sitecache", ignore_errors=True)
        return
    if setup == "nginx":
        port = free_port()
        prefix = site.tmp / "nginx"
        conf = nginx_conf(prefix, port, site.url)
        ngx = subprocess.Popen([NGINX, "-e", str(prefix / "error.log"), "-c", str(conf), "-p", str(prefix),
                                 "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            if ngx.poll() is not None:
                raise RuntimeError(f"nginx did not start: {ngx.stderr.read() if ngx.stderr else ''}")
            yield f"http://127.0.0.1:{port}", ["--cacheable-fetch"], ngx.pid
        finally:
            ngx.terminate()
            ngx.wait(10)
            shutil.rmtree(prefix, ignore_errors=True)
        return
    raise ValueError(setup)


ATTACH_ARGS: list[str] = []  # --attach-args: given to every agent
NO_ROLLOUT = ("nginx", "before", "sitecache-before")  # set-ups whose largest run is not moved to a v2


def start_agents(site: Site, n: int, url: str, extra: list[str], bp: str = BP) -> list[tuple[Proc, Path, Path]]:
    """``attach`` N agents at once (nothing fetched: --no-profile, no read yet); ``bp``: whose
    ``blockprov`` (the ``before`` set-up: another tree's)."""
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKPROV_REPO", "BLOCKPROV_TOKEN")}
    for k in range(n):
        cache, sock = site.tmp / f"agent{k}", site.short / f"a{k}"
        with open(site.tmp / f"agent{k}.err", "w") as err:  # a file: a pipe nobody reads stops the agent
            p = subprocess.Popen([bp, "--repo", url, "attach", REF, "--cache", str(cache), "--socket", str(sock),
                                  "--no-profile", "--json", *ATTACH_ARGS, *extra], stdout=subprocess.PIPE, stderr=err,
                                 text=True, env=env)
        procs.append((p, cache, sock))
    out = []
    for p, cache, sock in procs:
        line = first_line(p, 300)
        if not line.startswith("{"):
            p.kill()
            raise RuntimeError(f"agent did not start: {line!r} {(site.tmp / 'agent0.err').read_text()[-2000:]}")
        out.append((Proc(p, line), cache, sock))
    return out


def status(cache: Path) -> dict[str, Any]:
    return dict(control.call(cache, "status", timeout=60.0))


def drain(proc: subprocess.Popen[str], path: Path) -> None:
    """Copy a server's stderr to a file as it comes: a pipe nobody reads fills at 64 KiB and stops
    the process at its next log line (a site cache of thirty PCs stalled so for minutes)."""
    import threading

    def copy() -> None:
        with open(path, "a") as f:
            for line in proc.stderr or ():
                f.write(line)

    threading.Thread(target=copy, daemon=True).start()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants so far (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def wait_peers(agents: list[tuple[Proc, Path, Path]], want: int) -> float:
    t = time.monotonic()
    for _ in range(600):
        if all((status(c).get("site") or {}).get("peers", 0) >= want for _p, c, _s in agents):
            return time.monotonic() - t
        time.sleep(0.5)
    raise RuntimeError(f"the agents did not find {want} peers")


def stop_agents(agents: list[tuple[Proc, Path, Path]]) -> None:
    for p, _c, _s in agents:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p, cache, _s in agents:
        try:
            p.proc.wait(60)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()
        shutil.rmtree(cache, ignore_errors=True)


# Exports per replay process (bench/storm_replay.py): its threads share one GIL, and thirty replays
# cost ~21 CPU s (RESULTS.md, "Boot storm"), so in one process they would hold one core for most of
# the 30 s the goal allows, their reads queued behind each other's Python whatever the agents do.
# Several processes (four at N = 30) keep every replay's offsets, lengths, timing and concurrency,
# and a lone agent is replayed by the same client (one process).
REPLAY_PER_PROCESS = 8


def replay(trace_path: Path, image: Path, socks: list[Path], delay: float = 2.0) -> list[dict[str, Any]]:
    start = time.time() + delay
    uris = [f"nbd+unix:///lab?socket={s}" for s in socks]
    groups = [uris[k:k + REPLAY_PER_PROCESS] for k in range(0, len(uris), REPLAY_PER_PROCESS)]
    procs = [subprocess.Popen([SYSTEM_PYTHON, str(ROOT / "bench" / "storm_replay.py"), "--trace", str(trace_path),
                               "--start", str(start), "--image", str(image), *g], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for g in groups]
    out: list[dict[str, Any]] = []
    failed = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=3600)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        if p.returncode != 0:
            failed.append(stderr[-3000:])
        else:
            out += json.loads(stdout)["results"]
    if failed:
        raise RuntimeError(f"replay failed: {failed[0]}")
    return out


# -- one run ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    setup: str
    n: int
    ready: list[float]
    egress: int
    mismatches: int  # reads that completed with bytes other than the image's
    failures: list[str]
    sources: dict[str, int]
    peer_bad: int
    load: tuple[float, float, float]
    joined_in: float | None = None
    rollout: dict[str, Any] | None = None
    # CPU seconds during the replay: each agent's, the repository's, the site cache's or nginx's, the
    # replay's own (bench/storm_replay.py), and the replay's wall time: on a shared 2-core machine
    # these say whether N agents were waiting for the link or for a core
    cpu: dict[str, Any] = field(default_factory=dict)
    read_errors: int = 0  # reads that failed (EIO), apart from wrong bytes
    diag: dict[str, Any] = field(default_factory=dict)  # where the bytes went (``diagnose``)

    def row(self, lone_ready: float | None, lone_egress: int | None) -> dict[str, Any]:
        r = sorted(self.ready)
        p95 = r[min(len(r) - 1, max(0, round(0.95 * len(r)) - 1))] if r else float("nan")
        return {"setup": self.setup, "N": self.n, "ready p50 s": statistics.median(r) if r else "-",
                "ready p95 s": p95, "ready max s": r[-1] if r else "-",
                "p95 / lone": p95 / lone_ready if lone_ready else "-",
                "repo egress MiB": self.egress / MIB,
                "egress / lone": self.egress / lone_egress if lone_egress else "-",
                "from peers MiB": self.sources.get("peers", 0) / MIB,
                "from site cache MiB": self.sources.get("site_cache", 0) / MIB,
                "wrong bytes": self.mismatches, "failed reads": self.read_errors, "peer chunks refused": self.peer_bad,
                "agent CPU s (median)": self.cpu.get("agent_median", "-"),
                "CPU s / wall s (all)": self.cpu.get("busy_cores", "-"),
                "note": "; ".join(self.failures)[:300] + (f" load {self.load[0]:.1f}" if self.load else "")}


def one_run(site: Site, setup: str, n: int, trace_path: Path, image: Path, *, liar: bool,
            rollout: dict[str, Any] | None, before_bin: str = BP) -> Run:
    vid = RemoteRepository(site.direct).resolve(REF).id
    liar_peer = None
    with front(setup, site) as (url, extra, front_pid):
        agents = start_agents(site, n, url, extra, before_bin if setup in ("before", "sitecache-before") else BP)
        try:
            joined = None
            if setup == "peers":
                if liar and n > 1:
                    from tests.interop.test_site_peers import LyingPeer

                    liar_peer = LyingPeer(site.direct, "pc-liar", vid, SITE)
                joined = wait_peers(agents, n - 1 + (1 if liar_peer else 0))
            site.link.reset()
            load = os.getloadavg()
            pids = {"agents": [p.proc.pid for p, _c, _s in agents], "repository": [site.server_pid],
                    "front": [front_pid] if front_pid else []}
            before = {k: [cpu_seconds(x) for x in v] for k, v in pids.items()}
            t0, children0 = time.monotonic(), _children_cpu()
            results = replay(trace_path, image, [s for _p, _c, s in agents])
            wall, replay_cpu = time.monotonic() - t0, _children_cpu() - children0
            after = {k: [cpu_seconds(x) for x in v] for k, v in pids.items()}
            used = {k: [b - a for a, b in zip(before[k], after[k], strict=True)] for k in pids}
            egress = site.link.stats()["down_bytes"]
            sts = [status(c) for _p, c, _s in agents]
            sources = {"peers": 0, "site_cache": 0, "repository": 0}
            bad = 0
            for st in sts:
                src = st.get("sources") or {}
                bad += int(src.get("peer_bad_chunks", 0))
                for by in (src.get("by_version") or {}).values():
                    for k in sources:
                        sources[k] += int(by.get(k, {}).get("bytes", 0))
            run = Run(setup, n, [float(r["ready"]) for r in results if "ready" in r],
                      egress, sum(int(r.get("mismatches", 0)) for r in results),
                      [str(r["failed"]) for r in results if "failed" in r], sources, bad, load, joined)
            run.read_errors = sum(int(r.get("errors", 0)) for r in results)
            run.diag = diagnose(sts)
            total = sum(sum(v) for v in used.values()) + replay_cpu
            run.cpu = {"agent_median": statistics.median(used["agents"]), "agents_total": sum(used["agents"]),
                       "repository": sum(used["repository"]), "front": sum(used["front"]), "replay": replay_cpu,
                       "wall": wall, "busy_cores": total / wall if wall else None}
            if rollout is not None:
                try:
                    run.rollout = do_rollout(site, agents, rollout)
                except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
                    run.failures.append(f"rollout: {e}")
            return run
        finally:
            if liar_peer is not None:
                liar_peer.close()
            stop_agents(agents)


def diagnose(sts: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a run's fetches went, summed over its agents: chunks each fetcher got (demand and
    speculative: read-ahead and neighbourhoods), and with peers what their servers did (requests
    turned away busy, chunks fetched from the repository as owners, failures seen; requests sent to
    peers, and speculative chunks asked of them or left unasked by their have-vectors)."""
    def total(path: tuple[str, ...]) -> int:
        n = 0
        for st in sts:
            v: Any = st
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            n += int(v or 0)
        return n

    return {"chunks_fetched": total(("chunks_fetched",)), "speculative": total(("readahead_chunks",)),
            "batches": total(("batches",)), "peer_busy": total(("site", "serving", "busy")),
            "owner_fetched": total(("site", "serving", "chunks_fetched")),
            "peer_failures": total(("sources", "peer_failures")),
            "peer_requests": total(("sources", "peer_requests")),
            "held_asked": total(("sources", "held_asked")), "held_skipped": total(("sources", "held_skipped")),
            "repository_chunks": sum(int(by.get("repository", {}).get("chunks", 0)) for st in sts
                                     for by in ((st.get("sources") or {}).get("by_version") or {}).values())}


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def do_rollout(site: Site, agents: list[tuple[Proc, Path, Path]], v2: dict[str, Any]) -> dict[str, Any]:
    """Move every agent to v2 at once (update by diff: the changed chunks they held fetched again)."""
    site.link.reset()
    t = time.monotonic()
    procs = [subprocess.Popen([BP, "update", "--cache", str(c), "--to", v2["ref"], "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _p, c, _s in agents]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"update failed: {e[-1000:]}")
        outs.append(json.loads(o))
    seconds = time.monotonic() - t
    egress = site.link.stats()["down_bytes"]
    refetched = [int(o.get("chunks_refetched", 0)) for o in outs]
    # the chunks' part of the egress: what the agents fetched from the repository itself for v2 (an
    # owner's fetches for its peers included); the rest is manifests, joins and requests
    vid = RemoteRepository(site.direct).resolve(v2["ref"]).id
    sts = [status(c).get("sources") or {} for _p, c, _s in agents]
    chunks = sum(int((st.get("by_version") or {}).get(vid, {}).get("repository", {}).get("bytes", 0)) for st in sts)
    # v2's manifest: how many came from the repository (or the site cache) and how many from peers
    manifests = {k: sum(int((st.get("manifests") or {}).get(k, {}).get("count", 0)) for st in sts)
                 for k in ("repository", "site_cache", "peers")}
    return {"seconds": seconds, "egress": egress, "changed_wire": v2["changed_wire"], "chunk_bytes": chunks,
            "manifests": manifests,
            "ratio": egress / v2["changed_wire"] if v2["changed_wire"] else None,
            "refetched_per_agent": statistics.median(refetched) if refetched else 0}


def make_v2(site: Site, image: Path, trace: dict[str, Any], fraction: float) -> dict[str, Any]:
    """v2: ``fraction`` of the chunks the boot reads get new bytes (imported next to the repository)."""
    m = RemoteRepository(site.direct).resolve(REF)
    cs = m.chunk_size
    touched = sorted({o // cs + k for _s, _c, o, n in trace["reads"] for k in range((o % cs + n + cs - 1) // cs)})
    touched = [i for i in touched if i < m.count and not m.is_zero(i)]
    rnd = random.Random(26)
    changed = sorted(rnd.sample(touched, max(1, int(fraction * len(touched)))))
    v2 = site.tmp / "v2.raw"
    shutil.copyfile(image, v2)
    with open(v2, "r+b") as f:
        for i in changed:
            f.seek(i * cs + 512)
            f.write(rnd.randbytes(4096))  # part of the chunk: new content, as a changed file would give
    subprocess.run([BP, "--repo", site.direct, "import", str(v2), "lab:v2"], check=True, stdout=subprocess.DEVNULL)
    v2.unlink()
    m2 = RemoteRepository(site.direct).resolve("lab:v2")
    ids = list({m2.digest_at(i) for i in changed})
    blobs = RemoteRepository(site.direct).get_blobs(ids)
    return {"ref": "lab:v2", "changed_chunks": len(changed), "touched_chunks": len(touched),
            "changed_wire": sum(len(b) for b in blobs)}


# -- report -------------------------------------------------------------------------------------------------------
def p95(r: Run) -> float:
    s = sorted(r.ready)
    return s[min(len(s) - 1, max(0, round(0.95 * len(s)) - 1))]


def medians(runs: list[Run], setup: str, n: int) -> tuple[float, float] | None:
    """The median p95 time-to-ready and repository egress of a set-up's repeats at N (None: no run)."""
    rs = [r for r in runs if r.setup == setup and r.n == n and r.ready]
    if not rs:
        return None
    return statistics.median(p95(r) for r in rs), statistics.median(r.egress for r in rs)


def goals(runs: list[Run]) -> list[str]:
    by = {(r.setup, r.n): r for r in runs}  # the last repeat of each (the largest N runs once)
    lone = medians(runs, "alone", 1)
    out = []
    if lone is None:
        return ["no lone agent measured: no ratios"]
    lone_ready, lone_egress = lone
    out.append(f"one lone agent (median of {sum(1 for r in runs if r.setup == 'alone' and r.n == 1 and r.ready)}): "
               f"ready in {lone_ready:.1f} s, repository egress {lone_egress / MIB:.1f} MiB")
    for setup in ("alone", "nginx", "sitecache", "sitecache-before", "peers"):
        r = by.get((setup, 30)) or by.get((setup, max((k[1] for k in by if k[0] == setup), default=0)))
        if r is None or not r.ready:
            continue
        e = r.egress / lone_egress if lone_egress else float("nan")
        t = p95(r) / lone_ready
        out.append(f"{setup} N={r.n}: repository egress {e:.2f}x one lone agent's (goal 1.3x: "
                   f"{'met' if e <= 1.3 else 'NOT met'}); p95 time-to-ready {t:.2f}x (goal 1.5x: "
                   f"{'met' if t <= 1.5 else 'NOT met'})")
        if r.rollout and r.rollout.get("ratio") is not None:
            ro = r.rollout["ratio"]
            out.append(f"{setup} v2 rollout to {r.n}: repository sent {ro:.2f}x the changed chunks' bytes "
                       f"(goal 1.3x: {'met' if ro <= 1.3 else 'NOT met'})")
    peer1 = medians(runs, "peers", 1)
    if peer1 is not None:
        pairs = [(a, b) for a, b in zip([r for r in runs if r.setup == "alone" and r.n == 1 and r.ready],
                                        [r for r in runs if r.setup == "peers" and r.n == 1 and r.ready], strict=False)]
        each = ", ".join(f"{p95(b) / p95(a):.2f}" for a, b in pairs)
        out.append(f"a lone agent with a site and no peers (median): {peer1[0] / lone_ready:.2f}x today's lone agent "
                   f"(interleaved pairs: {each})")
    before = medians(runs, "before", 1)
    if before is not None:
        out.append(f"today's lone agent vs the one before peers landed (--before), medians: "
                   f"{lone_ready:.1f} s vs {before[0]:.1f} s ({lone_ready / before[0]:.2f}x)")
    wrong = sum(r.mismatches for r in runs)
    out.append(f"wrong bytes read by any agent in any run: {wrong}; peer chunks refused as wrong: "
               f"{sum(r.peer_bad for r in runs)} ({'met' if wrong == 0 else 'NOT met'}); failed reads (EIO): "
               f"{sum(r.read_errors for r in runs)}")
    return out


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for setup in dict.fromkeys(r.setup for r in runs):
        ns = sorted({r.n for r in runs if r.setup == setup and r.ready})
        if not ns:
            continue
        ms = [m for n in ns if (m := medians(runs, setup, n)) is not None]
        ax1.plot(ns, [m[0] for m in ms], marker="o", label=setup)
        ax2.plot(ns, [m[1] / MIB for m in ms], marker="o", label=setup)
    ax1.set_xlabel("agents starting at once")
    ax1.set_ylabel("p95 time-to-ready (s)")
    ax2.set_xlabel("agents starting at once")
    ax2.set_ylabel("repository egress (MiB)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def save(a: argparse.Namespace, runs: list[Run], meta: dict[str, Any]) -> list[str]:
    lone = medians(runs, "alone", 1)
    rows = [r.row(lone[0] if lone else None, int(lone[1]) if lone else None) for r in runs]
    for r in runs:
        if r.rollout:
            rows.append({"setup": f"{r.setup} v2 rollout", "N": r.n, "ready p50 s": r.rollout["seconds"],
                         "ready p95 s": "-", "ready max s": "-", "p95 / lone": "-",
                         "repo egress MiB": r.rollout["egress"] / MIB,
                         "egress / lone": f"{r.rollout['ratio']:.2f}x changed" if r.rollout["ratio"] else "-",
                         "from peers MiB": "-", "from site cache MiB": "-", "wrong bytes": "-",
                         "peer chunks refused": "-",
                         "note": f"changed chunks' wire bytes {r.rollout['changed_wire'] / MIB:.1f} MiB; "
                                 f"chunks from the repository to the agents {r.rollout.get('chunk_bytes', 0) / MIB:.2f}"
                                 " MiB (the rest: manifests, joins, requests); "
                                 f"v2's manifest from (agents' count) {r.rollout.get('manifests', {})}; "
                                 f"{r.rollout['refetched_per_agent']} chunks refetched per agent (median)"})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "-") for k in cols} for r in rows]  # a rollout's row has no CPU columns
    g = goals(runs)
    write_results("storm", rows, meta | {"goals": "; ".join(g)})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "storm.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": g,
                                                "runs": [r.__dict__ for r in runs]}, indent=2, default=str))
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="the test image's virtual size (default 4G)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files in it (default 300)")
    ap.add_argument("--counts", default="1,10,30")
    ap.add_argument("--setups", default="alone,nginx,sitecache,peers")
    ap.add_argument("--rate", default="100mbit", help="the shared link's bandwidth (default 100mbit)")
    ap.add_argument("--rtt", default="2ms", help="the shared link's round trip (default 2ms)")
    ap.add_argument("--rollout", action="store_true", help="after each set-up's largest run, move it to a v2")
    ap.add_argument("--changed", type=float, default=0.02, help="share of the boot's chunks a v2 changes")
    ap.add_argument("--liar", action="store_true", help="one lying peer in the peers runs")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--recapture", action="store_true", help="capture the trace again (else the cached one)")
    ap.add_argument("--before", default="",
                    help="the blockprov of another tree (its .venv/bin/blockprov): set-up 'before' runs its agents "
                         "alone against this tree's repository (an A/B of a lone agent across commits)")
    ap.add_argument("--lone-only", default="before",
                    help="set-ups run at N = 1 only (default: before)")
    ap.add_argument("--attach-args", default="",
                    help="extra options for every agent's attach, e.g. '--readahead 4M' (an A/B of a setting)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each set-up at N = 1, interleaved (the lone figures are their medians)")
    a = ap.parse_args()
    ATTACH_ARGS[:] = a.attach_args.split()
    counts = [int(x) for x in a.counts.split(",")]
    setups = [s for s in a.setups.split(",") if s]
    load_start = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    image = bootvm.bootimage.build(WORK / f"bootimage-{a.size}-{a.fill_mb}", size=a.size, fill_mb=a.fill_mb)
    trace_path = WORK / f"storm-trace-{a.size}-{a.fill_mb}.json"
    trace = capture(image, trace_path, a.timeout, a.recapture)
    print(f"trace: {len(trace['reads'])} reads, {trace['bytes'] / MIB:.1f} MiB, {trace['span']:.1f} s, at most "
          f"{trace['most_in_flight']} in flight (the boot took {trace['boot_seconds']:.1f} s)", flush=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="storm-"))
    short = Path(tempfile.mkdtemp(prefix="bps", dir="/tmp"))
    data = tmp / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image.disk), REF], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([BP, "--data", str(data), "site", "add", SITE], check=True, stdout=subprocess.DEVNULL)
    server, direct = start_server(data, env={"BLOCKPROV_PREPARE": "0"})
    drain(server.proc, tmp / "repository.err")
    host, port = direct.split("//", 1)[1].rsplit(":", 1)
    runs: list[Run] = []
    meta: dict[str, Any] = {
        "trace": f"{len(trace['reads'])} reads, {trace['bytes'] / MIB:.1f} MiB read over {trace['span']:.1f} s, "
                 f"at most {trace['most_in_flight']} in flight: one boot of the {a.size} test image "
                 f"({a.fill_mb} MB of files) under qemu TCG from nbdkit's log filter (captured at load "
                 f"{trace.get('load', ['?'])[0]})",
        "link": f"bench/wanproxy.py, one {a.rate} / {a.rtt} link shared by every connection to the repository",
        "agents": "blockprov attach --no-profile (default read-ahead); replay: bench/storm_replay.py (libnbd)",
        "cpus": os.cpu_count(), "command": "python bench/bench_storm.py " + " ".join(sys.argv[1:]),
    }
    try:
        with ProxyThread((host, int(port)), rtt=parse_duration(a.rtt), rate=parse_rate(a.rate)) as link:
            site = Site(data, direct, link, tmp, short, server.proc.pid)
            v2 = make_v2(site, image.disk, trace, a.changed) if a.rollout else None
            if v2:
                meta["v2"] = (f"{v2['changed_chunks']} of the {v2['touched_chunks']} non-zero chunks the boot reads "
                              f"changed ({v2['changed_wire'] / MIB:.1f} MiB on the wire)")
            # by N, the set-ups interleaved (each N's set-ups see the same load); N = 1 repeated
            plan = [(setup, n) for n in counts for _rep in range(a.repeats if n == 1 else 1) for setup in setups
                    if n == 1 or setup not in a.lone_only.split(",")]  # e.g. the older agents: the lone A/B
            for setup, n in plan:
                print(f"{setup} N={n} …", flush=True)
                try:
                    r = one_run(site, setup, n, trace_path, image.disk, liar=a.liar, before_bin=a.before or BP,
                                rollout=v2 if v2 and n == max(counts) and setup not in NO_ROLLOUT else None)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    print(f"  FAILED: {e}", flush=True)
                    r = Run(setup, n, [], 0, 0, [str(e)[:300]], {}, 0, os.getloadavg())
                runs.append(r)
                print(f"  ready p50 {statistics.median(r.ready) if r.ready else float('nan'):.1f} s, max "
                      f"{max(r.ready) if r.ready else float('nan'):.1f} s; egress {r.egress / MIB:.1f} MiB; "
                      f"peers {r.sources.get('peers', 0) / MIB:.1f} MiB, site cache "
                      f"{r.sources.get('site_cache', 0) / MIB:.1f} MiB; wrong bytes {r.mismatches}"
                      + (f"; CPU {r.cpu}" if r.cpu else "") + (f"; {r.diag}" if r.diag else "")
                      + (f"; rollout {r.rollout}" if r.rollout else ""),
                      flush=True)
                meta["load average (1, 5, 15 min) at start / end"] = f"{load_start} / {os.getloadavg()}"
                save(a, runs, meta)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)
    g = save(a, runs, meta)
    print("\n".join(g))
    plot(runs, RESULTS / "storm.png", f"{a.size} test image boot trace replayed by N agents at once; repository "
                                      f"behind one {a.rate} / {a.rtt} link")
    print(f"wrote {OUT / 'storm.json'}, {OUT / 'storm.md'}, {RESULTS / 'storm.png'}")


if __name__ == "__main__":
    main()
