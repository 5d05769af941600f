"""Run the HTTP service: uvicorn on a socket we bind ourselves.

Binding first (instead of letting uvicorn bind) is what makes ``--listen 127.0.0.1:0`` useful: the
kernel picks a free port, we read it back and report the real URL through ``on_ready`` once the
server accepts connections — tests and ``blockprov serve`` rely on that line. SIGINT and SIGTERM
make uvicorn finish in-flight requests and return normally (exit status 0), instead of re-raising
the signal after shutdown as uvicorn does by default. Finishing is bounded (``SHUTDOWN_GRACE``): a
client that holds its connection open mid-request (a proxy that never reads, a stalled peer) would
otherwise keep a stopped server alive for ever; what a cancelled request was doing in a worker
thread still ends before the process exits (the interpreter joins those threads).

TLS (``--tls-cert``/``--tls-key``) is uvicorn's own: it wraps the socket we bound. The certificate
and key are loaded once before the socket is bound, so a wrong path, a key that does not match
or a passphrase-protected key is one clear error at start, not a failure at the first connection.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import uvicorn

from blockprov.catalog.db import SQLDatabase
from blockprov.catalog.tokens import TokenStore
from blockprov.errors import UsageError
from blockprov.repo.local import LocalRepository
from blockprov.service.access import AccessPolicy
from blockprov.service.app import create_app
from blockprov.service.bounds import IN_FLIGHT, MAX_BODY, REQUEST_TIMEOUT, bounded_http
from blockprov.store.base import ChunkStore
from blockprov.store.cached import CachedChunkStore

OnReady = Callable[[str], None]
log = logging.getLogger("blockprov.service")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6 literal or name); port 0 picks a free one."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _canon, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def check_tls(cert: str, key: str | None) -> None:
    """Load the certificate and key as the server will, and say plainly what is wrong with them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")  # a passphrase-protected key fails here
    except FileNotFoundError as e:
        raise UsageError(f"cannot use the TLS certificate: {e.filename}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"cannot use the TLS certificate {cert} and key {key or cert}: {e}") from None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warn_open(repo: LocalRepository, policy: AccessPolicy, host: str, *, tls: bool) -> None:
    """Say at start what an operator might not expect: an open repository, or tokens sent in clear."""
    tokens = policy.mode == "on" or (policy.mode == "auto" and TokenStore(repo.catalog.db).any_created())
    if not tokens:
        why = "--auth off" if policy.mode == "off" else "no access token exists yet"
        log.warning("access control is off (%s): anyone who can reach this server may read and change the "
                    "repository; create a token with: blockprov token create --scope write (with --auth auto, "
                    "the first token closes it at once: start with --anonymous-boot if PCs network-boot from it)",
                    why)
    else:
        if not policy.anonymous_boot:
            log.warning("tokens are required and --anonymous-boot is off: PCs that network-boot (iPXE sends no "
                        "token) are refused their boot scripts and shown why; start with --anonymous-boot to let "
                        "them boot (it opens only boot scripts and kernel/initrd downloads)")
        if not tls and not _loopback(host):
            log.warning("tokens are required but sent in clear over plain HTTP; serve with --tls-cert/--tls-key")


SHUTDOWN_GRACE = 10  # seconds in-flight requests get to finish after SIGTERM/SIGINT


class _Server(uvicorn.Server):
    """uvicorn with a readiness callback and signal handling that ends in a normal return."""

    def __init__(self, config: uvicorn.Config, url: str, on_ready: OnReady | None) -> None:
        super().__init__(config)
        self.url = url
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = getattr(self.config.app, "state", None)
        if state is not None:
            state.draining = True  # long polls (service/routes/agents.py) answer now instead of at their end
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(sig: int, _frame: object) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for slow clients
            self.should_exit = True

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def run_server(data_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8420, *,
               on_ready: OnReady | None = None, max_body: int = MAX_BODY, access_log: bool = False,
               log_level: str = "info", store: ChunkStore | None = None, access: AccessPolicy | None = None,
               tls_cert: str | None = None, tls_key: str | None = None, catalog: SQLDatabase | None = None,
               chunk_cache: int = 0, in_flight: int = IN_FLIGHT, request_timeout: float = REQUEST_TIMEOUT,
               prepare: Callable[[LocalRepository, str, str], object] | None = None) -> None:
    """Serve the repository in ``data_dir`` until SIGINT/SIGTERM; ``on_ready(url)`` once listening.
    ``store``: the chunk store to use instead of ``data_dir``'s pack store (e.g. S3); ``catalog``: the
    catalog's database instead of ``data_dir``'s SQLite (e.g. PostgreSQL). The server closes both.
    ``chunk_cache``: bytes of memory for blobs read from ``store`` (store/cached.py; 0: none).
    ``access``: who may call what (service/access.py);
    ``tls_cert``/``tls_key``: serve HTTPS with these PEM files (the key may be in the cert file);
    ``in_flight``, ``request_timeout``: the bounds across requests (service/bounds.py).
    ``prepare(repo, image, vid)``: called when a version gets boot files (cli/serve.py starts the
    preparation of its boot profile, vm/prepare.py); None: no preparation."""
    if tls_cert is not None:
        check_tls(tls_cert, tls_key)
    elif tls_key is not None:
        raise UsageError("--tls-key needs --tls-cert")
    if store is not None and chunk_cache > 0:
        store = CachedChunkStore(store, chunk_cache)
    repo = LocalRepository(data_dir, store=store, catalog=catalog)
    warn_open(repo, access or AccessPolicy(), host, tls=tls_cert is not None)
    try:
        app = create_app(repo, max_body=max_body, access=access, in_flight=in_flight, timeout=request_timeout)
        if prepare is not None:
            def started(image: str, vid: str) -> None:
                log.info("%s@%s got boot files: %s", image, vid, prepare(repo, image, vid))

            app.state.service.prepare = started
        run_app(app, host, port, on_ready=on_ready, access_log=access_log, log_level=log_level, tls_cert=tls_cert,
                tls_key=tls_key, request_timeout=request_timeout)
    finally:
        repo.close()


def run_app(app: Any, host: str, port: int, *, on_ready: OnReady | None = None, access_log: bool = False,
            log_level: str = "info", tls_cert: str | None = None, tls_key: str | None = None,
            request_timeout: float = REQUEST_TIMEOUT) -> None:
    """uvicorn serving ``app`` on a socket bound here, until SIGINT/SIGTERM (the repository's app or a
    site cache's, service/sitecache.py)."""
    if tls_cert is not None:
        check_tls(tls_cert, tls_key)
    sock = bind(host, port)
    try:
        # uvicorn writes access lines to stdout by default; stdout is for the "serving URL" line
        # (scripts read it and may not drain the rest), so logs of every kind go to stderr.
        log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
        log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
        config = uvicorn.Config(app, access_log=access_log, log_level=log_level, timeout_keep_alive=75,
                                lifespan="on", log_config=log_config, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                http=bounded_http(request_timeout), timeout_graceful_shutdown=SHUTDOWN_GRACE)
        _Server(config, url_of(sock, "https" if tls_cert else "http"), on_ready).run(sockets=[sock])
    finally:
        sock.close()


def run_site_cache(data_dir: str | os.PathLike[str], upstream: str, capacity: int, host: str = "127.0.0.1",
                   port: int = 8420, *, token: str | None = None, max_body: int = MAX_BODY, in_flight: int = IN_FLIGHT,
                   request_timeout: float = REQUEST_TIMEOUT, **kw: Any) -> None:
    """Serve a site cache of ``upstream`` (service/sitecache.py) from ``data_dir`` until SIGINT/SIGTERM;
    its requests bounded as the repository's are (``max_body``, ``in_flight``, ``request_timeout``)."""
    from blockprov.service.prewarm import Prewarm
    from blockprov.service.sitecache import SiteCache, create_site_cache_app

    # httpx logs every request it makes at INFO: here, every heartbeat and long poll of every PC of
    # the site, passed through (a thousand lines a run of thirty PCs, bench_storm; a stderr nobody
    # drained stopped the site cache). Its failures are still logged, by the site cache's own words.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    root = Path(data_dir) / "sitecache"
    sc = SiteCache(root, upstream, capacity, token=token)
    prewarm = Prewarm(sc)
    app = create_site_cache_app(sc, prewarm.routes(), background=prewarm.run, max_body=max_body, in_flight=in_flight,
                                timeout=request_timeout)
    run_app(app, host, port, request_timeout=request_timeout, **kw)


class ServerThread:
    """The repository's app on 127.0.0.1 in a thread of this process, for as long as a caller needs
    it (a profile preparation boots a network-booting guest against it: vm/prepare.py)."""

    def __init__(self, repo: LocalRepository, access: AccessPolicy,
                 on_fetch: Callable[[list[bytes]], None] | None = None, host: str = "127.0.0.1") -> None:
        self.app = create_app(repo, access=access)
        self.app.state.service.on_fetch = on_fetch
        self.sock = bind(host, 0)
        self.url = url_of(self.sock)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_keep_alive=75,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE)
        self.server = _Server(config, self.url, None)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="bp-serve")

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self.sock.close()
