"""``blockprov reset / snapshot / update / hydrate / profile save``: an instance's lifecycle
(and ``profile show``, which reads a version's boot profile from the repository).

Each lifecycle command works on a cache directory, through the agent serving it or on the cache opened
here (agent/offline.py: ``on_cache``); each passes the operation it would run on an opened cache.

``snapshot --instance ID`` is the repository side of claims 10 and 34: it queues a request for a
registered agent (which long-polls its repository) and waits for the agent's answer.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from blockprov import humanize as hz
from blockprov.agent import control
from blockprov.agent.offline import on_cache
from blockprov.cli._common import (
    MEMORY_HELP,
    Ctx,
    emit,
    json_option,
    memory_option,
    progress_bar,
    quiet_library_logs,
    refuse_own_options,
    run_async,
    size_option,
)
from blockprov.errors import AgentDied, AgentNotRunning, BlockprovError, UsageError
from blockprov.names import parse_ref
from blockprov.results import from_dict, to_dict

if TYPE_CHECKING:  # the device stack loads asyncio and more: only commands that open a cache import it
    from blockprov.agent import keep, lifecycle
    from blockprov.agent.hydrate import HydrationStatus
    from blockprov.agent.lifecycle import SnapshotResult
    from blockprov.cache import CacheDevice
    from blockprov.repo.base import Repository

R = TypeVar("R")

CACHE_OPTION = click.option("--cache", "cache_dir", required=True,
                            type=click.Path(file_okay=False, path_type=Path), help="The instance's cache directory.")
FETCH_TIMEOUT_OPTION = click.option(
    "--fetch-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600),
    help="Without a running agent: seconds a fetch retries an unreachable repository before the command "
         "fails (exit 7).")


async def _watching(dev: CacheDevice, work: Awaitable[R], total: int | None, desc: str, enabled: bool) -> R:
    """Run ``work`` on an offline cache with a bar of the bytes it fetches (the device's own
    counter, polled: the lifecycle steps need no progress hook for it)."""
    import asyncio

    with progress_bar(total, desc, enabled) as bar:
        seen = dev.totals()["bytes_fetched"]
        task = asyncio.ensure_future(work)
        while not task.done():
            await asyncio.wait([task], timeout=0.2)
            now = dev.totals()["bytes_fetched"]
            bar(now - seen)
            seen = now
        return task.result()


@click.command("reset")
@CACHE_OPTION
@click.option("--eager", is_flag=True, help="Fetch the reset chunks now, so the next session starts fully local.")
@FETCH_TIMEOUT_OPTION
@json_option
@click.pass_obj
def reset_cmd(obj: Ctx, cache_dir: Path, eager: bool, fetch_timeout: float, as_json: bool) -> None:
    """Bring the instance back to its base version: only the chunks modified since are touched.

    Lazily (default) the modified chunks are forgotten and fetched again on first read; --eager
    fetches them now. On a running agent, requests in flight finish first; clients then read the
    base (a guest's own page cache is not the agent's to clear: reset between sessions).
    """
    from blockprov.agent import lifecycle

    async def offline(dev: CacheDevice, repo: Repository) -> lifecycle.ResetResult:
        if not eager:
            return await lifecycle.reset(dev, eager=False)
        total = dev.chunks.counts()["modified"] * dev.manifest.chunk_size
        return await _watching(dev, lifecycle.reset(dev, eager=True), total, "reset: fetch", not as_json)

    quiet_library_logs()

    out = on_cache(cache_dir, "reset", {"eager": eager}, offline, obj.repository_for, lifecycle.ResetResult,
                   fetch_timeout=fetch_timeout)
    if as_json:
        emit(out)
        return
    click.echo(f"reset {out.chunks_reset} modified chunk(s) to the base version {out.version} "
               f"in {out.seconds * 1000:.1f} ms" + (f"; fetched {out.chunks_refetched} again" if eager else ""))
    if out.chunks_from_repository is None:  # an agent of an older version does not say
        return
    if not out.chunks_from_repository:
        click.echo("  every chunk is local: none depends on the repository")
    else:
        click.echo(f"  {out.reset_from_repository} of them and {out.chunks_from_repository} chunk(s) in all "
                   "now depend on the repository: reads of them fail while it is unreachable")


@click.command("snapshot")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The instance's cache directory (on this machine).")
@click.option("--instance", help="A registered agent instance to ask (repository side; see `blockprov agents`).")
@click.option("--to", "to", required=True, metavar="NAME:TAG", help="The new version's name.")
@click.option("--target", default="default", show_default=True,
              help="Snapshot target: each keeps its own record of what it has received.")
@click.option("--rebase", is_flag=True, help="Make the new version the instance's reset base.")
@click.option("--wait", "wait_s", default=3600.0, show_default=True, type=click.FloatRange(0, 86400),
              help="With --instance: seconds to wait for the agent's answer.")
@json_option
@click.pass_obj
def snapshot_cmd(obj: Ctx, cache_dir: Path | None, instance: str | None, to: str, target: str, rebase: bool,
                 wait_s: float, as_json: bool) -> None:
    """Send the chunks modified since the base (only those the repository lacks) and commit them
    as a new version; the repository's answer is the acknowledgement."""
    if (cache_dir is None) == (instance is None):
        raise UsageError("give --cache DIR (a local instance) or --instance ID (a registered agent)")
    if instance is None:
        refuse_own_options(("wait_s",), "it is how long a registered agent (--instance) is waited for; a "
                                        "snapshot of a local instance (--cache) runs to its end")
    args = {"to": to, "target": target, "rebase": rebase}
    if instance is not None:
        out = _remote_snapshot(obj.repo, instance, args, wait_s)
    else:
        from blockprov.agent import lifecycle

        assert cache_dir is not None

        async def offline(dev: CacheDevice, repo: Repository) -> lifecycle.SnapshotResult:
            total = dev.chunks.counts()["modified"] * dev.manifest.chunk_size
            with progress_bar(total, f"snapshot {to}", not as_json) as bar:
                return await lifecycle.snapshot(dev, repo, to, target=target, rebase=rebase, progress=bar)

        quiet_library_logs()

        out = on_cache(cache_dir, "snapshot", args, offline, obj.repository_for, lifecycle.SnapshotResult)
    if as_json:
        emit(out)
        return
    if out.unchanged:
        click.echo(f"unchanged: the instance equals {out.image}@{out.version}, which {out.image}:{out.tag} "
                   f"now names; no new version was committed" + ("; it is now the reset base" if out.rebased else ""))
    else:
        click.echo(f"snapshot {out.image}@{out.version} ({out.image}:{out.tag}): "
                   f"{out.chunks_modified} modified chunk(s), sent {out.chunks_sent} "
                   f"({hz.size(out.bytes_sent)}) to target {out.target} in {out.seconds:.2f} s"
                   + ("; it is now the reset base" if out.rebased else ""))
    if out.chunks_written_during:
        click.echo(f"  {out.chunks_written_during} chunk(s) were written during the snapshot: "
                   "they stay unsynced for the next one")


def _remote_snapshot(repo: Repository, instance: str, args: dict[str, Any], wait_s: float) -> SnapshotResult:
    rid = repo.post_request(instance, "snapshot", args)
    try:
        return _wait_request(repo, instance, rid, wait_s)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"request {rid} stays queued: agent {instance} takes it when it next asks (see: "
                                "blockprov agents)") from None


def _wait_request(repo: Repository, instance: str, rid: str, wait_s: float) -> SnapshotResult:
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        st = repo.get_request(instance, rid, wait=max(0.0, min(25.0, left)))
        if st["state"] == "done":
            from blockprov.agent.lifecycle import SnapshotResult

            return from_dict(SnapshotResult, st["result"])
        if st["state"] == "failed":
            raise BlockprovError(msg=f"agent {instance} could not snapshot: {st.get('error')}")
        if left <= 0:
            raise BlockprovError(msg=f"agent {instance} has not answered request {rid} within {wait_s:g} s "
                                     f"(state {st['state']}); it stays queued")


@click.command("update")
@CACHE_OPTION
@click.option("--to", "to", required=True, metavar="NAME:TAG|NAME@ID", help="The version to move to.")
@click.option("--keep-modified", is_flag=True,
              help="Keep the user's modified chunks of the partitions the new version leaves unchanged (a "
                   "user-data partition); refused (exit 5) when other chunks are modified, unless --force "
                   "(default: discard every modified chunk).")
@click.option("--force", is_flag=True,
              help="With --keep-modified: reset the modified chunks that cannot be kept instead of refusing "
                   "(snapshot the instance first to keep them as a version).")
@click.option("--lazy", is_flag=True, help="Do not fetch the changed chunks now; fetch them on first read.")
@FETCH_TIMEOUT_OPTION
@json_option
@click.pass_obj
def update_cmd(obj: Ctx, cache_dir: Path, to: str, keep_modified: bool, force: bool, lazy: bool,
               fetch_timeout: float, as_json: bool) -> None:
    """Move the instance to another version of its image, transferring only the chunks that differ.

    Modified chunks are never laid over another version's file systems: --keep-modified keeps only
    those of partitions the new version leaves exactly as they were (same place, size, type and
    content); a whole-disk file system can only be reset."""
    from blockprov.agent import keep

    if force and not keep_modified:
        raise UsageError("--force goes with --keep-modified (without it every modified chunk is discarded)")
    args = {"to": to, "keep_modified": keep_modified, "force": force, "lazy": lazy}

    async def offline(dev: CacheDevice, repo: Repository) -> keep.KeptUpdate:
        import asyncio

        new = await asyncio.get_running_loop().run_in_executor(None, repo.resolve, to)
        work = keep.update(dev, repo, new, keep_modified=keep_modified, force=force, eager=not lazy,
                           where=str(cache_dir))
        return await _watching(dev, work, None, f"update to {to}", not as_json and not lazy)

    quiet_library_logs()

    out = on_cache(cache_dir, "update", args, offline, obj.repository_for, keep.KeptUpdate,
                   fetch_timeout=fetch_timeout)
    if as_json:
        emit(out)
        return
    u = out.update
    click.echo(f"updated {u.from_version} → {u.version}: {u.chunks_changed} chunk(s) differ, "
               f"fetched {u.chunks_refetched} ({hz.size(u.bytes_fetched)}) in {u.seconds:.2f} s")
    plan = out.keep
    if plan is not None:
        click.echo(f"  kept {u.modified_kept} modified chunk(s), reset {u.modified_discarded}"
                   + (f" (no partition table: {plan.why})" if plan.table == "none" else ""))
        for p in plan.partitions:
            click.echo(f"  partition {p.number} ({hz.size(p.size)} at {hz.size(p.start)}): "
                       f"{p.modified_chunks} modified chunk(s), {'kept' if p.kept else 'reset'} — {p.why}")
    elif u.modified_discarded:
        click.echo(f"  discarded {u.modified_discarded} modified chunk(s)")


@click.command("hydrate")
@CACHE_OPTION
@click.option("--rate", default=None, callback=lambda c, p, v: None if v is None else size_option(c, p, v),
              metavar="BYTES/S", help="Limit the transfer rate, e.g. 50M.")
@click.option("--background", is_flag=True, help="With a running agent: start and return at once.")
@FETCH_TIMEOUT_OPTION
@json_option
@click.pass_obj
def hydrate_cmd(obj: Ctx, cache_dir: Path, rate: int | None, background: bool, fetch_timeout: float,
                as_json: bool) -> None:
    """Copy every missing chunk into the cache (client reads keep priority); stops by itself: when
    every chunk is local, or (without a running agent) when the repository stays unreachable for
    --fetch-timeout (exit 7) or the cache disk is full (exit 12)."""
    from blockprov.agent.hydrate import HydrationStatus, Hydrator
    from blockprov.agent.instance import StatusReport

    cache_dir = cache_dir.resolve()
    args = {"rate": rate}
    show = not as_json and sys.stderr.isatty()

    async def offline(dev: CacheDevice, repo: Repository) -> HydrationStatus:
        import asyncio
        h = Hydrator(dev, rate=rate)
        task = h.start()
        while not task.done():
            _progress(h.status(), show)
            await asyncio.wait([task], timeout=0.5)
            if h.state in ("paused", "failed") and h.fault is not None:
                # Offline nobody waits for the repository to come back: the fetcher already retried
                # for the fetch timeout, so stop, as other commands do (exit 7, or 12 for a full disk).
                await h.stop()
                if show:
                    click.echo("", err=True)
                raise h.fault
        task.result()
        return h.status()

    quiet_library_logs()

    out = on_cache(cache_dir, "hydrate", args, offline, obj.repository_for, HydrationStatus,
                   fetch_timeout=fetch_timeout)
    if out.state != "done" and not background:
        try:
            while out.state not in ("done", "stopped", "failed"):
                _progress(out, show)
                time.sleep(0.5)
                try:
                    st = from_dict(StatusReport, control.call(cache_dir, "status", timeout=10.0))
                except (AgentNotRunning, AgentDied):
                    raise AgentDied(path=str(cache_dir), op="hydrate", outcome=_hydration_left(cache_dir)) from None
                out = st.hydration or HydrationStatus(state="stopped")
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"the agent serving {cache_dir} goes on hydrating in the background (see: "
                                    f"blockprov status --cache {cache_dir})") from None
    if show:
        click.echo("", err=True)
    if as_json:
        emit(out)
        return
    click.echo(f"hydration {out.state}: {out.percent}% local, fetched "
               f"{hz.size(out.bytes_fetched)}" + (f" — {out.message}" if out.message else ""))


def _hydration_left(cache_dir: Path) -> str:
    """What a hydration whose agent died leaves: the chunks it fetched are kept (each was recorded
    present only once its data was written)."""
    from blockprov.agent.agent import status

    try:
        st = status(cache_dir).device.cache
    except BlockprovError as e:
        return f"the cache cannot be read now ({e})"
    return (f"hydration stopped with {st.chunks_missing} of {st.chunks_total} chunk(s) still to fetch; what "
            "it fetched is kept (attach again, then hydrate, to go on)")


def _progress(st: HydrationStatus, show: bool) -> None:
    if not show:
        return
    line = (f"\rhydrating: {st.percent:5.1f}%  {hz.size(st.rate_bytes_per_s)}/s"
            + (f"  ETA {st.eta_seconds:.0f} s" if st.eta_seconds is not None else "")
            + (f"  {st.message}" if st.message else ""))
    click.echo(line.ljust(80), err=True, nl=False)


@click.group("profile")
def profile_group() -> None:
    """Boot profiles: the order in which a boot first reads chunks, kept with the version."""


@profile_group.command("save")
@CACHE_OPTION
@json_option
@click.pass_obj
def profile_save_cmd(obj: Ctx, cache_dir: Path, as_json: bool) -> None:
    """Store this cache's first-read order with its version in the repository; later attaches of
    the version prefetch (and hydrate) in that order first."""
    cache_dir = cache_dir.resolve()

    from blockprov.agent.instance import ReadOrder

    async def offline(dev: CacheDevice, repo: Repository) -> ReadOrder:
        m = dev.manifest
        return ReadOrder(image=m.image, version=m.id, order=dev.profile())

    quiet_library_logs()

    got = on_cache(cache_dir, "profile", {}, offline, obj.repository_for, ReadOrder)
    order = [int(i) for i in got.order]
    if not order:
        raise UsageError(f"{cache_dir} has recorded no reads yet: boot from it first")
    repo = obj.repository_for(cache_dir)
    repo.put_profile(got.image, got.version, order)
    out = {"image": got.image, "version": got.version, "chunks": len(order), "repository": repo.url}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"saved a boot profile of {len(order)} chunk(s) for {got.image}@{got.version} in {repo.url}")


@profile_group.command("record")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True,
              help="Seconds the recording boot may take at most.")
@click.option("--idle", type=click.FloatRange(1, 3600), default=20.0, show_default=True,
              help="Seconds without a new chunk read that end a boot that does not power off.")
@click.option("--memory", default="512", show_default=True, callback=memory_option,
              help=f"Guest memory ({MEMORY_HELP}).")
@click.option("--append", default="", help="Extra kernel arguments (with the version's boot files).")
@json_option
@click.pass_obj
def profile_record_cmd(obj: Ctx, ref: str, timeout: float, idle: float, memory: int, append: str,
                       as_json: bool) -> None:
    """Boot the version once, headless, next to the repository (qemu, TCG) through a throwaway
    cache that records the order the boot reads chunks, and save that order as its boot profile:
    its first real machine then boots warm. Direct kernel boot with the version's boot files when
    it has them, else its own boot loader. Ends when the guest powers off or reads nothing new for
    --idle seconds."""
    from blockprov.vm.record import record  # qemu and the cache load only for this command

    quiet_library_logs()
    r = parse_ref(ref)
    m = obj.repo.resolve(r)
    got = run_async(record(obj.repo, m, timeout=timeout, idle=idle, memory=f"{memory >> 20}M", append=append))
    out = {**to_dict(got), "repository": obj.repo.url}
    if as_json:
        emit(out)
        return
    how = "its boot files" if got.direct_kernel else "its own boot loader"
    click.echo(f"recorded a boot profile of {got.chunks} chunk(s) for {got.image}@{got.version} in "
               f"{got.seconds:.0f} s (booted with {how}; ended: {got.ended}); saved in {obj.repo.url}")


@profile_group.command("prepare")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=600.0, show_default=True,
              help="Seconds the preparing boot may take at most.")
@click.option("--idle", type=click.FloatRange(1, 3600), default=20.0, show_default=True,
              help="Seconds without a new chunk read that end a boot that does not power off.")
@json_option
@click.pass_obj
def profile_prepare_cmd(obj: Ctx, ref: str, timeout: float, idle: float, as_json: bool) -> None:
    """Prepare the version's boot profile on the repository's host, one preparation at a time
    (what `boot-files set`/`build` and `serve` start in the background): skipped when it has or
    inherits one; blockprov's network-boot initramfs is booted as a PC boots it. Needs the
    repository's data directory (--data), not --repo."""
    from blockprov.repo.local import LocalRepository
    from blockprov.vm.prepare import prepare

    repo = obj.repo
    if not isinstance(repo, LocalRepository):
        raise UsageError("profile prepare runs on the repository's host, on its data directory: use --data DIR "
                         "(a server prepares the versions it records boot files for by itself)")
    def serve(mode: str, on_fetch: Callable[[list[bytes]], None]) -> AbstractContextManager[str]:
        from blockprov.service.access import AccessPolicy
        from blockprov.service.run import ServerThread

        return ServerThread(repo, AccessPolicy(mode), on_fetch=on_fetch)

    quiet_library_logs()
    got = run_async(prepare(repo, ref, serve, timeout=timeout, idle=idle))
    if as_json:
        emit(got)
        return
    click.echo(f"{got['image']}@{got['version']}: {got['state']}: {got['detail']}")


@profile_group.command("show")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@json_option
@click.pass_obj
def profile_show(obj: Ctx, ref: str, as_json: bool) -> None:
    """Show the boot profile recorded for a version (the order its chunks were first read), or
    the one it inherits from the version it was made from."""
    r = parse_ref(ref)
    vid = r.version or obj.repo.resolve(r).id
    order = obj.repo.get_profile(r.name, vid)
    inherited = order is not None and obj.repo.get_profile(r.name, vid, inherit=False) is None
    if as_json:
        emit({"image": r.name, "version": vid, "chunks": order, "inherited": inherited})
        return
    if order is None:
        click.echo(f"no boot profile recorded for {r.name}@{vid}")
        return
    head = ", ".join(map(str, order[:20]))
    click.echo(f"{r.name}@{vid}: {len(order)} chunks in first-read order: {head}{' …' if len(order) > 20 else ''}"
               + ("\n(inherited from the version it was made from, until it records its own)" if inherited else ""))


def register(cli: click.Group) -> None:
    for cmd in (reset_cmd, snapshot_cmd, update_cmd, hydrate_cmd, profile_group):
        cli.add_command(cmd)

