"""CLI command ``catalog copy``: move a repository's catalog between SQLite and PostgreSQL
(catalog_copy.py says what a copy is). Like the token commands it runs where the catalog is
(``--data DIR`` / ``--catalog URL``), never through ``--repo``."""

from __future__ import annotations

from pathlib import Path

import click

from .cli import Ctx, default_data_dir, emit
from .errors import UsageError

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group("catalog")
def catalog() -> None:
    """The repository's catalog database (SQLite by default, or PostgreSQL with --catalog)."""


@catalog.command("copy")
@click.option("--to", "target", required=True, metavar="postgresql://…|FILE",
              help="An empty PostgreSQL database, or a new SQLite file (e.g. /backup/catalog.sqlite).")
@json_option
@click.pass_obj
def catalog_copy(obj: Ctx, target: str, as_json: bool) -> None:
    """Copy this repository's whole catalog (the one --data/--catalog name) into an empty one.

    Stop the servers that write the catalog first. Then point them at the copy with --catalog
    (the chunks do not move: they stay in --store)."""
    if obj.repo_url:
        raise UsageError("the catalog is copied on the repository's host: run this without --repo / BLOCKPROV_REPO "
                         "(with --data DIR or --catalog URL)")
    from .catalog_copy import copy_catalog
    from .db import is_shared, open_database
    from .sqlite import Database

    data = Path(obj.data_dir or default_data_dir())
    if not is_shared(target) and Path(target).exists():
        raise UsageError(f"{target} exists already: copy into a new SQLite file")
    src = open_database(obj.catalog, data)
    try:
        dst = open_database(target, data) if is_shared(target) else Database(target, timeout=30.0)
        try:
            stats = copy_catalog(src, dst)
        except BaseException:
            if not is_shared(target):  # leave no half-made file behind to refuse the next try
                dst.close()
                for suffix in ("", "-wal", "-shm"):
                    Path(target + suffix).unlink(missing_ok=True)
            raise
        finally:
            dst.close()
    finally:
        src.close()
    if as_json:
        emit({"source": src.url, "target": dst.url, "rows": stats.rows})
        return
    click.echo(f"copied {src.url} to {dst.url}: "
               + ", ".join(f"{n} {t}" for t, n in stats.rows.items()))


def register(cli: click.Group) -> None:
    cli.add_command(catalog)
