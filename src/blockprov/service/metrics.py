"""Prometheus metrics of the repository service (``GET /metrics``).

Why it is shaped like this: the counters are plain integers in dicts, bumped by the outermost ASGI
middleware and by a few handlers, all on the event loop thread — no lock, no label lookup, no
allocation beyond a tuple per request. prometheus_client only sees them at scrape time, through a
custom collector that turns them into metric families. The route label is the route *template*
(``/v1/chunks/{cid}``), never the path, so a client cannot grow the label set; paths that match no
route share one label. Each app has its own registry (tests build many apps in one process), with
the process collector (CPU seconds, memory) so a benchmark can read the server's CPU from it too.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blockprov.catalog.sites import SOURCES
from blockprov.service.access import UNKNOWN

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class _Hist:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0


class ServiceMetrics(Collector):
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.seconds: dict[tuple[str, str], _Hist] = {}
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.in_flight = 0
        # chunk traffic (handlers bump these)
        self.chunks_served = 0  # blobs sent by POST /v1/chunks/fetch and GET /v1/chunks/{id}
        self.chunk_fetches = 0  # POST /v1/chunks/fetch answered
        self.chunks_not_modified = 0  # GET /v1/chunks/{id} answered 304 (a cache revalidated)
        self.chunks_received = 0  # blobs uploaded
        self.chunks_new = 0  # of which the store did not have yet
        self.missing_asked = 0  # ids asked about by POST /v1/chunks/missing
        self.manifest_cache: Callable[[], tuple[int, int]] | None = None  # (hits, misses), set by the app
        # (hits, misses, joined, bytes) of the chunk cache in front of an object store, set by the app
        self.chunk_cache: Callable[[], tuple[int, int, int, int]] | None = None
        # per site and version, the bytes agents took from peers, their site cache and this repository
        # (catalog/sites.py ``traffic``: read from the agents' last reports at scrape time), set by the app
        self.site_traffic: Callable[[], list[dict[str, Any]]] | None = None
        self.started = time.time()

    def registry(self) -> CollectorRegistry:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)
        ProcessCollector(registry=reg)
        PlatformCollector(registry=reg)
        return reg

    def collect(self) -> Iterator[Metric]:
        req = CounterMetricFamily("blockprov_http_requests", "HTTP requests answered, by route template and status",
                                  labels=["method", "route", "status"])
        for (m, r, s), n in list(self.requests.items()):
            req.add_metric([m, r, s], n)
        yield req
        hist = HistogramMetricFamily("blockprov_http_request_duration_seconds",
                                     "Time from request to the end of the answer", labels=["method", "route"])
        for (m, r), h in list(self.seconds.items()):
            acc, buckets = 0, []
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), h.counts, strict=True):
                acc += n
                buckets.append((bound, acc))
            hist.add_metric([m, r], buckets, h.total)
        yield hist
        for name, doc, d in (("blockprov_http_received_bytes", "Request body bytes received", self.bytes_in),
                             ("blockprov_http_sent_bytes", "Response body bytes sent", self.bytes_out)):
            c = CounterMetricFamily(name, doc, labels=["route"])
            for r, n in list(d.items()):
                c.add_metric([r], n)
            yield c
        err = CounterMetricFamily("blockprov_http_errors", "Error answers by error class (InternalError: a bug)",
                                  labels=["error"])
        for e, n in list(self.errors.items()):
            err.add_metric([e], n)
        yield err
        yield GaugeMetricFamily("blockprov_http_requests_in_flight", "Requests being answered", value=self.in_flight)
        for name, doc, v in (
                ("blockprov_chunks_served", "Chunks sent (batch fetches and single GETs)", self.chunks_served),
                ("blockprov_chunk_fetches", "Batch chunk fetches answered (POST /v1/chunks/fetch)", self.chunk_fetches),
                ("blockprov_chunks_not_modified", "Chunk GETs answered 304 (an HTTP cache revalidated)",
                 self.chunks_not_modified),
                ("blockprov_chunks_received", "Chunks uploaded", self.chunks_received),
                ("blockprov_chunks_stored_new", "Uploaded chunks the store did not have", self.chunks_new),
                ("blockprov_chunks_missing_asked", "Chunk ids asked about by missing-chunk questions",
                 self.missing_asked)):
            yield CounterMetricFamily(name, doc, value=v)
        if self.manifest_cache is not None:
            hits, misses = self.manifest_cache()
            yield CounterMetricFamily("blockprov_manifest_cache_hits", "Manifests served from memory", value=hits)
            yield CounterMetricFamily("blockprov_manifest_cache_misses", "Manifests read from the catalog",
                                      value=misses)
        if self.chunk_cache is not None:
            hits, misses, joined, size = self.chunk_cache()
            yield CounterMetricFamily("blockprov_chunk_cache_hits", "Chunks served from the server's memory",
                                      value=hits)
            yield CounterMetricFamily("blockprov_chunk_cache_misses", "Chunks read from the object store",
                                      value=misses)
            yield CounterMetricFamily("blockprov_chunk_cache_joined",
                                      "Chunks another request was already reading from the object store", value=joined)
            yield GaugeMetricFamily("blockprov_chunk_cache_bytes", "Bytes of chunks held in memory", value=size)
        if self.site_traffic is not None:
            fam = GaugeMetricFamily("blockprov_site_fetched_bytes",
                                    "Bytes the agents of a site (\"\" for none) took, per version, from their peers, "
                                    "their site cache and this repository, as they last reported them (counted "
                                    "since each agent started)", labels=["site", "image", "version", "source"])
            for row in self.site_traffic():
                for source in SOURCES:
                    fam.add_metric([row["site"] or "", row["image"] or "", row["version"], source], row[source])
            yield fam
        yield GaugeMetricFamily("blockprov_start_time_seconds", "When the server started (Unix time)",
                                value=self.started)


class Measure:
    """Outermost ASGI middleware: counts every answer (also 401, 413 and 500) into ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.m = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.m
        t0 = time.perf_counter()
        status = 500
        got = sent = 0

        async def counting_receive() -> Message:
            nonlocal got
            msg = await receive()
            if msg["type"] == "http.request":
                got += len(msg.get("body", b""))
            return msg

        async def counting_send(msg: Message) -> None:
            nonlocal status, sent
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                sent += len(msg.get("body", b""))
            await send(msg)

        m.in_flight += 1
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            m.in_flight -= 1
            r = scope.get("route")
            route = str(getattr(r, "path_format", None) or scope.get("blockprov.route") or UNKNOWN)
            method = scope["method"]
            key = (method, route, str(status))
            m.requests[key] = m.requests.get(key, 0) + 1
            h = m.seconds.get((method, route))
            if h is None:
                h = m.seconds[(method, route)] = _Hist()
            dt = time.perf_counter() - t0
            h.counts[bisect.bisect_left(BUCKETS, dt)] += 1
            h.total += dt
            e = scope.get("blockprov.error")
            if e is not None or status >= 500:  # set where an error answer is made (app.py, access.py)
                e = str(e or "InternalError")
                m.errors[e] = m.errors.get(e, 0) + 1
            if got:
                m.bytes_in[route] = m.bytes_in.get(route, 0) + got
            if sent:
                m.bytes_out[route] = m.bytes_out.get(route, 0) + sent
