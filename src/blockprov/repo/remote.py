"""A repository reached over HTTP (``blockprov serve``): the same interface, the same errors.

Why it is shaped like this:

* **Same errors as LocalRepository.** The service answers ``{"error": ClassName, "details": …}``;
  we rebuild that very class from ``blockprov.errors`` (MissingChunks keeps its list), so callers
  never care which repository they hold. Anything the server could not answer — refused
  connection, timeout, a torn response, any 5xx — is ``RepositoryUnavailable``, the one error the
  retry helper treats as temporary.
* **Nothing is trusted.** A manifest asked for by id must hash to that id (docs/architecture.md,
  invariant 6, for manifests); one asked for by tag must hash to the id the server says it resolved
  to. Blobs are returned unverified, as the protocol says, and every consumer verifies them with
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
* **Cacheable mode** (``cacheable=True``, ``attach --cacheable-fetch``): a POST is never cached by
  an HTTP cache, so with a cache (nginx, a CDN) between agents and the repository, ``get_blob_views``
  asks ``GET /v1/chunks/{id}`` for each chunk instead, ``GET_WORKERS`` at a time. Those answers are
  immutable with strong ETags: the cache serves every agent after the first. Costs a request per
  chunk, so it is off by default.
* **Tokens and TLS** (``token=``, ``ca=``; ``--token``/``--ca``): the token goes as
  ``Authorization: Bearer …`` on every request, the fast fetch path and cacheable GETs included;
  one ``ssl.SSLContext`` (the system's trust store, or only ``ca`` when given) serves both httpx and
  ``http.client``, so both paths trust exactly the same servers. A certificate that fails
  verification is ``UntrustedServer``, not ``RepositoryUnavailable``: retrying or failing over cannot
  fix a configuration problem, and the message names ``--ca``.
* Tests pass a ``starlette.testclient.TestClient`` as ``client`` to run against the app in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import httpx

from blockprov import __version__, boot, codec, errors, names
from blockprov.catalog.records import BootFilesInfo, GcStats, HostInfo, ImageInfo, SiteInfo, VersionInfo
from blockprov.errors import (
    BlockprovError,
    ManifestError,
    NotHeld,
    RepositoryUnavailable,
    StaleConnection,
    UntrustedServer,
    UsageError,
)
from blockprov.manifest import Manifest
from blockprov.names import (
    Ref,
    host_id,
    image_name,
    instance_id,
    kernel_args,
    op_name,
    parse_ref,
    request_id,
    site_name,
    tag_name,
    version_id,
)
from blockprov.retry import RetryPolicy, retry_sync

BATCH_BYTES = 16 << 20  # target size of one fetch answer or one upload
# A POST on an idle keep-alive connection the server closed meanwhile goes once more, at once.
STALE_RETRY = RetryPolicy(timeout=None, first_delay=0.0, max_delay=0.0, max_attempts=2)
MISSING_BATCH = 65536  # ids per /v1/chunks/missing question (2 MiB)
MAX_FETCH_IDS = 4096
GET_WORKERS = 16  # parallel per-chunk GETs in cacheable mode
LEN = struct.Struct("<I")
ABSENT = 0xFFFFFFFF  # a frame's length for a chunk the server does not give (a site cache's partial answer)
PARTIAL = {"x-blockprov-partial": "1"}  # this client takes partial fetch answers (service/sitecache.py)
# only what the site cache holds, nothing pulled from its upstream: a speculative fetch (``get_held_views``)
HELD_ONLY = {"x-blockprov-held-only": "1"}
ID = codec.DIGEST_SIZE
OCTETS = {"content-type": "application/octet-stream"}

_BY_STATUS: dict[int, type[BlockprovError]] = {
    400: errors.UsageError, 401: errors.Unauthorized, 403: errors.AccessDenied, 404: errors.NotFound,
    409: errors.Conflict, 413: errors.TooLarge, 422: errors.IntegrityError,
}


def tls_context(ca: str | None = None) -> ssl.SSLContext:
    """The client's TLS trust: the system's CAs (and SSL_CERT_FILE / SSL_CERT_DIR), or only ``ca``."""
    try:
        return ssl.create_default_context(cafile=ca)
    except FileNotFoundError:
        raise UsageError(f"--ca {ca}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"--ca {ca}: not a PEM certificate file ({e})") from None


def auth_headers(token: str | None) -> dict[str, str]:
    """``Authorization: Bearer TOKEN`` (nothing without a token); a token must be printable ASCII."""
    if not token:
        return {}
    if not all(0x21 <= ord(c) <= 0x7E for c in token) or len(token) > 1024:
        raise UsageError("--token must be printable ASCII without spaces (as `blockprov token create` prints it)")
    return {"authorization": f"Bearer {token}"}


def _cert_failure(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind a transport error, if that is what it was."""
    seen: BaseException | None = e
    for _ in range(8):  # bounded walk down the cause chain
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _as_ref(ref: Ref | str) -> Ref:
    return ref if isinstance(ref, Ref) else parse_ref(ref)


def _host_info(d: dict[str, Any]) -> HostInfo:
    """A host record as the server sent it; fields this client does not know (a newer server's
    settings) are left out rather than refused."""
    known = {f.name for f in dataclasses.fields(HostInfo)}
    return HostInfo(**{k: v for k, v in d.items() if k in known})


def _rel(r: Ref) -> str:
    """How the API names a version of an image in a path or query: ``TAG`` or ``@ID``."""
    return f"@{r.version}" if r.version else str(r.tag)


_Blob = bytes | memoryview


class KeepAlivePost:
    """Keep-alive ``http.client`` connections for one hot POST (see the module docstring); also the
    peer client's (cache/peers.py), which adds a header per call (its ticket changes)."""

    KEEP = 16  # idle connections kept

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        u = urllib.parse.urlsplit(url)
        self.url = url
        self.host = u.hostname or "localhost"
        self.port = u.port
        self.https = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"user-agent": f"blockprov/{__version__}", "content-type": OCTETS["content-type"],
                        "accept-encoding": "identity", **(headers or {})}
        self.context = context
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
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def post(self, path: str, body: bytes,
             headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], memoryview]:
        """Status, headers and body (read-only) of one POST. Raises OSError / HTTPException. A
        request sent on an idle keep-alive connection the server had closed goes once more, at
        once (retry.py, ``StaleConnection``); a second such failure is raised as its own error."""
        try:
            return retry_sync(functools.partial(self._post_once, path, body, headers), STALE_RETRY,
                              f"POST {self.prefix}{path}")
        except StaleConnection as e:
            assert isinstance(e.__cause__, OSError | http.client.HTTPException)
            raise e.__cause__ from None

    def _post_once(self, path: str, body: bytes,
                   headers: dict[str, str] | None) -> tuple[int, list[tuple[str, str]], memoryview]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        answered = False
        try:
            conn.request("POST", self.prefix + path, body=body,
                         headers=self.headers if headers is None else {**self.headers, **headers})
            resp = conn.getresponse()
            answered = True
            data = _read_body(resp)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if reused and not answered:  # the server closed an idle keep-alive connection
                raise StaleConnection(url=self.url, why=f"{type(e).__name__}: {e}" if str(e)
                                      else type(e).__name__) from e
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

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def whole(b: bytes | memoryview | BlockprovError) -> bytes:
    """A blob as bytes; the error a partial answer put in its place is raised."""
    if isinstance(b, BlockprovError):
        raise b
    return b if type(b) is bytes else bytes(b)


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
    def __init__(self, url: str, *, timeout: float = 30.0, client: httpx.Client | None = None,
                 cacheable: bool = False, token: str | None = None, ca: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._own_client = client is None
        self._auth = auth_headers(token)
        ctx = tls_context(ca) if self.url.startswith("https://") or ca else None
        self.client = client if client is not None else httpx.Client(
            timeout=timeout, headers={"user-agent": f"blockprov/{__version__}", **self._auth},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            verify=ctx if ctx is not None else True)
        self._avg_blob = 64 << 10  # learned from answers; sizes the next fetch batch
        self._raw = (KeepAlivePost(self.url, timeout, self._auth | PARTIAL, ctx)
                     if client is None and KeepAlivePost.usable(self.url) else None)
        self.cacheable = cacheable
        self._get_pool = ThreadPoolExecutor(GET_WORKERS, thread_name_prefix="bp-get") if cacheable else None

    # -- plumbing ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, slow: bool = False, **kw: Any) -> httpx.Response:
        if slow and self._own_client:  # a caller-supplied client keeps its own timeouts
            kw["timeout"] = httpx.Timeout(self.timeout, read=None)
        if self._auth and not self._own_client:  # our own client sends it by default
            kw["headers"] = {**self._auth, **(kw.get("headers") or {})}
        try:
            r = self.client.request(method, self.url + path, **kw)
        except httpx.TransportError as e:
            bad = _cert_failure(e)
            if bad is not None:
                raise UntrustedServer(url=self.url, why=bad.verify_message or str(bad)) from None
            raise RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}" if str(e)
                                        else type(e).__name__) from None
        if r.status_code >= 400 or r.headers.get("content-type", "").startswith("text/html"):
            raise self._error(r)
        return r

    def _error(self, r: httpx.Response) -> BlockprovError:
        """The error the server reported, rebuilt as the class it raised where we know it."""
        if r.headers.get("content-type", "").startswith("text/html"):  # blockprov never answers HTML (issue 17)
            return RepositoryUnavailable(url=self.url, why=f"HTTP {r.status_code} with a web page: it is not a "
                                                           "blockprov repository (check the URL)")
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        message = str(body.get("message") or r.text[:200] or r.reason_phrase)
        if r.status_code >= 500:
            return RepositoryUnavailable(url=self.url, why=f"HTTP {r.status_code}: {message}")
        return errors.error_from_dict(body | {"message": message}, _BY_STATUS.get(r.status_code, BlockprovError))

    def __enter__(self) -> RemoteRepository:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._get_pool is not None:
            self._get_pool.shutdown(wait=False, cancel_futures=True)
        if self._raw is not None:
            self._raw.close()
        if self._own_client:
            self.client.close()

    def health(self) -> dict[str, Any]:
        """The server's ``/v1/health``: ``role`` is ``repository`` or ``site-cache``."""
        return dict(self._request("GET", "/v1/health").json())

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

    def version_of(self, ref: Ref | str) -> str | None:
        """The version a reference names now, without its manifest: a conditional GET that matches
        any version (``If-None-Match: *``) answers 304 with the id alone. None when the server sent
        no id (the caller then resolves as usual). An agent moving to a v2 with its site's peers
        fetches the manifest itself from them (cache/peers.py, ``PeerSource.manifest``)."""
        r = _as_ref(ref)
        if r.version:
            return r.version
        resp = self._request("GET", f"/v1/images/{r.name}/manifest", params={"ref": _rel(r)},
                             headers={"if-none-match": "*"})
        vid = resp.headers.get("x-blockprov-version")
        return version_id(vid) if vid else None

    def images(self) -> list[ImageInfo]:
        return [ImageInfo(**d) for d in self._request("GET", "/v1/images").json()["images"]]

    def versions(self, name: str) -> list[VersionInfo]:
        d = self._request("GET", f"/v1/images/{image_name(name)}/versions").json()
        return [VersionInfo(**v) for v in d["versions"]]

    def get_blobs(self, ids: Sequence[bytes]) -> list[bytes]:
        return [whole(b) for b in self.get_blob_views(ids)]

    def get_blob_views(self, ids: Sequence[bytes]) -> list[_Blob | BlockprovError]:
        """Like ``get_blobs``, but blobs may be read-only memoryviews of the answer (no copies), and a
        site cache may answer in part (repo/base.py, ``BlobViews``)."""
        if self._get_pool is not None:
            return list(self._get_each(ids))
        out: list[_Blob | BlockprovError] = []
        i = 0
        while i < len(ids):
            n = max(16, min(MAX_FETCH_IDS, BATCH_BYTES // max(1, self._avg_blob)))
            out.extend(self._fetch(ids[i:i + n]))
            i += n
        return out

    def _get_each(self, ids: Sequence[bytes]) -> list[_Blob]:
        """Cacheable mode: one ``GET /v1/chunks/{id}`` per distinct id, in parallel, answers in order."""
        assert self._get_pool is not None
        uniq = list(dict.fromkeys(ids))
        blobs = self._get_pool.map(lambda c: self._request("GET", f"/v1/chunks/{c.hex()}").content, uniq)
        got: dict[bytes, _Blob] = dict(zip(uniq, blobs, strict=True))
        return [got[c] for c in ids]

    def get_held_views(self, ids: Sequence[bytes]) -> list[_Blob | NotHeld]:
        """Like ``get_blob_views``, but a site cache answers only with what it holds and pulls nothing
        from its upstream (``HELD_ONLY``; the others come back ``NotHeld``): an agent's speculation
        behind a site cache (cache/peers.py, ``PeerSource.get_held``), so that thirty agents' guesses
        do not make the site cache pull their union over the uplink. A repository holds everything
        and ignores the header. Not in cacheable mode (an HTTP cache cannot tell): everything NotHeld."""
        if self._get_pool is not None:
            return [NotHeld() for _ in ids]
        out: list[_Blob | NotHeld] = []
        i = 0
        while i < len(ids):
            n = max(16, min(MAX_FETCH_IDS, BATCH_BYTES // max(1, self._avg_blob)))
            for b in self._fetch(ids[i:i + n], held_only=True):
                out.append(b if not isinstance(b, BlockprovError) else NotHeld())
            i += n
        return out

    def _post_fetch(self, body: bytes, held_only: bool = False) -> bytes | memoryview:
        if self._raw is None:
            return self._request("POST", "/v1/chunks/fetch", content=body,
                                 headers=OCTETS | PARTIAL | (HELD_ONLY if held_only else {})).content
        try:
            status, headers, data = self._raw.post("/v1/chunks/fetch", body, HELD_ONLY if held_only else None)
        except ssl.SSLCertVerificationError as e:
            raise UntrustedServer(url=self.url, why=e.verify_message or str(e)) from None
        except (OSError, http.client.HTTPException) as e:
            raise RepositoryUnavailable(url=self.url, why=f"{type(e).__name__}: {e}" if str(e)
                                        else type(e).__name__) from None
        if status >= 400:
            raise self._error(httpx.Response(status, headers=headers, content=bytes(data)))
        return data

    def _fetch(self, batch: Sequence[bytes], held_only: bool = False) -> list[_Blob | BlockprovError]:
        uniq = list(dict.fromkeys(batch))
        data = self._post_fetch(b"".join(uniq), held_only)
        view = memoryview(data)
        got: dict[bytes, _Blob | BlockprovError] = {}
        pos, end = 0, len(view)
        for cid in uniq:
            if end - pos < LEN.size:
                raise RepositoryUnavailable(url=self.url, why="truncated chunk batch")
            (n,) = LEN.unpack_from(view, pos)
            pos += LEN.size
            if n == ABSENT and held_only:  # a held-only answer: the site cache lacks this one
                got[cid] = NotHeld()
                continue
            if n == ABSENT:  # a site cache's partial answer: this one it lacks, its upstream is down
                got[cid] = RepositoryUnavailable(url=self.url, why=f"chunk {cid.hex()} is not held by this site "
                                                                   "cache and its upstream is unreachable")
                continue
            if end - pos < n:
                raise RepositoryUnavailable(url=self.url, why="truncated chunk batch")
            got[cid] = view[pos:pos + n]
            pos += n
        if pos != end:
            raise RepositoryUnavailable(url=self.url, why=f"{end - pos} unexpected bytes after a chunk batch")
        if uniq:
            self._avg_blob = max(1, end // len(uniq))
        if not held_only and all(isinstance(b, BlockprovError) for b in got.values()):  # nothing came: failed
            raise next(iter(got.values()))  # type: ignore[misc]
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

    # -- remote boot, profiles, agents ------------------------------------------------------------
    def _version_of(self, r: Ref) -> str:
        """The id a reference names now, without fetching a manifest (they can be tens of MB)."""
        if r.version is not None:
            return r.version
        for v in self.versions(r.name):
            if r.tag in v.tags:
                return v.id
        raise errors.ImageNotFound(ref=str(r))

    def _waiting(self, wait: float) -> dict[str, Any]:
        """Request options for a long poll of ``wait`` seconds: a read timeout that outlasts it."""
        return {"timeout": httpx.Timeout(self.timeout + wait)} if self._own_client else {}

    def set_boot_files(self, ref: Ref | str, kernel: boot.Source, initrd: boot.Source, cmdline: str = "",
                       efi: Mapping[str, boot.Source] | None = None, *, prepare: bool = True) -> BootFilesInfo:
        """Upload the pieces the repository lacks (chunk protocol), then record the descriptors."""
        r = _as_ref(ref)
        cmdline = kernel_args(cmdline)
        vid = self._version_of(r)

        def sink(items: list[tuple[bytes, bytes]]) -> None:
            absent = set(self.missing([cid for cid, _ in items]))
            self.put_blobs([(cid, blob) for cid, blob in items if cid in absent])

        k = boot.split(kernel, "kernel", sink)
        i = boot.split(initrd, "initrd", sink)
        loader = {name: boot.split(src, name, sink).to_dict() for name, src in (efi or {}).items()}
        d = self._request("PUT", f"/v1/images/{r.name}/versions/{vid}/boot", params={} if prepare else {"prepare": 0},
                          json={"kernel": k.to_dict(), "initrd": i.to_dict(), "cmdline": cmdline,
                                **({"efi": loader} if loader else {})}).json()
        return BootFilesInfo.from_dict(d)

    def preparation(self, ref: Ref | str) -> dict[str, Any] | None:
        r = _as_ref(ref)
        d = self._request("GET", f"/v1/images/{r.name}/versions/{self._version_of(r)}/preparation").json()
        return None if d.get("state") is None else dict(d)

    def get_boot_files(self, ref: Ref | str) -> BootFilesInfo | None:
        r = _as_ref(ref)
        d = self._request("GET", f"/v1/images/{r.name}/versions/{self._version_of(r)}/boot").json()["boot"]
        return None if d is None else BootFilesInfo.from_dict(d)

    def boot_file(self, ref: Ref | str, which: str) -> bytes:
        """Downloaded, then checked piece by piece against the descriptor (docs/architecture.md, invariant 6)."""
        if which not in boot.BOOT_FILES:
            raise errors.UsageError(f"a boot file is one of {', '.join(boot.BOOT_FILES)}, not {which!r}")
        r = _as_ref(ref)
        info = self.get_boot_files(r)
        if info is None:
            raise errors.BootFilesMissing(ref=str(r))
        f = info.file(which)
        if f is None:
            raise errors.EfiLoaderMissing(ref=f"{info.image}@{info.version}", missing=which)
        data = self._request("GET", f"/v1/images/{r.name}/versions/{info.version}/boot/{which}", slow=True).content
        got = boot.split(data, which, lambda _items: None)
        if got != f:
            raise errors.IntegrityError(f"the {which} of {r} served does not match its descriptor "
                                        f"({got.size} bytes, id {got.id}; expected {f.size} bytes, id {f.id})")
        return data

    def assign_host(self, host: str, ref: Ref | str, args: str | None = None,
                    settings: Mapping[str, str | None] | None = None) -> HostInfo:
        body: dict[str, Any] = {"ref": str(_as_ref(ref)), **(settings or {})}
        if args is not None:
            body["args"] = kernel_args(args)
        return _host_info(self._request("PUT", f"/v1/hosts/{host_id(host)}", json=body).json())

    def hosts(self) -> list[HostInfo]:
        return [_host_info(h) for h in self._request("GET", "/v1/hosts").json()["hosts"]]

    def remove_host(self, host: str) -> None:
        self._request("DELETE", f"/v1/hosts/{host_id(host)}")

    def boot_script(self, host: str, base_url: str | None = None, *, booting: bool = False) -> str:
        """(``booting``: the server decides by its caller — only iPXE's request is a PC booting.)"""
        params = {}
        if base_url is not None:
            params["base"] = names.base_url(base_url)
        return self._request("GET", f"/v1/boot/{host_id(host)}", params=params,
                             headers={"accept": "application/json, text/plain"}).text

    def check_disk(self, host: str, base_url: str | None, version: str, fingerprint: str) -> str | None:
        params = {} if base_url is None else {"base": names.base_url(base_url)}
        text = self._request("POST", f"/v1/boot/{host_id(host)}/disk", params=params,
                             json={"version": version, "fingerprint": fingerprint}).text.strip()
        return None if text == "disk" else text.removeprefix("network:").strip()

    def record_disk(self, host: str, version: str, fingerprint: str) -> None:
        self._request("PUT", f"/v1/boot/{host_id(host)}/disk", json={"version": version, "fingerprint": fingerprint})

    def reprovision_host(self, host: str) -> str:
        return str(self._request("POST", f"/v1/hosts/{host_id(host)}/reprovision").json()["reprovision"])

    def put_profile(self, image: str, version: str, order: Sequence[int]) -> None:
        body = b"".join(struct.pack("<I", i) if type(i) is int and 0 <= i < 1 << 32 else b"" for i in order)
        if len(body) != 4 * len(order):
            raise errors.UsageError("a profile holds chunk indices (non-negative integers)")
        self._request("PUT", f"/v1/images/{image_name(image)}/versions/{version_id(version)}/profile",
                      content=body, headers=OCTETS)

    def get_profile(self, image: str, version: str, *, inherit: bool = True) -> list[int] | None:
        try:
            data = self._request("GET", f"/v1/images/{image_name(image)}/versions/{version_id(version)}/profile",
                                 params={} if inherit else {"own": "1"},
                                 headers={"accept": OCTETS["content-type"]}).content
        except errors.ProfileNotFound:
            return None
        if len(data) % 4:
            raise RepositoryUnavailable(url=self.url, why="torn boot profile")
        return [v for (v,) in struct.iter_unpack("<I", data)]

    def register_agent(self, instance: str, info: dict[str, Any]) -> None:
        self._request("PUT", f"/v1/agents/{instance_id(instance)}", **_json(info, "agent info"))

    def agents(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/agents").json()["agents"])

    def unregister_agent(self, instance: str) -> None:
        self._request("DELETE", f"/v1/agents/{instance_id(instance)}")

    def post_request(self, instance: str, op: str, args: dict[str, Any] | None = None) -> str:
        d = self._request("POST", f"/v1/agents/{instance_id(instance)}/requests",
                          **_json({"op": op_name(op), "args": args if args is not None else {}}, "request")).json()
        return str(d["id"])

    def next_request(self, instance: str, wait: float = 0.0) -> dict[str, Any] | None:
        """Long polls of at most ``POLL_MAX`` s each until a request arrives or ``wait`` is over."""
        instance_id(instance)
        deadline = time.monotonic() + _wait(wait)
        while True:  # bounded by the deadline
            w = round(max(0.0, min(POLL_MAX, deadline - time.monotonic())), 3)
            r = self._request("GET", f"/v1/agents/{instance}/requests/next", params={"wait": w}, **self._waiting(w))
            if r.status_code == 200:
                return dict(r.json())
            if time.monotonic() >= deadline:
                return None

    def complete_request(self, instance: str, rid: str, ok: bool, result: dict[str, Any] | None = None,
                         error: str | None = None) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/agents/{instance_id(instance)}/requests/{request_id(rid)}/result",
                                  **_json({"ok": ok, "result": result, "error": error}, "result")).json())

    def get_request(self, instance: str, rid: str, wait: float = 0.0) -> dict[str, Any]:
        path = f"/v1/agents/{instance_id(instance)}/requests/{request_id(rid)}"
        deadline = time.monotonic() + _wait(wait)
        while True:  # bounded by the deadline
            w = round(max(0.0, min(POLL_MAX, deadline - time.monotonic())), 3)
            d = dict(self._request("GET", path, params={"wait": w}, **self._waiting(w)).json())
            if d["state"] in ("done", "failed") or time.monotonic() >= deadline:
                return d


    # -- sites (catalog/sites.py) -------------------------------------------------------------------
    def add_site(self, name: str, cache: str | None = None) -> SiteInfo:
        body = {} if cache is None else {"cache": cache}
        return SiteInfo(**self._request("PUT", f"/v1/sites/{site_name(name)}", **_json(body, "site")).json())

    def sites(self) -> list[SiteInfo]:
        return [SiteInfo(**d) for d in self._request("GET", "/v1/sites").json()["sites"]]

    def remove_site(self, name: str) -> None:
        self._request("DELETE", f"/v1/sites/{site_name(name)}")

    def rotate_site_secret(self) -> None:
        self._request("POST", "/v1/site-secret/rotate")

    def join_site(self, site: str, instance: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/sites/{site_name(site)}/join",
                                  **_json({"instance": instance_id(instance)}, "join")).json())

    # -- a site cache's own API (service/sitecache.py, service/prewarm.py) --------------------------
    def prewarm(self, ref: Ref | str, at: float | None = None, everything: bool = False) -> dict[str, Any]:
        """Ask a site cache to pull a version's boot working set at ``at`` (unix time; None: now)."""
        body = {"ref": str(_as_ref(ref)), "at": at, "all": everything}
        return dict(self._request("POST", "/v1/sitecache/prewarm", **_json(body, "pre-warm")).json())

    def prewarm_jobs(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/sitecache/prewarm").json()["jobs"])

POLL_MAX = 25.0  # seconds per long-poll request (the server allows 30)


def _json(d: object, what: str) -> dict[str, Any]:
    """A JSON request body; what cannot be JSON is the caller's mistake (UsageError), as locally."""
    if not isinstance(d, dict):
        raise errors.UsageError(f"{what} must be a JSON object")
    try:
        body = json.dumps(d, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise errors.UsageError(f"{what} is not JSON: {e}") from None
    return {"content": body, "headers": {"content-type": "application/json"}}
MAX_WAIT = 3600.0


def _wait(wait: float) -> float:
    if not 0 <= wait <= MAX_WAIT:  # also refuses NaN
        raise errors.UsageError(f"wait must be 0 to {MAX_WAIT:g} seconds, not {wait}")
    return float(wait)
