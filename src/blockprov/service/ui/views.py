"""What each console page shows, gathered from the repository by plain functions (run on the
service's thread pool: they read the catalog and the store, which block).

Why the agents' columns look the way they do: the console shows what an agent put in its
registration (``PUT /v1/agents/{instance}``, refreshed as a heartbeat), read with ``.get`` and shown
as "not reported" when absent, so an older agent, or one that reports less, still appears.
Fields read from the info: ``kind`` (absent for a host's agent, ``clones`` or ``pool`` for
``clones serve`` / ``pool serve``: those are shown on the Pools page, not with the machines),
``image``, ``version``, ``host``, ``hydration`` (``{"percent": …}``, as ``Hydrator.status()`` makes
it), ``modified_chunks``, ``fetch_latency_ms``, ``last_error``, ``pools`` (a list of ``{name, base,
ready, in_use, size, error}``) and ``clones`` (a list of ``{name, image, version, modified_chunks,
state, host}``, with ``clones_total``). The last error is also taken from the agent's most recent
failed request, which the repository knows by itself.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from blockprov import manifest as mf
from blockprov.catalog.records import VersionInfo
from blockprov.catalog.sites import SOURCES, traffic
from blockprov.errors import BlockprovError
from blockprov.names import Ref, image_name
from blockprov.service.state import Service

STORE_STATS_SECONDS = 300.0  # bytes stored: a walk of the store's index (a listing, on S3), so counted rarely
RECENT_REQUESTS = 15
DIFF_RANGES_SHOWN = 50


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a token's name and scope, or the open console (no tokens configured)."""

    name: str
    scope: str
    open: bool = False

    @property
    def can_write(self) -> bool:
        return self.scope == "write"

    @property
    def who(self) -> str:
        """What the tag history records as having done a change."""
        return "open console" if self.open else self.name


@dataclass
class ConsoleState:
    """What the console keeps between requests (per app): caches of immutable or slow answers."""

    new_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (image, version) → bytes
    store_stats: tuple[float, int, int, int] | None = None  # (when, chunks, bytes stored, logical bytes)
    rate_sample: tuple[float, int] | None = None  # (when, requests answered) for requests per second
    rate: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def new_bytes(svc: Service, state: ConsoleState, v: VersionInfo) -> int:
    """Bytes of ``v`` that differ from its parent (all of its non-zero bytes when it has none)."""
    key = (v.image, v.id)
    hit = state.new_bytes.get(key)
    if hit is not None:
        return hit
    _vid, m, _raw = svc.manifests.get(Ref(v.image, version=v.id))
    if v.parent is None:
        n = m.stored_bytes_logical()
    else:
        try:
            _pid, p, _ = svc.manifests.get(Ref(v.image, version=v.parent))
            n = sum(m.chunk_length(i) for i in mf.diff(p, m))
        except BlockprovError:  # the parent was removed: count it as new
            n = m.stored_bytes_logical()
    state.new_bytes[key] = n
    return n


def images(svc: Service) -> dict[str, Any]:
    cat = svc.repo.catalog
    return {"images": svc.repo.images(), "history": cat.tag_history(limit=20)}


def image(svc: Service, state: ConsoleState, name: str) -> dict[str, Any]:
    name = image_name(name)
    versions = list(reversed(svc.repo.versions(name)))  # newest first
    rows = [{"v": v, "new_bytes": new_bytes(svc, state, v)} for v in versions]
    tags = next((i.tags for i in svc.repo.images() if i.name == name), {})
    return {"name": name, "versions": rows, "tags": tags, "history": svc.repo.catalog.tag_history(name, 50)}


def diff(svc: Service, name: str, a: str, b: str) -> dict[str, Any]:
    """The chunks (and bytes) of version ``b`` that differ from ``a``, with the changed ranges."""
    _ia, ma, _ = svc.manifests.get(Ref(name, version=a))
    _ib, mb, _ = svc.manifests.get(Ref(name, version=b))
    changed = mf.diff(ma, mb)
    ranges: list[tuple[int, int]] = []
    for i in changed:
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    cs = mb.chunk_size
    return {"a": a, "b": b, "chunks": len(changed), "bytes": sum(mb.chunk_length(i) for i in changed),
            "chunk_size": cs, "ranges": [(lo * cs, hi * cs) for lo, hi in ranges[:DIFF_RANGES_SHOWN]],
            "more_ranges": max(0, len(ranges) - DIFF_RANGES_SHOWN)}


def refs(svc: Service) -> list[str]:
    """What a host may be assigned: every ``NAME:TAG`` (follows the tag), then every ``NAME@ID``."""
    out: list[str] = []
    ids: list[str] = []
    for i in svc.repo.images():
        out += [f"{i.name}:{t}" for t in sorted(i.tags)]
        ids += [f"{i.name}@{v.id}" for v in reversed(svc.repo.versions(i.name))]
    return out + ids


def _num(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _text(x: object) -> str | None:
    return x if isinstance(x, str) else None


def agent_row(a: dict[str, Any], failed: dict[str, tuple[str, float]]) -> dict[str, Any]:
    info = a["info"] if isinstance(a.get("info"), dict) else {}
    hyd = info.get("hydration")
    percent = _num(hyd.get("percent")) if isinstance(hyd, dict) else _num(hyd)
    last_error = info.get("last_error") if isinstance(info.get("last_error"), str) else None
    if not last_error and a["instance"] in failed:
        last_error = failed[a["instance"]][0]
    return {"instance": a["instance"], "online": bool(a.get("online")), "seen_ago": a["seen_ago"],
            "image": _text(info.get("image")), "version": _text(info.get("version")), "host": _text(info.get("host")),
            "hydration": percent, "modified": _num(info.get("modified_chunks")),
            "latency": _num(info.get("fetch_latency_ms")), "last_error": last_error,
            "move": _text(move.get("summary")) if isinstance(move := info.get("last_move"), dict) else None,
            "pending": a["pending"], "running": a["running"], "site": _text(info.get("site")),
            "sources": _sources(info.get("sources"))}


def _sources(by: object) -> dict[str, int] | None:
    """An agent's bytes by source, over its versions (from its report's ``sources``)."""
    rows = traffic([{"info": {"sources": by}}]) if isinstance(by, dict) and by else []
    if not rows:
        return None
    return {s: sum(int(r[s]) for r in rows) for s in SOURCES}


def _info(a: dict[str, Any]) -> dict[str, Any]:
    return a["info"] if isinstance(a.get("info"), dict) else {}


def is_clones_agent(a: dict[str, Any]) -> bool:
    """An agent of ``clones serve`` or ``pool serve`` (it reports clones, not one machine's disk)."""
    return _info(a).get("kind") in ("clones", "pool")


def machines(svc: Service) -> dict[str, Any]:
    reg = svc.repo.registry
    requests = reg.recent_requests(RECENT_REQUESTS)
    failed = reg.last_failures()
    agents = [agent_row(a, failed) for a in svc.repo.agents() if not is_clones_agent(a)]
    return {"hosts": svc.repo.hosts(), "agents": agents, "requests": requests}


def _list(x: object) -> list[Any]:
    return x if isinstance(x, list) else []


def _clone_row(c: object) -> dict[str, Any] | None:
    if not isinstance(c, dict):
        return None
    return {"name": str(c.get("name", "")), "image": _text(c.get("image")), "version": _text(c.get("version")),
            "modified": _num(c.get("modified_chunks")), "state": _text(c.get("state")), "host": _text(c.get("host"))}


def pools(svc: Service, viewer: Viewer) -> dict[str, Any]:
    """Pools and clones agents as they reported themselves (agent/report.py), online or not."""
    out = []
    groups = []
    every = svc.repo.agents()
    for a in every:
        info = _info(a)
        if not is_clones_agent(a) and not isinstance(info.get("pools"), list):
            continue
        online = bool(a.get("online"))
        for p in _list(info.get("pools")):
            if isinstance(p, dict):
                out.append({"instance": a["instance"], "online": online, "name": str(p.get("name", "")),
                            "base": _text(p.get("base")), "ready": _num(p.get("ready")),
                            "in_use": _num(p.get("in_use")), "size": _num(p.get("size")),
                            "error": _text(p.get("error"))})
        clones = [r for r in map(_clone_row, _list(info.get("clones"))) if r is not None]
        total = _num(info.get("clones_total"))
        groups.append({"instance": a["instance"], "kind": _text(info.get("kind")) or "pool", "online": online,
                       "seen_ago": a["seen_ago"], "host": _text(info.get("host")),
                       "dir": _text(info.get("dir")) if viewer.can_write else None,
                       "clones": clones, "more": max(0, int(total) - len(clones)) if total is not None else 0,
                       "last_error": _text(info.get("last_error"))})
    return {"pools": out, "groups": groups, "agents": len(every)}


HIDDEN = "shown to write tokens"


def health(svc: Service, state: ConsoleState, viewer: Viewer) -> dict[str, Any]:
    """Reachability, space and traffic, from the counters ``/metrics`` exposes (service/metrics.py).

    Where the catalog is (a data directory's path, a database's host) and why it or the store
    failed (messages name paths and hosts) are shown only to write scope (issue 27): a read token
    learns whether the repository is healthy, not how the server's machine is laid out."""
    out: dict[str, Any] = {}
    paths = viewer.can_write
    t0 = time.monotonic()
    try:
        svc.repo.catalog.db.one("SELECT 1")
        out["catalog"] = {"ok": True, "where": svc.repo.catalog.db.url if paths else HIDDEN,
                          "ms": 1000 * (time.monotonic() - t0)}
    except Exception as e:  # any failure is the answer to "is it reachable"
        out["catalog"] = {"ok": False, "where": _safe_url(svc) if paths else HIDDEN,
                          "why": (str(e) or type(e).__name__) if paths else "the server's log says why"}
    t0 = time.monotonic()
    try:
        svc.store.missing([bytes(32)])
        out["store"] = {"ok": True, "where": type(svc.store).__name__, "ms": 1000 * (time.monotonic() - t0)}
    except Exception as e:  # any failure is the answer to "is it reachable"
        out["store"] = {"ok": False, "where": type(svc.store).__name__,
                        "why": (str(e) or type(e).__name__) if paths else "the server's log says why"}
    now = time.monotonic()
    with state.lock:
        stats = state.store_stats
    if out["store"]["ok"] and out["catalog"]["ok"] and (stats is None or now - stats[0] > STORE_STATS_SECONDS):
        chunks = stored = 0
        for _cid, n, _mtime in svc.store.iter_ids():
            chunks += 1
            stored += n
        logical = sum(m.stored_bytes_logical() for m in svc.repo.catalog.all_manifests())
        stats = (now, chunks, stored, logical)
        with state.lock:
            state.store_stats = stats
    out["chunks"], out["stored"], out["logical"] = (stats[1], stats[2], stats[3]) if stats else (None, None, None)
    out["counted_ago"] = now - stats[0] if stats else None
    out["dedup"] = out["logical"] / out["stored"] if out["logical"] and out["stored"] else None
    m = svc.metrics
    total = sum(m.requests.values())
    errors = sum(n for (_m, _r, s), n in list(m.requests.items()) if s.startswith("5"))
    with state.lock:
        if state.rate_sample is not None and now - state.rate_sample[0] >= 1.0:
            state.rate = (total - state.rate_sample[1]) / (now - state.rate_sample[0])
        if state.rate_sample is None or now - state.rate_sample[0] >= 1.0:
            state.rate_sample = (now, total)
        rate = state.rate
    out["requests"] = {"total": total, "per_second": rate, "server_errors": errors, "in_flight": m.in_flight,
                       "chunks_served": m.chunks_served, "chunks_received": m.chunks_received,
                       "uptime": time.time() - m.started}
    out["sites"] = traffic(svc.repo.agents())
    out["chunk_cache"] = _hit_rate(m.chunk_cache() if m.chunk_cache else None)
    out["manifest_cache"] = _hit_rate(m.manifest_cache() if m.manifest_cache else None)
    return out


def _hit_rate(counts: tuple[int, ...] | None) -> dict[str, Any] | None:
    if counts is None:
        return None
    hits, misses = counts[0], counts[1]
    return {"hits": hits, "misses": misses, "rate": hits / (hits + misses) if hits + misses else None}


def _safe_url(svc: Service) -> str:
    try:
        return str(svc.repo.catalog.db.url)
    except Exception:  # the URL is only decoration in an error report
        return "the catalog"
