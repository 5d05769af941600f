"""Managed VMs on one host: run, list, stop, make a template of a running VM, clone it N times.

Layout of a VM directory ``ROOT`` (default: the data directory's ``vms/``)::

    ROOT/disks/                  a clones directory (clones/clones.py): one overlay instance per
                                 VM, named after it, over the shared base cache of its version
    ROOT/disks/nbd.sock          where the disks agent (``blockprov clones serve``) serves them
    ROOT/vms/<name>/vm.json      the VM's record: machine, wiring, pid, template (a clone's)
    ROOT/vms/<name>/memory       a VM's RAM (``share=on``: it becomes a template's memory file)
    ROOT/vms/<name>/console.log  the serial console; qemu.log, qemu's own messages
    ROOT/templates/<name>/       a template (template.py)

Why the disks are served by one ``clones serve`` process started on demand: the VMs outlive the
command that starts them, and a version's base cache is shared by every VM of it (fetched once per
host), which only one process may hold. The process is started by the first ``vm run``/``vm clone``
that finds none, and stopped by the ``vm stop`` that leaves no VM running.

Why a template's disk is an ordinary committed version: the VM's overlay, flushed by the pause,
is snapshotted into the repository (agent/lifecycle.py) and the clones' overlays lie over it, like
any ``clone`` of a version; the repository keeps it, ``gc`` respects it, ``diff`` shows it.

Crash rules: vm.json is written with ``durable.atomic_write`` before qemu starts (pid null) and
again with its pid once it runs, so a crash in between leaves a record whose VM ``vm list`` shows
as ``dead`` and ``vm rm`` removes. A VM's state is never inferred from the record alone: a pid is
alive only if /proc shows a live qemu of that directory (pids are reused). A template is written
as template.py says (its manifest last). A disk instance is made before its VM's record (an
orphan overlay is harmless and ``clones rm`` removes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blockprov import humanize as hz
from blockprov.agent import control
from blockprov.agent.instance import ReadOrder, StatusReport
from blockprov.boot import is_blockprov_initramfs
from blockprov.clones.clones import (
    base_dir,
    create_instances,
    instance_dir,
    instance_name,
    list_instances,
    next_names,
    remove,
)
from blockprov.durable import atomic_write, ensure_dir
from blockprov.errors import (
    AgentDied,
    AgentNotRunning,
    BlockprovError,
    CacheError,
    Conflict,
    NoSpace,
    NotEnoughMemory,
    NotFound,
    UsageError,
    VmFailed,
    VmNotRunning,
)
from blockprov.manifest import Manifest
from blockprov.names import UNIX_PATH_MAX, parse_ref
from blockprov.repo.base import Repository
from blockprov.results import from_dict, omit_none, to_dict
from blockprov.vm import lazy, qemu, stored
from blockprov.vm import template as tpl

DISKS = "disks"
VMS = "vms"
TEMPLATES = "templates"
RECORD = "vm.json"
NBD_SOCKET = "nbd.sock"
BUILTIN_IDENTITY = "builtin:identity"
LAZY_PREFIX = "tplmem-"  # the disk instance that serves a lazy template's memory (vm/lazy.py)
RESUME_SETTLE = 1.0  # seconds without a first read of the lazy memory: the resumed guests settled
RESUME_PARALLEL = 3  # resume-profile batches fetched at once (the fetcher allows 4: one left for page faults)
RESUME_LIMIT = 10.0  # at most this long recording a resume profile (a busy guest never settles)


def vm_dir(root: Path, name: str) -> Path:
    return root / VMS / name


def template_dir(root: Path, name: str) -> Path:
    return root / TEMPLATES / name


@dataclass(frozen=True)
class VmRecord:
    """A VM's record, ``vm.json`` in its directory (written with ``atomic_write``; a record that
    says ``stopped`` is one ``vm stop`` ended; ``end`` says how it ended when not by ``vm stop``)."""

    name: str
    image: str
    version: str
    disk: str  # its overlay in ROOT/disks
    machine: qemu.Machine
    mac: str
    pid: int | None = None
    template: str | None = None  # a clone: its template
    created: float = 0.0
    stopped: bool = False
    console: str = ""
    end: str | None = omit_none()  # e.g. "templated as NAME"
    customized: dict[str, Any] | None = omit_none()  # a clone's customization (``_customize``)


@dataclass(frozen=True)
class VmStatus:
    """One VM as ``vm list`` / ``vm status`` show it."""

    name: str
    state: str  # qemu's (running, paused, …), or stopped, dead, or how it ended
    pid: int | None
    console: str | None
    template: str | None
    image: str | None
    version: str | None
    mac: str | None
    memory_size: int
    memory: dict[str, int] = field(default_factory=dict)  # smaps_rollup of its qemu
    guest_ram: dict[str, int] = field(default_factory=dict)  # its RAM mapping's figures
    why: str | None = omit_none()  # a dead VM: its last words


def read_record(root: Path, name: str) -> VmRecord:
    try:
        data = json.loads((vm_dir(root, name) / RECORD).read_text())
        return from_dict(VmRecord, data)
    except FileNotFoundError:
        raise NotFound(msg=f"no VM {name} in {root}") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise VmFailed(name=name, why=f"its record is unreadable: {e}") from None


def write_record(root: Path, rec: VmRecord) -> None:
    atomic_write(vm_dir(root, rec.name) / RECORD,
                 json.dumps(to_dict(rec), indent=2, sort_keys=True).encode() + b"\n")


def names(root: Path) -> list[str]:
    d = root / VMS
    return sorted(p.name for p in d.iterdir() if (p / RECORD).exists()) if d.is_dir() else []


def is_alive(root: Path, rec: VmRecord) -> bool:
    return qemu.alive(rec.pid, vm_dir(root, rec.name))


# -- the disks agent --------------------------------------------------------------------------------
def ensure_disks_served(root: Path, repo_args: list[str], timeout: float = 60.0) -> Path:
    """The disks agent serving ``ROOT/disks`` (told to pick up new instances, or started); returns
    its NBD socket."""
    disks = ensure_dir(root / DISKS)
    sock = disks / NBD_SOCKET
    if len(str(sock).encode()) > UNIX_PATH_MAX:
        raise UsageError(f"{sock} is too long for a unix socket ({UNIX_PATH_MAX} bytes): use a shorter --dir")
    try:
        control.call(disks, "rescan", timeout=60.0)
        return sock
    except AgentNotRunning:
        pass
    # the clones layer's own entry point (clones/serve.py): the CLI is not started from below it
    cmd = [sys.executable, "-m", "blockprov.clones.serve", "--dir", str(disks), "--socket", str(sock), *repo_args]

    def ready() -> bool:
        try:
            control.call(disks, "status", timeout=5.0)
        except (CacheError, AgentDied, OSError):  # not yet listening, or starting
            return False
        return True
    qemu.spawn(cmd, disks / "agent.log", ready, "the disks agent (clones serve)", timeout, poll=0.02)
    return sock


def stop_disks_agent_if_idle(root: Path) -> bool:
    """Stop the disks agent when no VM runs any more (True if it was asked to)."""
    if any(is_alive(root, read_record(root, n)) for n in names(root)):
        return False
    for t in (root / TEMPLATES).glob(f"*/{tpl.LAZY_MOUNT}"):  # their export is about to go
        lazy.unmount(t)
    try:
        pid = int(control.call(root / DISKS, "status", timeout=10.0)["pid"])
    except (CacheError, AgentDied, OSError, KeyError, TypeError, ValueError):  # gone, or going already
        return False
    with contextlib.suppress(CacheError, AgentDied, OSError):  # one that ends before it answers is going
        control.call(root / DISKS, "stop", timeout=30.0)
    # Its caches are written as it exits: a caller that then removes the directory must find it done.
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and qemu.process_lives(pid):
        time.sleep(0.05)
    return True


def _disk_uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


# -- run ----------------------------------------------------------------------------------------------
def _new_vm_dir(root: Path, name: str, *, disk_made: bool = False) -> Path:
    d = vm_dir(root, instance_name(name))
    if (d / RECORD).exists():
        st = status(root, name)
        why = f" ({st.why})" if st.why else ""
        how = f"vm rm {name}" if st.state in ("dead", "stopped") or st.state.startswith("templated") \
            else f"vm rm --force {name}"
        raise Conflict(f"VM {name} already exists in {root}, {st.state}{why}: `{how}` removes it and its "
                       "disk, then the name is free")
    if not disk_made and name in list_instances(root / DISKS):
        raise UsageError(f"a disk named {name} already exists in {root / DISKS} (clones rm it first)")
    if d.exists():  # a run that crashed before its record: nothing in it is worth keeping
        shutil.rmtree(d)
    ensure_dir(d)
    qemu.sockets(d)  # refuse paths too long before anything is made
    return d


def _taken_macs(root: Path) -> set[str]:
    return {read_record(root, n).mac for n in names(root)}


def check_room(root: Path, what: str, needed: int, memory: int) -> None:
    """The VM directory's file system can hold ``needed`` bytes (a VM's RAM is a file there, which
    a guest fills as it touches its memory: short of room, qemu dies of SIGBUS later, and the VM
    looked started), and the host has ``memory`` bytes of RAM available for it."""
    available = qemu.mem_available()
    if memory > available:
        raise NotEnoughMemory(what=what, needed=hz.size(memory), available=hz.size(available))
    where = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if needed > free:
        raise NoSpace(msg=f"{where} has {hz.size(free)} free, and {what} needs {hz.size(needed)} there "
                          "(its RAM is a file in the VM directory): free space or use another --dir")


def refuse_netboot_files(ref: str, initrd: bytes) -> None:
    """blockprov's network-boot initramfs (``boot-files build``) boots a PC onto its own disk; as a
    VM on an overlay it finds no disk to own and reboots every 30 s while the VM looks running."""
    if is_blockprov_initramfs(initrd):
        raise Conflict(f"{ref}'s boot files are blockprov's network-boot initramfs (boot-files build): it boots "
                       "a PC from the network onto its own disk, not a VM, and would reboot every 30 s here; try it "
                       "as a PC (docs/operations.md shows a qemu command line), or `vm run` a version whose boot "
                       "files are a plain kernel and initrd (boot-files set), or that has none (its own loader)")


def run(root: Path, repo: Repository, repo_args: list[str], m: Manifest, name: str, *, memory: int, cpus: int,
        extra_args: tuple[str, ...], machine: str = "pc", timeout: float = 60.0) -> VmRecord:
    """Start a VM on a new overlay of version ``m``: direct kernel boot with the version's boot files
    when it has them, else from the disk's own boot loader. Returns once QMP says the guest runs;
    anything that fails on the way (or Ctrl-C) removes what was made, so the name stays free."""
    ref = f"{m.image}@{m.id}"
    instance_name(name)
    if (vm_dir(root, name) / RECORD).exists():
        _new_vm_dir(root, name)  # says why the name is taken
    boot = repo.get_boot_files(ref)
    files: dict[str, bytes] = {}
    if boot is not None:
        files = {"vmlinuz": repo.boot_file(ref, "kernel"), "initrd": repo.boot_file(ref, "initrd")}
        refuse_netboot_files(f"{m.image}:{m.id}", files["initrd"])
    mach = qemu.Machine(qemu_version=qemu.qemu_version(), machine=qemu.resolve_machine(machine), memory=memory,
                        cpus=cpus, extra_args=extra_args, kernel=boot is not None,
                        append=boot.cmdline if boot is not None else "")
    check_room(root, f"VM {name}", memory + sum(len(b) for b in files.values()) + ROOM_SLACK, memory)
    d = _new_vm_dir(root, name)
    pid: int | None = None
    try:
        for f, data in files.items():
            atomic_write(d / f, data)
        asyncio.run(create_instances(root / DISKS, repo, m, [name]))
        sock = ensure_disks_served(root, repo_args)
        rec = VmRecord(name=name, image=m.image, version=m.id, disk=name, machine=mach,
                       mac=qemu.new_mac(_taken_macs(root)), created=time.time(), console=str(d / "console.log"))
        write_record(root, rec)
        wiring = qemu.Wiring(dir=d, disk_uri=_disk_uri(sock, name), mac=rec.mac, memory_path=d / tpl.MEMORY,
                             share=True, incoming=False, kernel=d / "vmlinuz" if files else None,
                             initrd=d / "initrd" if files else None)
        pid = qemu.start(qemu.command(mach, wiring), d)
        rec = replace(rec, pid=pid)
        write_record(root, rec)
        qemu.wait_running(d, pid, timeout)
    except BaseException:
        _undo(root, name, pid)
        raise
    return rec


ROOM_SLACK = 16 << 20  # the disk overlay's metadata, the logs


def _discard(root: Path, name: str, pid: int | None = None) -> None:
    """Remove what a failed or interrupted start made — its qemu (``pid``, else the record's), its
    disk, its directory — best effort and writing nothing: nothing of a VM that never ran stays,
    and its name is free again. The disks agent is the caller's to stop."""
    d = vm_dir(root, name)
    with contextlib.suppress(BlockprovError, OSError, ValueError, KeyError):
        pid = pid or read_record(root, name).pid
    with contextlib.suppress(BlockprovError, OSError):
        if pid:
            qemu.kill(int(pid), d, grace=2.0)
    with contextlib.suppress(BlockprovError, OSError):
        if name in list_instances(root / DISKS):
            remove(root / DISKS, name)
    shutil.rmtree(d, ignore_errors=True)


def _undo(root: Path, name: str, pid: int | None) -> None:
    """A ``vm run`` that failed or was interrupted: its VM goes, and the disks agent if no VM runs."""
    _discard(root, name, pid)
    with contextlib.suppress(BlockprovError, OSError):
        stop_disks_agent_if_idle(root)


# -- list / stop / rm ---------------------------------------------------------------------------------
def status(root: Path, name: str) -> VmStatus:
    """One VM as ``vm list`` shows it: state (running, paused, …, stopped, dead), pid, console log,
    template, and its memory on the host (shared and private, from smaps_rollup)."""
    rec = read_record(root, name)
    d = vm_dir(root, name)
    row = VmStatus(name=name, state="", pid=rec.pid, console=rec.console, template=rec.template, image=rec.image,
                   version=rec.version, mac=rec.mac, memory_size=rec.machine.memory)
    if is_alive(root, rec):
        assert rec.pid is not None
        ram = d / tpl.MEMORY
        if rec.template:
            td = template_dir(root, rec.template)
            ram = tpl.memory_path(tpl.load(td), td)
        return replace(row, state=_qemu_state(d), memory=qemu.smaps_rollup(rec.pid),
                       guest_ram=qemu.mapping_figures(rec.pid, ram))
    state = rec.end or ("stopped" if rec.stopped else "dead")
    why = "qemu exited without `vm stop`: " + (_last_log_line(d) or _full(d) or "no message") if state == "dead" \
        else None
    return replace(row, state=state, pid=None if rec.stopped else rec.pid, why=why)


def _full(d: Path) -> str:
    """Why a VM with no last words may have died: its RAM file's file system is full (the guest's
    next touch of a new page is a SIGBUS)."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(d).free < ROOM_SLACK:
            return f"no message; {d}'s file system is full (its RAM file could not grow)"
    return ""


def _last_log_line(d: Path) -> str:
    try:
        lines = (d / "qemu.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _qemu_state(d: Path) -> str:
    async def ask() -> str:
        async with qemu.qmp(d, timeout=3.0) as c:
            st = await qemu.execute(c, "query-status", timeout=3.0)
            return str(st.get("status", "unknown"))
    try:
        return asyncio.run(ask())
    except VmFailed:
        return "unresponsive"


def list_all(root: Path) -> list[VmStatus]:
    return [status(root, n) for n in names(root)]


def _quit(root: Path, rec: VmRecord, timeout: float = 10.0) -> None:
    d = vm_dir(root, rec.name)

    async def ask() -> None:
        async with qemu.qmp(d, timeout=3.0) as c:
            await qemu.execute(c, "quit", timeout=5.0)
    with contextlib.suppress(VmFailed):
        asyncio.run(ask())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive(root, rec):
        time.sleep(0.05)
    if rec.pid:
        qemu.kill(rec.pid, d)


def stop(root: Path, name: str, *, stop_agent: bool = True) -> dict[str, Any]:
    """Quit a VM's qemu (its disk overlay stays; ``vm rm`` removes it), and the disks agent when no
    VM runs any more (``stop_agent``). The stopped VM's RAM file goes (nothing restarts a stopped VM
    from it; a template is made from a running one), which also frees what a full disk needs for
    the record saying "stopped"."""
    rec = read_record(root, name)
    was = is_alive(root, rec)
    try:
        if was:
            _quit(root, rec)
        if not rec.template:  # a clone's RAM is its template's file
            (vm_dir(root, name) / tpl.MEMORY).unlink(missing_ok=True)
        recorded = True
        try:
            write_record(root, replace(rec, stopped=True))
        except OSError as e:  # still full: the VM is stopped all the same, and `vm list` shows it dead
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            recorded = False
    finally:
        if stop_agent:
            stop_disks_agent_if_idle(root)
    return {"name": name, "stopped": True, "was_running": was, "recorded": recorded}


def refuse_running(root: Path, name: str, force: bool) -> VmRecord:
    """VM ``name``'s record; a running VM is refused unless ``force`` (``vm rm`` used to kill it
    without a word)."""
    rec = read_record(root, name)
    if not force and is_alive(root, rec):
        raise Conflict(f"VM {name} is running (pid {rec.pid}): `vm stop {name}` first, or `vm rm --force "
                       f"{name}` to stop and remove it")
    return rec


def rm(root: Path, name: str, *, force: bool = False) -> dict[str, Any]:
    """Remove a VM with its disk overlay (through the disks agent, which must stop serving it first)
    and its directory; then the disks agent if no VM runs any more. A running VM is refused unless
    ``force`` (then it is stopped first: ``was_running`` says so). Writes nothing before removing,
    so it works on a full disk."""
    rec = refuse_running(root, name, force)
    was = is_alive(root, rec)
    try:
        if was:
            _quit(root, rec)
        disks = root / DISKS
        if name in list_instances(disks):
            remove(disks, name)
        shutil.rmtree(vm_dir(root, name), ignore_errors=True)
    finally:
        stop_disks_agent_if_idle(root)
    return {"name": name, "stopped": was, "was_running": was, "removed": True}


# -- template -------------------------------------------------------------------------------------------
def make_template(root: Path, repo: Repository, name: str, source: str, timeout: float = 300.0) -> dict[str, Any]:
    """Pause VM ``source`` and keep, at that instant, its RAM (the memory file), its device state
    and its disk (committed as ``IMAGE:vmtpl-NAME``); then stop the VM. See template.py."""
    instance_name(name)
    rec = read_record(root, source)
    if rec.template:
        raise UsageError(f"VM {source} is a clone (of {rec.template}): its RAM is a private mapping, not a file")
    d = vm_dir(root, source)
    if not is_alive(root, rec):
        raise VmNotRunning(name=source, state=status(root, source).state)
    t = template_dir(root, name)
    if (t / tpl.MANIFEST).exists():
        raise UsageError(f"template {name} already exists in {root}")
    if t.exists():  # an unfinished template (no manifest): start it over
        shutil.rmtree(t)
    ensure_dir(t)
    state_tmp = t / (tpl.STATE + ".part")

    async def freeze() -> None:
        async with qemu.qmp(d) as c:
            await qemu.execute(c, "stop")  # drains and flushes the disks: the overlay holds every write
            await qemu.set_ignore_shared(c)
            await qemu.execute(c, "migrate", {"uri": f"exec:cat > {shlex.quote(str(state_tmp))}"})
            await qemu.wait_migration(c, timeout)
    try:
        asyncio.run(freeze())
        snap = control.call(instance_dir(root / DISKS, source), "snapshot", timeout=timeout,
                            to=f"{rec.image}:vmtpl-{name}")
    except BaseException:
        _thaw(d)  # failed or interrupted (Ctrl-C): the VM runs on as it was, no half template stays
        shutil.rmtree(t, ignore_errors=True)
        raise
    _quit(root, rec)
    write_record(root, replace(rec, stopped=True, end=f"templated as {name}"))
    os.replace(d / tpl.MEMORY, t / tpl.MEMORY)
    os.replace(state_tmp, t / tpl.STATE)
    mach = rec.machine
    if mach.kernel:
        for f in ("vmlinuz", "initrd"):
            shutil.copyfile(d / f, t / f)
            tpl.seal(t / f)
    made = tpl.Template(name=name, machine=mach, image=str(snap["image"]), version=str(snap["version"]),
                        memory_file=tpl.seal(t / tpl.MEMORY, tpl.MEMORY_MODE), state_file=tpl.seal(t / tpl.STATE),
                        from_vm=source, created=time.time())
    atomic_write(t / tpl.MANIFEST, made.to_json())
    stop_disks_agent_if_idle(root)
    return {"template": name, "from": source, "disk": f"{made.image}@{made.version}",
            "memory": made.memory_file.size, "state_bytes": made.state_file.size, "dir": str(t)}


def _thaw(d: Path) -> None:
    """Resume a VM whose freezing stopped half way (best effort: a migration in flight is cancelled)."""
    async def cont() -> None:
        async with qemu.qmp(d, timeout=5.0) as c:
            with contextlib.suppress(VmFailed):
                await qemu.execute(c, "migrate_cancel", timeout=10.0)
            await qemu.execute(c, "cont", timeout=10.0)
    with contextlib.suppress(VmFailed, OSError):
        asyncio.run(cont())


def push(root: Path, repo: Repository, name: str) -> dict[str, Any]:
    """Store a template of this directory in the repository (vm/stored.py)."""
    return stored.push(template_dir(root, instance_name(name)), repo, name)


def list_templates(root: Path) -> list[dict[str, Any]]:
    d = root / TEMPLATES
    out = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if (p / tpl.MANIFEST).exists():
            t = tpl.load(p)
            out.append({"template": t.name, "from": t.from_vm, "disk": f"{t.image}@{t.version}",
                        "memory_size": t.machine.memory, "machine": t.machine.machine,
                        "clones": [n for n in names(root) if read_record(root, n).template == t.name]})
    return out


# -- clone ----------------------------------------------------------------------------------------------
def clone(root: Path, repo: Repository, repo_args: list[str], name: str, count: int, *,
          memory: int | None = None, cpus: int | None = None, extra_args: tuple[str, ...] | None = None,
          customize: str | None = None, lazy: bool = False, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``count`` clones of template ``name``, each resumed from its memory (mapped privately:
    shared until written) and device state, on its own overlay of the template's disk, with its own
    MAC and a fresh vmgenid. Every check is made before the first clone starts; a clone that fails
    to start or resume is reported and the others go on. ``steps`` in the answer: seconds from the
    call to each step (where a clone's start goes: bench/bench_vm.py reports them)."""
    t0 = time.monotonic()
    steps: dict[str, Any] = {}

    def step(what: str) -> None:
        steps[what] = round(time.monotonic() - t0, 3)
    t_dir = template_dir(root, instance_name(name))
    pulled = not (t_dir / tpl.MANIFEST).exists()
    # The disks agent (a Python process: 0.1-0.2 s) starts at once (a template to fetch: once the
    # repository has shown it), while the template is checked or fetched, and is stopped again if
    # a check refuses the clones (no VM would use it). A template not made here comes from the
    # repository (vm push), copied whole and verified, or lazily: then, as soon as the repository
    # has shown the template and the agent runs, the memory is served and its resume profile
    # prefetched (one worker: in that order), while the rest of the template is fetched and the
    # clones' qemu start.
    with ThreadPoolExecutor(1) as pool:
        # a template to fetch: the agent waits until the repository has shown it (a name that is
        # nowhere must fail without starting anything — the agent registers with the repository)
        agent: list[Future[Path]] = [] if pulled else [pool.submit(ensure_disks_served, root, repo_args)]
        early: dict[str, Manifest] = {}
        try:
            if pulled:
                def found(mem: Manifest) -> None:
                    step("template found")
                    early["memory"] = mem
                    agent.append(pool.submit(ensure_disks_served, root, repo_args))
                    if lazy:
                        agent.append(pool.submit(_early_lazy, root, repo, repo_args, name, mem, step))
                stored.pull(t_dir, repo, name, lazy=lazy, found=found)
                step("template fetched")
                if not agent:
                    agent.append(pool.submit(ensure_disks_served, root, repo_args))
            t = tpl.load(t_dir)
            tpl.check_machine(t, qemu_version=qemu.qemu_version(), machine_types=qemu.machine_types(),
                              memory=memory, cpus=cpus, extra_args=extra_args)
            tpl.verify_files(t, t_dir)
            if not t.extra.get("lazy"):
                tpl.check_memory_access(t_dir / tpl.MEMORY)
            tpl.check_host_memory(t, count, qemu.mem_available())
            try:
                m = repo.resolve(parse_ref(f"{t.image}@{t.version}"))
            except NotFound:
                raise NotFound(msg=f"template {name}'s disk, {t.image}@{t.version}, is no longer in the repository "
                                   "(removed with blockprov rm): the template cannot be cloned; make it again from "
                                   "a VM of a version that exists (blockprov vm template)") from None
            step("checked")
            for a in agent:  # before the clones' disks are made: a starting agent must not see them half made
                a.result()
            step("disks agent ready")
        except BaseException:
            with contextlib.suppress(BlockprovError, OSError):
                for a in agent:
                    a.result()
                    stop_disks_agent_if_idle(root)  # started for nothing
            raise
    new = next_names(root / DISKS, f"{name}-", count, also_taken=names(root))
    started: list[VmRecord] = []
    failed: dict[str, str] = {}
    try:
        asyncio.run(create_instances(root / DISKS, repo, m, new))
        mm = None
        if t.extra.get("lazy"):
            mm = early.get("memory") or _lazy_instance(root, repo, t)
        sock = ensure_disks_served(root, repo_args)
        step("disks made")
        if mm is not None:
            _mount_lazy(root, sock, t, t_dir, mm)
            step("memory mounted")
            steps["memory fetched at mount"] = _fetched(root, mm)
        for index, vm in enumerate(new):
            try:
                rec = _start_clone(root, t, t_dir, vm, sock, timeout, step if index == 0 else None)
                if index == 0 and mm is not None:
                    steps["memory fetched at resume"] = _fetched(root, mm)
                if customize:
                    rec = replace(rec, customized=_customize(root, customize, vm, index, timeout))
                started.append(rec)
            except BlockprovError as e:
                failed[vm] = str(e)
                _discard(root, vm)  # never kept half made
    except BaseException:
        # Ctrl-C, or a step before the first clone failed: the clones not fully started go (a paused
        # qemu, an overlay `vm list` would never show), and the disks agent (with the lazy memory's
        # mount) if no VM runs. Those that were started run on, as `vm list` shows.
        done = {r.name for r in started}
        for vm in new:
            if vm not in done:
                _discard(root, vm)
        with contextlib.suppress(BlockprovError, OSError):
            stop_disks_agent_if_idle(root)
        raise
    if not started:
        stop_disks_agent_if_idle(root)
    step("done")
    out = {"template": name, "clones": [r.name for r in started], "failed": failed, "pulled": pulled,
           "customized": {r.name: r.customized for r in started if customize}, "steps": steps}
    if mm is not None and started:
        out["resume_profile"] = _record_resume_profile(root, repo, mm)
    return out


def _lazy_instance(root: Path, repo: Repository, t: tpl.Template) -> Manifest:
    """The disk instance ``tplmem-NAME`` that serves a lazy template's memory version (made if
    missing; the disks agent picks it up with the clones' disks). Returns the memory version."""
    mm = repo.resolve(parse_ref(str(t.extra["memory_version"])))
    _make_lazy_instance(root, repo, t.name, mm)
    return mm


def _make_lazy_instance(root: Path, repo: Repository, name: str, mm: Manifest) -> None:
    disks = root / DISKS
    inst = f"{LAZY_PREFIX}{name}"
    if inst not in list_instances(disks):
        asyncio.run(create_instances(disks, repo, mm, [inst]))


def _early_lazy(root: Path, repo: Repository, repo_args: list[str], name: str, mm: Manifest,
                step: Callable[[str], None]) -> Path:
    """What ``vm clone --lazy`` of a template it is fetching does in the background as soon as the
    repository has shown the template and the disks agent runs: serve the memory version ``mm``
    and start prefetching its resume profile, so the profile streams in while the device state and
    boot files are fetched, the clones' disks made and qemu started."""
    _make_lazy_instance(root, repo, name, mm)
    sock = ensure_disks_served(root, repo_args)
    _prefetch_memory(root, mm)
    step("memory prefetch started")
    return sock


def _fetched(root: Path, mm: Manifest) -> dict[str, Any]:
    """What the base cache of a lazy template's memory has fetched so far: chunks, bytes and
    repository requests in all, and the chunks its prefetch (hydration) fetched, the rest being
    page faults; {} when the agent does not say."""
    try:
        st = from_dict(StatusReport, control.call(base_dir(root / DISKS, mm), "status", timeout=10.0))
    except (BlockprovError, OSError):
        return {}
    f, h = st.device.fetch, st.hydration
    return {"chunks": f.chunks_fetched if f else None, "bytes": f.bytes_fetched if f else None,
            "requests": f.batches if f else None, "prefetched_chunks": h.chunks_fetched if h else None,
            "prefetch": h.state if h else None}


def _prefetch_memory(root: Path, mm: Manifest) -> None:
    """Start fetching a lazy template's memory version in the base cache, in the background: its
    resume profile (the chunks the first lazy clone's guest touched after it resumed, in that order)
    first, RESUME_PARALLEL batches at a time, then, once the guests' page faults have calmed down
    (at most RESUME_LIMIT s later), the rest. Asking again while it runs changes nothing."""
    with contextlib.suppress(BlockprovError, OSError):  # only a head start: first touches fetch anyway
        control.call(base_dir(root / DISKS, mm), "hydrate", timeout=30.0, profile_parallel=RESUME_PARALLEL,
                     hold_rest=RESUME_LIMIT)


def _mount_lazy(root: Path, sock: Path, t: tpl.Template, t_dir: Path, mm: Manifest) -> None:
    """Show a lazy template's memory version as its memory file (vm/lazy.py), its prefetch started
    first (when the template was fetched by this command, it started already: see _early_agent)."""
    _prefetch_memory(root, mm)
    lazy.mount(t_dir / tpl.LAZY_MOUNT, _disk_uri(sock, f"{LAZY_PREFIX}{t.name}"), t.memory_file.size)


def _record_resume_profile(root: Path, repo: Repository, mm: Manifest, *, settle: float = RESUME_SETTLE,
                           limit: float = RESUME_LIMIT) -> dict[str, Any]:
    """The first lazy clone of a memory version anywhere records its resume profile: the memory
    chunks its guest read first, in that order (the base cache's first-read order), once no new
    chunk was read for ``settle`` seconds (at most ``limit``), so every later host prefetches them
    in one stream instead of paying a round trip per page. Kept as the version's boot profile in
    the repository (the same record disks' boot profiles use); an existing one is left alone.
    Best effort: a failure only costs later clones their head start."""
    base = base_dir(root / DISKS, mm)
    try:
        if repo.get_profile(mm.image, mm.id):
            return {"recorded": False, "reason": "the version has one"}
        order: list[int] = []
        deadline = time.monotonic() + limit
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
            time.sleep(0.1)
            now = from_dict(ReadOrder, control.call(base, "profile", timeout=10.0)).order
            if len(now) != len(order):
                order, quiet_since = now, time.monotonic()
        if not order:
            return {"recorded": False, "reason": "no chunk was read"}
        repo.put_profile(mm.image, mm.id, order)
        return {"recorded": True, "chunks": len(order)}
    except (BlockprovError, OSError) as e:
        return {"recorded": False, "reason": str(e)}


def _start_clone(root: Path, t: tpl.Template, t_dir: Path, vm: str, sock: Path, timeout: float,
                 step: Callable[[str], None] | None = None) -> VmRecord:
    """Start one clone: qemu waiting for its device state, the state loaded, ``cont``; ``step``
    (the first clone's) is told when each of the three is done."""
    def done(what: str) -> None:
        if step is not None:
            step(what)
    d = _new_vm_dir(root, vm, disk_made=True)
    rec = VmRecord(name=vm, image=t.image, version=t.version, disk=vm, machine=t.machine,
                   mac=qemu.new_mac(_taken_macs(root)), template=t.name, created=time.time(),
                   console=str(d / "console.log"))
    write_record(root, rec)
    wiring = qemu.Wiring(dir=d, disk_uri=_disk_uri(sock, vm), mac=rec.mac, memory_path=tpl.memory_path(t, t_dir),
                         share=False, incoming=True, kernel=t_dir / "vmlinuz" if t.machine.kernel else None,
                         initrd=t_dir / "initrd" if t.machine.kernel else None)
    rec = replace(rec, pid=qemu.start(qemu.command(t.machine, wiring), d))
    write_record(root, rec)
    done("qemu started")

    async def resume() -> None:
        async with qemu.qmp(d) as c:
            await qemu.set_ignore_shared(c)
            await qemu.execute(c, "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(t_dir / tpl.STATE))}"})
            await qemu.wait_migration(c, timeout)
            done("device state loaded")
            await qemu.execute(c, "cont")
            done("resumed")
    asyncio.run(resume())
    return rec


# -- customizing --------------------------------------------------------------------------------------------
def _customize(root: Path, cmd: str, vm: str, index: int, timeout: float) -> dict[str, Any]:
    d = vm_dir(root, vm)
    if cmd == BUILTIN_IDENTITY:
        machine_id = uuid.uuid4().hex  # systemd's format: 32 lowercase hex digits, random (version 4)
        return {"identity": vm, "machine_id": machine_id,
                "acknowledged": send_identity(d, vm, machine_id, timeout=min(timeout, 60.0))}
    env = {**os.environ, "BLOCKPROV_VM": vm, "BLOCKPROV_INDEX": str(index),
           "BLOCKPROV_QMP": str(qemu.sockets(d)["qmp"]), "BLOCKPROV_IDENTITY_SOCKET": str(qemu.sockets(d)["identity"])}
    try:
        r = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise VmFailed(name=vm, why=f"--customize did not finish in {timeout:g} s") from None
    if r.returncode != 0:
        raise VmFailed(name=vm, why=f"--customize exited with {r.returncode}: {r.stderr.strip()[-200:]}")
    return {"command": cmd, "returncode": 0}


def send_identity(d: Path, ident: str, machine_id: str, timeout: float) -> bool:
    """Send ``ident`` (a hostname) and ``machine_id`` on the VM's identity channel as one line
    ``NAME MACHINE-ID``, and hold the connection until the guest's console acknowledges both
    (``BP-IDENTITY name=… machine-id=…``): qemu reads the socket only while the guest has the port
    open, so closing at once could lose the line. False: no acknowledgement."""
    ack = re.compile(rf"BP-IDENTITY name={re.escape(ident)} machine-id={re.escape(machine_id)}\b")
    console = d / "console.log"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10.0)
        s.connect(str(qemu.sockets(d)["identity"]))
        s.sendall(f"{ident} {machine_id}\n".encode())
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if ack.search(console.read_text(errors="replace")):
                    return True
            time.sleep(0.2)
    return False
