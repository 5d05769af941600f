"""Several repository servers as one repository: ``--repo URL1,URL2,…`` (agent failover).

The servers are stateless fronts of one repository (one bucket, one catalog), so any of them can
answer any read, and a request one of them failed to answer can be asked of another.

Rules, and why:

* **Reads spread round-robin** over the healthy endpoints (``resolve``, ``images``, ``versions``,
  ``get_blobs``, ``get_blob_views``, ``missing``, ``diff``): N servers share the agents' load.
* **A failure moves the call, not the caller**: on ``RepositoryUnavailable`` (refused or cut
  connection, timeout, torn answer, 5xx) the same call goes at once to the next endpoint, so a server
  killed mid-run loses no request; the failed endpoint is marked down for a back-off (1 s, doubling
  per consecutive failure, at most 30 s) and tried again after it. When every endpoint is down the
  call still tries them all (soonest back first) before raising the last error — then the caller's
  own retry policy (the agent's fetch timeout) takes over.
* **Writes go to the first healthy endpoint** in the order given (one primary, predictable).
  Idempotent writes also fail over: ``put_blobs`` (content-addressed), ``commit`` (a version's id is
  its content; committing it twice records it once), ``set_tag``, ``gc``. ``remove`` does not (a
  second try after a lost answer would report the tag missing), nor does anything else reached
  through ``__getattr__``: the error is raised and the endpoint marked down, so the caller's retry
  goes elsewhere.
* Other errors (not found, corrupt, refused commit) are answers, not failures: they are raised as is.
* A server that hangs instead of dying costs the client's timeout (30 s) before the move.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from blockprov.catalog.records import GcStats, ImageInfo, VersionInfo
from blockprov.errors import BlockprovError, RepositoryUnavailable
from blockprov.manifest import Manifest
from blockprov.names import Ref
from blockprov.repo.remote import RemoteRepository

T = TypeVar("T")
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0

_Blob = bytes | memoryview


@dataclass
class _Endpoint:
    repo: RemoteRepository
    down_until: float = 0.0
    failures: int = 0
    calls: int = 0  # answered calls (for status and tests)


class FailoverRepository:
    def __init__(self, repos: Sequence[RemoteRepository]) -> None:
        if not repos:
            raise ValueError("FailoverRepository needs at least one endpoint")
        self.endpoints = [_Endpoint(r) for r in repos]
        self.url = ",".join(r.url for r in repos)
        self._lock = threading.Lock()
        self._next = 0

    # -- choosing endpoints -----------------------------------------------------------------------
    def _order(self, spread: bool) -> list[_Endpoint]:
        """Healthy endpoints first (rotated for reads, in order for writes), then the down ones."""
        now = time.monotonic()
        with self._lock:
            up = [e for e in self.endpoints if e.down_until <= now]
            down = sorted((e for e in self.endpoints if e.down_until > now), key=lambda e: e.down_until)
            if spread and up:
                k = self._next % len(up)
                self._next += 1
                up = up[k:] + up[:k]
        return up + down

    def _failed(self, e: _Endpoint) -> None:
        with self._lock:
            e.failures += 1
            e.down_until = time.monotonic() + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (e.failures - 1))

    def _answered(self, e: _Endpoint) -> None:
        with self._lock:
            e.failures = 0
            e.down_until = 0.0
            e.calls += 1

    def _call(self, fn: Callable[[RemoteRepository], T], *, spread: bool, failover: bool = True) -> T:
        last: RepositoryUnavailable | None = None
        for e in self._order(spread):
            try:
                out = fn(e.repo)
            except RepositoryUnavailable as err:
                self._failed(e)
                last = err
                if not failover:
                    raise
                continue
            self._answered(e)
            return out
        assert last is not None
        raise last

    def _read(self, fn: Callable[[RemoteRepository], T]) -> T:
        return self._call(fn, spread=True)

    def _write(self, fn: Callable[[RemoteRepository], T], *, idempotent: bool = True) -> T:
        return self._call(fn, spread=False, failover=idempotent)

    def healthy(self) -> list[str]:
        now = time.monotonic()
        return [e.repo.url for e in self.endpoints if e.down_until <= now]

    # -- reading ----------------------------------------------------------------------------------
    def resolve(self, ref: Ref | str) -> Manifest:
        return self._read(lambda r: r.resolve(ref))

    def images(self) -> list[ImageInfo]:
        return self._read(lambda r: r.images())

    def versions(self, name: str) -> list[VersionInfo]:
        return self._read(lambda r: r.versions(name))

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return self._read(lambda r: r.get_blobs(ids))

    def get_blob_views(self, ids: Sequence[bytes]) -> list[_Blob | BlockprovError]:
        return self._read(lambda r: r.get_blob_views(ids))

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        return self._read(lambda r: r.missing(ids))

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]:
        return self._read(lambda r: r.diff(a, b))

    def raw_url(self, ref: Ref | str) -> str | None:
        return self._order(spread=False)[0].repo.raw_url(ref)

    # -- writing ----------------------------------------------------------------------------------
    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        return self._write(lambda r: r.put_blobs(items, trusted=trusted))

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        return self._write(lambda r: r.commit(manifest, tag))

    def set_tag(self, name: str, tag: str, version: str) -> None:
        self._write(lambda r: r.set_tag(name, tag, version))

    def remove(self, ref: Ref | str) -> list[str]:
        return self._write(lambda r: r.remove(ref), idempotent=False)

    def gc(self, grace: float | None = None) -> GcStats:
        return self._write(lambda r: r.gc(grace))

    def __getattr__(self, name: str) -> Any:
        """Anything else a RemoteRepository offers (hosts, profiles, agents, …): the first healthy
        endpoint, no failover within the call (its idempotence is not known here)."""
        if name.startswith("_") or not callable(getattr(self.endpoints[0].repo, name, None)):
            raise AttributeError(name)

        def call(*args: Any, **kw: Any) -> Any:
            return self._write(lambda r: getattr(r, name)(*args, **kw), idempotent=False)

        return call

    def close(self) -> None:
        for e in self.endpoints:
            e.repo.close()
