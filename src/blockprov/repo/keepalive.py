"""Keep-alive connections for the agent's one hot request: ``POST`` a batch of chunk ids, read the blobs.

Used by ``RemoteRepository`` for ``POST /v1/chunks/fetch`` (repo/remote.py says why that request
skips httpx) and by the peer client for ``POST /peer/v1/chunks`` (cache/peers.py). Every chunk an
agent fetches comes through here, one request per batch: a lone agent sends ~1,800 of them on the
boot trace of bench/bench_storm.py, one of thirty peers ~3,000. ``http.client`` spent ~90 µs of CPU
on each (its header objects and the ``email`` parser behind ``getresponse``), this ~20 µs (measured
in one thread against a local server), which on thirty agents sharing two cores is time-to-ready
(bench/RESULTS.md, "Boot storm").

The HTTP it speaks is the small part of HTTP/1.1 these requests need, and says so when an answer
is outside it:

- a request is the request line, ``Host``, the fixed and per-call headers, ``Content-Length`` and
  the body, in one ``sendall``;
- an answer's head is at most ``HEAD_LIMIT`` bytes (status line and headers, as ``http.client``
  bounds them); its body is framed by ``Content-Length``, by ``Transfer-Encoding: chunked``, or
  (no framing, or ``Connection: close``, or HTTP/1.0) by the end of the connection; a 1xx answer
  is skipped. Anything else (a head that does not parse, a short body) is
  ``http.client.HTTPException`` or ``OSError``, as callers expect of ``http.client``;
- the body is read with ``recv_into`` into one preallocated buffer and returned as a read-only
  ``memoryview`` (blobs are slices of it: no copy per blob);
- a request that fails on a reused connection before any byte of an answer arrived (the server
  closed it while it was idle) is sent once more on a fresh one, at once; any other failure is
  raised (``RemoteRepository`` makes it ``RepositoryUnavailable``).

Thread-safe: the fetcher's worker threads share one object; each request holds one connection,
taken from and returned to a small idle list under a lock.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import urllib.parse
import urllib.request

from blockprov import __version__
from blockprov.errors import StaleConnection

HEAD_LIMIT = 65536  # bytes of status line and headers an answer may have
RECV = 65536  # bytes asked of the socket at a time while reading a head

Headers = list[tuple[str, str]]


class _Conn:
    """One connection: a socket and the bytes read past the last answer's end (none, normally)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.extra = b""

    def close(self) -> None:
        self.sock.close()

    def recv_head(self) -> tuple[bytes, bytes]:
        """The head of the next answer (up to the blank line) and what came after it. Raises
        ``RemoteDisconnected`` if the connection ends before any byte."""
        buf = bytearray(self.extra)
        self.extra = b""
        start = 0
        while True:
            k = buf.find(b"\r\n\r\n", max(0, start - 3))
            if 0 <= k <= HEAD_LIMIT:
                return bytes(buf[:k]), bytes(buf[k + 4:])
            if len(buf) > HEAD_LIMIT:
                raise http.client.LineTooLong(f"answer head over {HEAD_LIMIT} bytes")
            start = len(buf)
            d = self.sock.recv(RECV)
            if not d:
                if buf:
                    raise http.client.IncompleteRead(bytes(buf))
                raise http.client.RemoteDisconnected("the server closed the connection without an answer")
            buf += d

    def read_exact(self, n: int, have: bytes) -> tuple[memoryview, bytes]:
        """``n`` body bytes (``have`` already read) as a read-only view, and any bytes past them."""
        if len(have) >= n:
            return memoryview(have[:n]).toreadonly(), have[n:]
        out = bytearray(n)
        view = memoryview(out)
        view[:len(have)] = have
        got = len(have)
        while got < n:
            r = self.sock.recv_into(view[got:])
            if not r:
                raise http.client.IncompleteRead(bytes(view[:got]), n - got)
            got += r
        return view.toreadonly(), b""

    def read_to_end(self, have: bytes) -> memoryview:
        parts = [have]
        while d := self.sock.recv(1 << 20):
            parts.append(d)
        return memoryview(b"".join(parts)).toreadonly()

    def read_chunked(self, have: bytes) -> tuple[memoryview, bytes]:
        """A ``Transfer-Encoding: chunked`` body (trailers skipped) and any bytes past it."""
        parts: list[bytes] = []
        buf = have
        while True:
            line, buf = self._line(buf)
            size = int(line.split(b";", 1)[0].strip() or b"x", 16)  # ValueError on garbage
            if size == 0:
                while True:  # trailers, up to the blank line
                    line, buf = self._line(buf)
                    if not line:
                        return memoryview(b"".join(parts)).toreadonly(), buf
            data, buf = self.read_exact(size + 2, buf)
            if bytes(data[size:]) != b"\r\n":
                raise http.client.IncompleteRead(bytes(data[:size]))
            parts.append(bytes(data[:size]))

    def _line(self, buf: bytes) -> tuple[bytes, bytes]:
        while (k := buf.find(b"\r\n")) < 0:
            if len(buf) > HEAD_LIMIT:
                raise http.client.LineTooLong("chunk size line")
            d = self.sock.recv(RECV)
            if not d:
                raise http.client.IncompleteRead(buf)
            buf += d
        return buf[:k], buf[k + 2:]


def parse_head(head: bytes) -> tuple[str, int, Headers]:
    """(HTTP version, status, headers) of an answer's head; ``BadStatusLine`` if it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise http.client.BadStatusLine(lines[0][:200])
    headers: Headers = []
    for ln in lines[1:]:
        name, colon, value = ln.partition(":")
        if not colon or not name or name != name.strip():
            raise http.client.HTTPException(f"a header line that does not parse: {ln[:200]!r}")
        headers.append((name, value.strip()))
    return version, int(code), headers


class KeepAlivePost:
    """Keep-alive connections for one hot POST (module docstring); ``headers`` go with every
    request, a call may add its own (the peer client's ticket)."""

    KEEP = 16  # idle connections kept

    def __init__(self, url: str, timeout: float, headers: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        u = urllib.parse.urlsplit(url)
        self.url = url
        self.host = u.hostname or "localhost"
        self.https = u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"host": f"{host}:{self.port}", "user-agent": f"blockprov/{__version__}",
                 "content-type": "application/octet-stream", "accept-encoding": "identity", **(headers or {})}
        self._fixed = _header_bytes(fixed)
        self.context = context if context is not None or not self.https else ssl.create_default_context()
        self._idle: list[_Conn] = []
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

    def _connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                assert self.context is not None
                sock = self.context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Headers, memoryview]:
        """Status, headers and body (read-only) of one POST. Raises OSError / HTTPException."""
        request = b"".join((b"POST ", (self.prefix + path).encode("ascii"), b" HTTP/1.1\r\n", self._fixed,
                            _header_bytes(headers) if headers else b"",
                            b"content-length: %d\r\n\r\n" % len(body), body))
        try:
            return self._post_once(request, fresh=False)
        except StaleConnection:  # a reused connection the server had closed: once more, on a new one
            return self._post_once(request, fresh=True)

    def _post_once(self, request: bytes, *, fresh: bool) -> tuple[int, Headers, memoryview]:
        conn = None
        if not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        answered = False
        try:
            conn.sock.sendall(request)
            while True:
                head, rest = conn.recv_head()
                answered = True
                version, status, headers = parse_head(head)
                if not 100 <= status < 200:
                    break
                conn.extra = rest  # an interim answer: the real one follows
            data, keep = self._body(conn, version, status, headers, rest)
        except (OSError, http.client.HTTPException, ValueError) as e:
            conn.close()
            if reused and not answered:  # the server closed an idle keep-alive connection
                raise StaleConnection(url=self.url, why=f"{type(e).__name__}: {e}") from e
            if isinstance(e, ValueError):
                raise http.client.HTTPException(f"an answer that does not parse: {e}") from e
            raise
        if keep:
            with self._lock:
                if len(self._idle) < self.KEEP:
                    self._idle.append(conn)
                    conn = None
        if conn is not None:
            conn.close()
        return status, headers, data

    @staticmethod
    def _body(conn: _Conn, version: str, status: int, headers: Headers, rest: bytes) -> tuple[memoryview, bool]:
        """The answer's body and whether the connection may carry another request."""
        length = encoding = None
        close = version == "HTTP/1.0"
        for name, value in headers:
            n = name.lower()
            if n == "content-length":
                length = int(value)
                if length < 0:
                    raise ValueError(f"content-length {value}")
            elif n == "transfer-encoding":
                encoding = value.lower()
            elif n == "connection":
                close = close or "close" in value.lower()
        if encoding is not None and encoding != "identity":
            if encoding != "chunked":
                raise http.client.HTTPException(f"transfer-encoding {encoding} is not supported")
            data, conn.extra = conn.read_chunked(rest)
            return data, not close
        if status in (204, 304):  # no body, whatever the headers say
            conn.extra = rest
            return memoryview(b""), not close
        if length is None:
            return conn.read_to_end(rest), False
        data, conn.extra = conn.read_exact(length, rest)
        return data, not close

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def _header_bytes(headers: dict[str, str]) -> bytes:
    out = []
    for k, v in headers.items():
        if any(c in k + v for c in "\r\n\0"):
            raise ValueError(f"header {k!r}: a line break or NUL in a header")
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("latin-1")
