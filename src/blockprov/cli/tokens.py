"""CLI commands for access tokens: ``token create``, ``token list``, ``token revoke``.

Tokens are managed where the catalog is, like database users on a database host: these commands
work on the embedded repository's catalog (``--data DIR``, or ``--catalog postgresql://…`` from any
host that reaches that database) and refuse ``--repo``. Managing tokens
over HTTP would need a scope above ``write`` and would let a stolen write token mint more; running
them on the repository's host needs nothing but access to its data directory, which is the
repository anyway. ``catalog/tokens.py`` says why tokens look the way they do.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING

import click

from blockprov.catalog.tokens import SCOPES
from blockprov.cli._common import Ctx, check_data_dir, emit, json_option, refuse_closed_output
from blockprov.errors import UsageError
from blockprov.results import to_dict

if TYPE_CHECKING:  # SQLite and the catalog load only when a token command runs (CLI start-up time)
    from blockprov.catalog.images import Catalog
    from blockprov.catalog.tokens import TokenStore



def _store(obj: Ctx, *, create: bool = False) -> tuple[Catalog, TokenStore]:
    if obj.repo_url:
        raise UsageError("tokens are managed on the repository's host, on its data directory: "
                         "run this without --repo / BLOCKPROV_REPO (with --data DIR or --catalog URL)")
    data = check_data_dir(obj.data_dir, create=create)  # only token create makes a new data directory
    data.mkdir(parents=True, exist_ok=True)
    from blockprov.catalog.db import open_database
    from blockprov.catalog.images import Catalog
    from blockprov.catalog.tokens import TokenStore

    catalog = Catalog(open_database(obj.catalog, data))
    return catalog, TokenStore(catalog.db)


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


@click.group("token")
def token() -> None:
    """Access tokens for `blockprov serve` (scopes: read < agent < write)."""


@token.command("create")
@click.option("--scope", required=True, type=click.Choice(SCOPES),
              help="read: read everything; agent: read, register, take and answer requests; write: everything.")
@click.option("--name", default=None, help="Who or what holds it (shown by `token list`, usable by `token revoke`).")
@click.option("--site", default=None, help="Bind it to this site: it joins only this site's peers (a PC's token).")
@json_option
@click.pass_obj
def token_create(obj: Ctx, scope: str, name: str | None, site: str | None, as_json: bool) -> None:
    """Create a token and print it. Only its hash is kept: store it now."""
    refuse_closed_output()  # a secret nobody can read would still turn access control on
    catalog, store = _store(obj, create=True)
    try:
        if site is not None:
            from blockprov.catalog.sites import Sites

            Sites(catalog.db).get(site)  # SiteNotFound: a typo would bind the token to no site at all
        first = not store.any_created()
        value, info = store.create(scope, name, site)
        warning = _first_token_warning(catalog) if first else None
    finally:
        catalog.close()
    if as_json:
        emit(to_dict(info) | {"token": value} | ({"warning": warning} if warning else {}))
        return
    click.echo(value)
    click.echo(f"token {info.id}{f' ({name})' if name else ''} with {scope} scope"
               f"{f', bound to site {site}' if site else ''}: shown only now; "
               f"clients pass it with --token or BLOCKPROV_TOKEN", err=True)
    if warning:
        click.echo(f"warning: {warning}", err=True)


def _first_token_warning(catalog: Catalog) -> str:
    """What the first token changes for everyone else (issue 27 item 2: it silently stopped every
    PC from network-booting): a server with ``--auth auto`` (the default) now wants a token from
    every client, and iPXE cannot send one."""
    from blockprov.catalog.machines import Registry

    hosts = len(Registry(catalog).hosts())
    pcs = (f"{hosts} host(s) assigned here will be refused their boot scripts" if hosts
           else "PCs that network-boot will be refused their boot scripts")
    return ("this is the repository's first token: a server on this catalog with --auth auto (the default) "
            f"requires a token from every client from now on (within 5 s, no restart). {pcs} (their screens say "
            "why) unless the server runs with --anonymous-boot: restart it as `blockprov serve --anonymous-boot …`; "
            "give agents a token (--token, BLOCKPROV_TOKEN; a PC's: host assign … --args blockprov.token=TOKEN)")


@token.command("list")
@json_option
@click.pass_obj
def token_list(obj: Ctx, as_json: bool) -> None:
    """List tokens (never their values): id, name, scope, created, revoked."""
    catalog, store = _store(obj)
    try:
        infos = store.tokens()
    finally:
        catalog.close()
    if as_json:
        emit(infos)
        return
    if not infos:
        click.echo("no tokens (the server runs open until one exists; create one with: "
                   "blockprov token create --scope write)")
    for i in infos:
        state = f"revoked {_when(i.revoked)}" if i.revoked is not None else "active"
        click.echo(f"{i.id}  {i.scope:5}  {i.name or '-':24}  created {_when(i.created)}  {state}"
                   + (f"  site {i.site}" if i.site else ""))


@token.command("revoke")
@click.argument("key", metavar="ID|NAME")
@json_option
@click.pass_obj
def token_revoke(obj: Ctx, key: str, as_json: bool) -> None:
    """Revoke a token; servers refuse it within a few seconds."""
    catalog, store = _store(obj)
    asked = time.time()
    try:
        info = store.revoke(key)
    finally:
        catalog.close()
    if as_json:
        emit(info)
        return
    what = f"{info.id}{f' ({info.name})' if info.name else ''}"
    if info.revoked is not None and info.revoked < asked:  # issue 27: it said "revoked" again
        click.echo(f"{what} was already revoked, at {_when(info.revoked)}")
    else:
        click.echo(f"revoked {what}")


def register(cli: click.Group) -> None:
    cli.add_command(token)
