"""The ``blockprov`` command line. Errors from anywhere are mapped to messages and exit codes here.

The repository comes from ``--repo URL`` / ``BLOCKPROV_REPO`` (a ``blockprov serve`` endpoint),
else the embedded local repository in ``--data DIR`` / ``BLOCKPROV_DATA`` / the user data directory.
Read commands take ``--json`` for scripts; humans get progress bars on a terminal.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import platformdirs

from . import __version__
from . import humanize as hz
from .errors import BlockprovError, UsageError
from .manifest import DEFAULT_CHUNK
from .names import parse_ref
from .repo.base import Repository
from .store.factory import StoreOptions


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("blockprov"))


def open_repository(repo_url: str | None, data_dir: str | None, store: str | None = None,
                    store_options: StoreOptions | None = None, *, cacheable: bool = False,
                    token: str | None = None, ca: str | None = None, catalog: str | None = None) -> Repository:
    """``--repo URL[,URL…]`` (several: a FailoverRepository), else the embedded repository in the data
    directory, with its chunks in ``store`` (``--store``: local packs or ``s3://BUCKET/PREFIX``) and its
    catalog in ``catalog`` (``--catalog``: SQLite in the data directory, or ``postgresql://…``).
    ``cacheable``: fetch chunks with per-chunk GETs an HTTP cache can keep (``attach --cacheable-fetch``).
    ``token``/``ca``: the access token sent to servers and the CA their certificates must chain to."""
    if repo_url:
        urls = [u.strip() for u in repo_url.split(",") if u.strip()]
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise UsageError(f"--repo must be http:// or https:// URLs (comma-separated), not {u!r}")
        from .repo.remote import RemoteRepository

        if len(urls) == 1:
            return RemoteRepository(urls[0], cacheable=cacheable, token=token, ca=ca)
        from .repo.multi import FailoverRepository

        return FailoverRepository([RemoteRepository(u, cacheable=cacheable, token=token, ca=ca) for u in urls])
    from .repo.local import LocalRepository
    from .store.factory import open_store

    data = data_dir or default_data_dir()
    from .db import open_database

    db = open_database(catalog, data)  # first: a bad --catalog must not leave an S3 client behind
    return LocalRepository(data, store=open_store(store, data, store_options) if store else None, catalog=db)


class Ctx:
    def __init__(self, repo_url: str | None, data_dir: str | None, store: str | None = None,
                 store_options: StoreOptions | None = None) -> None:
        self.repo_url = repo_url
        self.data_dir = data_dir
        self.store = store
        self.store_options = store_options
        self.cacheable = False  # set by attach --cacheable-fetch before the repository is opened
        self.token: str | None = None  # --token / BLOCKPROV_TOKEN
        self.ca: str | None = None  # --ca / BLOCKPROV_CA
        self.catalog: str | None = None  # --catalog / BLOCKPROV_CATALOG
        self._repo: Repository | None = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = open_repository(self.repo_url, self.data_dir, self.store, self.store_options,
                                         cacheable=self.cacheable, token=self.token, ca=self.ca,
                                         catalog=self.catalog)
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def fail(err: BlockprovError) -> NoReturn:
    click.echo(f"blockprov: error: {err}", err=True)
    missing = getattr(err, "missing", None)
    if missing:
        for cid in missing[:10]:
            click.echo(f"  missing chunk {cid}", err=True)
        if len(missing) > 10:
            click.echo(f"  … and {len(missing) - 10} more", err=True)
    sys.exit(err.exit_code)


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A byte progress bar on stderr when it is a terminal; a no-op otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar.update


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BlockprovError as e:
            fail(e)
        except KeyboardInterrupt:
            click.echo("blockprov: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as e:  # a bug: say so plainly; the traceback only on request
            if os.environ.get("BLOCKPROV_DEBUG"):
                raise
            click.echo(f"blockprov: internal error: {type(e).__name__}: {e} "
                       "(set BLOCKPROV_DEBUG=1 for a traceback)", err=True)
            sys.exit(70)


json_option: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", envvar="BLOCKPROV_REPO", metavar="URL",
              help="Repository server URL (env BLOCKPROV_REPO); default: the embedded local repository.")
@click.option("--data", envvar="BLOCKPROV_DATA", metavar="DIR",
              help="Data directory of the embedded repository (env BLOCKPROV_DATA).")
@click.option("--store", envvar="BLOCKPROV_STORE", metavar="local|s3://BUCKET/PREFIX",
              help="Where the embedded repository (and serve) keeps chunks (env BLOCKPROV_STORE); "
                   "default: packs in the data directory.")
@click.option("--catalog", envvar="BLOCKPROV_CATALOG", metavar="sqlite|postgresql://…",
              help="Where the embedded repository keeps its catalog (env BLOCKPROV_CATALOG); default: SQLite in "
                   "the data directory. A PostgreSQL URL lets several servers on several hosts share one catalog "
                   "(with one --store bucket).")
@click.option("--s3-endpoint", envvar="BLOCKPROV_S3_ENDPOINT", metavar="URL",
              help="S3 endpoint (default: AWS_ENDPOINT_URL, ~/.aws/config, else AWS).")
@click.option("--s3-region", envvar="BLOCKPROV_S3_REGION", metavar="REGION",
              help="S3 region (default: AWS_REGION, ~/.aws/config, else us-east-1).")
@click.option("--s3-create-bucket", is_flag=True, help="Create the --store bucket if it does not exist.")
@click.option("--s3-timeout", envvar="BLOCKPROV_S3_TIMEOUT", default=30.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="Seconds temporary S3 failures are retried.")
@click.option("--token", envvar="BLOCKPROV_TOKEN", metavar="TOKEN",
              help="Access token sent to the repository server (env BLOCKPROV_TOKEN).")
@click.option("--ca", envvar="BLOCKPROV_CA", metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Trust only this CA (PEM) for https:// repositories (env BLOCKPROV_CA); default: the system's.")
@click.version_option(__version__, prog_name="blockprov")
@click.pass_context
def cli(ctx: click.Context, repo: str | None, data: str | None, store: str | None, catalog: str | None,
        s3_endpoint: str | None,
        s3_region: str | None, s3_create_bucket: bool, s3_timeout: float, token: str | None,
        ca: str | None) -> None:
    """Provision machines and VMs from golden disk images at block level."""
    ctx.obj = Ctx(repo, data, store, StoreOptions(endpoint=s3_endpoint, region=s3_region,
                                                  create_bucket=s3_create_bucket, timeout=s3_timeout))
    ctx.obj.token, ctx.obj.ca, ctx.obj.catalog = token or None, ca or None, catalog or None
    ctx.call_on_close(ctx.obj.close)


def _size_option(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return hz.parse_size(value)
    except ValueError:
        raise click.BadParameter(f"not a size: {value!r}") from None


def _labels(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in value:
        if "=" not in item:
            raise click.BadParameter(f"labels are KEY=VALUE, not {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


@cli.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=str))
@click.argument("ref", metavar="NAME:TAG")
@click.option("--chunk-size", default=str(DEFAULT_CHUNK), callback=_size_option, show_default=True,
              help="Chunk size, a power of two from 4K to 4M.")
@click.option("--format", "fmt", default=None, help="Source format (default: detected by qemu-img).")
@click.option("--label", "labels", multiple=True, callback=_labels, metavar="KEY=VALUE")
@json_option
@click.pass_obj
def import_cmd(obj: Ctx, source: str, ref: str, chunk_size: int, fmt: str | None, labels: dict[str, str],
               as_json: bool) -> None:
    """Import a disk image (raw, qcow2, vmdk, vhdx, …) as a new version of NAME:TAG."""
    from .importer import import_image

    target = parse_ref(ref, allow_version=False)
    total: list[int] = []
    with progress_bar(None, f"import {target}", not as_json) as bar:
        vid, stats = import_image(obj.repo, source, target, chunk_size=chunk_size, fmt=fmt, labels=labels,
                                  progress=bar, on_size=total.append)
    d = stats.to_dict() | {"image": target.name, "tag": target.tag, "id": vid}
    if as_json:
        emit(d)
        return
    click.echo(f"imported {source} as {target.name}:{target.tag} = {target.name}@{vid}")
    click.echo(f"  virtual size   {hz.size(stats.source_bytes)} in {stats.chunks} chunks of {hz.size(chunk_size)}")
    click.echo(f"  read           {hz.size(stats.bytes_read)} (holes skipped)")
    click.echo(f"  zero chunks    {stats.zero_chunks} (never stored)")
    click.echo(f"  unique chunks  {stats.unique_chunks}, new to the repository {stats.new_chunks}")
    share = 100.0 * stats.new_bytes_stored / stats.bytes_read if stats.bytes_read else 0.0
    click.echo(f"  new bytes      {hz.size(stats.new_bytes_stored)} stored after dedup and compression "
               f"({share:.1f}% of the data read)")
    if stats.seconds:
        click.echo(f"  time           {stats.seconds:.2f} s "
                   f"({hz.size(stats.source_bytes / stats.seconds)}/s of virtual disk)")


@cli.command("export")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.argument("dest", type=click.Path(path_type=str))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@json_option
@click.pass_obj
def export_cmd(obj: Ctx, ref: str, dest: str, fmt: str, as_json: bool) -> None:
    """Write a version to a file or block device."""
    from .exporter import export_image

    m = obj.repo.resolve(ref)
    with progress_bar(m.stored_bytes_logical(), f"export {ref}", not as_json) as bar:
        export_image(obj.repo, parse_ref(ref), dest, fmt=fmt, progress=bar)
    if as_json:
        emit({"ref": ref, "id": m.id, "dest": dest, "format": fmt, "size": m.size})
    else:
        click.echo(f"exported {m.image}@{m.id} ({hz.size(m.size)}) to {dest} as {fmt}")


@cli.command("images")
@json_option
@click.pass_obj
def images_cmd(obj: Ctx, as_json: bool) -> None:
    """List images, their tags and number of versions."""
    imgs = obj.repo.images()
    if as_json:
        emit([i.to_dict() for i in imgs])
        return
    if not imgs:
        click.echo("no images (import one with: blockprov import DISK NAME:TAG)")
    for i in imgs:
        tags = ", ".join(f"{t}→{v}" for t, v in sorted(i.tags.items())) or "-"
        click.echo(f"{i.name:24} {i.versions:3} version(s)  tags: {tags}")


@cli.command("versions")
@click.argument("name")
@json_option
@click.pass_obj
def versions_cmd(obj: Ctx, name: str, as_json: bool) -> None:
    """List the versions of an image, oldest first."""
    vs = obj.repo.versions(name)
    if as_json:
        emit([v.to_dict() for v in vs])
        return
    for v in vs:
        when = datetime.datetime.fromtimestamp(v.created).isoformat(timespec="seconds")
        click.echo(f"{v.image}@{v.id}  {when}  {hz.size(v.size):>10}  parent={v.parent or '-'}  "
                   f"tags={','.join(v.tags) or '-'}")


@cli.command("show")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@json_option
@click.pass_obj
def show_cmd(obj: Ctx, ref: str, as_json: bool) -> None:
    """Show one version: size, chunks, zero chunks, parent, labels."""
    m = obj.repo.resolve(ref)
    d = m.summary() | {"raw_url": obj.repo.raw_url(parse_ref(ref)), "repository": obj.repo.url}
    if as_json:
        emit(d)
        return
    click.echo(f"{m.image}@{m.id}")
    click.echo(f"  size        {hz.size(m.size)} ({m.size} bytes)")
    click.echo(f"  chunks      {d['chunks']} × {hz.size(m.chunk_size)}: {d['zero_chunks']} zero, "
               f"{d['unique_chunks']} unique stored")
    click.echo(f"  parent      {m.parent or '-'}")
    click.echo(f"  created     {datetime.datetime.fromtimestamp(m.created).isoformat(timespec='seconds')}")
    if m.labels:
        click.echo("  labels      " + ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())))
    if d["raw_url"]:
        click.echo(f"  raw view    {d['raw_url']}")


@cli.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@json_option
@click.pass_obj
def diff_cmd(obj: Ctx, a: str, b: str, as_json: bool) -> None:
    """Chunks that differ from version A to version B."""
    changed = obj.repo.diff(parse_ref(a), parse_ref(b))
    mb = obj.repo.resolve(b)
    if as_json:
        emit({"a": a, "b": b, "chunk_size": mb.chunk_size, "changed": changed})
        return
    click.echo(f"{len(changed)} of {mb.count} chunks differ ({hz.size(len(changed) * mb.chunk_size)})")
    if changed:
        runs = _runs(changed)
        shown = ", ".join(f"{s}" if s == e else f"{s}-{e}" for s, e in runs[:20])
        click.echo(f"  chunks {shown}{' …' if len(runs) > 20 else ''}")


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


@cli.command("tag")
@click.argument("src", metavar="NAME:TAG|NAME@ID")
@click.argument("dst", metavar="NAME:TAG")
@click.pass_obj
def tag_cmd(obj: Ctx, src: str, dst: str) -> None:
    """Point tag DST at the version SRC names."""
    s, d = parse_ref(src), parse_ref(dst, allow_version=False)
    if s.name != d.name:
        raise UsageError(f"tags name versions of the same image ({s.name} ≠ {d.name})")
    m = obj.repo.resolve(s)
    assert d.tag is not None
    obj.repo.set_tag(d.name, d.tag, m.id)
    click.echo(f"{d} → {m.image}@{m.id}")


@cli.command("rm")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.pass_obj
def rm_cmd(obj: Ctx, ref: str) -> None:
    """Remove a tag, or a version with its tags. Chunks go at the next gc."""
    for gone in obj.repo.remove(parse_ref(ref)):
        click.echo(f"removed {gone}")


@cli.command("gc")
@json_option
@click.pass_obj
def gc_cmd(obj: Ctx, as_json: bool) -> None:
    """Delete chunks no version references (chunks younger than an hour are kept for uploads in progress)."""
    st = obj.repo.gc()
    if as_json:
        emit(st.to_dict())
    else:
        click.echo(f"removed {st.chunks_removed} chunks ({hz.size(st.bytes_removed)}), kept {st.chunks_kept}")


@cli.command("serve")
@click.option("--listen", default="127.0.0.1:8420", show_default=True, metavar="HOST:PORT",
              help="Address to listen on; port 0 picks a free port.")
@click.option("--max-body", default="256M", callback=_size_option, show_default=True,
              help="Largest request body accepted (larger ones get 413).")
@click.option("--access-log", is_flag=True, help="Log every request to stderr.")
@click.option("--chunk-cache", default="256M", callback=_size_option, show_default=True, metavar="SIZE",
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
@click.pass_obj
def serve_cmd(obj: Ctx, listen: str, max_body: int, access_log: bool, chunk_cache: int, auth_mode: str,
              anonymous_read: bool, anonymous_boot: bool, tls_cert: str | None, tls_key: str | None) -> None:
    """Serve the embedded repository over HTTP to remote agents and tools.

    The first line printed is "serving URL" (with the real port when --listen asks for port 0).
    """
    import logging

    from .service.access import AccessPolicy
    from .service.run import run_server

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen must be HOST:PORT, not {listen!r}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = obj.data_dir or default_data_dir()
    from .db import open_database

    catalog = open_database(obj.catalog, data)
    store = None
    if obj.store:
        from .store.factory import open_store

        store = open_store(obj.store, data, obj.store_options)
    try:
        run_server(data, host.strip("[]"), int(port), max_body=max_body, store=store, catalog=catalog,
                   chunk_cache=chunk_cache,
                   access_log=access_log, on_ready=lambda url: click.echo(f"serving {url}"),
                   access=AccessPolicy(auth_mode, anonymous_read, anonymous_boot), tls_cert=tls_cert,
                   tls_key=tls_key)
    except OSError as e:  # bind failures: port in use, bad address
        raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from None


def run_async(coro: Any) -> Any:
    """Run the agent's event loop: uvloop when installed (faster transports), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(coro)
    return uvloop.run(coro)


@cli.command("attach")
@click.argument("ref", required=False, metavar="[NAME:TAG|NAME@ID]")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cache directory (created if needed).")
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve NBD on this unix socket.")
@click.option("--listen", metavar="HOST:PORT", help="Serve NBD on TCP (port 0 picks one).")
@click.option("--data-file", type=click.Path(dir_okay=False, path_type=str),
              help="Keep the image data in this existing file or block device instead of DIR/data.")
@click.option("--readahead", default="32M", callback=_size_option, show_default=True,
              help="Largest read-ahead window on sequential reads (0 disables).")
@click.option("--fetch-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds a read of a missing chunk retries an unreachable repository before EIO.")
@click.option("--read-only", is_flag=True, help="Refuse writes.")
@click.option("--cacheable-fetch", is_flag=True, envvar="BLOCKPROV_CACHEABLE_FETCH",
              help="Fetch chunks with one GET each (cacheable by an HTTP cache in front of the repository) "
                   "instead of batched POSTs.")
@click.option("--reset-on-start", is_flag=True,
              help="Reboot-to-restore: reset the instance to its base version before serving.")
@click.option("--hydrate", is_flag=True, help="Copy every missing chunk in the background while serving.")
@click.option("--hydrate-rate", default=None, metavar="BYTES/S",
              callback=lambda c, p, v: None if v is None else _size_option(c, p, v),
              help="Limit hydration's transfer rate, e.g. 50M.")
@click.option("--no-profile", is_flag=True,
              help="Do not prefetch in the version's recorded boot order, nor record one for it.")
@click.option("--instance", metavar="ID", help="Name to register with the repository (default: from the cache).")
@click.option("--no-register", is_flag=True, help="Do not register with the repository nor take its requests.")
@click.option("--metrics", "metrics_at", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9420; port 0 picks one).")
@json_option
@click.pass_obj
def attach_cmd(obj: Ctx, ref: str | None, cache_dir: Path, sock: Path | None, listen: str | None,
               data_file: str | None, readahead: int, fetch_timeout: float, read_only: bool,
               cacheable_fetch: bool, reset_on_start: bool, hydrate: bool, hydrate_rate: int | None,
               no_profile: bool, instance: str | None, no_register: bool, metrics_at: str | None,
               as_json: bool) -> None:
    """Serve a version as an NBD export backed by a lazy local cache, until SIGINT/SIGTERM.

    Without NAME:TAG the version the cache already holds is re-attached (no repository round trip).
    """
    from .agent.agent import Agent, AgentConfig, parse_listen

    cache_dir = cache_dir.resolve()
    if sock is None and listen is None:
        raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
    obj.cacheable = cacheable_fetch
    manifest = obj.repo.resolve(parse_ref(ref)) if ref else None
    if manifest is None and not (cache_dir / "meta").exists():
        raise UsageError(f"{cache_dir} holds no cache yet: name the version to attach (NAME:TAG)")
    cfg = AgentConfig(cache_dir=cache_dir, socket=sock, listen=parse_listen(listen) if listen else None,
                      data_path=data_file, readahead=readahead, fetch_timeout=fetch_timeout, read_only=read_only,
                      reset_on_start=reset_on_start, hydrate=hydrate,
                      hydrate_rate=float(hydrate_rate) if hydrate_rate else None, use_profile=not no_profile,
                      instance=instance, register=not no_register,
                      metrics=parse_listen(metrics_at) if metrics_at else None)

    async def main() -> None:
        agent = Agent(cfg, obj.repo, manifest)
        addresses = await agent.start()
        assert agent.device is not None
        m = agent.device.manifest
        if as_json:
            click.echo(json.dumps({"image": m.image, "version": m.id, "addresses": addresses, "pid": os.getpid(),
                                   "instance": agent.instance, "metrics": agent.metrics_url}))
        else:
            st = agent.device.status()
            click.echo(f"serving {m.image}@{m.id} ({hz.size(m.size)}, {st['chunks_present']}/{st['chunks_total']} "
                       f"chunks local) from cache {cache_dir}")
            for a in addresses:
                click.echo(f"  {a}")
            if agent.metrics_url:
                click.echo(f"  metrics {agent.metrics_url}")
            click.echo("stop with Ctrl-C or SIGTERM")
        sys.stdout.flush()
        await agent.run()
        if not as_json:
            click.echo("stopped cleanly")

    run_async(main())


@cli.command("status")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@json_option
def status_cmd(cache_dir: Path, as_json: bool) -> None:
    """Show a cache: version, chunks present / modified, fetch figures, whether an agent serves it."""
    from .agent.agent import status

    cache_dir = cache_dir.resolve()
    st = status(cache_dir)
    if as_json:
        emit(st)
        return
    total = st["chunks_total"] or 1
    local = st["chunks_present"] + st["chunks_zero"]
    click.echo(f"{st['image']}@{st['version']}  {hz.size(st['size'])} in chunks of {hz.size(st['chunk_size'])}")
    click.echo(f"  local     {local}/{st['chunks_total']} chunks ({100.0 * local / total:.1f}%): "
               f"{st['chunks_present']} with data, {st['chunks_zero']} zero; {st['chunks_missing']} to fetch")
    click.echo(f"  modified  {st['chunks_modified']} chunks since the base version")
    tot = st.get("totals", {})
    click.echo(f"  fetched   {hz.size(tot.get('bytes_fetched', 0))} in {tot.get('chunks_fetched', 0)} chunks "
               f"({hz.size(tot.get('wire_bytes', 0))} on the wire) over all agent runs")
    agent = st.get("agent", {})
    if agent.get("running"):
        lat = st.get("fetch_latency_ms", {})
        if lat.get("p50") is not None:
            click.echo(f"  latency   fetch p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms "
                       f"(since the agent started)")
        click.echo(f"  agent     running, pid {agent['pid']}, up {agent.get('uptime', 0):.0f} s")
        for a in agent.get("addresses", []):
            click.echo(f"            {a}")
    else:
        click.echo("  agent     not running" + ("" if st.get("clean_shutdown", True) else
                                               " (last stop was unclean: the next attach recovers it)"))


from .cli_admin import register as _register_admin  # noqa: E402  catalog copy, store copy/reindex, check
from .cli_clones import register as _register_clones  # noqa: E402  clone, clones, pool
from .cli_hosts import register as _register_hosts  # noqa: E402  boot-files, host, agents, profile show
from .cli_instance import register as _register_instance  # noqa: E402  reset, snapshot, update, hydrate
from .cli_tokens import register as _register_tokens  # noqa: E402  token create, list, revoke

_register_instance(cli)
_register_clones(cli)
_register_hosts(cli)
_register_tokens(cli)
_register_admin(cli)


def main() -> None:
    cli(prog_name="blockprov")


if __name__ == "__main__":
    main()
