"""``blockprov vm run|list|status|stop|rm|template|templates|clone``: managed VMs and running-VM clones.

The domain lives in ``blockprov.vm`` (vm/vms.py: directories, the disks agent, templates, clones;
vm/qemu.py: the command line and QMP); this module parses options and prints. The VMs outlive the
command: qemu and the disks agent run detached, and every later command finds them through the
VM directory (``--dir``, default the data directory's ``vms/``).
"""

from __future__ import annotations

from pathlib import Path

import click

from blockprov import humanize as hz
from blockprov.cli._common import (
    MEMORY_HELP,
    Ctx,
    check_data_dir,
    default_data_dir,
    emit,
    json_option,
    memory_option,
    refuse_closed_output,
)
from blockprov.errors import NotFound, VmFailed
from blockprov.names import parse_ref

DIR_OPTION = click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path),
                          help="The VM directory (default: the data directory's vms/).")


def _root(obj: Ctx, root: Path | None) -> Path:
    if root is not None:
        return root.resolve()
    return (Path(obj.data_dir) if obj.data_dir else default_data_dir()).resolve() / "vms"


def _existing_root(obj: Ctx, root: Path | None) -> Path:
    """The VM directory a listing reads: a --dir or --data that is not there is a mistake (a typo
    listed nothing, exit 0); the default one of an existing data directory may simply be empty."""
    if root is not None:
        if not root.resolve().is_dir():
            raise NotFound(msg=f"no VM directory at {root.resolve()} (make one with: blockprov vm run … --dir {root})")
        return root.resolve()
    if obj.data_dir:
        check_data_dir(obj.data_dir, create=False)
    return _root(obj, None)


def _repo_args(obj: Ctx) -> list[str]:
    """The global options the disks agent needs to reach the same repository (tokens and CAs travel
    in the environment)."""
    args: list[str] = []
    for opt, val in (("--repo", obj.repo_url), ("--data", obj.data_dir), ("--store", obj.store),
                     ("--catalog", obj.catalog)):
        if val:
            args += [opt, val]
    return args


@click.group("vm")
def vm_group() -> None:
    """Managed VMs on this host: run, template a running VM, clone it (memory shared copy-on-write)."""


@vm_group.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("ref", metavar="NAME:TAG|NAME@ID")
@click.option("--name", "name", required=True, help="The VM's name (lowercase letters, digits, '-').")
@click.option("--memory", default="512M", show_default=True, callback=memory_option,
              help=f"Guest RAM ({MEMORY_HELP}).")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--machine", default="pc", show_default=True, help="qemu machine type (recorded resolved).")
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- QEMU-ARGS…]")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_run_cmd(obj: Ctx, ref: str, name: str, memory: int, cpus: int, machine: str, qemu_args: tuple[str, ...],
               root: Path | None, as_json: bool) -> None:
    """Start a VM (qemu, TCG) on a new copy-on-write overlay of a version; it keeps running."""
    from blockprov.vm import vms

    refuse_closed_output()  # a VM nobody hears of (`vm list` would show it, but the caller has gone)
    r = _root(obj, root)
    m = obj.repo.resolve(parse_ref(ref))
    rec = vms.run(r, obj.repo, _repo_args(obj), m, name, memory=memory, cpus=cpus, extra_args=tuple(qemu_args),
                  machine=machine)
    if as_json:
        emit(rec)
        return
    click.echo(f"VM {name}: {m.image}@{m.id}, pid {rec.pid}, console {rec.console}")


def _mem(mem: dict[str, int]) -> str:
    if not mem:
        return "-"
    return f"rss {hz.size(mem['rss'])} pss {hz.size(mem['pss'])} shared {hz.size(mem['shared'])} " \
           f"private {hz.size(mem['private'])}"


@vm_group.command("list")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_list_cmd(obj: Ctx, root: Path | None, as_json: bool) -> None:
    """Every VM and clone: state, pid, console log, template, host memory shared and private."""
    from blockprov.vm import vms

    rows = vms.list_all(_existing_root(obj, root))
    if as_json:
        emit(rows)
        return
    for r in rows:
        what = f"clone of {r.template}" if r.template else f"{r.image}@{(r.version or '')[:12]}"
        click.echo(f"{r.name:20} {r.state:10} pid {r.pid or '-':>7}  {what}  {_mem(r.memory)}  {r.console}")
        if r.why:
            click.echo(f"  {r.why}")


@vm_group.command("status")
@click.argument("name")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_status_cmd(obj: Ctx, name: str, root: Path | None, as_json: bool) -> None:
    """One VM: state, pid, console, template, memory shared vs private."""
    from blockprov.vm import vms

    r = vms.status(_root(obj, root), name)
    if as_json:
        emit(r)
        return
    for k, v in (("name", r.name), ("state", r.state), ("pid", r.pid), ("template", r.template), ("mac", r.mac),
                 ("console", r.console)):
        click.echo(f"{k:9} {v or '-'}")
    click.echo(f"memory    {_mem(r.memory)}")
    click.echo(f"guest RAM {_mem(r.guest_ram)}")
    if r.why:
        click.echo(f"why       {r.why}")


@vm_group.command("stop")
@click.argument("names", nargs=-1, required=True)
@DIR_OPTION
@json_option
@click.pass_obj
def vm_stop_cmd(obj: Ctx, names: tuple[str, ...], root: Path | None, as_json: bool) -> None:
    """Quit VMs (their disks stay; `vm rm` removes them)."""
    from blockprov.vm import vms

    r = _root(obj, root)
    names = tuple(dict.fromkeys(names))  # a name given twice is stopped once
    for n in names:  # every name checked before anything is stopped
        vms.read_record(r, n)
    out = [vms.stop(r, n) for n in names]
    if as_json:
        emit(out)
        return
    click.echo(f"stopped {', '.join(names)}")
    for o in out:
        if not o["recorded"]:
            click.echo(f"  {o['name']}: its record could not say so (no space left in {r}): `vm list` shows it dead")


@vm_group.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="Stop a running VM first (without it, a running VM is refused).")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_rm_cmd(obj: Ctx, names: tuple[str, ...], force: bool, root: Path | None, as_json: bool) -> None:
    """Remove VMs with their disk overlays (their writes are lost). A running one is refused unless
    --force, which stops it first."""
    from blockprov.vm import vms

    r = _root(obj, root)
    names = tuple(dict.fromkeys(names))  # a name given twice is removed once (the second failed after the first)
    for n in names:  # every name checked before anything is removed
        vms.refuse_running(r, n, force)
    out = [vms.rm(r, n, force=force) for n in names]
    if as_json:
        emit(out)
        return
    stopped = [o["name"] for o in out if o["was_running"]]
    click.echo(f"removed {', '.join(names)}" + (f" (stopped first: {', '.join(stopped)})" if stopped else ""))


@vm_group.command("template")
@click.argument("name")
@click.option("--from", "source", required=True, metavar="VM", help="The running VM to freeze.")
@click.option("--push", is_flag=True, help="Also store it in the repository (as `vm push` does).")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_template_cmd(obj: Ctx, name: str, source: str, push: bool, root: Path | None, as_json: bool) -> None:
    """Pause a running VM and keep its RAM, device state and disk (a committed version) as a template;
    the VM is stopped."""
    from blockprov.vm import vms

    out = vms.make_template(_root(obj, root), obj.repo, name, source)
    if push:
        out["pushed"] = vms.push(_root(obj, root), obj.repo, name)
    if as_json:
        emit(out)
        return
    click.echo(f"template {name} from {source}: disk {out['disk']}, memory {hz.size(out['memory'])}, "
               f"device state {hz.size(out['state_bytes'])} in {out['dir']}")


@vm_group.command("push")
@click.argument("name")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_push_cmd(obj: Ctx, name: str, root: Path | None, as_json: bool) -> None:
    """Store a template in the repository (image vmtpl-NAME): `vm clone NAME` then works in any VM
    directory that reaches the repository (it copies the template first)."""
    from blockprov.vm import vms

    out = vms.push(_root(obj, root), obj.repo, name)
    if as_json:
        emit(out)
        return
    click.echo(f"template {name} stored: memory {out['memory']}, device state {out['state']}")


@vm_group.command("templates")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_templates_cmd(obj: Ctx, root: Path | None, as_json: bool) -> None:
    """Templates of this VM directory and their clones."""
    from blockprov.vm import vms

    rows = vms.list_templates(_existing_root(obj, root))
    if as_json:
        emit(rows)
        return
    for r in rows:
        click.echo(f"{r['template']:20} from {r['from']}, disk {r['disk']}, {hz.size(r['memory_size'])}, "
                   f"{len(r['clones'])} clone(s)")


@vm_group.command("clone", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1000))
@click.option("--memory", default=None, callback=memory_option,
              help=f"Must be the template's (checked; default: the template's; {MEMORY_HELP}).")
@click.option("--cpus", default=None, type=click.IntRange(1, 64), help="Must be the template's (checked).")
@click.option("--customize", "customize_cmd", metavar="CMD",
              help="Run after each clone resumes (env BLOCKPROV_VM, BLOCKPROV_INDEX, BLOCKPROV_QMP, "
                   "BLOCKPROV_IDENTITY_SOCKET); 'builtin:identity' sends each clone its name as hostname and a new "
                   "random machine-id on the virtio-serial port org.blockprov.identity and waits for the guest's "
                   "acknowledgement.")
@click.option("--lazy", is_flag=True,
              help="A template only in the repository: map its memory before it is copied, each page fetched on "
                   "first touch (through nbdfuse), the rest hydrated in the background.")
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- QEMU-ARGS…]")
@DIR_OPTION
@json_option
@click.pass_obj
def vm_clone_cmd(obj: Ctx, name: str, count: int, memory: int | None, cpus: int | None, customize_cmd: str | None,
                 lazy: bool, qemu_args: tuple[str, ...], root: Path | None, as_json: bool) -> None:
    """Start COUNT clones of a template: each resumes where the template was, its RAM shared with the
    template's memory file until it writes, its own disk overlay, MAC and vmgenid."""
    from blockprov.vm import vms

    refuse_closed_output()
    out = vms.clone(_root(obj, root), obj.repo, _repo_args(obj), name, count, memory=memory, cpus=cpus,
                    extra_args=tuple(qemu_args) if qemu_args else None, customize=customize_cmd, lazy=lazy)
    if as_json:
        emit(out)
    else:
        click.echo(f"{len(out['clones'])} clone(s) of {name} running: {', '.join(out['clones'])}")
        for n, e in out["failed"].items():
            click.echo(f"blockprov: error: {n}: {e}", err=True)
    if out["failed"]:
        raise VmFailed(name=f"{len(out['failed'])} of {count} clone(s)", why="they were not started (see above)")


def register(cli: click.Group) -> None:
    cli.add_command(vm_group)
