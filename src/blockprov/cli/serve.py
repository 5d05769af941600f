"""``blockprov serve``: the repository over HTTP.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from blockprov.cli._common import (
    S3_ONLY,
    Ctx,
    check_data_dir,
    refuse_own_options,
    server_logs,
    size_option,
)
from blockprov.errors import UsageError
from blockprov.names import host_port

if TYPE_CHECKING:
    from blockprov.repo.local import LocalRepository


@click.command("serve")
@click.option("--listen", default="127.0.0.1:8420", show_default=True, metavar="HOST:PORT",
              help="Address to listen on; port 0 picks a free port.")
@click.option("--max-body", default="256M", callback=size_option, show_default=True,
              help="Largest request body accepted (larger ones get 413); each route also has its own, smaller "
                   "limit (x-blockprov-max-body in /openapi.json).")
@click.option("--max-in-flight", default="512M", callback=size_option, show_default=True, metavar="SIZE",
              help="Bytes of request bodies the whole server holds at once; a request that would pass it "
                   "waits, then gets 503.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1, max=3600), default=30.0, show_default=True,
              metavar="SECONDS",
              help="Time a request's headers may take, and the grace before its body must keep coming at "
                   "4 KiB/s or faster; a slower client gets 408 and is disconnected.")
@click.option("--access-log", is_flag=True, help="Log every request to stderr.")
@click.option("--chunk-cache", default="256M", callback=size_option, show_default=True, metavar="SIZE",
              help="Memory for chunks read from an object store (--store s3://…), so that many agents reading "
                   "the same version cost one read per chunk; 0 turns it off. The local pack store needs none.")
@click.option("--auth", "auth_mode", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              envvar="BLOCKPROV_AUTH",
              help="Require tokens: auto = once any token was created (blockprov token create), on = always, "
                   "off = never.")
@click.option("--anonymous-read", is_flag=True, help="Let requests without a token read (not change) the repository.")
@click.option("--anonymous-boot", is_flag=True,
              help="Let requests without a token fetch boot scripts and boot files (for iPXE).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="Serve HTTPS with this PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="The certificate's PEM private key (default: in the --tls-cert file).")
@click.option("--prepare/--no-prepare", default=True, show_default=True, envvar="BLOCKPROV_PREPARE",
              help="When a version gets boot files, prepare its boot profile in the background on this host "
                   "(one headless boot at a time) unless it has or inherits one.")
@click.option("--upstream", default=None, metavar="URL",
              help="Be a site cache of the repository at URL: keep what this site's machines ask for (within "
                   "--cache-size), serve it to all of them, pass everything else on (docs/operations.md, "
                   "'Many PCs, many sites').")
@click.option("--cache-size", default="20G", callback=size_option, show_default=True, metavar="SIZE",
              help="With --upstream: disk space for chunks (least recently used out).")
@click.option("--upstream-token", default=None, envvar="BLOCKPROV_UPSTREAM_TOKEN", metavar="TOKEN",
              help="With --upstream: the read token the site cache fetches chunks with (a site's machines' "
                   "own tokens are passed on for everything else).")
@click.pass_obj
def serve_cmd(obj: Ctx, listen: str, max_body: int, max_in_flight: int, request_timeout: float, access_log: bool,
              chunk_cache: int, auth_mode: str, anonymous_read: bool, anonymous_boot: bool, tls_cert: str | None,
              tls_key: str | None, prepare: bool, upstream: str | None, cache_size: int,
              upstream_token: str | None) -> None:
    """Serve the embedded repository over HTTP to remote agents and tools (or, with --upstream, be a
    site cache of another repository).

    The first line printed is "serving URL" (with the real port when --listen asks for port 0).
    """
    import logging

    from blockprov.service.access import AccessPolicy
    from blockprov.service.run import run_server

    refuse_ignored(obj, upstream is not None)
    server_logs()
    host, port = host_port(listen)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = check_data_dir(obj.data_dir, create=True)  # serve may start an empty repository
    if upstream is not None:
        from blockprov.names import base_url
        from blockprov.service.run import bind, run_site_cache

        url = base_url(upstream)
        if obj.store or obj.catalog:
            raise UsageError("a site cache (--upstream) keeps its own chunks: --store and --catalog are the upstream's")
        try:
            if port:
                bind(host, port).close()
            run_site_cache(data, url, cache_size, host, port, token=upstream_token, access_log=access_log,
                           on_ready=lambda u: click.echo(f"serving {u} (site cache of {url})"),
                           tls_cert=tls_cert, tls_key=tls_key, max_body=max_body, in_flight=max_in_flight,
                           request_timeout=request_timeout)
        except OSError as e:
            raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from None
        return
    from blockprov.catalog.db import open_database

    catalog = open_database(obj.catalog, data)
    store = None
    if obj.store:
        from blockprov.store.factory import open_store

        store = open_store(obj.store, data, obj.store_options)
    try:
        if port:  # a busy port is the one error line, not after the start-up warnings (bound again below)
            from blockprov.service.run import bind

            bind(host, port).close()
        hook = None
        if prepare:
            from blockprov.vm.prepare import cli_prefix, schedule

            def hook(repo: LocalRepository, image: str, vid: str) -> str:
                return schedule(repo, image, vid, cli_prefix(data, obj.store, obj.catalog), data / "prepare")

        run_server(data, host, port, max_body=max_body, store=store, catalog=catalog,
                   chunk_cache=chunk_cache, in_flight=max_in_flight, request_timeout=request_timeout, prepare=hook,
                   access_log=access_log, on_ready=lambda url: click.echo(f"serving {url}"),
                   access=AccessPolicy(auth_mode, anonymous_read, anonymous_boot), tls_cert=tls_cert,
                   tls_key=tls_key)
    except OSError as e:  # bind failures: port in use, bad address
        raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from None


# serve's own options that only one of its two forms uses: the repository's, the site cache's (--upstream)
REPOSITORY_ONLY = ("auth_mode", "anonymous_read", "anonymous_boot", "chunk_cache", "prepare")
SITE_CACHE_ONLY = ("cache_size", "upstream_token")


def refuse_ignored(obj: Ctx, site_cache: bool) -> None:
    """An option typed that this form of serve would not use is refused, not ignored (issue 27: ``serve
    --repo URL`` served --data, ``--cache-size`` without --upstream and ``--auth on`` with it did nothing)."""
    obj.refuse_typed(("repo", "token", "ca"), "serve serves the repository in --data (a site cache names its "
                                              "repository with --upstream URL and its token with --upstream-token)")
    if not (obj.store or "").startswith("s3://"):
        obj.refuse_typed(S3_ONLY, "the S3 options are for an s3:// --store")
    if site_cache:
        refuse_own_options(REPOSITORY_ONLY, "a site cache (--upstream) follows the upstream's access rules and keeps "
                                            "chunks on disk (--cache-size); the upstream prepares boot profiles")
    else:
        refuse_own_options(SITE_CACHE_ONLY, "a site cache's option (serve --upstream URL)")


def register(cli: click.Group) -> None:
    cli.add_command(serve_cmd)
