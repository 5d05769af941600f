"""``blockprov clone``, ``clones serve|list|rm`` and ``pool create|serve|acquire|release|status``.

Clones and pools live in a directory of overlays over shared base caches (clones/clones.py,
clones/pool.py). One process serves a directory: ``clones serve`` or ``pool serve``. Commands that
change a directory ask that process when it runs (through the directory's control socket), and
work on the files themselves when it does not; the domain functions they call decide which.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from blockprov import humanize as hz
from blockprov.cli._common import (
    Ctx,
    activated_sockets,
    check_creatable,
    check_data_dir,
    emit,
    json_option,
    listening,
    progress_bar,
    run_async,
    server_logs,
)
from blockprov.clones.customize import BUILTIN_IDENTITY
from blockprov.errors import AgentNotRunning, CustomizeFailed, NotFound, PoolExhausted, UsageError
from blockprov.names import host_port, instance_id, parse_ref, pool_name

if TYPE_CHECKING:  # the agent's modules load asyncio and the device stack: only commands that run them import them
    from blockprov.clones.clones import ClonesAgent

CLONE_GROUP = 16  # instances made between two updates of clone's progress bar
F = TypeVar("F", bound=Callable[..., Any])


def report_options(default: str) -> Callable[[F], F]:
    """``--instance`` / ``--no-register`` of the serving commands (as ``attach`` has them)."""
    def wrap(fn: F) -> F:
        fn = click.option("--no-register", is_flag=True,
                          help="Do not register with the repository (no report to its console, `blockprov agents`)."
                          )(fn)
        return click.option("--instance", metavar="ID", callback=lambda c, p, v: None if v is None else instance_id(v),
                            help=f"Name to register with the repository as (default: {default}).")(fn)
    return wrap

DIR_OPTION = click.option("--dir", "root", required=True, type=click.Path(file_okay=False, path_type=Path),
                          help="The clones directory.")
CUSTOMIZE_HELP = (f"Run this shell command on each new instance's export before it is handed out (env "
                  f"BLOCKPROV_INSTANCE, BLOCKPROV_INDEX, BLOCKPROV_NBD); '{BUILTIN_IDENTITY}' gives each its own "
                  "hostname and /etc/machine-id in its ext4 root.")


@click.command("clone")
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10000))
@DIR_OPTION
@click.option("--prefix", help="Instance names are PREFIX1, PREFIX2, … (default: the image name and '-').")
@click.option("--customize", "customize_cmd", metavar="CMD", help=CUSTOMIZE_HELP)
@json_option
@click.pass_obj
def clone_cmd(obj: Ctx, ref: str, count: int, root: Path, prefix: str | None, customize_cmd: str | None,
              as_json: bool) -> None:
    """Make COUNT instances of a version: copy-on-write overlays over one shared base cache."""
    from blockprov.clones.clones import create_instances, next_names, rescan_served
    from blockprov.clones.temporary import customize_new

    root = root.resolve()
    m = obj.repo.resolve(parse_ref(ref))
    names = next_names(root, prefix or f"{m.image}-", count)
    t0 = time.monotonic()

    async def make() -> None:
        with progress_bar(count, f"clone {m.image}@{m.id}", not as_json, unit="instances") as bar:
            for k in range(0, count, CLONE_GROUP):
                group = names[k:k + CLONE_GROUP]
                await create_instances(root, obj.repo, m, group)
                bar(len(group))

    run_async(make())
    made = time.monotonic() - t0
    served = rescan_served(root)
    failed = run_async(customize_new(root, obj.repo, names, customize_cmd, served)) if customize_cmd else {}
    ok = [n for n in names if n not in failed]
    out = {"instances": ok, "failed": {n: str(e) for n, e in failed.items()},
           "seconds": round(time.monotonic() - t0, 4),
           "seconds_per_instance": round(made / count, 4), "base": f"{m.image}@{m.id}", "dir": str(root)}
    if as_json:
        emit(out)
    else:
        click.echo(f"made {len(ok)} instance(s) of {m.image}@{m.id} in {root} "
                   f"({made / count * 1000:.1f} ms each{', then customized' if customize_cmd and ok else ''})")
        for n in ok:
            click.echo(f"  {n}")
        if not served:
            click.echo(f"serve them with: blockprov clones serve --dir {root} --socket SOCKET")
        for n, e in failed.items():
            click.echo(f"blockprov: error: {e} (instance {n} was not kept)", err=True)
    if failed:
        raise CustomizeFailed(name=f"{len(failed)} of {count} new instance(s)", why="they were not kept")


@click.group("clones")
def clones_group() -> None:
    """Serve, list and remove the instances of a clones directory."""


@clones_group.command("serve")
@DIR_OPTION
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve NBD on this unix socket (exports are the instance names).")
@click.option("--listen", metavar="HOST:PORT", help="Serve NBD on TCP.")
@report_options("clones-DIRNAME-HASH-HOSTNAME")
@json_option
@click.pass_obj
def clones_serve_cmd(obj: Ctx, root: Path, sock: Path | None, listen: str | None, instance: str | None,
                     no_register: bool, as_json: bool) -> None:
    """Serve every instance of the directory as an NBD export named after it, until SIGTERM.

    It registers with the repository and reports its clones and their versions (the console's
    Pools page, `blockprov agents`), unless --no-register. Started by systemd socket activation
    (LISTEN_FDS) it serves the sockets it was given instead of --socket/--listen, and prints its
    banner on stderr."""
    server_logs()
    from blockprov.clones.clones import ClonesAgent, recorded_repository

    root = root.resolve()
    activated = activated_sockets(sock, listen)
    address = host_port(listen) if listen else None
    base = recorded_repository(root)  # the repository the clones were made from, unless one is named
    repo = obj.repository_for(base) if base is not None else obj.repo
    if sock is not None:
        check_creatable(sock, "socket").parent.mkdir(parents=True, exist_ok=True)  # as attach does

    async def main() -> None:
        agent = ClonesAgent(root, repo, socket=sock, listen=address, activated=activated, register=not no_register,
                            instance=instance)
        agent.catch_signals()
        with listening(listen):
            await agent.start()
        _banner(agent, as_json, err=bool(activated))
        await agent.run()

    run_async(main())


def _banner(agent: ClonesAgent, as_json: bool, *, err: bool = False) -> None:
    """What the server serves, on stdout (stderr when socket-activated: stdout is its starter's)."""
    uris = {n: agent.uri(n) for n in agent.instances}
    if as_json:
        click.echo(json.dumps({"dir": str(agent.root), "instances": uris, "addresses": agent.addresses}), err=err)
    else:
        click.echo(f"serving {len(uris)} instance(s) of {agent.root}", err=err)
        for n, u in uris.items():
            click.echo(f"  {n}  {u}", err=err)
    sys.stdout.flush()


def _existing(root: Path) -> Path:
    """A clones directory to read: one that is not there is a mistake (a typo listed nothing, exit 0)."""
    root = root.resolve()
    if not root.is_dir():
        raise NotFound(msg=f"no clones directory at {root} (make one with: blockprov clone NAME:TAG --dir {root})")
    return root


@clones_group.command("list")
@DIR_OPTION
@json_option
def clones_list_cmd(root: Path, as_json: bool) -> None:
    """Instances, their base version and how much each changed."""
    from blockprov.cache import load_state
    from blockprov.clones.clones import list_instances

    root = _existing(root)
    rows: list[dict[str, Any]] = []
    for name in list_instances(root):
        st = load_state(root / "instances" / name)
        counts = st.chunks.counts()
        rows.append({"instance": name, "image": st.image, "version": st.version,
                     "chunks_modified": counts["modified"], "bytes_held": counts["present"] * st.chunk_size})
    if as_json:
        emit(rows)
        return
    for r in rows:
        click.echo(f"{r['instance']:24} {r['image']}@{r['version']}  {r['chunks_modified']} chunk(s) modified, "
                   f"{hz.size(r['bytes_held'])} held")


@clones_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@DIR_OPTION
def clones_rm_cmd(names: tuple[str, ...], root: Path) -> None:
    """Remove instances (their overlays; the shared base stays). Every name is checked before any
    is removed."""
    from blockprov.clones.clones import instance_dir, instance_name, remove

    root = _existing(root)
    wanted = list(dict.fromkeys(instance_name(n) for n in names))  # a name given twice is removed once
    missing = [n for n in wanted if not instance_dir(root, n).exists()]
    if missing:  # issue 27: `clones rm A TYPO` removed A, then failed on TYPO, and said only that
        raise NotFound(msg=f"no instance {', '.join(missing)} in {root} (nothing removed)")
    done: list[str] = []
    try:
        for n in wanted:
            remove(root, n)
            done.append(n)
    finally:
        if done:
            click.echo(f"removed {', '.join(done)}")


# -- pools -------------------------------------------------------------------------------------
def pool_dir(obj: Ctx, name: str, root: Path | None) -> Path:
    """``--dir``, else DATA/pools/NAME where DATA is --data / BLOCKPROV_DATA like every other
    command's (issue 17: pools looked in the default data directory whatever was given)."""
    if root is not None:
        return root.resolve()
    return check_data_dir(obj.data_dir, create=False) / "pools" / pool_name(name)


POOL_DIR_OPTION = click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path),
                               help="The pool's directory (default: the data directory's pools/NAME).")


@click.group("pool")
def pool_group() -> None:
    """Pools: ready-made instances handed out at once (golden → configured → per-instance)."""


@pool_group.command("create")
@click.argument("name")
@click.option("--from", "source", required=True, metavar="NAME:TAG", help="The golden version.")
@click.option("--size", default=2, show_default=True, type=click.IntRange(1, 10000),
              help="How many ready instances to keep.")
@click.option("--configure", metavar="CMD",
              help="Run once on a scratch clone of the golden; the result is committed as IMAGE:pool-NAME.")
@click.option("--customize", "customize_cmd", metavar="CMD", help=CUSTOMIZE_HELP)
@POOL_DIR_OPTION
@json_option
@click.pass_obj
def pool_create_cmd(obj: Ctx, name: str, source: str, size: int, configure: str | None, customize_cmd: str | None,
                    root: Path | None, as_json: bool) -> None:
    """Make the configured version and SIZE ready instances of it."""
    from blockprov.clones import pool

    d = pool_dir(obj, name, root)
    m = obj.repo.resolve(parse_ref(source))
    st = run_async(pool.create(d, obj.repo, name, m, size, configure=configure, customize_cmd=customize_cmd))
    if as_json:
        emit(st)
        return
    click.echo(f"pool {name}: {len(st['instances'])} ready instance(s) of {st['configured']} in {d}")
    click.echo(f"serve it with: blockprov pool serve {name}" + (f" --dir {d}" if root else ""))


@pool_group.command("serve")
@click.argument("name")
@POOL_DIR_OPTION
@click.option("--socket", "sock", type=click.Path(dir_okay=False, path_type=Path),
              help="NBD unix socket (default: DIR/nbd.sock).")
@click.option("--listen", metavar="HOST:PORT", help="Serve NBD on TCP too.")
@report_options("pool-NAME-HOSTNAME")
@json_option
@click.pass_obj
def pool_serve_cmd(obj: Ctx, name: str, root: Path | None, sock: Path | None, listen: str | None,
                   instance: str | None, no_register: bool, as_json: bool) -> None:
    """Serve the pool's instances, hand them out, refill in the background, until SIGTERM.

    It registers with the repository and reports the pool (ready, in use, size, last refill
    error) and its clones (the console's Pools page, `blockprov agents`), unless --no-register.

    Started by systemd socket activation (LISTEN_FDS) it serves the sockets it was given instead
    of DIR/nbd.sock or --socket/--listen, and prints its banner on stderr."""
    server_logs()
    from blockprov.agent.report import host_instance
    from blockprov.clones import pool
    from blockprov.clones.clones import ClonesAgent
    from blockprov.nbd.activation import listen_sockets

    d = pool_dir(obj, name, root)
    activated = listen_sockets()  # without: DIR/nbd.sock, so neither --socket nor --listen is required
    if activated and (sock is not None or listen is not None):
        raise UsageError("started by socket activation (LISTEN_FDS): it serves the sockets it was given; "
                         "drop --socket and --listen")
    address = host_port(listen) if listen else None
    pool.read_state(d)

    if sock is not None:
        check_creatable(sock, "socket").parent.mkdir(parents=True, exist_ok=True)  # as attach does

    async def main() -> None:
        agent = ClonesAgent(d, obj.repo, socket=None if activated else sock or d / pool.SOCKET, listen=address,
                            activated=activated, register=not no_register,
                            instance=instance or host_instance("pool", name))
        agent.catch_signals()
        server = pool.PoolServer(d, obj.repo, agent)  # before start: the first report has the pool
        with listening(listen):
            await agent.start()
        server.start()
        _banner(agent, as_json, err=bool(activated))
        try:
            await agent.run()
        finally:
            await server.stop()

    run_async(main())


@pool_group.command("acquire")
@click.argument("name")
@click.option("--host", required=True, help="The host the instance is handed to.")
@click.option("--wait", "wait_s", default=0.0, type=click.FloatRange(0, 3600),
              help="Seconds to wait for a ready instance when the pool is exhausted.")
@POOL_DIR_OPTION
@json_option
@click.pass_obj
def pool_acquire_cmd(obj: Ctx, name: str, host: str, wait_s: float, root: Path | None, as_json: bool) -> None:
    """Hand a ready instance to a host at once and print how to connect to it."""
    from blockprov.clones import pool

    d = pool_dir(obj, name, root)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            try:
                out = pool.server_call(d, "pool-acquire", host=host)
            except AgentNotRunning:
                inst = pool.acquire(d, host)
                out = {"instance": inst, "uri": f"nbd+unix:///{inst}?socket={d / pool.SOCKET}",
                       "note": f"start `blockprov pool serve {name}` to serve it"}
            break
        except PoolExhausted:  # from the server too: its control socket sends the error's class
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    if as_json:
        emit(out)
        return
    click.echo(f"{out['instance']} → {host}: {out['uri']}")
    if out.get("note"):
        click.echo(f"  ({out['note']})")


@pool_group.command("release")
@click.argument("name")
@click.option("--instance", help="The instance to release.")
@click.option("--host", help="Release the instance handed to this host.")
@click.option("--destroy", is_flag=True, help="Remove the instance instead of resetting it.")
@POOL_DIR_OPTION
@json_option
@click.pass_obj
def pool_release_cmd(obj: Ctx, name: str, instance: str | None, host: str | None, destroy: bool,
                     root: Path | None, as_json: bool) -> None:
    """Reset an instance and return it to the pool (or destroy it; the pool refills)."""
    from blockprov.clones import pool

    if (instance is None) == (host is None):
        raise UsageError("give --instance NAME or --host ID")
    d = pool_dir(obj, name, root)
    inst = pool.find(d, instance, host)
    try:
        out = pool.server_call(d, "pool-release", instance=inst, destroy=destroy)
    except AgentNotRunning:
        out = {"instance": inst, "state": run_async(pool.release(d, obj.repo, inst, destroy=destroy, agent=None))}
    if as_json:
        emit(out)
        return
    click.echo(f"{out['instance']}: {out['state']}")


@pool_group.command("status")
@click.argument("name")
@POOL_DIR_OPTION
@json_option
@click.pass_obj
def pool_status_cmd(obj: Ctx, name: str, root: Path | None, as_json: bool) -> None:
    """Ready and in-use instances, and whether the pool server runs."""
    from blockprov.clones import pool

    d = pool_dir(obj, name, root)
    try:
        st = pool.server_call(d, "pool-status")
    except AgentNotRunning:
        st = pool.read_state(d)
        st["server"] = {"running": False}
    if as_json:
        emit(st)
        return
    inst = st["instances"]
    ready = [n for n, v in inst.items() if v["state"] == "ready"]
    used = {n: v["host"] for n, v in inst.items() if v["state"] == "in-use"}
    click.echo(f"pool {st['name']}: {st['configured']} (from {st['source']}), size {st['size']}: "
               f"{len(ready)} ready, {len(used)} in use; server {'running' if st['server']['running'] else 'stopped'}")
    for n, h in used.items():
        click.echo(f"  {n} → {h}")
    if st["server"].get("last_error"):
        click.echo(f"  last refill error: {st['server']['last_error']}")


def register(cli: click.Group) -> None:
    for cmd in (clone_cmd, clones_group, pool_group):
        cli.add_command(cmd)
