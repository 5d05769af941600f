"""A site cache whose upstream is down (issue 26, from a review): it asked the upstream's
``/openapi.json`` again on every request with a body, and ``/v1/whoami`` on every request once its
answer about the caller's token was a minute old, each time waiting for the failure. Now a down
upstream is asked once per interval (``UPSTREAM_RETRY``), and what the site cache holds is served
without waiting for it.

The upstream here is a real TCP peer on 127.0.0.1 that reads each request's first line (so the
test counts what was asked of it) and then fails it: it closes the connection, or holds it
unanswered (a blackholed uplink)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.retry import Backoff, RetryPolicy
from blockprov.service import sitecache
from blockprov.service.sitecache import SiteCache, create_site_cache_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


class DownUpstream:
    """Accepts, reads a request's first line, counts it by path, then closes (``hold`` False) or
    holds the connection unanswered until ``close``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.asked: Counter[str] = Counter()
        self.hold = False
        self.held: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.settimeout(10)
            buf = b""
            with contextlib.suppress(OSError):
                while b"\r\n" not in buf and len(buf) < 65536:
                    got = c.recv(4096)
                    if not got:
                        break
                    buf += got
            path = buf.split(b" ", 2)[1].decode().split("?")[0] if buf.count(b" ") >= 2 else "?"
            with self.lock:
                self.asked[path] += 1
                if self.hold:
                    self.held.append(c)
                    continue
            c.close()

    def still_held(self) -> int:
        """Held connections the site cache has not closed yet."""
        n = 0
        for c in self.held:
            c.setblocking(False)
            try:
                n += c.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def upstream() -> Iterator[DownUpstream]:
    u = DownUpstream()
    yield u
    u.close()


def test_a_down_upstream_is_asked_once_per_interval(tmp_path: Path, upstream: DownUpstream,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sitecache, "UPSTREAM_RETRY", RetryPolicy(timeout=None, first_delay=600.0, max_delay=600.0,
                                                                 jitter=False))
    sc = SiteCache(tmp_path / "sc", upstream.url, 64 << 20, timeout=60.0)
    data = bytes(range(256)) * 256
    blob = codec.encode(data)
    cid = codec.digest(data)
    sc.store.put(cid, blob)
    # what the upstream said of anonymous callers, two minutes ago (more than DECISION_FRESH, less than STALE)
    key = hashlib.sha256(b"").hexdigest()
    sc._decisions[key] = (time.time() - 120, {"enforced": False})
    now = [time.monotonic()]
    sc.reach = Backoff(sitecache.UPSTREAM_RETRY, clock=lambda: now[0])
    with TestClient(create_site_cache_app(sc)) as c:
        for _ in range(20):  # a held chunk: served each time; the upstream asked once about the token
            r = c.get(f"/v1/chunks/{cid.hex()}")
            assert r.status_code == 200 and r.content == blob
        assert upstream.asked["/v1/whoami"] == 1, upstream.asked
        for _ in range(20):  # bodies passed on: each goes to the upstream (and fails), its limits asked once
            r = c.put("/v1/hosts/52:54:00:00:00:01", json={"ref": "lab:v1"})
            assert r.status_code in (502, 503), r.text  # it closed mid-request: UpstreamCutBody
        assert upstream.asked["/openapi.json"] == 1, upstream.asked
        assert upstream.asked["/v1/hosts/52:54:00:00:00:01"] == 20, upstream.asked
        health = c.get("/v1/health").json()
        assert health["upstream_error"] and health["upstream_ok"] is None, health
        # the interval passes and the uplink now swallows requests: the next chunk is served at once,
        # while one background attempt waits on the upstream (the old code waited for its timeout first)
        upstream.hold = True
        now[0] += 601
        for _ in range(5):
            r = c.get(f"/v1/chunks/{cid.hex()}")
            assert r.status_code == 200 and r.content == blob
        deadline = time.monotonic() + 30
        while upstream.asked["/v1/whoami"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.asked["/v1/whoami"] == 2, upstream.asked
        assert upstream.still_held() == 1  # that attempt is still under way: nobody waited for it
