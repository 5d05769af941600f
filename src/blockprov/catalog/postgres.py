"""The shared catalog's database: PostgreSQL through psycopg 3 and its connection pool.

Why it behaves like this:

* **Writers are serialized**, as with SQLite's ``BEGIN IMMEDIATE``: every ``tx()`` first takes one
  transaction-scoped advisory lock. Catalog code checks and then writes inside a transaction (a
  request's state, a pending-queue bound, a version that must exist); under PostgreSQL's default
  READ COMMITTED two servers could otherwise interleave those. Catalog writes are small and rare
  next to chunk traffic (a commit, a tag, an agent's heartbeat every few seconds), so one lock costs
  nothing measurable and keeps a single meaning for the code in images.py, machines.py and tokens.py.
* **Reads** run outside transactions (autocommit) and see what is committed, from any server.
* **Connections** come from a bounded pool (``MAX_CONNECTIONS`` per process), each checked before
  use, so a PostgreSQL restart or failover costs the requests in flight, not the server: the pool
  reconnects by itself. A process that cannot connect at all when it opens the catalog says so at
  once, with PostgreSQL's own reason.
* **Errors**: a lost or refused connection (or no free connection within ``WAIT_SECONDS``) is
  ``CatalogUnavailable`` (HTTP 503, exit 7); a full disk on the database host is ``NoSpace``; a
  role that may not create or change the tables, or a read-only standby given as the catalog, is
  ``CatalogMisconfigured`` (503, exit 7), with what to grant; a value PostgreSQL refuses as data
  (a NUL character SQLite would have kept) is a ``UsageError`` (400), so that input the checks in
  names.py and machines.py let through is never a 500.
* **Dialect**: catalog code writes SQLite's (``?`` placeholders, SQLite type names in schemas);
  ``pg_sql`` and ``pg_schema`` translate. Text columns use the "C" collation, so names sort as they do
  in SQLite whatever the database's locale; ``REAL`` becomes ``DOUBLE PRECISION`` (timestamps must
  not lose their fraction) and ``INTEGER`` ``BIGINT`` (image sizes pass 2**31).

Crash rules: PostgreSQL's (a commit that returned is durable with the default
``synchronous_commit=on``; one that did not is absent). A connection lost during ``COMMIT`` leaves
the outcome unknown: callers see ``CatalogUnavailable`` and every catalog write is safe to repeat
(versions are content-addressed, tags and hosts are set, not appended).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
import psycopg_pool

from blockprov.errors import CatalogMisconfigured, CatalogUnavailable, NoSpace, UsageError

MAX_CONNECTIONS = 16
WAIT_SECONDS = 5.0  # for a free (or new) connection before a request fails with 503
CONNECT_TIMEOUT = 5  # seconds, per connection attempt
WRITER_LOCK = 0x626C6B70726F76  # "blkprov": the advisory lock every catalog transaction takes


@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """SQLite-style SQL to psycopg's: ``?`` placeholders become ``%s`` (and a literal ``%`` ``%%``)."""
    return sql.replace("%", "%%").replace("?", "%s")


_TYPES = {"TEXT": 'TEXT COLLATE "C"', "REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT", "BLOB": "BYTEA"}


def pg_schema(schema: str) -> str:
    return re.sub(r"\b(TEXT|REAL|INTEGER|BLOB)\b", lambda m: _TYPES[m.group(1)], schema)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"^([a-z]+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class _Tx:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.conn.execute(pg_sql(sql), params)


class PostgresDatabase:
    def __init__(self, url: str) -> None:
        self._url = url
        try:  # fail now, with PostgreSQL's reason, rather than after a pool's wait
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT).close()
        except psycopg.Error as e:
            raise self._unavailable(e) from None
        self.pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=MAX_CONNECTIONS, timeout=WAIT_SECONDS, open=True,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            check=psycopg_pool.ConnectionPool.check_connection, name="blockprov-catalog")

    @property
    def url(self) -> str:
        return redact(self._url)

    def _unavailable(self, e: Exception) -> CatalogUnavailable:
        return CatalogUnavailable(url=self.url, why=_first_line(e))

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg_pool.PoolTimeout:
            raise CatalogUnavailable(url=self.url, why=f"no connection to PostgreSQL within {WAIT_SECONDS:g} s"
                                     ) from None
        except psycopg.errors.DiskFull as e:
            raise NoSpace(msg=f"the catalog database {self.url}: {e}") from None
        except psycopg.DataError as e:  # a value PostgreSQL refuses as data (a NUL in text, a number too big)
            raise UsageError(f"the catalog refused a value: {_first_line(e)}") from None
        except psycopg.errors.InsufficientPrivilege as e:
            raise CatalogMisconfigured(url=self.url, why=f"{_first_line(e)} (the role needs to own the database, "
                                       "or CREATE on its schema and all rights on blockprov's tables)") from None
        except psycopg.errors.ReadOnlySqlTransaction as e:
            raise CatalogMisconfigured(url=self.url, why=f"{_first_line(e)} (is this a standby? give the primary)"
                                       ) from None
        except psycopg.OperationalError as e:
            raise self._unavailable(e) from None

    @contextmanager
    def tx(self) -> Iterator[_Tx]:
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            yield _Tx(conn)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._conn() as conn:
            return conn.execute(pg_sql(sql), params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._conn() as conn:
            return conn.execute(pg_sql(sql), params).fetchall()

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._conn() as conn:  # autocommit: one statement, its own transaction, no writers' lock
            return conn.execute(pg_sql(sql), params).rowcount

    def script(self, schema: str) -> None:
        # Under the writers' lock: concurrent CREATE TABLE IF NOT EXISTS can fail in PostgreSQL.
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            conn.execute(pg_schema(schema).encode())  # several statements: allowed without parameters

    def add_column(self, table: str, column: str, decl: str) -> None:
        with self._conn() as conn, conn.transaction():  # under the writers' lock, as script() is
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            conn.execute(pg_schema(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {decl}").encode())

    def close(self) -> None:
        self.pool.close()
