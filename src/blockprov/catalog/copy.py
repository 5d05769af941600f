"""Copy a whole catalog into an empty one: SQLite → PostgreSQL when a repository outgrows one
host, or PostgreSQL → an SQLite file (a portable copy, or the way back).

Why it works on rows, not on objects: the catalog's tables (images.py, machines.py, tokens.py) are
created from the same schema text in both databases, so a row read from one is a row of the other,
column for column, and a copy is exact: version ids, token hashes, leases, timestamps and all.

Crash rules: the whole copy is one transaction of the target (all of it, or nothing: run it again)
and it refuses a target that holds anything, so it never merges two catalogs. The source is only
read; stop the servers that write it first, or what they write meanwhile is not copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockprov.catalog.db import SQLDatabase
from blockprov.catalog.images import Catalog
from blockprov.catalog.machines import Registry
from blockprov.catalog.tokens import TokenStore
from blockprov.errors import UsageError

# Parents before children (foreign keys are checked row by row).
TABLES = ("versions", "tags", "boot_files", "profiles", "hosts", "agents", "agent_requests", "tokens",
          "tag_history")


@dataclass
class CopyStats:
    rows: dict[str, int] = field(default_factory=dict)


def _open(db: SQLDatabase) -> Catalog:
    """The catalog over ``db`` with every table created (as any server opening it would)."""
    cat = Catalog(db)
    Registry(cat)
    TokenStore(db)
    return cat


def copy_catalog(src: SQLDatabase, dst: SQLDatabase) -> CopyStats:
    _open(src)
    _open(dst)
    stats = CopyStats()
    with dst.tx() as tx:
        held = {t: tx.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
        if any(held.values()):
            what = ", ".join(f"{n} {t}" for t, n in held.items() if n)
            raise UsageError(f"the target catalog {dst.url} is not empty ({what}); copy only into an empty one")
        for t in TABLES:
            with src.tx() as stx:  # by column name: a column added on open sits last, wherever SCHEMA has it
                cur = stx.execute(f"SELECT * FROM {t}")
                cols = [d[0] for d in cur.description]
                rows = cur.fetchall()
            if rows:
                insert = f"INSERT INTO {t} ({', '.join(cols)}) VALUES ({','.join('?' * len(cols))})"
                for r in rows:
                    tx.execute(insert, tuple(r))
            stats.rows[t] = len(rows)
    return stats
