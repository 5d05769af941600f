"""Site commands: ``site add``, ``site list``, ``site rm``, ``site rotate-secret`` (catalog/sites.py).

A site groups the hosts and agents of one LAN (a café, a classroom): they fetch chunks from each
other and from the site's cache before the repository. docs/operations.md, "Many PCs, many sites".
"""

from __future__ import annotations

import datetime

import click

from blockprov.catalog.sites import ONLINE_SECONDS
from blockprov.cli._common import Ctx, emit, json_option
from blockprov.results import to_dict


@click.group("site")
def site() -> None:
    """Sites: groups of hosts and agents that share chunks on their LAN, and their site cache."""


@site.command("add")
@click.argument("name")
@click.option("--cache", default=None, metavar="URL",
              help="The site cache (`blockprov serve --upstream …`) as the site's machines reach it; '' removes it.")
@json_option
@click.pass_obj
def site_add(obj: Ctx, name: str, cache: str | None, as_json: bool) -> None:
    """Add a site, or change its site cache."""
    info = obj.repo.add_site(name, cache)
    if as_json:
        emit(info)
        return
    click.echo(f"site {info.name}: site cache {info.cache or '-'}")


@site.command("list")
@json_option
@click.pass_obj
def site_list(obj: Ctx, as_json: bool) -> None:
    """List sites with their site cache and online agents."""
    sites = obj.repo.sites()
    agents = obj.repo.agents()
    rows = []
    for s in sites:
        members = [a for a in agents if (a.get("info") or {}).get("site") == s.name]
        up = [a for a in members if a.get("seen_ago", ONLINE_SECONDS) < ONLINE_SECONDS]
        rows.append(to_dict(s) | {"agents": len(members), "agents_online": len(up)})
    if as_json:
        emit(rows)
        return
    if not rows:
        click.echo("no sites (add one with: blockprov site add NAME [--cache URL])")
    for r in rows:
        when = datetime.datetime.fromtimestamp(r["created"]).isoformat(timespec="seconds")
        click.echo(f"{r['name']:24} cache {r['cache'] or '-':32} agents {r['agents_online']}/{r['agents']} online"
                   f"  added {when}")


@site.command("rm")
@click.argument("name")
@click.pass_obj
def site_rm(obj: Ctx, name: str) -> None:
    """Remove a site (its agents stop finding peers when they next join)."""
    obj.repo.remove_site(name)
    click.echo(f"removed site {name}")


@site.command("rotate-secret")
@click.pass_obj
def site_rotate(obj: Ctx) -> None:
    """Make every ticket and site key handed out so far invalid (a PC's token was revoked)."""
    obj.repo.rotate_site_secret()
    click.echo("rotated: agents get new tickets and keys when they next join (within 30 s)")


def register(cli: click.Group) -> None:
    cli.add_command(site)
