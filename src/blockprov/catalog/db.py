"""Which SQL database holds the catalog: ``open_database(spec, data_dir)``, and what both offer.

``spec`` is what ``--catalog`` / ``BLOCKPROV_CATALOG`` say: nothing (or ``sqlite``) for the embedded
default, ``DATA/catalog.sqlite``; ``postgresql://…`` (or ``postgres://…``) for a catalog shared by
several servers on several hosts (postgres.py; docs/architecture.md says why PostgreSQL).

Both speak one small dialect so that catalog code is written once: ``?`` placeholders,
``INSERT … ON CONFLICT … DO UPDATE/NOTHING`` (no ``INSERT OR REPLACE``), schemas in SQLite's type
names (``TEXT``, ``INTEGER``, ``REAL``, ``BLOB``), which postgres.py maps. Their transactions have
one meaning: writers are serialized (SQLite's ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so
check-then-write inside ``tx()`` is safe; ``one``/``all`` read committed data outside any transaction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from blockprov.errors import UsageError


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...  # DB-API: a sequence of (name, …) per column of the last SELECT

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ...) -> Cursor: ...


class SQLDatabase(Protocol):
    @property
    def url(self) -> str:
        """Where the database is, fit for messages (no password)."""
        ...

    def tx(self) -> AbstractContextManager[Tx]: ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One statement that needs no check before it (a heartbeat): atomic, durable, but not
        serialized with ``tx()`` writers, so frequent small writes never queue behind them. Returns
        the rows changed."""
        ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...

    def script(self, schema: str) -> None:
        """Run ``CREATE … IF NOT EXISTS`` statements (every process does on open: that is migration)."""
        ...

    def add_column(self, table: str, column: str, decl: str) -> None:
        """Give an existing ``table`` the column if it lacks it (``decl``: an SQLite type name and
        constraints, nullable or with a default): the migration of a table made by an older version.
        Safe when several processes open the catalog at once."""
        ...

    def close(self) -> None: ...


def is_shared(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(("postgresql://", "postgres://"))


def open_database(spec: str | None, data_dir: str | os.PathLike[str]) -> SQLDatabase:
    if spec in (None, "", "sqlite"):
        from blockprov.sqlite import Database

        return Database(Path(data_dir) / "catalog.sqlite", timeout=30.0)
    if is_shared(spec):
        from blockprov.catalog.postgres import PostgresDatabase

        return PostgresDatabase(str(spec))
    raise UsageError(f"--catalog must be 'sqlite' (the default: in the data directory) or "
                     f"postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DATABASE, not {spec!r}")
