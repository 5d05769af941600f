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

Offline (issue 13 item 4). The disk carries a golden reserve (cache/reserve.py: the base content
of each chunk, kept before its first overwrite) and its own boot loader, kernel and initramfs
(netboot/loader.py: written after the first provisioning and whenever the version's boot files
or the command line change, once the disk holds the whole image — before the boot under
``hydrate=before-boot``, in the background once the background copy is complete otherwise;
``blockprov.loader=off`` leaves it as it is for one boot — a one-off session, say an
administrator's, whose command line must not become what the PC boots offline). When the
repository does not answer, and the disk holds blockprov's cache, the
agent waits ``blockprov.offline_after`` seconds (OFFLINE_AFTER by default) and then boots from
what the disk holds — the version, manifest and policy of the last boot (the manifest is in the
cache directory; the policy is on the command line, which the disk's loader carries) — saying
``OFFLINE`` on the console: present chunks are served, a missing one fails with EIO after
OFFLINE_FETCH_TIMEOUT, no hydration, no registration. Under ``restore`` every chunk the last
session changed is restored from the reserve before the kernel sees a byte (online too: the
repository is asked only for those the reserve lacks); offline, the ones it lacks are listed on
the console and stay missing — their reads fail with EIO, never serving the session's data as
pristine.

Every module it will ever need is imported before it reports READY: the initramfs build ships
exactly the modules this import graph pulls in (netboot/initramfs.py's probe), and PID 1 keeps
the initramfs files (it moves the root without deleting them), so the agent's root stays intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from blockprov import boot
from blockprov.agent import keep, lifecycle, run_async
from blockprov.agent.agent import Agent, AgentConfig
from blockprov.align import runs
from blockprov.cache import DEFAULT_READAHEAD, DEFAULT_TIMEOUT, CacheDevice, Reserve, is_cache, load_state
from blockprov.errors import BlockprovError, CacheMismatch, NetbootError, Unauthorized
from blockprov.humanize import parse_size
from blockprov.manifest import Manifest
from blockprov.netboot import disk, everyday, loader
from blockprov.netboot.daemon import harden
from blockprov.netboot.native import Native, geometry
from blockprov.netboot.params import check_params, diskless, parse_cmdline, peer_port
from blockprov.netboot.resident import Resident
from blockprov.repo.remote import RemoteRepository
from blockprov.results import to_dict
from blockprov.retry import RetryPolicy, is_transient, retry_sync

log = logging.getLogger("blockprov.netboot")

RUN = Path("/run/blockprov")
META_MOUNT = RUN / "meta"
RAM_MOUNT = RUN / "ram"  # diskless: the tmpfs holding the cache's data
RAM_CHECK = 1.0  # seconds between looks at how full the diskless cache's tmpfs is
SOCKET = RUN / "nbd.sock"
DEV = RUN / "dev"  # the agent's own devtmpfs: after the root switch its root (the initramfs) has no /dev
MKFS = ["/usr/sbin/mke2fs", "-q", "-F", "-t", "ext4", "-L", "bp-meta"]
RETRY_MAX = 30.0
SYNC_FILLS = 0.2  # seconds between fsyncs of the journal's fill records (sync_fills)
OFFLINE_AFTER = 20.0  # seconds an unreachable repository is retried before a disk that can boots offline
OFFLINE_FETCH_TIMEOUT = 5.0  # offline, a missing chunk's read fails (EIO) after this
# A PC is powered off with its agent running, so every boot opens a cache left unclean and re-hashes
# what was filled since the last checkpoint before it serves (cache/device.py; up to 1 GiB on a
# host): under TCG ~350 MiB took 5-6 s (bench/RESULTS.md), so 64 MiB is about a second. A
# checkpoint is a few small writes on the metadata file system.
CHECKPOINT_FILL = 64 << 20
SECURE_BOOT_AT = everyday.SECURE_BOOT_AT  # the every-day boot's shell reads the same byte
NATIVE_FETCH = 256  # chunks a boot fetches before the root rather than stay on NBD (and 5 % of the image)


def resolve(repo: RemoteRepository, ref: str, say: Any, give_up_after: float | None = None) -> Manifest | None:
    """The manifest of ``ref``; a repository that is down is retried with backoff (retry.py: only
    what its error class calls transient — a certificate the PC does not trust ends the boot with
    its reason at once), for ever (a PC that cannot reach its repository has nothing better to do,
    and says so on its console) — or, with ``give_up_after`` (the disk can boot offline), for that
    many seconds, then None."""
    def unreachable(e: BaseException, attempt: int, delay: float) -> None:
        say(f"repository {repo.url} unreachable ({e}); retrying in {delay:.0f} s")

    policy = RetryPolicy(timeout=give_up_after, first_delay=1.0, max_delay=RETRY_MAX, jitter=False)
    try:
        return retry_sync(lambda: repo.resolve(ref), policy, f"resolving {ref} at {repo.url}", on_retry=unreachable)
    except BlockprovError as e:
        if not is_transient(e):
            raise
        say(f"repository {repo.url} unreachable ({e})")
        return None


def offline_disk(params: dict[str, str]) -> disk.Disk | None:
    """The disk holding blockprov's current layout, if any: the machine can boot from it offline.
    Run first at every boot with a disk, it also makes a GPT cut short mid-write whole again
    (``disk.mend``: netboot/disk.py's crash rules) before anything uses the partitions."""
    with contextlib.suppress(BlockprovError, OSError):
        d, kind = disk.choose(disk.disks(), 0, params.get("disk"))
        if kind == "blockprov":
            disk.mend(d)
            return d
    return None


def prepare_disk(params: dict[str, str], manifest: Manifest, say: Any) -> disk.Disk:
    found = disk.disks()
    d, kind = disk.choose(found, manifest.size, params.get("disk"))
    asked = params.get("reprovision")
    if kind == "blockprov" and asked and disk.read_label(disk.read_head(d.path)).get("reprovision") != asked:
        say(f"disk {d.name}: the repository asks for it to be set up again from scratch (request {asked})")
        kind = "blank"
    if kind == "blockprov-old":
        say(f"disk {d.name} has an older blockprov layout (no boot partition, no golden reserve): "
            "re-initializing it; its cache is fetched again")
    if kind in ("blank", "blockprov-old"):
        wanted = parse_size(params["reserve"]) if "reserve" in params else None
        reserve = disk.reserve_bytes(d.size, manifest.size, wanted)
        say(f"initializing disk {d.name} ({d.size >> 20} MiB) for {manifest.image}@{manifest.id[:12]}, "
            f"golden reserve {reserve >> 20} MiB")
        disk.initialize(d, {"image": manifest.image, "made": int(time.time()),
                            "reprovision": params.get("reprovision")}, MKFS, reserve)
    else:
        say(f"disk {d.name} holds blockprov's cache")
    mount_meta(d)
    return d


def mount_meta(d: disk.Disk) -> None:
    META_MOUNT.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "ext4", "-o", "rw,noatime", d.meta, str(META_MOUNT)],
                       capture_output=True, timeout=60)
    if p.returncode:
        raise NetbootError(f"cannot mount the metadata file system {d.meta}: "
                           f"{p.stderr.decode(errors='replace').strip()}")


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


def held_version(cache_dir: Path) -> tuple[str, str] | None:
    """(image, version) of the cache the disk holds, if any."""
    if not is_cache(cache_dir):
        return None
    try:
        st = load_state(cache_dir)
    except BlockprovError as e:
        raise NetbootError(f"the disk's cache metadata is unreadable: {e}") from None
    return st.image, st.version


def own_dev() -> bool:
    """A devtmpfs of the agent's own at DEV (mounted once): the device nodes the native path and
    the disk's loader use after PID 1 moved /dev into the new root. False when it cannot be made."""
    if (DEV / "null").exists():
        return True
    DEV.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "devtmpfs", "bp-dev", str(DEV)], capture_output=True,
                          timeout=60).returncode == 0


def instance_name(host: str | None) -> str | None:
    """The name the machine registers with: ``pc-`` and its host id (a MAC's ':' are not allowed)."""
    if not host:
        return None
    return "pc-" + "".join(c if c.isalnum() or c in "._-" else "-" for c in host)[:120]


async def serve(params: dict[str, str], repo: RemoteRepository, manifest: Manifest | None, d: disk.Disk | None,
                cache_dir: Path, data_path: str, ready: int, say: Any) -> None:
    """Serve ``manifest`` from ``cache_dir`` (metadata) and ``data_path`` (the disk ``d``'s data
    partition, or diskless — ``d`` None — the file on the RAM tmpfs) until the machine stops;
    offline (``manifest`` None), whatever version the disk holds. Once the disk holds the whole
    image the root is native (netboot/native.py) and the agent stays resident out of its path."""
    offline = manifest is None
    policy = params.get("policy", "keep")
    hydrate = params.get("hydrate", "off" if diskless(params) else "background")
    budget = 0
    if diskless(params) and manifest is not None:
        st = os.statvfs(RAM_MOUNT)
        budget = st.f_blocks * st.f_frsize
        if ram_hydrate(hydrate, manifest, budget) != hydrate:
            say(f"hydrate={hydrate} ignored: the image's data ({manifest.stored_bytes_logical() >> 20} MiB) does "
                f"not fit in the RAM cache")
            hydrate = "off"
    # the golden reserve serves ``restore``: a ``keep`` disk never goes back to the base (and saves the copies)
    reserve = open_reserve(d, say) if policy == "restore" and d is not None else None
    taken = TakeIn(d, policy, say) if d is not None else None  # the last native session's records, always
    config = AgentConfig(cache_dir=cache_dir, socket=SOCKET, data_path=data_path,
                         readahead=parse_size(params["readahead"]) if "readahead" in params else DEFAULT_READAHEAD,
                         reset_on_start=policy == "restore", hydrate=hydrate != "off" and not offline,
                         instance=instance_name(params.get("host")), register=not offline,
                         use_profile=not offline, reserve=reserve,
                         fetch_timeout=OFFLINE_FETCH_TIMEOUT if offline else DEFAULT_TIMEOUT,
                         checkpoint_fill_bytes=CHECKPOINT_FILL,
                         site=None if offline else params.get("site") or None,
                         peer_listen=None if offline or (port := peer_port(params)) is None else ("0.0.0.0", port),
                         extra={"host": params.get("host"), "netboot": True},
                         prepare=taken.prepare if taken is not None else None)
    held = held_version(config.cache_dir)
    if offline and held is None:
        raise NetbootError(f"the repository is unreachable and disk {d.name if d else '(none)'} holds no cache "
                           "to boot from")
    moved = manifest is not None and held is not None and held != (manifest.image, manifest.id)
    if moved and held is not None and manifest is not None and held[0] != manifest.image:
        say(f"the disk held {held[0]}@{held[1][:12]}; starting over for {manifest.image}")
        shutil.rmtree(config.cache_dir)
        moved = False
        held = None
    session = modified_chunks(config.cache_dir) if held is not None and policy == "restore" else []
    # The host moved to another version of the image: re-attach the version the disk holds (reset
    # first under restore), then update by diff before the kernel sees a byte.
    agent = Agent(config, repo, None if moved or offline else manifest)
    t0 = time.monotonic()
    try:
        await agent.start()
    except CacheMismatch as e:
        raise NetbootError(f"{e} (erase the disk's first MiB to start over)") from None
    dev = agent.device
    assert dev is not None and agent.ops is not None
    if dev.verified_chunks:
        say(f"re-verified {dev.verified_chunks} chunk(s) filled since the last checkpoint (the machine was "
            f"powered off with the agent running), {dev.dropped_chunks} dropped; cache opened in "
            f"{time.monotonic() - t0:.1f} s")
    if taken is not None:
        session = sorted(set(session) | set(taken.session))
    if session and reserve is not None:
        await restore_from_reserve(dev, reserve, session, offline, say)
    if moved and manifest is not None:
        await move_to(agent, dev, repo, manifest, params, say)
    counts = dev.chunks.counts()
    m = dev.manifest
    if offline:
        say(f"OFFLINE: the repository {repo.url} is unreachable; serving {m.image}@{m.id[:12]} from disk "
            f"{d.name if d else '(none)'} as it was last booted (policy={policy}): "
            f"{counts['total'] - counts['missing']}/{counts['total']} chunks present; a missing chunk's reads "
            f"fail with EIO after {OFFLINE_FETCH_TIMEOUT:g} s; no hydration until the next online boot")
    else:
        say(f"serving {m.image}@{m.id[:12]} policy={policy} hydrate={hydrate} "
            f"present={counts['total'] - counts['missing']}/{counts['total']} chunks")
        if agent.site is not None:
            known = agent.peers.membership if agent.peers is not None else None
            say(f"site {agent.site.site}: {len(known.peers) if known else 0} peer(s) online"
                + (f", serving them at {agent.peer_url}" if agent.peer_url else "")
                + (f"; {agent.site.last_error}" if agent.site.last_error else "")
                + (f"; chunks through the site cache {repo.url}" if agent.peers is not None
                   and agent.peers.upstream_kind == "site_cache" else ""))
    if hydrate == "before-boot" and agent.ops.hydrator is not None:
        say("hydrating every chunk before the boot (blockprov.hydrate=before-boot)")
        while agent.ops.hydrator.running:
            await asyncio.sleep(0.5)
        counts = dev.chunks.counts()
        say(f"hydrated before the boot: {counts['total'] - counts['missing']}/{counts['total']} chunks local")
    if not offline and d is not None and params.get("loader") != "off":
        hydrator = agent.ops.hydrator
        cmdline = Path("/proc/cmdline").read_text()  # /proc, /sys and /dev move into the new root
        job = threading.Thread(target=write_loader, daemon=True, name="loader", args=(
            params, cmdline, m, d, loader.node_numbers(d), say,
            lambda: hydrator is not None and hydrator.running, lambda: dev.chunks.counts()["missing"], firmware()[0]))
        job.start()
        # the FOG model (before-boot: everything on the disk first, the loader too), and a complete disk:
        # its loader current before the boot, so that its next boot is the every-day boot (everyday.py)
        if hydrate == "before-boot" or not dev.chunks.counts()["missing"]:
            await asyncio.get_running_loop().run_in_executor(None, job.join)
    resident = None
    native_on = params.get("native", "on") != "off"
    if taken is not None and taken.native is not None and native_on and await complete_for_native(dev, offline, say):
        root = await taken.native.enter(dev, policy)
        try:
            taken.native.write_plan(f"{m.image}@{m.id}", policy, taken.disk)
        except OSError as e:  # a full or failing metadata file system: this boot goes on, the next takes the slow path
            with contextlib.suppress(OSError):
                taken.native.remove_plan()  # never an older plan in its place
            say(f"warning: the every-day boot's plan could not be written ({e.strerror or e}): "
                "the next boot takes the slow path")
        say(f"native data path: the root is disk {d.name if d else ''} itself, through the kernel ({root}: "
            + ("a copy-on-write snapshot of the image, dropped at the next boot" if policy == "restore" else
               "the image in place, its writes recorded by dm-era") + "); the agent stays out of its path")
        resident = Resident(taken.native, dev, repo, say)
        agent.control.handlers.update(resident.handlers())
        config.extra["data_path"] = "native"
        resident.start()
        os.write(ready, f"READY native {root}\n".encode())
    else:
        if taken is not None and taken.native is not None:
            await asyncio.get_running_loop().run_in_executor(None, taken.native.teardown)
        say("NBD data path: the agent serves the root" + (" until the disk holds the whole image" if d else ""))
        config.extra["data_path"] = "nbd"
        os.write(ready, f"READY nbd {SOCKET}\n".encode())  # the supervisor connects the kernel's NBD client
    tasks = [asyncio.ensure_future(sync_fills(dev))]
    if budget:
        tasks.append(asyncio.ensure_future(watch_ram(budget, m.chunk_size, say)))
    try:
        await agent.run()
    finally:
        for t in tasks:
            t.cancel()
        if resident is not None:
            await resident.stop()


class TakeIn:
    """The agent's ``prepare`` on a PC's disk: the kernel's record of the last native session
    into the cache's map (netboot/native.py), before the reset on start, the update or anything
    else sees the cache. ``session``: the chunks the map then holds as modified (a restore
    brings them back from the golden reserve)."""

    def __init__(self, d: disk.Disk, policy: str, say: Any) -> None:
        self.disk = d
        self.policy = policy
        self.say = say
        self.native: Native | None = None
        self.session: list[int] = []

    async def prepare(self, dev: CacheDevice) -> None:
        m = dev.manifest
        try:
            nat = Native(geometry(self.disk, m.size, m.chunk_size), META_MOUNT, m.count, self.say,
                         dev_dir=str(DEV) if own_dev() else "/dev")
            nat.remove_plan()  # before anything here changes the disk (native.py's crash rules)
            got = await asyncio.get_running_loop().run_in_executor(None, nat.absorb)
            took = await nat.take_in(dev, got, self.policy)
        except (BlockprovError, OSError) as e:
            self.say(f"warning: the native data path is off for this boot: {e}")
            return
        self.native = nat
        if any(took.values()):
            self.say(f"native: the last session's kernel record: {took['era_chunks']} chunk(s) written in place "
                     f"(keep), {took['merged']} merged from its copy-on-write store, {took['dropped']} dropped with "
                     "it (restore)")
        if self.policy == "restore":
            self.session = dev.modified_chunks()


async def complete_for_native(dev: CacheDevice, offline: bool, say: Any) -> bool:
    """Whether the disk holds the whole image now — after fetching, when the repository is
    reachable, the few chunks this boot's restore left missing (NATIVE_FETCH at most): a disk
    that was complete stays so, and boots native."""
    counts = dev.chunks.counts()
    missing = counts["missing"]
    if missing and not offline and missing <= max(NATIVE_FETCH, counts["total"] // 20):
        todo = dev.chunks.missing(range(counts["total"]))
        say(f"fetching {len(todo)} missing chunk(s) before the boot, so the root can be native")
        await dev.fetch_chunks(todo)
        missing = dev.chunks.counts()["missing"]
    return missing == 0


async def move_to(agent: Agent, dev: CacheDevice, repo: RemoteRepository, manifest: Manifest,
                  params: dict[str, str], say: Any) -> None:
    """The host was assigned another version of the image: update the disk by diff before the
    kernel sees a byte. ``restore``: the session was reset already. ``keep``: agent/keep.py's
    ``move`` (the chunks of partitions the new version leaves unchanged are kept, the session is
    first kept as a version when anything else changed, never merged); when that snapshot cannot
    be made the PC stays on its version. The console and the agent's report say which."""
    old = dev.manifest
    report: dict[str, Any] = {"from": f"{old.image}@{old.id}", "to": f"{manifest.image}@{manifest.id}",
                              "at": time.time()}
    done: keep.KeptUpdate | None
    if params.get("policy", "keep") == "keep":
        done = await keep.move(dev, repo, manifest, host=params.get("host"),
                               on_move=params.get("on_move", "snapshot"), say=say)
    else:
        done = keep.KeptUpdate(update=await lifecycle.update(dev, manifest))
    if done is None:
        report["summary"] = (f"NOT moved to {manifest.image}@{manifest.id[:12]}: the session could not be kept as a "
                             "version (see the PC's console); serving the version it had")
        report["moved"] = False
    else:
        u = done.update
        say(f"updated {old.id[:12]} → {manifest.id[:12]} by diff: {u.chunks_changed} chunk(s) differ, "
            f"{u.chunks_refetched} fetched again, {u.modified_kept} modified kept, "
            f"{u.modified_discarded} reset")
        kept = [str(p.number) for p in (done.keep.partitions if done.keep else []) if p.kept]
        report.update(moved=True, kept_chunks=u.modified_kept, reset_chunks=u.modified_discarded,
                      kept_partitions=kept, snapshot=to_dict(done.snapshot),
                      summary=f"moved {old.id[:12]} → {manifest.id[:12]}: kept {u.modified_kept} modified "
                              f"chunk(s)" + (f" of partition {', '.join(kept)}" if kept else "")
                              + f", reset {u.modified_discarded}"
                              + (f"; session kept as {done.snapshot.image}:{done.snapshot.tag}"
                                 if done.snapshot else ""))
    agent.config.extra.setdefault("report", {})["last_move"] = report
    if agent.link is not None:
        agent.link.poke()  # the repository shows it at once (blockprov agents, the console)


def open_reserve(d: disk.Disk, say: Any) -> Reserve | None:
    try:
        return Reserve.open(d.reserve)
    except OSError as e:
        say(f"warning: no golden reserve ({d.reserve}: {e.strerror}); a restore needs the repository")
        return None


def modified_chunks(cache_dir: Path) -> list[int]:
    """The chunks the last session changed (the disk's journal replayed, nothing written)."""
    return load_state(cache_dir).chunks.modified_chunks()


async def restore_from_reserve(dev: CacheDevice, reserve: Reserve, session: list[int], offline: bool,
                               say: Any) -> None:
    """After the reset of a ``restore`` boot: the chunks the session changed, back from the golden
    reserve (verified by digest); the console says how many, and, offline, which could not be."""
    await dev.settle()  # the reset's hole punching is done: restored chunks are kept
    chunks = dev.chunks
    todo = [c for c in chunks.missing(session) if reserve.holds(dev.manifest, c)]
    if todo:
        await dev.fetch_chunks(todo)
    left = chunks.missing(session)
    kept = len(todo) - len(chunks.missing(todo))
    say(f"restored {len(session) - len(left)} of {len(session)} changed chunk(s): {kept} from the disk's "
        f"golden reserve, {len(session) - len(left) - kept} all-zero in the image; "
        f"{len(left)} left for the repository")
    if offline and left:
        spans = ", ".join(f"{x}" if y == x + 1 else f"{x}-{y - 1}" for x, y in runs(left))
        say(f"OFFLINE: {len(left)} chunk(s) changed by the last session could not be restored (the golden "
            f"reserve was full or its copy was bad): chunks {spans}; they are not served as they were left "
            "— their reads fail with EIO until the repository is back")


def firmware(sys_dir: Path = Path("/sys")) -> tuple[str, str | None]:
    """The machine's firmware, ``uefi`` or ``bios``, and whether Secure Boot is ``on``/``off``
    (None: a BIOS, or not known): the EFI stub records it in the boot parameters the kernel
    exports (``secure_boot``, byte 0x1ec: 3 enabled, 2 disabled)."""
    if not (sys_dir / "firmware" / "efi").is_dir():
        return "bios", None
    try:
        mode = (sys_dir / "kernel" / "boot_params" / "data").read_bytes()[SECURE_BOOT_AT]
    except (OSError, IndexError):
        return "uefi", None
    return "uefi", {3: "on", 2: "off"}.get(mode)


def write_loader(params: dict[str, str], cmdline: str, m: Manifest, d: disk.Disk,
                 nodes: dict[str, tuple[int, int]], say: Any, hydrating: Any, missing: Any,
                 machine_firmware: str = "bios") -> None:
    """Thread: the disk's own boot loaders (SYSLINUX, and shim and GRUB when the version has a
    UEFI loader), kernel and initramfs, when missing or out of date (netboot/loader.py); files the
    disk holds already are read back from it, not fetched. A failure is a warning (the machine
    still boots from the network); on a UEFI PC (``machine_firmware``) so is a version without a
    UEFI loader (the disk gets only the BIOS one, which this PC cannot boot).

    Only a disk that holds the whole image gets one (a disk that cannot run offline should not
    pretend to): it waits for the background copy (``hydrating()``), then checks ``missing()``
    — under ``hydrate=off`` there is usually no loader. It runs at the lowest CPU priority (its
    tools inherit it), through device nodes and a /proc of its own (after the root switch the agent's root,
    the initramfs, has neither)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    while hydrating():
        time.sleep(2.0)
    left = missing()
    if left:
        say(f"the disk lacks {left} chunk(s) of the image: no boot loader written (the disk cannot boot "
            "offline; blockprov.hydrate=background or before-boot copies the whole image)")
        return
    try:
        d = loader.private_disk(d, nodes, RUN / "dev")
        loader.own_proc()
    except (NetbootError, OSError) as e:
        say(f"warning: the disk's boot loader was not written: device nodes or /proc: {e}")
        return
    repo = RemoteRepository(params["repo"], timeout=60.0, token=params.get("token") or None)
    ref = f"{m.image}@{m.id}"
    try:
        info = repo.get_boot_files(ref)
        if info is None:
            say(f"warning: {ref} has no boot files: the disk gets no boot loader (no offline boot)")
            return
        if missing := boot.efi_missing(info.efi):
            if machine_firmware == "uefi":
                say(f"warning: {ref} has no UEFI loader ({', '.join(missing)}): this UEFI PC's disk gets no loader "
                    f"it can boot (boot-files build on a machine with {boot.DEBIAN_EFI_PACKAGES})")
            efi = {}
        else:
            efi = dict(info.efi)
        want = loader.wanted(info.kernel.id, info.initrd.id, cmdline, {n: f.id for n, f in efi.items()})
        have = loader.installed(d, META_MOUNT)
        if loader.comparable(have) != want:
            descriptors = {"kernel": info.kernel, "initrd": info.initrd, **efi}
            files = loader.read_back(d, have, descriptors)
            kept = sum(len(x) for x in files.values())
            for name in descriptors:
                if name not in files:
                    files[name] = repo.boot_file(ref, name)
            loader.install(d, META_MOUNT, files, want)
            forms = " and ".join(f.upper() for f in want["forms"])  # type: ignore[attr-defined]
            say(f"boot loader written to {d.part_name(1)} ({forms}): kernel {len(files['kernel']) >> 10} KiB, "
                f"initramfs {len(files['initrd']) >> 10} KiB, UEFI loader {sum(len(files[n]) for n in efi) >> 10} "
                f"KiB; fetched {(sum(len(x) for x in files.values()) - kept) >> 10} KiB, {kept >> 10} KiB read back "
                "from the disk (the disk boots by itself when the network boot fails)")
    except (BlockprovError, OSError) as e:
        say(f"warning: the disk's boot loader was not written: {e}")
        return
    finally:
        repo.close()
    if machine_firmware in want["forms"]:  # type: ignore[operator]  # a loader this PC can boot
        report_disk(params, ref, str(want["fingerprint"]), say)


def report_disk(params: dict[str, str], version: str, fingerprint: str, say: Any) -> None:
    """The disk holds ``version`` whole and its loader is current: the repository's iPXE script
    may tell this PC to boot its disk from now on (boot.py's ``disk_verdict``)."""
    host = params.get("host")
    if not host:
        return
    repo = RemoteRepository(params["repo"], timeout=30.0, token=params.get("token") or None)
    try:
        repo.record_disk(host, version, fingerprint)
    except BlockprovError as e:  # the next boot is a network boot, no worse
        say(f"warning: the repository was not told that the disk holds {version} whole: {e}")
    finally:
        repo.close()


async def sync_fills(dev: CacheDevice) -> None:
    """Make the journal's ``present`` records durable every ``SYNC_FILLS`` seconds.

    A host agent journals fills without an fsync (losing one costs a refetch) and checkpoints at
    its clean stop; a PC is powered off with the agent still running (``poweroff -f``, or the
    power button), so without this every fill since the guest's last FLUSH — all of a read-only
    session's — would be fetched again at the next boot."""
    while True:
        await asyncio.sleep(SYNC_FILLS)
        with contextlib.suppress(BlockprovError):
            await dev.sync_fills()


def own_api() -> None:
    """/proc and /sys in the agent's root when PID 1 moved them into the new root (the resident
    agent of the every-day boot starts after the switch); out of the new root's sight."""
    for fs, where in (("proc", Path("/proc")), ("sysfs", Path("/sys"))):
        if not any(where.iterdir()) if where.is_dir() else True:
            where.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", fs, f"bp-{fs}", str(where)], capture_output=True, timeout=60)


async def serve_resident(say: Any, ready: int = -1) -> None:
    """The agent the every-day boot starts once the root is native (netboot/everyday.py): the
    devices are made, the root mounted; it opens the cache as the disk holds it, takes the native
    path's devices over (netboot/native.py), registers and stays resident (netboot/resident.py).
    Nothing of the disk's content changes here: what the boot would have done is done."""
    params = parse_cmdline(Path("/proc/cmdline").read_text())
    check_params(params)
    plan = everyday.parse_plan((META_MOUNT / everyday.PLAN).read_text())
    own_dev()
    # /dev as the cache records its data partition: this root's own (everyday.py binds it; the
    # supervisor mounts one after a restart)
    d = next((x for x in disk.disks() if x.name == plan["BP_DISK"]), None)
    if d is None:
        raise NetbootError(f"disk {plan['BP_DISK']} of the every-day boot's plan is gone")
    repo = RemoteRepository(params["repo"], timeout=30.0, token=params.get("token") or None)
    policy = plan["BP_POLICY"]
    native: list[Native] = []

    async def adopt(dev: CacheDevice) -> None:
        m = dev.manifest
        nat = Native(geometry(d, m.size, m.chunk_size), META_MOUNT, m.count, say, dev_dir=str(DEV))
        nat.adopt(policy)
        native.append(nat)

    config = AgentConfig(cache_dir=META_MOUNT / "cache", socket=SOCKET, data_path=d.data, hydrate=False,
                         instance=instance_name(params.get("host")), checkpoint_fill_bytes=CHECKPOINT_FILL,
                         extra={"host": params.get("host"), "netboot": True, "data_path": "native"}, prepare=adopt)
    held = Manifest.from_json((META_MOUNT / "cache" / "manifest.json").read_bytes())
    agent = Agent(config, repo, held)
    await agent.start()
    assert agent.device is not None and native
    resident = Resident(native[0], agent.device, repo, say)
    agent.control.handlers.update(resident.handlers())
    resident.start()
    say(f"resident: {held.image}@{held.id[:12]} policy={policy}, out of the root's I/O path")
    if ready >= 0:
        os.write(ready, f"READY native {native[0].dm.node('bp-root')}\n".encode())
    try:
        await agent.run()
    finally:
        await resident.stop()


async def serve_resume(params: dict[str, str], ready: int, say: Any) -> None:
    """The agent started again by its supervisor (netboot/supervisor.py) after it died on the NBD
    path: the cache reopened as the disk holds it (an unclean stop: what was filled since the
    last checkpoint is verified again), served on the same socket — no reset, no update, no
    loader: the boot's steps were done — and the background copy resumed."""
    policy = params.get("policy", "keep")
    if diskless(params):
        data = str(RAM_MOUNT / "data")
        d = None
    else:
        own_dev()  # /dev as the cache records its data partition: the supervisor mounted this root's own
        named = (params.get("disk") or "").removeprefix("/dev/")  # the disk the boot chose (blockprov.disk=)
        d = next((x for x in disk.disks()
                  if (x.name == named if named else disk.identify(disk.read_head(x.path)) == "blockprov")), None)
        if d is None:
            raise NetbootError("the disk the agent served is gone")
        data = d.data
    cache_dir = (RUN / "cache") if d is None else (META_MOUNT / "cache")
    reserve = open_reserve(d, say) if policy == "restore" and d is not None else None
    hydrate = params.get("hydrate", "off" if diskless(params) else "background")
    repo = RemoteRepository(params["repo"], timeout=30.0, token=params.get("token") or None)
    config = AgentConfig(cache_dir=cache_dir, socket=SOCKET, data_path=data, reserve=reserve,
                         readahead=parse_size(params["readahead"]) if "readahead" in params else DEFAULT_READAHEAD,
                         hydrate=hydrate != "off", instance=instance_name(params.get("host")),
                         checkpoint_fill_bytes=CHECKPOINT_FILL,
                         extra={"host": params.get("host"), "netboot": True, "data_path": "nbd"})
    agent = Agent(config, repo, Manifest.from_json((cache_dir / "manifest.json").read_bytes()))
    await agent.start()
    assert agent.device is not None
    say(f"started again: serving {agent.device.manifest.image}@{agent.device.manifest.id[:12]} on {SOCKET}")
    os.write(ready, f"READY nbd {SOCKET}\n".encode())
    task = asyncio.ensure_future(sync_fills(agent.device))
    try:
        await agent.run()
    finally:
        task.cancel()


def main(argv: list[str]) -> int:
    """``@blockprov-agent PARAMS_JSON READY_FD`` (the boot's agent: netboot/supervisor.py starts
    it), ``@blockprov-agent --resume PARAMS_JSON READY_FD`` (started again after it died on the NBD
    path), or ``@blockprov-agent --resident [PARAMS_JSON READY_FD]`` (once the root is native:
    started by the every-day boot, or again by the supervisor)."""
    logging.basicConfig(level=logging.INFO, format="blockprov-agent: %(message)s", stream=sys.stderr)
    for h in logging.getLogger().handlers:
        h.addFilter(FewNoSpace())
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def say(msg: str) -> None:
        print(f"blockprov-agent: {msg}", file=sys.stderr, flush=True)

    for problem in harden():
        say(f"warning: {problem}")
    if argv[:1] in (["--resident"], ["--resume"]):
        ready = int(argv[2]) if len(argv) > 2 else -1
        try:
            own_api()
            if argv[0] == "--resident":
                with contextlib.suppress(OSError, AttributeError):  # the machine's own boot goes first
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                run_async(serve_resident(say, ready))
            else:
                run_async(serve_resume(json.loads(argv[1]), ready, say))
        except (BlockprovError, OSError, KeyError, ValueError) as e:
            say(f"error: the {argv[0][2:]} agent stopped: {e}")
            with contextlib.suppress(OSError):
                os.write(ready, f"ERROR {e}\n".encode())
            return getattr(e, "exit_code", 1)
        return 0
    params: dict[str, str] = json.loads(argv[0])
    ready = int(argv[1])
    try:
        check_params(params)
        RUN.mkdir(parents=True, exist_ok=True)
        # blockprov.token: the host's token, carried in its boot script (docs/operations.md, "Tokens",
        # says what that exposes); none: a repository without enforced tokens
        repo = RemoteRepository(params["repo"], timeout=30.0, token=params.get("token") or None)
        if params.get("from") == "disk":
            say("booted from the disk's own boot loader (the network boot failed or was skipped)")
        kind, secure = firmware()
        say(f"firmware: {kind.upper()}" + (f", Secure Boot {secure}" if secure else ""))
        ours = None if diskless(params) else offline_disk(params)
        wait = float(params.get("offline_after", OFFLINE_AFTER)) if ours is not None else None
        manifest = resolve(repo, params["image"], say, give_up_after=wait)
        d: disk.Disk | None
        if manifest is None and ours is not None:
            say(f"OFFLINE: no repository after {wait:g} s; booting from what disk {ours.name} holds")
            mount_meta(ours)
            d = ours
            cache_dir, data_path = META_MOUNT / "cache", d.data
        elif diskless(params):
            assert manifest is not None
            d = None
            cache_dir, data_path = prepare_ram(params, manifest, say)
        else:
            assert manifest is not None
            d = prepare_disk(params, manifest, say)
            cache_dir, data_path = META_MOUNT / "cache", d.data
        run_async(serve(params, repo, manifest, d, cache_dir, data_path, ready, say))
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
