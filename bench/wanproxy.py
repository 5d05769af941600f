"""A TCP proxy that behaves like a WAN link: fixed one-way delay each way, a bandwidth cap, byte counts.

Why a proxy: these kernels have no ``tc netem``, and the boot benchmark must put every peer (qemu's
http driver, nbdkit's curl plugin, ``qemu-img convert``, blockprov's agent) behind the *same* link to
the *same* repository server. The proxy also counts the bytes in each direction, which is how the
benchmark measures what each peer pulled from the repository.

Model (per direction, shared by all connections, like one physical link): a chunk read at time t is
serialised onto the link at ``depart = max(t, link_free) + bytes / rate`` (so the link never carries
more than ``rate``; a fluid token bucket with no burst), then delivered at ``depart + delay``. Chunks
are released at their delivery time, not one request at a time: a stream keeps flowing, data in
flight is pipelined, and the order within a connection is preserved. A new connection waits one
round trip before its first bytes move (the TCP handshake a real WAN would cost). Memory is bounded:
a connection reads no further while more than ``max(4 MiB, 4 × bandwidth-delay product)`` waits in
it (the sender then sees ordinary TCP back-pressure).

Use as a module (``ProxyThread`` runs it on its own event loop in a thread; ``stats()``,
``reset()``) or as a program::

    python bench/wanproxy.py --listen 127.0.0.1:0 --to 127.0.0.1:8420 --rtt 20ms --rate 1gbit

which prints its address (``127.0.0.1:PORT``) on the first line, serves until SIGINT/SIGTERM or
``--max-seconds`` (default one hour), then prints its byte counts as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

READ_SIZE = 256 * 1024
EPOLL_GRAIN = 0.001  # asyncio wakes no finer than this (see sleep_until)


def parse_duration(text: str) -> float:
    """'20ms', '0.02s', '20' (ms) → seconds."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(us|ms|s)?\s*", text)
    if not m:
        raise ValueError(f"bad duration {text!r}")
    v = float(m.group(1))
    return v * {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}[m.group(2)]


def parse_rate(text: str) -> float | None:
    """'1gbit', '100mbit', '500kbit', '1e9' (bits/s) → bytes per second; '0' / 'none' → unlimited."""
    t = text.strip().lower()
    if t in ("0", "none", "unlimited", "inf"):
        return None
    m = re.fullmatch(r"([\d.e+]+)\s*([kmg]?)(bit|bps|b)?(/s)?", t)
    if not m:
        raise ValueError(f"bad rate {text!r}")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    if m.group(3) == "b" and m.group(2):  # "125MB" style: bytes
        bits *= 8
    return bits / 8


@dataclass
class Link:
    """One direction of the link: when it is next free, and how many bytes it carried."""

    delay: float
    rate: float | None  # bytes per second; None: unlimited
    free_at: float = 0.0
    bytes: int = 0

    def schedule(self, n: int, now: float) -> float:
        """Delivery time of ``n`` bytes read at ``now``."""
        self.bytes += n
        if self.rate is None:
            return now + self.delay
        self.free_at = max(now, self.free_at) + n / self.rate
        return self.free_at + self.delay


@dataclass
class Stats:
    connections: int = 0
    open: int = 0
    errors: list[str] = field(default_factory=list)


class WanProxy:
    """The proxy on the running event loop: ``await start()``, ``await close()``."""

    def __init__(self, target: tuple[str, int], *, listen: tuple[str, int] = ("127.0.0.1", 0),
                 rtt: float = 0.020, rate: float | None = 125e6, handshake: bool = True) -> None:
        self.target = target
        self.listen = listen
        self.rtt = rtt
        self.up = Link(rtt / 2, rate)  # client → server
        self.down = Link(rtt / 2, rate)  # server → client
        self.handshake = handshake
        self.limit = max(4 << 20, int(4 * (rate or 0) * rtt))
        self.stats = Stats()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self.listen[0], self.listen[1])
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def counts(self) -> dict[str, int]:
        return {"up_bytes": self.up.bytes, "down_bytes": self.down.bytes, "connections": self.stats.connections}

    def reset(self) -> None:
        self.up.bytes = self.down.bytes = 0
        self.stats.connections = 0

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.stats.connections += 1
        self.stats.open += 1
        swriter: asyncio.StreamWriter | None = None
        try:
            if self.handshake and self.rtt > 0:
                await asyncio.sleep(self.rtt)
            sreader, swriter = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            up = asyncio.ensure_future(self._pump(creader, swriter, self.up))
            down = asyncio.ensure_future(self._pump(sreader, cwriter, self.down))
            try:
                # The server's EOF (after its delay) or any error ends the whole connection: HTTP servers
                # close fully, and a client must see that (not a half-closed socket it would send into).
                # A client's EOF is only a half-close: the server may still answer.
                pending = {up, down}
                while pending:
                    finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if down in finished or any(t.exception() for t in finished):
                        break
            finally:
                for t in (up, down):
                    if not t.done():
                        t.cancel()
                await asyncio.gather(up, down, return_exceptions=True)
        except (TimeoutError, OSError) as e:
            self.stats.errors.append(repr(e)[:200])
        finally:
            self.stats.open -= 1
            for w in (cwriter, swriter):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        """Read as data arrives, release each chunk at its delivery time; EOF travels the same way."""
        loop = asyncio.get_running_loop()
        queue: deque[tuple[float, bytes]] = deque()
        waiting = 0
        more = asyncio.Event()  # something was queued
        room = asyncio.Event()  # the queue went under the limit
        room.set()

        async def sender() -> None:
            nonlocal waiting
            while True:
                while not queue:
                    more.clear()
                    await more.wait()
                at, data = queue.popleft()
                await sleep_until(loop, at)
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        if writer.can_write_eof() and not writer.is_closing():
                            writer.write_eof()
                    return
                if writer.is_closing():
                    raise ConnectionResetError("peer went away")
                writer.write(data)
                await writer.drain()
                waiting -= len(data)
                if waiting <= self.limit:
                    room.set()

        send = asyncio.ensure_future(sender())
        try:
            while not send.done():
                await room.wait()
                data = await reader.read(READ_SIZE)
                now = loop.time()
                queue.append((link.schedule(len(data), now) if data else now + link.delay, data))
                more.set()
                if not data:
                    break
                waiting += len(data)
                if waiting > self.limit:
                    room.clear()
            await send
        finally:
            if not send.done():
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await send


async def sleep_until(loop: asyncio.AbstractEventLoop, at: float) -> None:
    """Wait until ``loop.time()`` reaches ``at``, to about 0.1 ms.

    asyncio's timers wake on epoll's 1 ms grain (selectors rounds the timeout up to whole
    milliseconds), so ``asyncio.sleep(0.00025)`` lasts 1 ms or more: the 0.5 ms LAN link measured
    2.5 ms a round trip (p50, 200-byte echo, load 6). The loop sleeps to within a grain of ``at``;
    the rest (< 1 ms, the proxy's loop blocked that long) is ``time.sleep``, which is precise."""
    pause = at - loop.time()
    if pause > EPOLL_GRAIN:
        await asyncio.sleep(pause - EPOLL_GRAIN)
        pause = at - loop.time()
    if pause > 0:
        time.sleep(pause)


class ProxyThread:
    """A ``WanProxy`` on its own event loop in a daemon thread, for synchronous callers (benchmarks)."""

    def __init__(self, target: tuple[str, int], *, rtt: float = 0.020, rate: float | None = 125e6,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.proxy = WanProxy(target, listen=listen, rtt=rtt, rate=rate)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="wanproxy", daemon=True)
        self.address = ""

    def __enter__(self) -> ProxyThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> str:
        self._thread.start()
        self.address = asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self.address

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stats(self) -> dict[str, int]:
        return asyncio.run_coroutine_threadsafe(_call(self.proxy.counts), self._loop).result(10)

    def reset(self) -> None:
        asyncio.run_coroutine_threadsafe(_call(self.proxy.reset), self._loop).result(10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


async def _call(fn: object) -> object:
    assert callable(fn)
    return fn()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _main(a: argparse.Namespace) -> None:
    proxy = WanProxy(_hostport(a.to), listen=_hostport(a.listen), rtt=parse_duration(a.rtt), rate=parse_rate(a.rate))
    print(await proxy.start(), flush=True)
    rate = parse_rate(a.rate)
    print(f"wanproxy: {proxy.address} → {a.to}, rtt {proxy.rtt * 1000:g} ms, "
          f"rate {'unlimited' if rate is None else f'{rate * 8 / 1e6:g} Mbit/s'}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.monotonic()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), a.max_seconds)
    await proxy.close()
    print(json.dumps(proxy.counts() | {"seconds": round(time.monotonic() - t0, 3)}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="TCP proxy adding WAN-like delay and a bandwidth cap.")
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0 picks one)")
    ap.add_argument("--to", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--rtt", default="20ms", help="round-trip time added (half each way); default 20ms")
    ap.add_argument("--rate", default="1gbit", help="bandwidth cap per direction (1gbit, 100mbit, none)")
    ap.add_argument("--max-seconds", type=float, default=3600.0, help="stop after this long (default 1 h)")
    asyncio.run(_main(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
