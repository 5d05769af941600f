"""A real PostgreSQL server for tests: ``initdb`` + ``postgres`` from Debian's ``postgresql`` package.

Why it is started like this:

* One server per test session (per xdist worker), a fresh database per test (``CREATE DATABASE``
  takes ~0.1 s, ``initdb`` ~0.5 s): tests never see each other's catalogs.
* PostgreSQL refuses to run as root; CI runs as root, so the server runs as Debian's ``postgres``
  user (``runuser``), over a directory it owns. pytest's temporary directories are private to root
  (mode 0700), so the session fixture makes its own under the system's temporary directory.
* It listens on 127.0.0.1 only, on a free port, and its unix socket stays in the test's directory.
  Authentication is ``trust``: nothing outside this machine can reach it.
* ``fsync=off``: tests kill our processes, not the machine, so the OS page cache keeps PostgreSQL's
  writes; durability across a power cut is PostgreSQL's job, not something these tests can check.
* Ready = a connection answers ``SELECT 1`` (bounded wait). ``kill9`` and ``start`` again reuse the
  data directory (crash recovery runs on start), which is how fault tests make the catalog vanish.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

USER = "postgres"


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian keeps them per major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    from tests.conftest import missing_tool  # not at the top: conftest imports this module

    pytest.fail(missing_tool("initdb"), pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One PostgreSQL server over ``root``; ``start`` again after ``kill9``/``stop`` keeps the data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_user: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(root, USER)
            self._as_user = ["runuser", "-u", USER, "--"]
        subprocess.run([*self._as_user, str(pg_bin() / "initdb"), "-D", str(self.data), "--auth=trust", "-U", USER,
                        "--no-sync", "-E", "UTF8", "--locale=C"], check=True, capture_output=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        args = [*self._as_user, str(pg_bin() / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=off", "-c", "max_connections=200"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.log}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:  # not up yet
                last = e
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not become ready in {timeout} s: {last}")

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"bp_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def _signal(self, sig: int, wait: float) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            os.killpg(p.pid, sig)  # the postmaster and its backends (runuser's session)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.proc = None

    def stop(self) -> None:
        self._signal(signal.SIGINT, 10.0)  # "fast" shutdown: disconnect clients, checkpoint, exit

    def kill9(self) -> None:
        self._signal(signal.SIGKILL, 10.0)


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    """A PostgreSQL server in a directory of its own, removed with it (tests and benchmarks)."""
    root = Path(tempfile.mkdtemp(prefix="bp-pg-"))
    pg = Postgres(root)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server shared by this worker's tests (each takes its own database: ``pg_url``)."""
    with running_postgres() as pg:
        yield pg


@pytest.fixture
def pg_url(postgres: Postgres) -> str:
    """The URL of a fresh database on the session's server, for ``--catalog``."""
    return postgres.create_database()
