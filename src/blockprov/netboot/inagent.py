"""The in-machine agent: serves the machine's root file system from its own disk, over the kernel's
NBD client, and keeps serving after the switch to the real root.

Started by PID 1 (netboot/machine.py) as ``@blockprov-agent`` — argv[0] starting with '@' is
systemd's convention for a root storage daemon, so neither systemd's shutdown nor a switch_root
kills it. It:

1. hardens itself against the deadlock of a storage daemon under memory pressure (the kernel
   reclaims memory by writing dirty pages to /dev/nbd0, which needs this very process):
   ``mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)`` (no page of it is ever swapped or dropped;
   ONFAULT so thread stacks and arenas are not populated up front), ``prctl(PR_SET_IO_FLUSHER)``
   (its own allocations do not recurse into I/O reclaim, as for loop and nbd-client), an
   ``oom_score_adj`` of -1000, and small thread stacks;
2. resolves ``blockprov.image`` at ``blockprov.repo`` (retrying with backoff while the repository
   is unreachable, saying so on the console);
3. picks and, when blank, initializes the disk (netboot/disk.py), mounts its metadata file system;
4. runs the ordinary agent (agent/agent.py: cache, NBD server on a unix socket in the initramfs,
   registration with the repository, background hydration) with the disk's data partition as
   the cache's data and ``reset_on_start`` under the ``restore`` policy, so a machine comes up
   pristine having re-fetched only what the last session changed; when the host was assigned
   another version of the image meanwhile, the disk's version is updated by diff (agent/
   lifecycle.py ``update``: only the chunks that differ are dropped, and those the disk held are
   fetched again) before the kernel sees a byte — a tag moved while a machine runs reaches it at
   its next boot, never under the running system;
   Diskless (``blockprov.disk=none``, item 6): no disk is touched; the cache's data is a sparse
   file on a tmpfs of its own, bounded by ``blockprov.ram`` (default: half the machine's memory),
   its metadata in the initramfs's /run. Nothing is copied ahead unless ``blockprov.hydrate``
   says so and the image fits. When the tmpfs is full the console says why once; a write to an
   area not yet in RAM fails (ENOSPC in the agent, which the kernel's NBD client turns into EIO
   for the machine), a read of data not yet in RAM is still answered (fetched, served, not kept:
   fetched again at every read), and what is in RAM keeps working. The bound is what keeps the
   cache from taking the memory the machine (and the agent, locked and OOM-exempt) needs;
5. connects the kernel's NBD client to that socket (netboot/kernelnbd.py) and reports READY to
   PID 1 on a pipe, which mounts /dev/nbd0 and switches root.

Every module it will ever need is imported before it reports READY: the initramfs build ships
exactly the modules this import graph pulls in (netboot/initramfs.py's probe), and PID 1 keeps
the initramfs files (it moves the root without deleting them), so the agent's root stays intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from blockprov.agent import lifecycle
from blockprov.agent.agent import Agent, AgentConfig
from blockprov.cache.device import CacheDevice
from blockprov.cache.fetcher import DEFAULT_READAHEAD
from blockprov.cache.journal import META_NAME, load
from blockprov.errors import BlockprovError, CacheMismatch, NetbootError, Unauthorized
from blockprov.humanize import parse_size
from blockprov.manifest import Manifest
from blockprov.netboot import disk, kernelnbd
from blockprov.netboot.params import check_params, diskless
from blockprov.repo.remote import RemoteRepository

log = logging.getLogger("blockprov.netboot")

RUN = Path("/run/blockprov")
META_MOUNT = RUN / "meta"
RAM_MOUNT = RUN / "ram"  # diskless: the tmpfs holding the cache's data
RAM_CHECK = 1.0  # seconds between looks at how full the diskless cache's tmpfs is
SOCKET = RUN / "nbd.sock"
NBD_DEVICE = "nbd0"
MKFS = ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-L", "bp-meta"]
PR_SET_IO_FLUSHER = 57
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
RETRY_MAX = 30.0
SYNC_FILLS = 0.2  # seconds between fsyncs of the journal's fill records (sync_fills)


def harden() -> list[str]:
    """Lock memory, become an I/O flusher, refuse the OOM killer; returns what failed (logged)."""
    problems = []
    threading.stack_size(512 << 10)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        problems.append(f"mlockall: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        problems.append(f"PR_SET_IO_FLUSHER: {os.strerror(ctypes.get_errno())}")
    try:
        Path("/proc/self/oom_score_adj").write_text("-1000\n")
    except OSError as e:
        problems.append(f"oom_score_adj: {e.strerror}")
    return problems


def resolve(repo: RemoteRepository, ref: str, say: Any) -> Manifest:
    """The manifest of ``ref``; a repository that is down is retried with backoff, forever (a PC
    that cannot reach its repository has nothing better to do, and says so on its console)."""
    wait = 1.0
    while True:
        try:
            return repo.resolve(ref)
        except BlockprovError as e:
            if getattr(e, "exit_code", 0) != 7:  # only "unavailable" is worth a retry
                raise
            say(f"repository {repo.url} unreachable ({e}); retrying in {wait:g} s")
        time.sleep(wait)
        wait = min(RETRY_MAX, wait * 2)


def prepare_disk(params: dict[str, str], manifest: Manifest, say: Any) -> disk.Disk:
    found = disk.disks()
    d, kind = disk.choose(found, manifest.size, params.get("disk"))
    if kind == "blank":
        say(f"initializing disk {d.name} ({d.size >> 20} MiB) for {manifest.image}@{manifest.id[:12]}")
        disk.initialize(d, {"image": manifest.image, "made": int(time.time())}, MKFS)
    else:
        say(f"disk {d.name} holds blockprov's cache")
    META_MOUNT.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "ext4", "-o", "rw,noatime", d.meta, str(META_MOUNT)],
                       capture_output=True, timeout=60)
    if p.returncode:
        raise NetbootError(f"cannot mount the metadata file system {d.meta}: "
                           f"{p.stderr.decode(errors='replace').strip()}")
    return d


def mem_total(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise NetbootError("cannot read MemTotal from /proc/meminfo")


def ram_budget(params: dict[str, str], total: int) -> int:
    """Bytes the diskless cache may hold: ``blockprov.ram`` or half the machine's memory (the
    other half for the system the machine runs, the initramfs and the agent). Pure."""
    return parse_size(params["ram"]) if "ram" in params else total // 2


def prepare_ram(params: dict[str, str], manifest: Manifest, say: Any) -> tuple[Path, str]:
    """Diskless: mount the bounded tmpfs; returns (cache directory, data file)."""
    total = mem_total()
    budget = ram_budget(params, total)
    RAM_MOUNT.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={budget},mode=0700", "bp-ram", str(RAM_MOUNT)],
                       capture_output=True, timeout=60)
    if p.returncode:
        raise NetbootError(f"cannot mount the RAM cache: {p.stderr.decode(errors='replace').strip()}")
    say(f"diskless (blockprov.disk=none): the cache is in RAM, at most {budget >> 20} MiB of the machine's "
        f"{total >> 20} MiB (blockprov.ram=SIZE)")
    return RUN / "cache", str(RAM_MOUNT / "data")


def ram_hydrate(hydrate: str, manifest: Manifest, budget: int) -> str:
    """Diskless: the hydration asked for, or ``off`` when the image's data (its non-zero chunks:
    zero ones take no RAM) does not fit in the budget — copying ahead would only fill the RAM and
    turn the machine's own writes into errors. Pure."""
    return hydrate if manifest.stored_bytes_logical() <= budget else "off"


class FewNoSpace(logging.Filter):
    """Lets only the first few "no space left" records reach the console: with a full RAM cache
    every miss logs one, and a console scrolling them hides everything else (watch_ram has said
    once, clearly, what is going on)."""

    KEEP = 3

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "no space left" not in record.getMessage().lower():
            return True
        self.seen += 1
        if self.seen == self.KEEP + 1:
            record.msg, record.args = "(further \"no space left\" messages are not shown)", ()
        return self.seen <= self.KEEP + 1


async def watch_ram(budget: int, chunk: int, say: Any) -> None:
    """Say once on the console when the diskless cache is full (the fills that fail then are
    the machine's EIO: see the module's docstring)."""
    warned = False
    while True:
        await asyncio.sleep(RAM_CHECK)
        st = os.statvfs(RAM_MOUNT)
        free = st.f_bavail * st.f_frsize
        if free < chunk and not warned:
            say(f"error: the RAM cache is full ({budget >> 20} MiB, blockprov.ram): writes to areas not yet in "
                "RAM now fail (the machine sees I/O errors) and data not yet in RAM is fetched again at every "
                "read; give the machine more memory, a larger blockprov.ram, or a disk")
            warned = True
        elif free >= 4 * chunk:
            warned = False


def connect_kernel(ready: int, say: Any) -> None:
    """Thread: the kernel's NBD client on our socket; tells PID 1 'READY' once /dev/nbd0 runs."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(SOCKET))
        export = kernelnbd.handshake(sock)
        fd = kernelnbd.attach(f"/dev/{NBD_DEVICE}", sock, export)
    except (OSError, BlockprovError) as e:
        os.write(ready, f"ERROR cannot start /dev/{NBD_DEVICE}: {e}\n".encode())
        return

    def announce() -> None:
        for _ in range(600):
            if os.path.exists(f"/sys/block/{NBD_DEVICE}/pid"):
                os.write(ready, f"READY {export.size}\n".encode())
                return
            time.sleep(0.05)
        os.write(ready, b"ERROR the kernel NBD client did not start\n")

    threading.Thread(target=announce, daemon=True).start()
    try:
        kernelnbd.serve(fd)
    except OSError as e:
        say(f"/dev/{NBD_DEVICE} stopped: {e}")


def held_version(cache_dir: Path) -> tuple[str, str] | None:
    """(image, version) of the cache the disk holds, if any."""
    if not (cache_dir / META_NAME).exists():
        return None
    try:
        meta = load(cache_dir).meta
    except BlockprovError as e:
        raise NetbootError(f"the disk's cache metadata is unreadable: {e}") from None
    return meta.image, meta.version


def instance_name(host: str | None) -> str | None:
    """The name the machine registers with: ``pc-`` and its host id (a MAC's ':' are not allowed)."""
    if not host:
        return None
    return "pc-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in host)[:120]


async def serve(params: dict[str, str], repo: RemoteRepository, manifest: Manifest, cache_dir: Path,
                data_path: str, ready: int, say: Any) -> None:
    """Serve ``manifest`` from ``cache_dir`` (metadata) and ``data_path`` (the disk's data
    partition, or diskless the file on the RAM tmpfs) until the machine stops."""
    policy = params.get("policy", "keep")
    hydrate = params.get("hydrate", "off" if diskless(params) else "background")
    budget = 0
    if diskless(params):
        st = os.statvfs(RAM_MOUNT)
        budget = st.f_blocks * st.f_frsize
        if ram_hydrate(hydrate, manifest, budget) != hydrate:
            say(f"hydrate={hydrate} ignored: the image's data ({manifest.stored_bytes_logical() >> 20} MiB) does "
                f"not fit in the RAM cache")
            hydrate = "off"
    config = AgentConfig(cache_dir=cache_dir, socket=SOCKET, data_path=data_path,
                         readahead=parse_size(params["readahead"]) if "readahead" in params else DEFAULT_READAHEAD,
                         reset_on_start=policy == "restore", hydrate=hydrate != "off",
                         instance=instance_name(params.get("host")),
                         extra={"host": params.get("host"), "netboot": True})
    held = held_version(config.cache_dir)
    moved = held is not None and held != (manifest.image, manifest.id)
    if moved and held is not None and held[0] != manifest.image:
        say(f"the disk held {held[0]}@{held[1][:12]}; starting over for {manifest.image}")
        shutil.rmtree(config.cache_dir)
        moved = False
    # The host moved to another version of the image: re-attach the version the disk holds (reset
    # first under restore), then update by diff before the kernel sees a byte.
    agent = Agent(config, repo, None if moved else manifest)
    try:
        await agent.start()
    except CacheMismatch as e:
        raise NetbootError(f"{e} (erase the disk's first MiB to start over)") from None
    dev = agent.device
    assert dev is not None and agent.ops is not None
    if moved:
        old = dev.manifest.id
        done = await lifecycle.update(dev, manifest, keep_modified=policy == "keep")
        say(f"updated {old[:12]} → {manifest.id[:12]} by diff: {done['chunks_changed']} chunk(s) differ, "
            f"{done['chunks_refetched']} fetched again, {done['modified_kept']} modified kept")
    counts = dev.chunk_map.counts()
    say(f"serving {manifest.image}@{manifest.id[:12]} policy={policy} hydrate={hydrate} "
        f"present={counts['total'] - counts['missing']}/{counts['total']} chunks")
    if hydrate == "before-boot" and agent.ops.hydrator is not None:
        say("hydrating every chunk before the boot (blockprov.hydrate=before-boot)")
        while agent.ops.hydrator.running:
            await asyncio.sleep(0.5)
        counts = dev.chunk_map.counts()
        say(f"hydrated before the boot: {counts['total'] - counts['missing']}/{counts['total']} chunks local")
    threading.Thread(target=connect_kernel, args=(ready, say), daemon=True, name="nbd-kernel").start()
    tasks = [asyncio.ensure_future(sync_fills(dev))]
    if budget:
        tasks.append(asyncio.ensure_future(watch_ram(budget, manifest.chunk_size, say)))
    try:
        await agent.run()
    finally:
        for t in tasks:
            t.cancel()


async def sync_fills(dev: CacheDevice) -> None:
    """Make the journal's ``present`` records durable every ``SYNC_FILLS`` seconds.

    A host agent journals fills without an fsync (losing one costs a refetch) and checkpoints at
    its clean stop; a PC is powered off with the agent still running (``poweroff -f``, or the
    power button), so without this every fill since the guest's last FLUSH — all of a read-only
    session's — would be fetched again at the next boot."""
    while True:
        await asyncio.sleep(SYNC_FILLS)
        with contextlib.suppress(BlockprovError):
            await dev.state.sync()


def main(argv: list[str]) -> int:
    """``@blockprov-agent PARAMS_JSON READY_FD``."""
    params: dict[str, str] = json.loads(argv[0])
    ready = int(argv[1])
    logging.basicConfig(level=logging.INFO, format="blockprov-agent: %(message)s", stream=sys.stderr)
    for h in logging.getLogger().handlers:
        h.addFilter(FewNoSpace())
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def say(msg: str) -> None:
        print(f"blockprov-agent: {msg}", file=sys.stderr, flush=True)

    for problem in harden():
        say(f"warning: {problem}")
    try:
        check_params(params)
        RUN.mkdir(parents=True, exist_ok=True)
        # blockprov.token: the host's token, carried in its boot script (docs/operations.md, "Tokens",
        # says what that exposes); none: a repository without enforced tokens
        repo = RemoteRepository(params["repo"], timeout=30.0, token=params.get("token") or None)
        manifest = resolve(repo, params["image"], say)
        if diskless(params):
            cache_dir, data_path = prepare_ram(params, manifest, say)
        else:
            d = prepare_disk(params, manifest, say)
            cache_dir, data_path = META_MOUNT / "cache", d.data
        asyncio.run(serve(params, repo, manifest, cache_dir, data_path, ready, say))
    except BlockprovError as e:
        why = str(e)
        if isinstance(e, Unauthorized):  # the CLI's hint (--token) means nothing on a PC's console
            why = (f"the repository needs a token: give this host an agent-scope one with "
                   f"host assign {params.get('host') or 'MAC'} … --args blockprov.token=TOKEN ({why})")
        with contextlib.suppress(OSError):
            os.write(ready, f"ERROR {why}\n".encode())
        say(f"error: {why}")
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
