"""The one way blockprov opens SQLite: WAL, synchronous=FULL, a connection per thread, and
``BEGIN IMMEDIATE`` transactions (writers from several processes serialize on SQLite's lock,
waiting up to ``timeout`` seconds, instead of failing on an upgrade from a read lock).

It is the embedded catalog's database (catalog/db.py: the interface it shares with catalog/postgres.py) and the
pack store's index."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blockprov.errors import NoSpace


class Database:
    def __init__(self, path: str | Path, schema: str = "", *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()
        if schema:
            self.script(schema)

    @property
    def url(self) -> str:
        return str(self.path)

    def script(self, schema: str) -> None:
        db = self.conn()
        self._retry_locked(lambda: db.executescript(schema))

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn().execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.conn().execute(sql, params).fetchall()

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.tx() as db:  # SQLite has one writer at a time anyway
            return db.execute(sql, params).rowcount

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
            conn = db
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    def _retry_locked(self, fn: Callable[[], object]) -> None:
        """Switching a new database to WAL (and creating its tables) while other processes do the
        same can fail with "database is locked" at once: SQLite does not call the busy handler
        for that. Retry, bounded by ``timeout``."""
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                fn()
                return
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(0.2, delay * 2)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        db = self.conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if "full" in str(e):  # SQLITE_FULL: the disk is full; the transaction did not happen
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise NoSpace(msg=str(self.path)) from None
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
