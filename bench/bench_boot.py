"""Boot benchmark (issue 5, the headline figures): a real Linux guest (tools/bootimage.py, qemu under
TCG) boots from the same image in each of these ways, and we measure the time from qemu's start to
the guest's ``BLOCKPROV-BOOT-DONE`` marker, the bytes the repository sent, and the bytes the guest read:

- (a) ``local``: root on a local raw file (the floor; every ratio is against it, same link, same run);
- (b) ``copy``: full copy first (``qemu-img convert`` from the repository's raw HTTP view), then boot;
- (c) ``qemu-http``: qemu's http (curl) driver booting straight from the raw view (lazy, the peer);
- (c2) ``nbdkit-curl``: nbdkit's curl plugin on the raw view, qemu on its NBD socket (second peer);
- (d) ``bp-cold``: ``blockprov attach`` against ``blockprov serve``, a fresh cache;
- (e) ``bp-hydrated``: blockprov after ``blockprov hydrate`` filled the cache (boot time only; the
  hydration's bytes are reported);
- (f) ``bp-profile``: blockprov cold, with the boot profile recorded by an earlier boot;
- (g) ``v2``: the first boot of a v2 made from the version with a profile, about ``--changed`` (1%)
  of its chunks changed (bench/versions.py, as an administrator makes one): it starts with the
  profile it inherits (issue 15 item 1); goal ≤ 1.05× (f). Each sample is a fresh v2 (a first boot
  saves the version's own profile), made next to the repository (not over the link, not timed).
- (h) ``prepared``: a version's first boot after a plain import (issue 26 item 0): ``import``, then
  ``boot-files set``, which prepares its boot profile in the background (one headless boot next to
  the repository: ``profile prepare``); once ``show`` says it is ready, an agent attaches with default
  settings and the guest boots. A fresh repository per sample (nothing to inherit from); the
  preparation's time is reported apart (``prep``), not counted in the boot. Goal ≤ 1.05× (a).

Each scenario runs on three links: the repository on loopback, behind a LAN-like link (default
0.5 ms round trip, 1 Gbit/s; issue 15) and behind a WAN-like link (default 20 ms round trip,
1 Gbit/s). Every "link" is bench/wanproxy.py in front of a ``blockprov serve``: the loopback one
adds no delay and no cap and only counts bytes, so every peer's bytes are counted the same way
(the guest's reads come from qemu's ``query-blockstats``). Page caches are dropped before
each sample (when root). Medians of ``--repeat`` samples.

Run: ``.venv/bin/python bench/bench_boot.py [--size 4G] [--repeat 3] [--skip c2,lan,wan] [--interleave]``
(``--interleave``: one sample of each scenario per round, for a shared host whose load swings).
Results: bench/out/boot.{json,md} (the .md is the table for bench/RESULTS.md), bench/results/boot.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN, WORK, drop_caches, write_results
from tests import bootvm
from tests.procs import start_agent, start_server
from versions import make_v2
from wanproxy import ProxyThread, parse_duration, parse_rate

BP = str(VENV_BIN / "blockprov")
REF = "boot:v1"
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20


@dataclass
class Sample:
    """One measured run. ``seconds`` is what the user waits: preparation (a copy) plus boot."""

    seconds: float
    boot_seconds: float
    prep_seconds: float = 0.0
    down_bytes: int = 0  # repository → client, counted by the proxy
    up_bytes: int = 0  # client → repository
    guest_read_bytes: int = 0
    prep_down_bytes: int = 0  # bytes of the preparation step (hydration), reported apart
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    """What a scenario needs: the image, the repository behind the link, a scratch directory."""

    image: bootvm.bootimage.Built
    link: str
    proxy: ProxyThread
    raw_url: str  # the raw view, through the proxy
    tmp: Path
    timeout: float
    data: Path  # the repository's data directory (making a v2 reads it)
    server_url: str  # the repository without the link (setup that is not measured)
    changed: float = 0.01  # (g): fraction of the chunks a v2 changes
    v2s: int = 0  # (g): v2s made so far (each sample boots a fresh one)

    @property
    def repo_url(self) -> str:
        return self.proxy.url

    def wire(self) -> int:
        """Bytes the link carried so far (both ways): a boot's sign of progress."""
        st = self.proxy.stats()
        return st["down_bytes"] + st["up_bytes"]

    def boot(self, drive: str | Path | None = None, **kw: Any) -> bootvm.BootResult:
        r = bootvm.boot(self.image.kernel, self.image.initrd, drive, mode="plain", timeout=self.timeout, **kw)
        if not r.ok:
            why = next((ln[len("bootvm: "):] for ln in reversed(r.output.splitlines()) if ln.startswith("bootvm: ")),
                       r.fields.get("reason", "no marker"))
            raise RuntimeError(f"boot failed: {why}\n{' '.join(r.command)}\n{r.tail(25)}")
        return r

    def sample(self, r: bootvm.BootResult, prep: float = 0.0, **extra: Any) -> Sample:
        st = self.proxy.stats()
        assert r.seconds is not None
        return Sample(seconds=prep + r.seconds, boot_seconds=r.seconds, prep_seconds=prep,
                      down_bytes=st["down_bytes"], up_bytes=st["up_bytes"], guest_read_bytes=r.guest_read_bytes,
                      extra=_phases(r) | extra)


# -- scenarios ---------------------------------------------------------------------------------------------------


def s_local(ctx: Ctx) -> Sample:
    """(a) The floor: the raw file on the local disk (read-only; the plain boot mounts its root ro)."""
    return ctx.sample(ctx.boot(ctx.image.disk, readonly=True))


def s_copy(ctx: Ctx) -> Sample:
    """(b) What imaging tools do: copy the whole image from the raw view, then boot the copy."""
    out = ctx.tmp / "copy.raw"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    # -m 1: with more coroutines qemu 7.2's curl driver hangs forever in some runs (nginx too).
    subprocess.run(["qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "raw", ctx.raw_url, str(out)], check=True,
                   timeout=ctx.timeout)
    prep = time.perf_counter() - t
    try:
        return ctx.sample(ctx.boot(out), prep)
    finally:
        out.unlink(missing_ok=True)


def s_qemu_http(ctx: Ctx) -> Sample:
    """(c) qemu's curl driver reading the raw view lazily (read-only drive)."""
    return ctx.sample(ctx.boot(drive_spec=f"file.driver=http,file.url={ctx.raw_url},format=raw,if=virtio,"
                                          "readonly=on,id=root", progress=ctx.wire, stall_timeout=60))


def s_nbdkit_curl(ctx: Ctx) -> Sample:
    """(c2) nbdkit's curl plugin over the raw view, qemu on its NBD socket."""
    sock = ctx.tmp / "nbdkit.sock"
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(["nbdkit", "-r", "-f", "-U", str(sock), "--exit-with-parent", "curl", f"url={ctx.raw_url}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < end and p.poll() is None:
            time.sleep(0.05)
        if not sock.exists():
            raise RuntimeError(f"nbdkit did not start: {p.stderr.read() if p.stderr else ''}")
        return ctx.sample(ctx.boot(f"nbd+unix:///?socket={sock}", readonly=True, progress=ctx.wire,
                                   stall_timeout=60))
    finally:
        _stop(p)


def s_bp_cold(ctx: Ctx, *, profile: bool = False, ref: str = REF) -> Sample:
    """(d) blockprov: a fresh cache attached to the repository, the guest boots at once. Truly cold:
    ``--no-profile`` (no prefetch of a saved profile, and this boot does not save one either)."""
    cache = ctx.tmp / "cache-cold"
    shutil.rmtree(cache, ignore_errors=True)
    agent, banner = start_agent(cache, ref, ctx.tmp / "bp.sock", *([] if profile else ["--no-profile"]),
                                repo_url=ctx.repo_url)
    try:
        r = ctx.boot(_unix_uri(banner))
        st = _status(cache)
    finally:
        agent.stop()
    shutil.rmtree(cache, ignore_errors=True)
    return ctx.sample(r, **_fetch_figures(st))


def s_bp_hydrated(ctx: Ctx) -> Sample:
    """(e) blockprov after ``blockprov hydrate``: the boot reads only local data; hydration bytes apart."""
    cache = ctx.tmp / "cache-hyd"
    shutil.rmtree(cache, ignore_errors=True)
    agent, banner = start_agent(cache, REF, ctx.tmp / "bp.sock", "--no-profile", repo_url=ctx.repo_url)
    try:
        t = time.perf_counter()
        # `blockprov hydrate --cache DIR` returns once the cache is complete.
        subprocess.run([BP, "hydrate", "--cache", str(cache)], check=True, timeout=ctx.timeout,
                       stdout=subprocess.DEVNULL)
        prep = time.perf_counter() - t
        hyd = ctx.proxy.stats()
        ctx.proxy.reset()
        drop_caches()
        r = ctx.boot(_unix_uri(banner))
        st = _status(cache)
    finally:
        agent.stop()
    shutil.rmtree(cache, ignore_errors=True)
    s = ctx.sample(r, **_fetch_figures(st), hydrate_seconds=round(prep, 2))
    s.prep_down_bytes = hyd["down_bytes"]
    return s


def s_bp_profile(ctx: Ctx) -> Sample:
    """(f) blockprov cold with the boot profile an earlier boot recorded (``blockprov profile save``)."""
    _record_profile(ctx)
    ctx.proxy.reset()
    drop_caches()
    # A fresh attach of a version that has a profile prefetches in profile order by itself.
    return s_bp_cold(ctx, profile=True)


def s_v2(ctx: Ctx) -> Sample:
    """(g) The first boot of a fresh v2 (``--changed`` of the chunks differ) of a version with a profile."""
    if not _has_profile(ctx, REF):
        _record_profile(ctx)
    ctx.v2s += 1
    ref = f"boot:v2-{ctx.v2s}"
    made = make_v2(ctx.data, REF, ref, ctx.tmp, ctx.image, ctx.changed, repo_url=ctx.server_url, seed=ctx.v2s)
    ctx.proxy.reset()
    drop_caches()
    s = s_bp_cold(ctx, profile=True, ref=ref)
    s.extra.update(made)
    return s


def s_prepared(ctx: Ctx, agent_env: dict[str, str] | None = None) -> Sample:
    """(h) The first boot of a version whose profile was prepared after a plain import (module docstring).
    ``agent_env``: the measured agent's environment (h0: another tree's ``src``)."""
    data = ctx.tmp / "repo-prep"
    shutil.rmtree(data, ignore_errors=True)
    subprocess.run([BP, "--data", str(data), "import", str(ctx.image.disk), "prep:v1"], check=True,
                   stdout=subprocess.DEVNULL)
    env = dict(os.environ, BLOCKPROV_PREPARE="1")
    t = time.perf_counter()
    subprocess.run([BP, "--data", str(data), "boot-files", "set", "prep:v1", "--kernel", str(ctx.image.kernel),
                    "--initrd", str(ctx.image.initrd), "--cmdline", "quiet panic=-1 bp.mode=plain"], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    got: dict[str, Any] = {}
    for _ in range(int(ctx.timeout)):  # bounded: the preparation's own bound is 600 s
        got = json.loads(subprocess.run([BP, "--data", str(data), "show", "prep:v1", "--json"], check=True,
                                        capture_output=True, text=True, timeout=60).stdout)["profile"]
        # ready: the profile is stored; done: the preparation has also cleaned up after its boot and
        # ends (a PC does not boot in the second it finishes: its exit is not part of the boot)
        state = (got["preparation"] or {}).get("state")
        if (got["ready"] and state == "done") or state in ("failed", "skipped"):
            break
        time.sleep(1)
    if not got.get("ready"):
        raise RuntimeError(f"the profile was not prepared: {got}")
    prep = time.perf_counter() - t
    server, url = start_server(data, env={"BLOCKPROV_PREPARE": "0"})
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    cache = ctx.tmp / "cache-prep"
    shutil.rmtree(cache, ignore_errors=True)
    try:
        with ProxyThread((host, int(port)), rtt=ctx.proxy.proxy.rtt, rate=ctx.proxy.proxy.down.rate) as proxy:
            drop_caches()
            agent, banner = start_agent(cache, "prep:v1", ctx.tmp / "bp.sock", repo_url=proxy.url, env=agent_env)
            try:
                r = ctx.boot(_unix_uri(banner))
                st = _status(cache)
            finally:
                agent.stop()
            sent = proxy.stats()
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    assert r.seconds is not None
    return Sample(seconds=r.seconds, boot_seconds=r.seconds, down_bytes=sent["down_bytes"], up_bytes=sent["up_bytes"],
                  guest_read_bytes=r.guest_read_bytes, extra=_phases(r) | _fetch_figures(st) | {
                      "prepared_in": round(prep, 1), "profile_chunks": got["chunks"]})


BASELINE_SRC: str | None = None  # --baseline-src: (h0) is (h) with the measured agent running this src


def s_prepared_baseline(ctx: Ctx) -> Sample:
    """(h0) (h) with the measured agent from another tree's ``src`` (the rest, the preparation
    included, from this one): an A/B of an agent change in the same run, interleaved."""
    assert BASELINE_SRC is not None
    return s_prepared(ctx, agent_env={"PYTHONPATH": BASELINE_SRC})


def _has_profile(ctx: Ctx, ref: str) -> bool:
    r = subprocess.run([BP, "--repo", ctx.server_url, "profile", "show", ref, "--json"], capture_output=True,
                       text=True, timeout=60)
    return r.returncode == 0 and bool(json.loads(r.stdout).get("chunks"))


def _record_profile(ctx: Ctx) -> None:
    """Boot once on a fresh cache and save the read order as the version's boot profile."""
    rec = ctx.tmp / "cache-rec"
    shutil.rmtree(rec, ignore_errors=True)
    agent, banner = start_agent(rec, REF, ctx.tmp / "bp.sock", repo_url=ctx.repo_url)
    try:
        ctx.boot(_unix_uri(banner))
        # Saves the recorded access order as the version's boot profile (the agent would also save it
        # by itself when it stops, since the version had none: this makes it explicit).
        subprocess.run([BP, "--repo", ctx.repo_url, "profile", "save", "--cache", str(rec)], check=True,
                       timeout=120, stdout=subprocess.DEVNULL)
    finally:
        agent.stop()
    shutil.rmtree(rec, ignore_errors=True)


@dataclass
class Scenario:
    key: str
    label: str
    fn: Callable[[Ctx], Sample]
    needs: str = ""  # a blockprov command this scenario needs


SCENARIOS = [
    Scenario("a", "(a) local raw file", s_local),
    Scenario("b", "(b) full copy, then boot", s_copy),
    Scenario("c", "(c) qemu http driver", s_qemu_http),
    Scenario("c2", "(c) nbdkit curl plugin", s_nbdkit_curl),
    Scenario("d", "(d) blockprov cold", s_bp_cold),
    Scenario("e", "(e) blockprov hydrated", s_bp_hydrated, needs="hydrate"),
    Scenario("f", "(f) blockprov cold + boot profile", s_bp_profile, needs="profile"),
    Scenario("g", "(g) v2 (1% changed) first boot, inherited profile", s_v2, needs="profile"),
    Scenario("h", "(h) first boot after a plain import (profile prepared)", s_prepared, needs="profile"),
    Scenario("h0", "(h) with the agent of --baseline-src", s_prepared_baseline, needs="profile"),
]


# -- helpers -----------------------------------------------------------------------------------------------------


def _unix_uri(banner: dict[str, object]) -> str:
    return next(str(a) for a in banner["addresses"] if str(a).startswith("nbd+unix://"))  # type: ignore[attr-defined]


def _status(cache: Path) -> dict[str, Any]:
    return dict(json.loads(subprocess.run([BP, "status", "--cache", str(cache), "--json"], check=True,
                                          capture_output=True, text=True, timeout=60).stdout))


def _phases(r: bootvm.BootResult) -> dict[str, Any]:
    """Where a boot's time went, to compare two scenarios sample by sample: before the guest's
    kernel ran (qemu's start, firmware, loading the kernel: wall time less the guest's uptime at the
    marker), the guest's root mounted and its files read (guest uptime), and the time the guest's
    reads waited in all (qemu's ``rd_total_time_ns``: the disk path's share, apart from the CPU)."""
    out: dict[str, Any] = {}
    try:
        up = float(r.fields["uptime"])
        out |= {"pre_kernel_s": round((r.seconds or 0.0) - up, 2), "mounted_s": float(r.fields["mounted"]),
                "read_done_s": float(r.fields["readdone"])}
    except (KeyError, ValueError):
        pass
    if "rd_total_time_ns" in r.blockstats:
        out |= {"read_wait_s": round(int(r.blockstats["rd_total_time_ns"]) / 1e9, 3),
                "read_ops": r.blockstats.get("rd_operations")}
    return out


def _fetch_figures(st: dict[str, Any]) -> dict[str, Any]:
    """The agent's fetch counters, and how long its profile's prefetch took from its own start
    (to compare with ``pre_kernel_s``: a prefetch still running when the kernel reads is waited for)."""
    tot = st.get("totals", {})
    out = {"chunks_fetched": tot.get("chunks_fetched"), "fetched_MiB": round(tot.get("bytes_fetched", 0) / MIB, 1),
           "agent_wire_MiB": round(tot.get("wire_bytes", 0) / MIB, 1)}
    hyd = st.get("hydration") or {}
    if hyd.get("finished") and hyd.get("started"):
        out["prefetch_s"] = round(hyd["finished"] - hyd["started"], 2)
    if "batches" in st:  # this run's: the prefetch's and the guest's misses (with their read-ahead)
        out |= {"fetch_batches": st["batches"], "readahead_chunks": st.get("readahead_chunks")}
    return out


def _stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def blockprov_commands() -> set[str]:
    """Commands ``blockprov --help`` lists (scenarios e/f need commands being built)."""
    out = subprocess.run([BP, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"^\s{2}([a-z][a-z-]*)\s", out.split("Commands:", 1)[-1], re.MULTILINE))


def raw_url_via(proxy_url: str) -> str:
    out = subprocess.run([BP, "--repo", proxy_url, "show", REF, "--json"], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    url = json.loads(out).get("raw_url")
    if not url:
        raise SystemExit("the repository gives no raw_url for the image")
    return str(url)


def run_scenario(sc: Scenario, ctx: Ctx, repeat: int, retries: int, samples: list[Sample] | None = None,
                 failures: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """``repeat`` good samples in ``samples`` if possible; a failed run (a hung peer) is recorded and
    retried at most ``retries`` times in all, so one flaky peer neither stops the benchmark nor hides
    its failures. ``samples``/``failures``: continue these (``--interleave`` takes one at a time)."""
    samples = [] if samples is None else samples
    failures = [] if failures is None else failures
    while len(samples) < repeat and len(failures) <= retries:
        ctx.proxy.reset()
        drop_caches()
        try:
            s = sc.fn(ctx)
        except (RuntimeError, subprocess.SubprocessError, OSError, AssertionError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            failures.append(first)
            print(f"  {ctx.link:8} {sc.label:36} FAILED: {str(e)[-1500:]}", flush=True)
            continue
        samples.append(s)
        print(f"  {ctx.link:8} {sc.label:36} run {len(samples)}/{repeat}: {s.seconds:7.2f} s "
              f"(boot {s.boot_seconds:.2f}), repo sent {s.down_bytes / MIB:8.1f} MiB, "
              f"guest read {s.guest_read_bytes / MIB:6.1f} MiB", flush=True)
    return samples, failures


def link_rows(link: str, todo: list[Scenario], got: dict[str, tuple[list[Sample], list[str]]]) -> list[dict[str, Any]]:
    """The table rows of one link; ratios against its (a)."""
    a_samples = got.get("a", ([], []))[0]
    base = statistics.median(s.seconds for s in a_samples) if a_samples else None
    out = []
    for sc in todo:
        samples, failures = got[sc.key]
        note = f"{len(failures)} failed run(s): {failures[0][:120]}" if failures else ""
        out.append(row(link, sc, samples, base, note))
    return out


def row(link: str, sc: Scenario, samples: list[Sample], base: float | None, note: str = "") -> dict[str, Any]:
    """One table row: medians; a scenario that could not run gets its reason in ``note``."""
    if not samples:
        return {"link": link, "scenario": sc.label, "seconds": "-", "vs (a)": "-", "boot s": "-",
                "repo sent MiB": "-", "guest read MiB": "-", "sent / read": "-", "note": note}
    med = statistics.median
    secs = med(s.seconds for s in samples)
    down = med(s.down_bytes for s in samples)
    read = med(s.guest_read_bytes for s in samples)
    notes = [note] if note else []
    if any(s.prep_seconds for s in samples):
        notes.append(f"prep {med(s.prep_seconds for s in samples):.1f} s")
    if any(s.prep_down_bytes for s in samples):
        notes.append(f"hydration sent {med(s.prep_down_bytes for s in samples) / MIB:.0f} MiB")
    if any("prepared_in" in s.extra for s in samples):
        notes.append("profile prepared in " + "/".join(f"{s.extra['prepared_in']:.0f}" for s in samples) + " s ("
                     + "/".join(str(s.extra["profile_chunks"]) for s in samples) + " chunks), not counted")
    if any("changed_percent" in s.extra for s in samples):
        notes.append("v2s changed " + "/".join(f"{s.extra['changed_percent']}%" for s in samples) + " of the chunks")
    if all("read_wait_s" in s.extra for s in samples):
        notes.append(f"guest reads waited {med(s.extra['read_wait_s'] for s in samples):.2f} s in all")
    if len(samples) > 1:
        notes.append("samples " + "/".join(f"{s.seconds:.1f}" for s in samples))
    return {"link": link, "scenario": sc.label, "seconds": secs, "vs (a)": secs / base if base else "-",
            "boot s": med(s.boot_seconds for s in samples), "repo sent MiB": down / MIB,
            "guest read MiB": read / MIB, "sent / read": down / read if read else "-", "note": "; ".join(notes)}


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, evaluated on this run's medians."""
    by = {(r["link"], r["scenario"][:3]): r for r in rows if isinstance(r["seconds"], float)}
    out = []

    def check(text: str, val: float | None, limit: float, smaller: bool = True) -> None:
        if val is None:
            out.append(f"{text}: not measured")
        else:
            ok = val <= limit if smaller else val >= limit
            out.append(f"{text}: {val:.2f} — {'met' if ok else 'NOT met'}")

    def get(link: str, key: str, col: str = "seconds") -> float | None:
        r = by.get((link, key))
        return float(r[col]) if r and isinstance(r[col], float) else None

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    check("(d) ≤ 1.1× (a) on loopback", ratio(get("loopback", "(d)"), get("loopback", "(a)")), 1.1)
    check("(d) ≤ 1.3× (a) over the WAN link", ratio(get("wan", "(d)"), get("wan", "(a)")), 1.3)
    check("(d) ≤ 0.3× (b) over the WAN link", ratio(get("wan", "(d)"), get("wan", "(b)")), 0.3)
    check("(d) ≤ 1.1× (a) on the LAN link", ratio(get("lan", "(d)"), get("lan", "(a)")), 1.1)
    for link in ("loopback", "lan", "wan"):
        c_link = [float(r["seconds"]) for r in rows if r["link"] == link and r["scenario"].startswith("(c)")
                  and isinstance(r["seconds"], float)]
        check(f"(d) faster than every (c) peer ({link}), (d)/(c fastest)",
              ratio(get(link, "(d)"), min(c_link, default=None)), 1.0)
        check(f"(f) ≤ 1.05× (a) ({link})", ratio(get(link, "(f)"), get(link, "(a)")), 1.05)
        check(f"(g) v2 first boot ≤ 1.05× (f) ({link})", ratio(get(link, "(g)"), get(link, "(f)")), 1.05)
        check(f"(h) first boot after a plain import, profile prepared, ≤ 1.05× (a) ({link})",
              ratio(get(link, "(h)"), get(link, "(a)")), 1.05)
    check("(d) bytes sent ≤ 0.6× bytes the guest read (loopback)", get("loopback", "(d)", "sent / read"), 0.6)
    check("(d) bytes sent ≤ 0.8× bytes the guest read (wan)", get("wan", "(d)", "sent / read"), 0.8)
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["scenario"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    import textwrap

    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(1, len(links))
    for i, link in enumerate(links):
        vals = []
        for lab in labels:
            r = next((r for r in rows if r["link"] == link and r["scenario"] == lab), None)
            vals.append(float(r["seconds"]) if r and isinstance(r["seconds"], float) else 0.0)
        xs = [j + (i - (len(links) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, vals, width, label=link)
        for b, v in zip(bars, vals, strict=True):
            if v:
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([textwrap.fill(lab, 16) for lab in labels], fontsize=8)
    ax.set_yscale("log")  # the slowest peer is ~30× the floor: a linear axis would hide the rest
    ax.set_ylabel("seconds from qemu start to boot marker (log)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def save(a: argparse.Namespace, image: bootvm.bootimage.Built, rows: list[dict[str, Any]], raw: dict[str, Any],
         load_start: tuple[float, float, float]) -> list[str]:
    """Write bench/out/boot.{json,md} with the rows so far (called after every scenario, so a run
    stopped at a deadline keeps what it measured); returns the goals evaluated on them."""
    meta: dict[str, Any] = {
        "image": f"{a.size} ext4, {image.info['files']} files ({int(image.info['file_bytes']) / 1e6:.0f} MB) "
                 f"from /usr; plain boot reads {image.info['boot_full_files']} files whole and the first 16 KiB "
                 f"of {image.info['boot_head_files']}",
        "links": f"loopback (counting proxy, no delay), LAN ({a.lan_rtt} RTT, {a.lan_rate}) and WAN ({a.rtt} RTT, "
                 f"{a.rate}) via bench/wanproxy.py",
        "qemu": "qemu-system-x86_64 -machine accel=tcg -m 512 -nographic -no-reboot, direct kernel boot, "
                "root on virtio-blk",
        "repeats": a.repeat, "cpus": os.cpu_count(),
        "load average (1, 5, 15 min) at start / end": f"{load_start} / {os.getloadavg()}",
        "command": f"python bench/bench_boot.py --size {a.size} --repeat {a.repeat}"
                   + (f" --skip {a.skip}" if a.skip else "") + (f" --retries {a.retries}" if a.retries != 2 else "")
                   + (" --interleave" if a.interleave else "")
                   + (f" --baseline-src {a.baseline_src}" if a.baseline_src else ""),
    }
    g = goals(rows)
    write_results("boot", rows, meta | {"goals": "; ".join(g)})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "boot.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": g, "samples": raw}, indent=2,
                                              default=str))
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4G", help="virtual disk size of the test image (default 4G; 1G for quick runs)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files in the image (default 300)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of the chunks a v2 changes ((g))")
    ap.add_argument("--skip", default="", help="comma list of scenario keys (a,b,c,c2,d,e,f,g) and/or links "
                                               "(loopback,lan,wan)")
    ap.add_argument("--rtt", default="20ms", help="round-trip time of the WAN link (default 20ms)")
    ap.add_argument("--rate", default="1gbit", help="bandwidth of the WAN link (default 1gbit)")
    ap.add_argument("--lan-rtt", default="0.5ms", help="round-trip time of the LAN link (default 0.5ms)")
    ap.add_argument("--lan-rate", default="1gbit", help="bandwidth of the LAN link (default 1gbit)")
    ap.add_argument("--timeout", type=float, default=900, help="longest a boot or a copy may take (s)")
    ap.add_argument("--retries", type=int, default=2, help="failed runs tolerated per scenario and link")
    ap.add_argument("--interleave", action="store_true",
                    help="take one sample of every scenario per round (a, d, f, a, d, f, …) instead of each "
                         "scenario's samples back to back")
    ap.add_argument("--baseline-src", help="adds (h0): (h) with the measured agent running this src directory")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    global BASELINE_SRC
    BASELINE_SRC = a.baseline_src
    if not a.baseline_src:
        skip.add("h0")
    load_start = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    image = bootvm.bootimage.build(WORK / f"bootimage-{a.size}-{a.fill_mb}", size=a.size, fill_mb=a.fill_mb)
    print(f"image: {image.disk} ({a.size}, {image.info['files']} files, "
          f"{int(image.info['file_bytes']) / 1e6:.0f} MB of files; ready in {time.perf_counter() - t:.1f} s)")
    have = blockprov_commands()
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="boot-"))
    short = Path(tempfile.mkdtemp(prefix="bpb", dir="/tmp"))  # unix sockets: short paths
    links = [("loopback", 0.0, None), ("lan", parse_duration(a.lan_rtt), parse_rate(a.lan_rate)),
             ("wan", parse_duration(a.rtt), parse_rate(a.rate))]
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    try:
        for link, rtt, rate in links:
            if link in skip:
                continue
            # A fresh repository per link: a boot profile saved by (f) stays with the version and would
            # otherwise turn the next link's "cold" runs into profile runs.
            data = tmp / f"repo-{link}"
            subprocess.run([BP, "--data", str(data), "import", str(image.disk), REF], check=True,
                           stdout=subprocess.DEVNULL)
            server, url = start_server(data)
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            try:
                with ProxyThread((host, int(port)), rtt=rtt, rate=rate) as proxy:
                    ctx = Ctx(image, link, proxy, raw_url_via(proxy.url), short, a.timeout, data, url, a.changed)
                    todo: list[Scenario] = []
                    for sc in SCENARIOS:
                        if sc.key in skip:
                            continue
                        if sc.needs and sc.needs not in have:
                            msg = f"needs blockprov {sc.needs} (not in this build)"
                            print(f"  {link:8} {sc.label:36} skipped: {msg}")
                            rows.append(row(link, sc, [], None, msg))
                            continue
                        todo.append(sc)
                    # One scenario's samples back to back, or (--interleave) one sample of each per
                    # round: on a shared host a load swing then hits every scenario alike.
                    got: dict[str, tuple[list[Sample], list[str]]] = {sc.key: ([], []) for sc in todo}
                    for rnd in range(a.repeat if a.interleave else 1):
                        for sc in todo:
                            samples, failures = got[sc.key]
                            run_scenario(sc, ctx, rnd + 1 if a.interleave else a.repeat, a.retries, samples,
                                         failures)
                            raw[f"{link}/{sc.key}"] = [s.__dict__ for s in samples]
                        done = rows + link_rows(link, todo, got)
                        save(a, image, done, raw, load_start)
                    rows += link_rows(link, todo, got)
            finally:
                server.stop()
                shutil.rmtree(data, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)
    g = save(a, image, rows, raw, load_start)
    print("\n".join(g))
    plot(rows, RESULTS / "boot.png", f"Linux boot under TCG, {a.size} image: qemu start → boot marker "
                                     f"(median of {a.repeat})")
    print(f"wrote {OUT / 'boot.json'}, {OUT / 'boot.md'}, {RESULTS / 'boot.png'}")


if __name__ == "__main__":
    main()
