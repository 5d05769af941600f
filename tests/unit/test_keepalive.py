"""repo/keepalive.py over a real socket: each way an answer may be framed, and each way it may fail.

The server is a thread on 127.0.0.1 that reads one request at a time and sends the scripted answer
bytes, so the tests control the framing exactly (uvicorn's own answers are covered by
tests/interop/test_http_remote.py and tests/interop/test_site_peers.py).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from blockprov.repo.keepalive import KeepAlivePost

Script = Callable[[socket.socket, bytes, int], bool]  # (connection, request, n-th request) → keep going


def read_request(c: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            return b""
        buf += d
    head, _, body = buf.partition(b"\r\n\r\n")
    n = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
    while len(body) < n:
        body += c.recv(65536)
    return head + b"\r\n\r\n" + body


class Server:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.ls.getsockname()[1]}/base"
        self.requests: list[bytes] = []
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self.connections += 1
            with c:
                while True:
                    req = read_request(c)
                    if not req:
                        break
                    self.requests.append(req)
                    if not self.script(c, req, len(self.requests)):
                        break

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.ls.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        self.ls.close()
        self.thread.join(5)


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Server]]:
    made: list[Server] = []

    def make(script: Script) -> Server:
        made.append(Server(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def answer(*parts: bytes) -> Script:
    def run(c: socket.socket, _req: bytes, _n: int) -> bool:
        for p in parts:
            c.sendall(p)
        return True
    return run


def test_content_length_keeps_the_connection_and_sends_the_headers(serve: Callable[[Script], Server]) -> None:
    s = serve(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Have: v1\r\n\r\n", b"hel", b"lo"))
    c = KeepAlivePost(s.url, 5, {"authorization": "Bearer t"})
    for _ in range(3):
        status, headers, body = c.post("/v1/chunks/fetch", b"ids", {"x-extra": "1"})
        assert (status, bytes(body), ("X-Have", "v1") in headers) == (200, b"hello", True)
        assert body.readonly
    assert s.connections == 1  # one keep-alive connection for all three
    head = s.requests[0].split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("post /base/v1/chunks/fetch http/1.1\r\n")
    assert "authorization: bearer t" in head and "x-extra: 1" in head and "content-length: 3" in head
    assert s.requests[0].endswith(b"\r\n\r\nids")
    c.close()


def test_chunked_interim_and_until_close(serve: Callable[[Script], Server]) -> None:
    def script(c: socket.socket, _req: bytes, n: int) -> bool:
        if n == 1:
            c.sendall(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n")
            return True
        c.sendall(b"HTTP/1.0 404 Not Found\r\n\r\n{\"error\": \"NotFound\"}")
        return False  # the end of the connection ends the body
    s = serve(script)
    c = KeepAlivePost(s.url, 5)
    assert bytes(c.post("/x", b"")[2]) == b"abcde"
    status, _h, body = c.post("/x", b"")
    assert (status, bytes(body)) == (404, b'{"error": "NotFound"}')
    assert s.connections == 1
    c.close()


def test_a_closed_idle_connection_is_retried_once_on_a_new_one(serve: Callable[[Script], Server]) -> None:
    def script(c: socket.socket, _req: bytes, n: int) -> bool:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False  # closes after each answer without saying so: the kept connection is stale
    s = serve(script)
    c = KeepAlivePost(s.url, 5)
    assert bytes(c.post("/x", b"1")[2]) == b"ok"
    assert bytes(c.post("/x", b"2")[2]) == b"ok"  # sent on the stale one, then once more on a new one
    assert s.connections == 2 and len(s.requests) == 2
    c.close()


@pytest.mark.parametrize(("reply", "error"), [
    (b"", http.client.RemoteDisconnected),  # nothing at all on a new connection
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", http.client.IncompleteRead),
    (b"SSH-2.0-OpenSSH\r\n\r\n", http.client.BadStatusLine),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http.client.HTTPException),
    (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
])
def test_bad_answers_raise_what_http_client_would(serve: Callable[[Script], Server], reply: bytes,
                                                  error: type[Exception]) -> None:
    def script(c: socket.socket, _req: bytes, _n: int) -> bool:
        c.sendall(reply)
        return False
    s = serve(script)
    c = KeepAlivePost(s.url, 5)
    with pytest.raises(error):
        c.post("/x", b"")
    c.close()


def test_refused_connection_is_an_os_error() -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    ls.close()
    with pytest.raises(OSError):
        KeepAlivePost(f"http://127.0.0.1:{port}", 5).post("/x", b"")


def test_a_header_cannot_smuggle_a_line() -> None:
    with pytest.raises(ValueError, match="line break"):
        KeepAlivePost("http://127.0.0.1:1", 5, {"authorization": "Bearer t\r\nX-Evil: 1"})
