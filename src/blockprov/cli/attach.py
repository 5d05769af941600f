"""The agent on this host: ``attach`` serves a version from a cache over NBD, ``status`` shows a cache.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import click

from blockprov import humanize as hz
from blockprov.cli._common import (
    Ctx,
    activated_sockets,
    check_creatable,
    emit,
    json_option,
    listening,
    refuse_own_options,
    run_async,
    server_logs,
    size_option,
)
from blockprov.errors import BlockprovError, NoSpace, UsageError
from blockprov.names import base_url, host_port, parse_ref, site_name


@click.command("attach")
@click.argument("ref", required=False, metavar="[NAME:TAG|NAME@ID]")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cache directory (created if needed).")
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve NBD on this unix socket.")
@click.option("--listen", metavar="HOST:PORT", help="Serve NBD on TCP (port 0 picks one).")
@click.option("--data-file", type=click.Path(dir_okay=False, path_type=str),
              help="Keep the image data in this existing file or block device instead of DIR/data.")
@click.option("--readahead", default="32M", callback=size_option, show_default=True,
              help="Largest read-ahead window on sequential reads (0 disables).")
@click.option("--fetch-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a read of a missing chunk retries an unreachable repository before EIO.")
@click.option("--nbd-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1, 86400),
              help="Seconds an NBD client may stay silent in the middle of a request, or take none of the "
                   "replies waiting for it, before it is dropped.")
@click.option("--read-only", is_flag=True, help="Refuse writes.")
@click.option("--cacheable-fetch", is_flag=True, envvar="BLOCKPROV_CACHEABLE_FETCH",
              help="Fetch chunks with one GET each (cacheable by an HTTP cache in front of the repository) "
                   "instead of batched POSTs.")
@click.option("--reset-on-start", is_flag=True,
              help="Reboot-to-restore: reset the instance to its base version before serving.")
@click.option("--hydrate", is_flag=True, help="Copy every missing chunk in the background while serving.")
@click.option("--hydrate-rate", default=None, metavar="BYTES/S",
              callback=lambda c, p, v: None if v is None else size_option(c, p, v),
              help="Limit hydration's transfer rate, e.g. 50M.")
@click.option("--no-profile", is_flag=True,
              help="Do not prefetch in the version's recorded boot order, nor record one for it.")
@click.option("--instance", metavar="ID", help="Name to register with the repository (default: from the cache).")
@click.option("--no-register", is_flag=True, help="Do not register with the repository nor take its requests.")
@click.option("--metrics", "metrics_at", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9420; port 0 picks one).")
@click.option("--site", default=None, envvar="BLOCKPROV_SITE",
              help="Take part in this site's peer sharing: fetch chunks from its other agents, serve them ours.")
@click.option("--peer-listen", default="0.0.0.0:0", show_default=True, metavar="HOST:PORT|none",
              help="With --site: serve chunks to the site's peers here (port 0 picks one; none: only fetch).")
@click.option("--peer-url", default=None, metavar="URL",
              help="With --site: how peers reach --peer-listen (default: its address, or this host's address "
                   "toward the repository).")
@click.option("--peer-slots", default=8, show_default=True, type=click.IntRange(1, 256),
              help="With --site: peer requests served at once (more wait; beyond 64 waiting a peer is turned away).")
@click.option("--peer-rate", default=None, metavar="BYTES/S",
              callback=lambda c, p, v: None if v is None else size_option(c, p, v),
              help="With --site: most bytes per second sent to peers, e.g. 50M (default: no limit).")
@json_option
@click.pass_obj
def attach_cmd(obj: Ctx, ref: str | None, cache_dir: Path, sock: Path | None, listen: str | None,
               data_file: str | None, readahead: int, fetch_timeout: float, nbd_timeout: float, read_only: bool,
               cacheable_fetch: bool, reset_on_start: bool, hydrate: bool, hydrate_rate: int | None,
               no_profile: bool, instance: str | None, no_register: bool, metrics_at: str | None,
               site: str | None, peer_listen: str, peer_url: str | None, peer_slots: int, peer_rate: int | None,
               as_json: bool) -> None:
    """Serve a version as an NBD export backed by a lazy local cache, until SIGINT/SIGTERM.

    Without NAME:TAG the version the cache already holds is re-attached (no repository round trip).

    Started by systemd socket activation (LISTEN_FDS, as nbdkit and qemu-nbd are; also
    nbdinfo -- [ blockprov attach ... ]) it serves the sockets it was given, without --socket or
    --listen, and prints its banner on stderr.
    """
    if site is None:
        refuse_own_options(("peer_listen", "peer_url", "peer_slots", "peer_rate"), "the peer options are for an "
                                                                                 "agent of a site (--site SITE)")
    if not obj.repo_url:
        refuse_own_options(("cacheable_fetch",), "it fetches from a repository server (--repo URL) through an HTTP "
                                                 "cache; the embedded repository is read from its files")
    server_logs()
    from blockprov.agent.agent import Agent, AgentConfig
    from blockprov.cache import is_cache

    cache_dir = cache_dir.resolve()
    activated = activated_sockets(sock, listen)
    err = bool(activated)  # an activated server's stdout is its starter's (nbdinfo prints there)
    if sock is not None:
        check_creatable(sock, "socket")
    check_creatable(cache_dir / "meta", "cache")
    obj.cacheable = cacheable_fetch
    exists = is_cache(cache_dir)
    # A cache keeps using the repository it was attached with (every endpoint of a failover list)
    # unless --repo / --data name another; the agent refuses one that lacks the cache's version.
    repo = obj.repository_for(cache_dir) if exists else obj.repo
    manifest = repo.resolve(parse_ref(ref)) if ref else None
    if manifest is None and not exists:
        raise UsageError(f"{cache_dir} holds no cache yet: name the version to attach (NAME:TAG)")
    cfg = AgentConfig(cache_dir=cache_dir, socket=sock, listen=host_port(listen) if listen else None,
                      data_path=data_file, readahead=readahead, fetch_timeout=fetch_timeout, read_only=read_only,
                      nbd_timeout=nbd_timeout,
                      reset_on_start=reset_on_start, hydrate=hydrate,
                      hydrate_rate=float(hydrate_rate) if hydrate_rate else None, use_profile=not no_profile,
                      instance=instance, register=not no_register,
                      metrics=host_port(metrics_at, "--metrics") if metrics_at else None, activated=activated,
                      site=site_name(site) if site else None,
                      peer_listen=host_port(peer_listen, "--peer-listen") if site and peer_listen != "none" else None,
                      peer_url=base_url(peer_url) if peer_url else None, peer_slots=peer_slots,
                      peer_rate=float(peer_rate) if peer_rate else None)

    async def main() -> None:
        agent = Agent(cfg, repo, manifest)
        with listening(listen, metrics_at):
            addresses = await agent.start()
        assert agent.device is not None
        m = agent.device.manifest
        if as_json:
            click.echo(json.dumps({"image": m.image, "version": m.id, "addresses": addresses, "pid": os.getpid(),
                                   "instance": agent.instance, "metrics": agent.metrics_url, "site": site,
                                   "peer_url": agent.peer_url}), err=err)
        else:
            counts = agent.device.chunks.counts()
            click.echo(f"serving {m.image}@{m.id} ({hz.size(m.size)}, {counts['present']}/{counts['total']} "
                       f"chunks local) from cache {cache_dir}", err=err)
            for a in addresses:
                click.echo(f"  {a}", err=err)
            if agent.metrics_url:
                click.echo(f"  metrics {agent.metrics_url}", err=err)
            if agent.site is not None:
                m_ = agent.peers.membership if agent.peers is not None else None
                click.echo(f"  site {site}: {len(m_.peers) if m_ else 0} peer(s) online"
                           + (f", serving them at {agent.peer_url}" if agent.peer_url else "")
                           + (f" ({agent.site.last_error})" if agent.site.last_error else ""), err=err)
            click.echo("stop with Ctrl-C or SIGTERM", err=err)
        sys.stdout.flush()
        try:
            await agent.run()
        except (BlockprovError, OSError) as e:
            if not _disk_full(e):
                raise
            raise NoSpace(msg=f"cache {cache_dir}: the agent stopped, but could not write its clean-shutdown "
                              "state (the next attach recovers from the journal)") from None
        if not as_json:
            click.echo("stopped cleanly", err=err)

    run_async(main())


@click.command("status")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@json_option
def status_cmd(cache_dir: Path, as_json: bool) -> None:
    """Show a cache: version, chunks present / modified, fetch figures, whether an agent serves it."""
    from blockprov.agent.agent import status
    from blockprov.agent.instance import AgentInfo

    cache_dir = cache_dir.resolve()
    report = status(cache_dir)
    if as_json:
        emit(report)
        return
    st = report.device.cache
    total = st.chunks_total or 1
    local = st.chunks_present + st.chunks_zero
    click.echo(f"{st.image}@{st.version}  {hz.size(st.size)} in chunks of {hz.size(st.chunk_size)}")
    click.echo(f"  local     {local}/{st.chunks_total} chunks ({100.0 * local / total:.1f}%): "
               f"{st.chunks_present} with data, {st.chunks_zero} zero; {st.chunks_missing} to fetch")
    click.echo(f"  modified  {st.chunks_modified} chunks since the base version")
    if st.chunks_from_repository is not None:  # an agent of an older version does not say
        click.echo(f"  depends   {st.chunks_from_repository} chunks can only be read from the repository")
    agent = report.agent or AgentInfo()
    click.echo(f"  repo      {st.repository or '-'}"
               + (f" (agent: {agent.repository})" if agent.repository and agent.repository != st.repository
                  else ""))
    hyd = report.hydration
    if hyd is not None:
        click.echo(f"  hydrate   {hyd.state}: {hyd.percent}% local, fetched "
                   f"{hz.size(hyd.bytes_fetched)} at {hz.size(hyd.rate_bytes_per_s)}/s"
                   + (f", ETA {hyd.eta_seconds:.0f} s" if hyd.eta_seconds is not None else "")
                   + (f" — {hyd.message}" if hyd.message else ""))
    elif st.hydrated:
        click.echo(f"  hydrated  every chunk local since {_when(st.hydrated)}")
    prof = report.profile
    if prof is not None:
        click.echo(f"  profile   {prof.chunks} chunk(s) prefetched in boot order"
                   + (" (inherited from the version this one was made from)" if prof.inherited else ""))
    for name, t in sorted(st.targets.items()):
        shown = f"last snapshot {t.last_snapshot}" if t.last_snapshot else "never snapshotted"
        click.echo(f"  target    {name}: {t.unsynced_chunks} chunk(s) not sent yet; {shown}")
    tot = st.totals
    click.echo(f"  fetched   {hz.size(tot.bytes_fetched)} in {tot.chunks_fetched} chunks "
               f"({hz.size(tot.wire_bytes)} on the wire) over all agent runs")
    if agent.running:
        lat = report.device.fetch.fetch_latency_ms if report.device.fetch is not None else None
        if lat is not None and lat.p50 is not None:
            click.echo(f"  latency   fetch p50 {lat.p50} ms, p90 {lat.p90} ms, p99 {lat.p99} ms "
                       f"(since the agent started)")
        click.echo(f"  agent     running, pid {agent.pid}, up {agent.uptime or 0:.0f} s")
        for a in agent.addresses or []:
            click.echo(f"            {a}")
    else:
        click.echo("  agent     not running" + ("" if report.device.clean_shutdown in (True, None) else
                                               " (last stop was unclean: the next attach recovers it)"))


def _disk_full(e: BaseException) -> bool:
    """A full disk, however it was wrapped (the cache reports a failed checkpoint as an I/O error
    whose cause is the OSError)."""
    if isinstance(e, NoSpace):
        return True
    cause = e if isinstance(e, OSError) else e.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")


def register(cli: click.Group) -> None:
    for cmd in (attach_cmd, status_cmd):
        cli.add_command(cmd)
