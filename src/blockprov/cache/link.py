"""What a link costs: its round trip and bandwidth, estimated from the fetches that crossed it. Pure.

The fetcher sizes a random miss's speculative neighbourhood by the bandwidth-delay product of the
link it fetches over (cache/fetcher.py, ``neighbourhood_span``). Two links have one: the one the
fetcher talks to (the repository, a site cache, or the site's peers), and, for an agent whose
chunks come through its peers, the site's uplink to the repository, which the owners of chunks
cross (cache/peers.py). Why the uplink's counts there: thirty agents that each speculate by their
own link's figures pull the *union* of their speculation over the uplink, and on a loaded machine
the LAN's measured round trip is the agents' CPU queueing (62–187 ms at thirty agents on two
cores, bench/RESULTS.md "Boot storm") times the LAN's bandwidth: up to the cap, eight MiB a miss.

Round trip: the least time of recent small fetches, as TCP's BBR takes its minimum RTT: queueing
(a busy machine keeping the agent or the server from running) only ever adds to a sample, so the
minimum over a window is the link's own cost. Bandwidth: a large fetch's time beyond a round trip
is its bytes crossing the link, smoothed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

DEFAULT_BANDWIDTH = 125e6  # bytes/s assumed until a large fetch measured the link (1 Gbit/s)
MAX_BANDWIDTH = 1.25e9  # the most a measurement is believed (a fetch that took about a round trip)
BANDWIDTH_SAMPLE_BYTES = 256 << 10  # a fetch this large (on the wire) measures the bandwidth
SMALL_FETCH = 4  # chunks: a fetch this small takes about a round trip
RTT_WINDOW = 64  # small fetches whose least time is the link's round trip


class LinkEstimate:
    """Round trip and bandwidth of one link, from ``observe``'d fetches (not thread-safe: one
    writer; readers may see a value one sample old)."""

    def __init__(self, window: int = RTT_WINDOW, *, believe_first: bool = False) -> None:
        # ``believe_first``: the first measurement replaces the assumed 1 Gbit/s (else it is smoothed
        # in from it, as the fetcher has always done for its own link)
        self._rtts: deque[float] = deque(maxlen=window)
        self._believe_first = believe_first
        self.bandwidth = DEFAULT_BANDWIDTH  # bytes/s on the wire
        self.bandwidth_measured = False

    @property
    def rtt(self) -> float:
        """Seconds; 0 until a small fetch was seen."""
        return min(self._rtts) if self._rtts else 0.0

    def observe(self, seconds: float, chunks: int, wire: int) -> None:
        """One fetch of ``chunks`` chunks (``wire`` bytes as they crossed) that took ``seconds``."""
        if chunks <= SMALL_FETCH:
            self._rtts.append(seconds)
        elif wire >= BANDWIDTH_SAMPLE_BYTES and self._rtts:
            bw = wire / max(seconds - self.rtt, seconds / 8)
            self.bandwidth = min(MAX_BANDWIDTH, bw if self._believe_first and not self.bandwidth_measured
                                 else 0.7 * self.bandwidth + 0.3 * bw)
            self.bandwidth_measured = True


@runtime_checkable
class SharedUplink(Protocol):
    """An optional capability of the ``BlobSource`` under a fetcher (cache/peers.py has it): the
    site's uplink, while chunks come through peers that share it (None: they do not, or no peer)."""

    def uplink(self) -> LinkEstimate | None:
        ...


@runtime_checkable
class PeerHeld(Protocol):
    """An optional capability of the ``BlobSource`` under a fetcher (cache/peers.py): blobs of only
    what the site already holds (its peers, its site cache; None for the rest), nothing fetched
    over the uplink. While ``speculate_held`` says so (the agent has peers, or its repository is a
    site cache), the fetcher's speculative neighbourhoods go here."""

    def speculate_held(self) -> bool:
        ...

    def get_held(self, ids: Sequence[bytes]) -> Sequence[bytes | memoryview | None]:
        ...


@runtime_checkable
class NearRegions(Protocol):
    """An optional capability of the ``BlobSource`` under a fetcher (cache/peers.py): while
    ``near_regions`` says so (a site cache below, no peers), a demand miss asks its whole aligned
    region in its own request (cache/fetcher.py, ``NEAR_REGION``)."""

    def near_regions(self) -> bool:
        ...

