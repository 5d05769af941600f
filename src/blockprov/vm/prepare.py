"""Every version's boot working set known before its first boot (issue 26 item 0).

A version with no profile of its own and none to inherit boots cold the first time (1.22× a local
disk on loopback, 1.55× over 20 ms: bench/RESULTS.md, issue 15), and pre-warm has nothing to
pre-warm. So when a version gets boot files (``boot-files set``/``build``), the repository's host
boots it once, headless, to record its profile, as eStargz's optimizer does for container images:
``blockprov profile prepare NAME@ID``, started in the background by the command that set the boot
files (the embedded repository) or by the server that recorded them (``blockprov serve``).

* **One at a time**: a preparation holds ``DATA/prepare.lock`` (flock) while it boots; the others
  wait their turn (``queued``). TCG boots take a core each, and the host serves the repository too.
* **Only where it helps**: a version that has a profile, or inherits one (a snapshot, a v2 made
  from a profiled version: catalog/inherit.py), is ``skipped``; so is every version on a host
  without qemu, and the command that set the boot files says so at once.
* **Two ways to boot.** Plain boot files (a kernel and its initrd): ``profile record``'s boot
  (vm/record.py), the disk an NBD export of a throwaway cache. blockprov's own network-boot
  initramfs (``boot-files build``): booted with no network that initramfs has no repository to
  read from and records nothing useful, so it is booted the way a PC boots it: qemu's user network,
  the repository served on 127.0.0.1 by this process (``Serve``: service/run.py's ``ServerThread``,
  given by the CLI; reached by the guest as 10.0.2.2), the in-machine agent diskless (the cache in
  RAM), with no read-ahead, no hydration and no boot loader written. With no read-ahead the agent
  fetches exactly what the guest reads, in the order it reads it, so the order of the chunk
  fetches the server sees is the boot's read order; the server records it (``on_fetch``) and
  nothing in the guest has to cooperate (the test image powers off at the end of its boot; a
  desktop idles at its login screen).
* Where tokens are enforced the guest gets a temporary ``agent`` token (revoked at the end);
  where none exist yet none is created (creating the first token closes an open repository).

State is kept in the catalog (catalog/preparation.py) for ``show``, the console and other servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from blockprov.catalog.tokens import TokenStore
from blockprov.errors import BlockprovError, VmFailed
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from blockprov.results import to_dict
from blockprov.vm.qemu import QEMU
from blockprov.vm.record import IDLE, TIMEOUT, boot_until_idle, record

log = logging.getLogger("blockprov.vm")

LOCK = "prepare.lock"
MARKER = b"blockprov.netboot.machine"  # the initramfs's /init runs it: blockprov's own initramfs
SCAN_LIMIT = 256 << 20  # unpacked initrd bytes searched for the marker
NETBOOT_MEMORY = "1536"  # MiB: the guest's RAM holds the cache of what it reads
# Serves the repository on 127.0.0.1 while a network boot records (the CLI gives it: the service is
# the CLI's to load): (access mode "on" or "off", a callback seeing every chunk fetch's ids) → its URL.
Serve = Callable[[str, Callable[[list[bytes]], None]], AbstractContextManager[str]]


def qemu_missing() -> str | None:
    """Why no profile can be prepared on this host, or None."""
    if shutil.which(QEMU) is None:
        return f"no {QEMU} on the repository's host (Debian package qemu-system-x86)"
    return None


def is_blockprov_initramfs(initrd: bytes) -> bool:
    """Whether the initrd is blockprov's network-boot initramfs (gzip'd cpio, or a plain one)."""
    if MARKER in initrd:
        return True
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip
        return MARKER in d.decompress(initrd, SCAN_LIMIT)
    except zlib.error:
        return False


def reason_to_skip(repo: LocalRepository, m: Manifest) -> str | None:
    """Why ``m`` needs no preparation (it has or inherits a profile, it has no boot files), or None."""
    if repo.get_profile(m.image, m.id, inherit=False):
        return "it has a boot profile"
    inherited = repo.get_profile(m.image, m.id)
    if inherited:
        return f"it inherits a boot profile of {len(inherited)} chunks"
    if repo.get_boot_files(f"{m.image}@{m.id}") is None:
        return "it has no boot files"
    return None


def schedule(repo: LocalRepository, image: str, vid: str, cli: Sequence[str], log_dir: Path) -> str:
    """Start ``profile prepare`` for ``image@vid`` in the background (``cli``: how to run blockprov on
    this repository, global options included); returns what to tell the operator."""
    m = repo.resolve(f"{image}@{vid}")
    why = reason_to_skip(repo, m)
    if why is not None:
        return f"no boot profile to prepare: {why}"
    missing = qemu_missing()
    if missing is not None:
        repo.preparations.set(image, vid, "skipped", missing)
        return f"no boot profile prepared: {missing}; the first machine to boot it records one"
    repo.preparations.set(image, vid, "queued", "waiting for the one preparation at a time")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{image}@{vid}.log", "ab") as out:
        proc = subprocess.Popen([*cli, "profile", "prepare", f"{image}@{vid}"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    threading.Thread(target=proc.wait, daemon=True, name="bp-prepare-reaper").start()  # no zombie in a server
    return (f"preparing its boot profile in the background (one headless boot, a few minutes; "
            f"`blockprov show {image}@{vid}` says when it is ready)")


def cli_prefix(data_dir: Path, store: str | None = None, catalog: str | None = None) -> list[str]:
    """How this process runs blockprov on the same repository."""
    beside = Path(sys.executable).with_name("blockprov")  # the entry point of this installation
    argv = [str(beside) if beside.exists() else shutil.which("blockprov") or "blockprov", "--data", str(data_dir)]
    if store:
        argv += ["--store", store]
    if catalog:
        argv += ["--catalog", catalog]
    return argv


@contextlib.contextmanager
def one_at_a_time(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def prepare(repo: LocalRepository, ref: str, serve: Serve, *, timeout: float = TIMEOUT,
                  idle: float = IDLE) -> dict[str, Any]:
    """Prepare the boot profile of the version ``ref`` names (module docstring); the result as a dict."""
    m = repo.resolve(ref)
    repo.preparations.set(m.image, m.id, "queued", "waiting for the one preparation at a time")
    with one_at_a_time(Path(repo.data_dir)):
        why = reason_to_skip(repo, m)
        missing = qemu_missing()
        if why is not None or missing is not None:
            repo.preparations.set(m.image, m.id, "skipped", why or missing)
            return {"image": m.image, "version": m.id, "state": "skipped", "detail": why or missing}
        repo.preparations.set(m.image, m.id, "running", f"booting it headless since {time.strftime('%H:%M:%S')}")
        try:
            initrd = repo.boot_file(f"{m.image}@{m.id}", "initrd")
            if is_blockprov_initramfs(initrd):
                got = await record_netboot(repo, m, serve, timeout=timeout, idle=idle)
            else:
                got = to_dict(await record(repo, m, timeout=timeout, idle=idle))
        except (BlockprovError, OSError) as e:
            repo.preparations.set(m.image, m.id, "failed", str(e))
            raise
        detail = f"{got['chunks']} chunks in boot order, recorded in {got['seconds']:.0f} s (ended: {got['ended']})"
        repo.preparations.set(m.image, m.id, "done", detail)
        return got | {"state": "done", "detail": detail}


async def record_netboot(repo: LocalRepository, m: Manifest, serve: Serve, *, timeout: float,
                         idle: float) -> dict[str, Any]:
    """Boot blockprov's initramfs of ``m`` the way a PC boots it, recording the order of the chunk
    fetches the repository answers (module docstring); save it as the version's profile."""
    ref = f"{m.image}@{m.id}"
    name = f"profile preparation of {ref}"
    files = repo.get_boot_files(ref)
    assert files is not None
    where: dict[bytes, list[int]] = {}
    for i in range(m.count):
        if not m.is_zero(i):
            where.setdefault(m.digest_at(i), []).append(i)
    order: list[int] = []
    seen: set[int] = set()
    lock = threading.Lock()

    def fetched(ids: list[bytes]) -> None:
        with lock:
            for cid in ids:
                for i in where.get(cid, ()):
                    if i not in seen:
                        seen.add(i)
                        order.append(i)

    tokens = TokenStore(repo.catalog.db)
    token: str | None = None
    token_id: str | None = None
    if tokens.any_created():
        token, info = tokens.create("agent", f"prepare-{m.id[:12]}-{secrets.token_hex(3)}")
        token_id = info.id
    host = f"prepare-{m.id[:12]}"
    tmp = Path(tempfile.mkdtemp(prefix="bpprep"))
    try:
        kernel, initrd = tmp / "kernel", tmp / "initrd"
        kernel.write_bytes(repo.boot_file(ref, "kernel"))
        initrd.write_bytes(repo.boot_file(ref, "initrd"))
        with serve("on" if token else "off", fetched) as url:
            port = url.rsplit(":", 1)[1]
            words = [files.cmdline, "console=ttyS0", f"blockprov.repo=http://10.0.2.2:{port}", f"blockprov.image={ref}",
                     f"blockprov.host={host}", "blockprov.disk=none", "blockprov.hydrate=off", "blockprov.readahead=0",
                     "blockprov.loader=off", *([f"blockprov.token={token}"] if token else [])]
            cmd = [QEMU, "-machine", "accel=tcg", "-m", NETBOOT_MEMORY, "-nographic", "-no-reboot",
                   "-nic", "user,model=virtio-net-pci", "-kernel", str(kernel), "-initrd", str(initrd),
                   "-append", " ".join(w for w in words if w)]
            log.info("preparing the boot profile of %s by a network boot: %s", ref, " ".join(cmd))

            def progress() -> int:
                with lock:
                    return len(order)

            ended, seconds, console = await boot_until_idle(cmd, progress, tmp / "console.log", name,
                                                            timeout=timeout, idle=idle)
    finally:
        if token_id is not None:
            tokens.revoke(token_id)
        with contextlib.suppress(BlockprovError):
            repo.unregister_agent(f"pc-{host}")  # the guest's agent registered for the boot
        shutil.rmtree(tmp, ignore_errors=True)
    with lock:
        got = list(order)
    if not got:
        raise VmFailed(name=name, why=f"the boot read nothing from the repository ({ended}); console: {console[-800:]}")
    repo.put_profile(m.image, m.id, got)
    return {"image": m.image, "version": m.id, "chunks": len(got), "saved": True, "ended": ended,
            "seconds": round(seconds, 1), "network_boot": True}
