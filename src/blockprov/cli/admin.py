"""CLI commands that work on a repository's data where it is: ``catalog copy`` (between SQLite
and PostgreSQL, catalog/copy.py) and ``store copy`` (its chunks into another store, store/copy.py),
which together take a repository from one host to several, ``store reindex`` (the pack store's
index rebuilt from its packs) and ``check`` (every chunk read and verified, repo/check.py). Like the
token commands they run with ``--data DIR``, ``--store`` and ``--catalog``, never through
``--repo``."""

from __future__ import annotations

from contextlib import ExitStack, closing
from pathlib import Path

import click

from blockprov import humanize as hz
from blockprov.cli._common import Ctx, check_data_dir, default_data_dir, emit, json_option, progress_bar
from blockprov.errors import ChunkCorrupt, IntegrityError, UsageError


def _here(obj: Ctx) -> None:
    if obj.repo_url:
        raise UsageError("a repository's data is copied where it is: run this without --repo / BLOCKPROV_REPO "
                         "(with --data DIR, --store, --catalog)")


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
    _here(obj)
    from blockprov.catalog.copy import copy_catalog
    from blockprov.catalog.db import is_shared, open_database
    from blockprov.sqlite import Database

    data = Path(obj.data_dir or default_data_dir())  # no catalog there is refused below, with its own line
    if not is_shared(obj.catalog) and not (data / "catalog.sqlite").exists():
        raise UsageError(f"there is no catalog to copy: {data / 'catalog.sqlite'} does not exist "
                         "(give --data DIR, or --catalog URL)")
    if not is_shared(target) and Path(target).exists():
        raise UsageError(f"{target} exists already: copy into a new SQLite file")
    with ExitStack() as stack:
        src = stack.enter_context(closing(open_database(obj.catalog, data)))
        dst = stack.enter_context(closing(open_database(target, data) if is_shared(target)
                                          else Database(target, timeout=30.0)))
        try:
            stats = copy_catalog(src, dst)
        except BaseException:
            if not is_shared(target):  # leave no half-made file behind to refuse the next try
                stack.close()
                for suffix in ("", "-wal", "-shm"):
                    Path(target + suffix).unlink(missing_ok=True)
            raise
    if as_json:
        emit({"source": src.url, "target": dst.url, "rows": stats.rows})
        return
    click.echo(f"copied {src.url} to {dst.url}: "
               + ", ".join(f"{n} {t}" for t, n in stats.rows.items()))


@click.group("store")
def store() -> None:
    """The repository's chunk store (packs in the data directory by default, or S3 with --store)."""


@store.command("copy")
@click.option("--to", "target", required=True, metavar="s3://BUCKET/PREFIX|local",
              help="The store to copy into (the --s3-* options and AWS_* variables apply to it).")
@json_option
@click.pass_obj
def store_copy(obj: Ctx, target: str, as_json: bool) -> None:
    """Copy every chunk of this repository's store (the one --data/--store name) into another.

    Only chunks the target lacks are sent, each verified on arrival; running it again copies
    nothing new. Then serve with --store TARGET (the catalog does not change: it names chunks by
    content). A damaged source chunk is listed and not copied (exit 4)."""
    _here(obj)
    from blockprov.store.copy import copy_store
    from blockprov.store.factory import open_store

    # The local source is the data directory's packs: refuse one that is not there (a typo would copy
    # nothing, successfully). An S3 source needs none; a bad --to is named by open_store below.
    local_source = not obj.store or obj.store == "local"
    data = (check_data_dir(obj.data_dir, create=False) if local_source and (target == "local" or
                                                                            target.startswith("s3://"))
            else Path(obj.data_dir or default_data_dir()))
    with ExitStack() as stack:
        src = stack.enter_context(closing(open_store(obj.store, data, obj.store_options)))
        dst = stack.enter_context(closing(open_store(target, data, obj.store_options)))
        with progress_bar(None, f"copy chunks to {target}", not as_json) as bar:
            st = copy_store(src, dst, bar)
    if as_json:
        emit(st.__dict__)
    else:
        click.echo(f"{st.chunks} chunks: {st.copied} copied ({st.bytes_copied} bytes stored), "
                   f"{st.present} already there, {len(st.damaged)} damaged")
    if st.damaged:
        raise ChunkCorrupt(digest=", ".join(st.damaged[:10]) + (" …" if len(st.damaged) > 10 else ""),
                           why=f"{len(st.damaged)} source chunks failed verification and were not copied "
                               "(blockprov check --drop-damaged, then an import of an image that holds them, "
                               "repairs the source)")


@store.command("reindex")
@json_option
@click.pass_obj
def store_reindex(obj: Ctx, as_json: bool) -> None:
    """Rebuild the pack store's index (DATA/chunks/index.sqlite) from the packs themselves.

    For an index that was lost or damaged: every record of every pack is read and verified, and
    what is not indexed yet is indexed again. Safe while a server runs. Then run `blockprov check`."""
    _here(obj)
    from blockprov.store.factory import open_store
    from blockprov.store.pack import PackChunkStore

    data = check_data_dir(obj.data_dir, create=False)
    if obj.store and obj.store != "local":
        raise UsageError(f"only the pack store has an index to rebuild; {obj.store} keeps one object per chunk")
    with closing(open_store(None, data)) as st:
        assert isinstance(st, PackChunkStore)
        found, damaged = st.rebuild_index()
    if as_json:
        emit({"indexed": found, "damaged": damaged})
    else:
        click.echo(f"{found} records indexed, {damaged} damaged records skipped")


@click.command("check")
@click.option("--drop-damaged", is_flag=True,
              help="Remove damaged chunks from the store, so that importing an image that holds them repairs them.")
@json_option
@click.pass_obj
def check(obj: Ctx, drop_damaged: bool, as_json: bool) -> None:
    """Read and verify every chunk the repository's versions and boot files name.

    Names the versions a missing or damaged chunk spoils (exit 4); run it on a schedule, as one
    scrubs a RAID, so damage is found before a machine reads it."""
    _here(obj)
    from blockprov.repo.check import check_repository
    from blockprov.repo.local import LocalRepository

    repo = obj.repo
    assert isinstance(repo, LocalRepository)  # _here refused --repo
    with progress_bar(None, "check", not as_json) as bar:
        rep = check_repository(repo, drop_damaged=drop_damaged, progress=bar)
    if as_json:
        emit(rep.__dict__ | {"ok": rep.ok})
    else:
        click.echo(f"{rep.versions} versions, {rep.chunks} chunks, {rep.bytes_read} stored bytes read: "
                   + ("all intact" if rep.ok else f"{len(rep.missing)} missing, {len(rep.damaged)} damaged"))
        for v in rep.affected:
            click.echo(f"  damaged: {v}")
        if rep.unindexed_bytes:
            click.echo(f"  {hz.size(rep.unindexed_bytes)} in {rep.unindexed_packs} pack file(s) hold no indexed chunk "
                       "(chunks gc removed, or an import or upload that failed): gc gives it back once it is an hour "
                       "old")
    if not rep.ok:
        what = ("dropped from the store: import an image that holds them, or a verified upload, repairs them"
                if rep.dropped else "check --drop-damaged, then an import of an image that holds them, repairs them")
        raise IntegrityError(f"{len(rep.affected)} versions or boot files name {len(rep.missing)} missing and "
                             f"{len(rep.damaged)} damaged chunks ({what})")


def register(cli: click.Group) -> None:
    cli.add_command(catalog)
    cli.add_command(store)
    cli.add_command(check)
