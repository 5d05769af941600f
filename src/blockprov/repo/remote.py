"""A repository reached over HTTP (``blockprov serve``): the same interface, the same errors.

Why it is shaped like this:

* **Same errors as LocalRepository.** The service answers ``{"error": ClassName, "details": …}``;
  we rebuild that very class from ``blockprov.errors`` (MissingChunks keeps its list), so callers
  never care which repository they hold. Anything the server could not answer — refused
  connection, timeout, a torn response, any 5xx — is ``RepositoryUnavailable``, the one error the
  retry helper treats as temporary.
* **Nothing is trusted.** A manifest asked for by id must hash to that id (invariant 6 for
  manifests); one asked for by tag must hash to the id the server says it resolved to. Blobs are
  returned unverified, as the protocol says, and every consumer verifies them with
  ``codec.decode``.
* **Few round trips.** ``get_blobs`` sends ids in batches sized to about 16 MiB of answer (it
  learns the average blob size as it goes), ``missing`` sends up to 64 Ki ids per question and
  ``put_blobs`` frames uploads into ≤ 16 MiB POSTs. Repeated ids are asked for once.
* **The agent's cold read skips httpx.** ``POST /v1/chunks/fetch`` is the one request whose cost
  matters (it carries every byte an agent fetches): httpx spent more CPU per byte on it than the
  decompression and the hashing together (~300 MB/s in one thread). ``get_blob_views`` sends it
  on a pool of keep-alive ``http.client`` connections and reads the body with ``readinto`` into
  one preallocated buffer; the blobs are read-only ``memoryview`` slices of it (no copy per blob).
  A request that fails on a reused connection before any answer arrived (the server closed it
  while idle) is sent once more on a fresh one; any other failure is ``RepositoryUnavailable``.
  Used for ``http(s)://`` URLs without a proxy and without a caller-supplied client; otherwise
  (tests, proxies) the request goes through httpx like every other.
* **Thread-safe.** One ``httpx.Client`` (a keep-alive connection pool with its own locking) is
  shared by the importer's and exporter's worker threads; the object holds no other mutable state
  but a size estimate.
* Tests pass a ``starlette.testclient.TestClient`` as ``client`` to run against the app in-process.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import urllib.parse
import urllib.request
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import httpx

from .. import __version__, codec, errors
from ..errors import BlockprovError, ManifestError, RepositoryUnavailable
from ..manifest import Manifest
from ..names import Ref, image_name, parse_ref, tag_name, version_id
from .base import GcStats, ImageInfo, VersionInfo

BATCH_BYTES = 16 << 20  # target size of one fetch answer or one upload
MISSING_BATCH = 65536  # ids per /v1/chunks/missing question (2 MiB)
MAX_FETCH_IDS = 4096
LEN = struct.Struct("<I")
ID = codec.DIGEST_SIZE
OCTETS = {"content-type": "application/octet-stream"}

_BY_STATUS: dict[int, type[BlockprovError]] = {
    400: errors.UsageError, 404: errors.NotFound, 409: errors.Conflict, 413: errors.TooLarge,
    422: errors.IntegrityError,
}


def _as_ref(ref: Ref | str) -> Ref:
    return ref if isinstance(ref, Ref) else parse_ref(ref)


def _rel(r: Ref) -> str:
    """How the API names a version of an image in a path or query: ``TAG`` or ``@ID``."""
    return f"@{r.version}" if r.version else str(r.tag)


_Blob = bytes | memoryview


class _RawPost:
    """Keep-alive ``http.client`` connections for one hot POST (see the module docstring)."""

    KEEP = 16  # idle connections kept

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        self.host = u.hostname or "localhost"
        self.port = u.port
        self.https = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"user-agent": f"blockprov/{__version__}", "content-type": OCTETS["content-type"],
                        "accept-encoding": "identity"}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @staticmethod
    def usable(url: str) -> bool:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.query:
            return False
        proxies = urllib.request.getproxies()
        if u.scheme in proxies or "all" in proxies:
            return bool(urllib.request.proxy_bypass(u.hostname))
        return True

    def _connect(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def post(self, path: str, body: bytes) -> tuple[int, list[tuple[str, str]], memoryview]:
        """Status, headers and body (read-only) of one POST. Raises OSError / HTTPException."""
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            answered = False
            try:
                conn.request("POST", self.prefix + path, body=body, headers=self.headers)
                resp = conn.getresponse()
                answered = True
                data = _read_body(resp)
            except (OSError, http.client.HTTPException):
                conn.close()
                if reused and not answered and attempt == 0:
                    continue  # the server closed an idle keep-alive connection: once more, fresh
                raise
            if resp.will_close:
                conn.close()
            else:
                with self._lock:
                    if len(self._idle) < self.KEEP:
                        self._idle.append(conn)
                        conn = None
                if conn is not None:
                    conn.close()
            return resp.status, resp.getheaders(), data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def _read_body(resp: http.client.HTTPResponse) -> memoryview:
    n = resp.length
    if n is None:  # not framed by Content-Length (chunked, or until close)
        return memoryview(resp.read()).toreadonly()
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = resp.readinto(view[got:])
        if not k:
            raise http.client.IncompleteRead(b"", n - got)
        got += k
    return view.toreadonly()


class RemoteRepository:
    def __init__(self, url: str, *, timeout: float = 30.0, client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._own_client = client is None
        self.client = client if client is not None else httpx.Client(
            timeout=timeout, headers={"user-agent": f"blockprov/{__version__}"},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
        self._avg_blob = 64 << 10  # learned from answers; sizes the next fetch batch
        self._raw = _RawPost(self.url, timeout) if client is None and _RawPost.usable(self.url) else None

    # -- plumbing ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, slow: bool = False, **kw: Any) -> httpx.Response:
        if slow and self._own_client:  # a caller-supplied client keeps its own timeouts
            kw["timeout"] = httpx.Timeout(self.timeout, read=None)
        try:
            r = self.client.request(method, self.url + path, **kw)
        except httpx.TransportError as e:
            raise RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}" if str(e)
                                        else type(e).__name__) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> BlockprovError:
        """The error the server reported, rebuilt as the class it raised where we know it."""
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        message = str(body.get("message") or r.text[:200] or r.reason_phrase)
        if r.status_code >= 500:
            return RepositoryUnavailable(url=self.url, why=f"HTTP {r.status_code}: {message}")
        name = body.get("error")
        cls = getattr(errors, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, BlockprovError):
            if cls is errors.MissingChunks:
                return errors.MissingChunks([str(m) for m in body.get("missing") or []])
            details = body.get("details")
            try:
                return cls(**details) if isinstance(details, dict) and details else cls(message)
            except TypeError:
                pass
        return _BY_STATUS.get(r.status_code, BlockprovError)(message)

    def __enter__(self) -> RemoteRepository:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._own_client:
            self.client.close()

    # -- reading ----------------------------------------------------------------------------------
    def resolve(self, ref: Ref | str) -> Manifest:
        r = _as_ref(ref)
        resp = self._request("GET", f"/v1/images/{r.name}/manifest", params={"ref": _rel(r)})
        m = Manifest.from_json(resp.content)
        got = m.id
        claimed = r.version or resp.headers.get("x-blockprov-version")
        if claimed is not None and got != claimed:
            raise ManifestError(why=f"manifest served for {r} hashes to {got}, not {claimed}")
        if m.image != r.name:
            raise ManifestError(why=f"manifest served for {r} describes image {m.image!r}")
        return m

    def images(self) -> list[ImageInfo]:
        return [ImageInfo(**d) for d in self._request("GET", "/v1/images").json()["images"]]

    def versions(self, name: str) -> list[VersionInfo]:
        d = self._request("GET", f"/v1/images/{image_name(name)}/versions").json()
        return [VersionInfo(**v) for v in d["versions"]]

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return [b if type(b) is bytes else bytes(b) for b in self.get_blob_views(ids)]

    def get_blob_views(self, ids: Sequence[bytes]) -> list[_Blob]:
        """Like ``get_blobs``, but blobs may be read-only memoryviews of the answer (no copies)."""
        out: list[_Blob] = []
        i = 0
        while i < len(ids):
            n = max(16, min(MAX_FETCH_IDS, BATCH_BYTES // max(1, self._avg_blob)))
            out.extend(self._fetch(ids[i:i + n]))
            i += n
        return out

    def _post_fetch(self, body: bytes) -> bytes | memoryview:
        if self._raw is None:
            return self._request("POST", "/v1/chunks/fetch", content=body, headers=OCTETS).content
        try:
            status, headers, data = self._raw.post("/v1/chunks/fetch", body)
        except (OSError, http.client.HTTPException) as e:
            raise RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}" if str(e)
                                        else type(e).__name__) from None
        if status >= 400:
            raise self._error(httpx.Response(status, headers=headers, content=bytes(data)))
        return data

    def _fetch(self, batch: Sequence[bytes]) -> list[_Blob]:
        uniq = list(dict.fromkeys(batch))
        data = self._post_fetch(b"".join(uniq))
        view = memoryview(data)
        got: dict[bytes, _Blob] = {}
        pos, end = 0, len(view)
        for cid in uniq:
            if end - pos < LEN.size:
                raise RepositoryUnavailable(url=self.url, why="truncated chunk batch")
            (n,) = LEN.unpack_from(view, pos)
            pos += LEN.size
            if end - pos < n:
                raise RepositoryUnavailable(url=self.url, why="truncated chunk batch")
            got[cid] = view[pos:pos + n]
            pos += n
        if pos != end:
            raise RepositoryUnavailable(url=self.url, why=f"{end - pos} unexpected bytes after a chunk batch")
        if uniq:
            self._avg_blob = max(1, end // len(uniq))
        return [got[c] for c in batch]

    def missing(self, ids: Sequence[bytes]) -> list[bytes]:
        uniq = [c for c in dict.fromkeys(ids) if c != codec.ZERO_DIGEST]
        out: list[bytes] = []
        for i in range(0, len(uniq), MISSING_BATCH):
            data = self._request("POST", "/v1/chunks/missing", content=b"".join(uniq[i:i + MISSING_BATCH]),
                                 headers=OCTETS).content
            if len(data) % ID:
                raise RepositoryUnavailable(url=self.url, why="torn answer to a missing-chunks question")
            out.extend(data[j:j + ID] for j in range(0, len(data), ID))
        return out

    def diff(self, a: Ref | str, b: Ref | str) -> list[int]:
        ra, rb = _as_ref(a), _as_ref(b)
        d = self._request("GET", f"/v1/images/{ra.name}/diff", params={"a": _rel(ra), "b": str(rb)}).json()
        return [int(i) for i in d["changed"]]

    def raw_url(self, ref: Ref | str) -> str | None:
        r = _as_ref(ref)
        return f"{self.url}/v1/images/{r.name}/raw/{_rel(r)}"

    # -- writing ----------------------------------------------------------------------------------
    def put_blobs(self, items: Sequence[tuple[bytes, bytes]], *, trusted: bool = False) -> int:
        new = 0
        frames: list[bytes] = []
        size = 0
        for cid, blob in items:
            if len(cid) != ID:
                raise errors.InvalidName(kind="chunk id", name=cid.hex(), why=f"must be {ID} bytes")
            if frames and size + len(blob) + ID + LEN.size > BATCH_BYTES:
                new += self._upload(frames)
                frames, size = [], 0
            frames += (cid, LEN.pack(len(blob)), blob)
            size += len(blob) + ID + LEN.size
        if frames:
            new += self._upload(frames)
        return new

    def _upload(self, frames: list[bytes]) -> int:
        return int(self._request("POST", "/v1/chunks", content=b"".join(frames), headers=OCTETS).json()["new"])

    def commit(self, manifest: Manifest, tag: str | None = None) -> str:
        raw = manifest.to_json()
        params = {"tag": tag_name(tag)} if tag is not None else {}
        d = self._request("POST", f"/v1/images/{manifest.image}/versions", content=raw, params=params,
                          headers={"content-type": "application/json"}).json()
        vid, expected = str(d["id"]), manifest.id
        if vid != expected:
            raise ManifestError(why=f"repository recorded version {vid}, but the manifest sent hashes to {expected}")
        return vid

    def set_tag(self, name: str, tag: str, version: str) -> None:
        self._request("PUT", f"/v1/images/{image_name(name)}/tags/{tag_name(tag)}",
                      json={"version": version_id(version)})

    def remove(self, ref: Ref | str) -> list[str]:
        r = _as_ref(ref)
        path = f"/versions/{r.version}" if r.version else f"/tags/{r.tag}"
        return [str(x) for x in self._request("DELETE", f"/v1/images/{r.name}{path}").json()["removed"]]

    def gc(self, grace: float | None = None) -> GcStats:
        """Server-side gc; ``grace`` (seconds) overrides the server's default protection of young chunks."""
        params = {"grace": grace} if grace is not None else {}
        return GcStats(**self._request("POST", "/v1/gc", params=params, slow=True).json())
