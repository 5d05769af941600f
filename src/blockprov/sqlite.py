"""The one way blockprov opens SQLite: WAL, synchronous=FULL, a connection per thread, and
``BEGIN IMMEDIATE`` transactions (writers from several processes serialize on SQLite's lock,
waiting up to ``timeout`` seconds, instead of failing on an upgrade from a read lock).

It is the embedded catalog's database (catalog/db.py: the interface it shares with catalog/postgres.py) and the
pack store's index."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blockprov.errors import CannotWrite, NoSpace


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
        try:
            self._retry_locked(lambda: db.executescript(schema))
        except sqlite3.OperationalError as e:
            raise self._environment(e) from None

    def add_column(self, table: str, column: str, decl: str) -> None:
        """SQLite has no ``ADD COLUMN IF NOT EXISTS``: look, then add, in one writer's transaction
        (``BEGIN IMMEDIATE``), so two processes opening an old catalog at once add it once."""
        with self.tx() as db:
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self.conn().execute(sql, params).fetchone()
        except sqlite3.OperationalError as e:
            raise self._environment(e) from None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self.conn().execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            raise self._environment(e) from None

    def _environment(self, e: sqlite3.OperationalError) -> Exception:
        """What SQLite's vague "unable to open database file" / "disk I/O error" is, when the
        directory is to blame: a full disk (NoSpace) or one that cannot be written (CannotWrite);
        otherwise the error itself. Even a read needs the WAL's -shm file (issue 17)."""
        where = self.path.parent
        try:
            full = os.statvfs(where).f_bavail == 0
        except OSError:
            full = False
        if full or "full" in str(e):
            return NoSpace(msg=str(self.path))
        if "unable to open" in str(e) or "readonly" in str(e) or "read-only" in str(e):
            if not where.is_dir():
                return CannotWrite(path=str(self.path), why=f"{where} is not a directory")
            if not os.access(where, os.W_OK):
                return CannotWrite(path=str(self.path), why=f"{where} is not writable (read-only file system?)")
        return e

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self.tx() as db:  # SQLite has one writer at a time anyway
            return db.execute(sql, params).rowcount

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
                conn = db
                self._retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.OperationalError as e:
                raise self._environment(e) from None
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
            mapped = self._environment(e)
            if mapped is not e:  # a full disk, a read-only directory: the transaction did not happen
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise mapped from None
            raise

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
