"""Prometheus metrics of an agent (``attach --metrics HOST:PORT``).

Why it is shaped like this:

* **Nothing on the hot path.** The NBD server, the fetcher and the hydrator already keep plain
  counters (``ServerStats``, ``FetchStats``, the hydrator's status); a custom collector reads them
  when Prometheus scrapes, and the chunk counts come from one ``bytes.translate`` over the chunk map.
  No lock and no metric object is touched by a read or a write.
* **A tiny HTTP listener on the agent's own event loop**, not prometheus_client's threaded server:
  the collector then runs on the thread that mutates those counters, so it never sees a deque
  change size under it, and the agent gains no thread. It answers ``GET /metrics`` (and ``/``)
  with the text format, one request per connection; anything else is 404/405. A scrape is bounded
  (8 KiB of request head, 5 s to send it) so a stuck client costs one idle socket.
* The listener should stay on loopback or a management network: metrics carry no secrets, but
  image names and instance ids are the operator's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from blockprov.agent.hydrate import HydrationStatus
from blockprov.cache import LATENCY_BUCKETS, CacheDevice
from blockprov.nbd.server import ServerStats

log = logging.getLogger("blockprov.agent")

HEAD_LIMIT = 8192
HEAD_TIMEOUT = 5.0


class AgentCollector(Collector):
    """Reads one instance's live counters at scrape time."""

    def __init__(self, device: Callable[[], CacheDevice | None], nbd: Callable[[], ServerStats | None],
                 hydration: Callable[[], HydrationStatus | None], labels: Callable[[], dict[str, str]]) -> None:
        self.device = device
        self.nbd = nbd
        self.hydration = hydration
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        dev = self.device()
        if dev is None or dev.closed:
            return
        info = self.labels()
        if info:
            yield _info(info)
        counts = dev.chunks.counts()
        chunks = GaugeMetricFamily("blockprov_agent_chunks", "Chunks of the instance by state", labels=["state"])
        for state in ("present", "zero", "modified", "missing"):
            chunks.add_metric([state], counts[state])
        yield chunks
        total = counts["total"] or 1
        yield GaugeMetricFamily("blockprov_agent_chunks_total", "Chunks in the version", value=counts["total"])
        yield GaugeMetricFamily("blockprov_agent_local_ratio",
                                "Share of chunks held locally (with data or known zero), 0 to 1",
                                value=(counts["total"] - counts["missing"]) / total)
        yield GaugeMetricFamily("blockprov_agent_chunk_size_bytes", "Chunk size", value=dev.manifest.chunk_size)
        st = dev.fetch_stats
        if st is not None:
            for name, doc, v in (
                    ("blockprov_agent_fetched_bytes", "Plain bytes of verified chunks fetched", st.bytes_fetched),
                    ("blockprov_agent_fetch_wire_bytes", "Stored (compressed) bytes received", st.wire_bytes),
                    ("blockprov_agent_fetched_chunks", "Chunks fetched from the repository", st.chunks_fetched),
                    ("blockprov_agent_fetch_batches", "Fetch batches (repository round trips)", st.batches),
                    ("blockprov_agent_fetch_failed_batches", "Fetch batches that failed", st.failed_batches),
                    ("blockprov_agent_corrupt_chunks", "Fetched chunks that failed verification", st.corrupt_chunks),
                    ("blockprov_agent_readahead_chunks", "Chunks asked for by read-ahead", st.readahead_chunks)):
                yield CounterMetricFamily(name, doc, value=v)
            hist = HistogramMetricFamily("blockprov_agent_fetch_latency_seconds",
                                         "Fetch batch latency: repository round trip and verification")
            acc, buckets = 0, []
            for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), list(st.latency_counts), strict=True):
                acc += n
                buckets.append((bound, acc))
            hist.add_metric([], buckets, st.latency_sum)
            yield hist
        nbd = self.nbd()
        if nbd is not None:
            yield GaugeMetricFamily("blockprov_agent_nbd_connections", "NBD connections open",
                                    value=nbd.connections_active)
            for name, doc, v in (
                    ("blockprov_agent_nbd_connections_opened", "NBD connections accepted", nbd.connections_total),
                    ("blockprov_agent_nbd_requests", "NBD requests answered", nbd.requests),
                    ("blockprov_agent_nbd_errors", "NBD error replies", nbd.errors),
                    ("blockprov_agent_nbd_protocol_errors", "NBD connections ended by a malformed frame",
                     nbd.protocol_errors),
                    ("blockprov_agent_nbd_timeouts", "NBD connections dropped for stalling mid-request",
                     nbd.timeouts),
                    ("blockprov_agent_nbd_write_timeouts", "NBD connections dropped for taking none of their "
                     "replies", nbd.write_timeouts),
                    ("blockprov_agent_nbd_read_bytes", "Bytes read by NBD clients", nbd.bytes_read),
                    ("blockprov_agent_nbd_written_bytes", "Bytes written by NBD clients", nbd.bytes_written)):
                yield CounterMetricFamily(name, doc, value=v)
        h = self.hydration()
        if h is not None:
            yield GaugeMetricFamily("blockprov_agent_hydration_running", "1 while hydration copies chunks",
                                    value=1.0 if h.state == "running" else 0.0)
            yield GaugeMetricFamily("blockprov_agent_hydration_rate_bytes_per_second",
                                    "Hydration's recent transfer rate", value=float(h.rate_bytes_per_s))
            yield CounterMetricFamily("blockprov_agent_hydration_bytes", "Bytes copied by hydration",
                                      value=int(h.bytes_fetched))


def _info(labels: dict[str, str]) -> Metric:
    g = GaugeMetricFamily("blockprov_agent_info", "What this agent serves", labels=list(labels))
    g.add_metric(list(labels.values()), 1)
    return g


def registry_for(collector: AgentCollector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    return reg


class MetricsListener:
    """``GET /metrics`` over HTTP/1.1 on the running event loop (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self, host: str, port: int) -> str:
        self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        h, p = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://[{h}]:{p}/metrics" if ":" in h else f"http://{h}:{p}/metrics"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if path not in ("/metrics", "/"):
                status, body, ctype = "404 Not Found", b"not found: try /metrics\n", "text/plain"
            elif method not in ("GET", "HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            else:
                status, body, ctype = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                ValueError):
            pass  # a client that sends nonsense or nothing gets nothing
        except Exception:  # a bug in a collector must not take the agent down
            log.exception("metrics scrape failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
