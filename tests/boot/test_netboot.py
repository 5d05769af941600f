"""A PC network-boots onto its own disk (issue 13), with qemu standing in for the PC.

Real peers end to end: ``blockprov serve`` on 127.0.0.1, the blockprov initramfs made by
``boot-files build``, qemu (TCG) with a blank 2 GiB virtio disk whose virtio-net NIC boots through
its own iPXE option ROM from ``bootfile=http://10.0.2.2:PORT/v1/boot/MAC`` (qemu's user network
maps 10.0.2.2 to the host's loopback). Inside the guest: the Debian kernel, the blockprov init
(DHCP, disk, agent, kernel NBD client, root switch), then the test image's own /sbin/init
(tools/bootimage.py) printing BP-CHECK and BLOCKPROV-BOOT-DONE.

What the repository sent is read from its own counter ``blockprov_chunks_served_total``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.conftest import require_tool, run_cli
from tests.procs import start_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(900)]  # several TCG boots, on a shared, loaded machine

MAC = "52:54:00:12:34:5a"
IPXE_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # Debian ipxe-qemu: qemu loads it for virtio-net-pci
BOOT_TIMEOUT = 300.0


@dataclass
class NetBoot:
    console: str
    seconds: float
    done: dict[str, str]
    sent_at_init: int | None  # chunks the repository had sent when the image's own init started

    @property
    def check(self) -> str | None:
        m = re.search(r"BP-CHECK (\w+)", self.console)
        return m.group(1) if m else None

    def number(self, pattern: str) -> int:
        m = re.search(pattern, self.console)
        assert m, f"no {pattern!r} on the console:\n{self.tail()}"
        return int(m.group(1))

    def tail(self, n: int = 40) -> str:
        return "\n".join([ln for ln in self.console.splitlines() if not ln.startswith("[")][-n:])


def chunks_served(url: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^blockprov_chunks_served_total (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def netboot(disk: Path, url: str, console: Path, timeout: float = BOOT_TIMEOUT, mac: str = MAC,
            until: str | None = None, action: Callable[[], object] | None = None,
            disk_second: bool = False) -> NetBoot:
    """One network boot of the PC; bounded (qemu is killed at ``timeout``). With ``until``: once
    the console shows that text, ``action()`` runs while the machine is up, then qemu is killed.
    ``disk_second``: the disk is the firmware's second boot device (the NIC stays first)."""
    port = url.rsplit(":", 1)[1]
    console.unlink(missing_ok=True)
    cmd = [require_tool("qemu-system-x86_64"), "-machine", "accel=tcg", "-m", "1024", "-display", "none",
           "-monitor", "none", "-serial", f"file:{console}", "-no-reboot",
           "-netdev", f"user,id=n,bootfile=http://10.0.2.2:{port}/v1/boot/{mac}",
           # bootindex makes SeaBIOS run the NIC's iPXE ROM first (tests/interop/test_remote_boot.py)
           "-device", f"virtio-net-pci,netdev=n,mac={mac},bootindex=1",
           *(["-drive", f"file={disk},format=raw,if=none,id=disk,cache=writeback",
              "-device", "virtio-blk-pci,drive=disk,bootindex=2"] if disk_second else
             ["-drive", f"file={disk},format=raw,if=virtio,cache=writeback"])]
    t0 = time.monotonic()
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    text = ""
    at_init = None
    try:
        while time.monotonic() - t0 < timeout and qemu.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if at_init is None and "BLOCKPROV-INIT" in text:
                with contextlib.suppress(OSError):  # a repository the test stopped has no counter
                    at_init = chunks_served(url)
            if until is not None and until in text:
                if action is not None:
                    action()
                break
            if bootvm.MARKER in text or bootvm.FAIL_MARKER in text or "BLOCKPROV-NETBOOT-FAIL" in text:
                break
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        if bootvm.MARKER in text:  # the guest powers off right after the marker
            with contextlib.suppress(subprocess.TimeoutExpired):
                qemu.wait(timeout=30)
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait(timeout=30)
    text = console.read_text(errors="replace") if console.exists() else ""
    m = re.search(re.escape(bootvm.MARKER) + r"(.*)$", text, re.M)
    done = dict(kv.split("=", 1) for kv in m.group(1).split() if "=" in kv) if m else {}
    return NetBoot(console=text, seconds=seconds, done=done, sent_at_init=at_init)


def admin_version(image: Path, tmp_path: Path) -> Path:
    """v2 of the test image: the administrator's sanctioned change (bootimage's ``admin`` mode),
    made offline with debugfs — a new file, and the golden list that knows it."""
    v2 = tmp_path / "v2.raw"
    subprocess.run(["cp", "--sparse=always", str(image), str(v2)], check=True, timeout=120)
    debugfs = require_tool("debugfs")
    golden = subprocess.run([debugfs, "-R", "cat /etc/bp-golden.sha256", str(v2)], capture_output=True,
                            check=True, timeout=60).stdout.decode()
    content = bootvm.bootimage.ADMIN_CHANGE_CONTENT.encode()
    lines = [ln for ln in golden.splitlines() if ln.strip()]
    lines.append(f"{hashlib.sha256(content).hexdigest()}  .{bootvm.bootimage.ADMIN_CHANGE_PATH}")
    (tmp_path / "admin").write_bytes(content)
    (tmp_path / "golden").write_text("".join(ln + "\n" for ln in sorted(lines, key=lambda ln: ln.split()[1])))
    (tmp_path / "cmds").write_text(f"write {tmp_path / 'admin'} {bootvm.bootimage.ADMIN_CHANGE_PATH}\n"
                                   "rm /etc/bp-golden.sha256\n"
                                   f"write {tmp_path / 'golden'} /etc/bp-golden.sha256\n")
    subprocess.run([debugfs, "-w", "-f", str(tmp_path / "cmds"), str(v2)], capture_output=True, check=True,
                   timeout=60)
    return v2


def assign(url: str, mode: str, policy: str, ref: str = "bootlab:v1", hydrate: str = "off", mac: str = MAC) -> None:
    # readahead 0: the agent fetches exactly what the guest reads, so the counts below are exact
    run_cli("--repo", url, "host", "assign", mac, ref, "--policy", policy, "--hydrate", hydrate,
            "--args", f"quiet panic=-1 blockprov.readahead=0 bp.mode={mode}")


@dataclass
class Repo:
    url: str
    initrd: Path
    built: dict[str, Any]
    nonzero: int  # non-zero chunks of the image
    unique: int  # distinct ones: what a full copy of the image sends at least


@pytest.fixture(scope="module")
def netrepo(boot_image: bootvm.bootimage.Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    """``blockprov serve`` holding the test image as bootlab:v1 with the blockprov initramfs."""
    assert Path(IPXE_ROM).exists(), f"{IPXE_ROM} missing: install ipxe-qemu (scripts/setup.sh)"
    tmp = tmp_path_factory.mktemp("netboot")
    server, url = start_server(tmp / "repo")
    try:
        run_cli("--repo", url, "import", str(boot_image.disk), "bootlab:v1")
        initrd = tmp / "initrd.img"
        built = json.loads(run_cli("--repo", url, "boot-files", "build", "bootlab:v1", "--output", str(initrd),
                                   "--json").stdout)
        m = json.loads(run_cli("--repo", url, "show", "bootlab:v1", "--json").stdout)
        nonzero = m["chunks"] - m["zero_chunks"]
        print(f"initramfs {built['build']['initrd_bytes']} bytes ({built['build']['unpacked_bytes']} unpacked, "
              f"{built['build']['files']} files); image: {nonzero} non-zero chunks")
        assert built["build"]["initrd_bytes"] < 40 << 20
        yield Repo(url, initrd, built, nonzero, m["unique_chunks"])
    finally:
        server.stop()


def blank_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # the PC's blank 2 GiB disk
    return path


def test_pc_boots_from_the_network_onto_its_blank_disk_then_restores(boot_image: bootvm.bootimage.Built,
                                                                     netrepo: Repo, tmp_path: Path) -> None:
    url, initrd, built, nonzero = netrepo.url, netrepo.initrd, netrepo.built, netrepo.nonzero
    disk = blank_disk(tmp_path / "pc-disk.raw")
    # 1. first boot onto the blank disk, nothing copied ahead: the guest's check passes while
    #    the disk holds only what the boot read
    assign(url, "check", "restore")
    base = chunks_served(url)  # the repository is shared by this module's tests
    first = netboot(disk, url, tmp_path / "console1.log")
    assert first.check == "OK" and first.done.get("check") == "OK", first.tail()
    assert "initializing disk vda" in first.console
    sent1 = chunks_served(url) - base
    at_init = None if first.sent_at_init is None else first.sent_at_init - base
    print(f"first boot: BLOCKPROV-BOOT-DONE after {first.seconds:.1f} s (root mounted at guest uptime "
          f"{first.done.get('mounted')} s); chunks sent: {at_init} when the image's init started, "
          f"{sent1} by the end of its check (which reads every file it checks, and a boot's worth more); "
          f"the image has {nonzero} non-zero chunks")
    # the machine runs its own init having fetched a sliver of the image; its check, which reads
    # a good part of the image's files, still runs with the disk partly unfetched
    assert at_init is not None and at_init < nonzero // 10, first.tail()
    assert 0 < sent1 < nonzero * 3 // 4, "the disk was fetched whole: not a lazy boot"

    # 2. a dirty session (the disk keeps it: policy keep)
    assign(url, "dirty", "keep")
    dirty = netboot(disk, url, tmp_path / "console2.log")
    assert dirty.done.get("mode") == "dirty", dirty.tail()
    assert "holds blockprov's cache" in dirty.console
    sent2 = chunks_served(url)

    # 3. reboot-to-restore: pristine, and only the chunks the session modified came back
    assign(url, "check", "restore")
    restored = netboot(disk, url, tmp_path / "console3.log")
    assert restored.check == "OK", restored.tail()
    reset = restored.number(r"reset on start: (\d+) chunk")
    sent3 = chunks_served(url) - sent2
    print(f"restore boot: {reset} chunks reset, {sent3} chunks sent, BOOT-DONE after {restored.seconds:.1f} s")
    # only the reset chunks come back (a reset chunk that is all zeros in the image is not even
    # sent); the slack covers fills of the last second before a power-off, whose journal
    # records were not yet synced (netboot/inagent.py, sync_fills): those are fetched again
    assert reset > 0 and sent3 <= reset + 16, restored.tail()

    # 4. the host moves to v2 (the administrator's change, made offline): the next boot updates
    #    the disk by diff and runs v2, and the repository sends no more than the changed chunks
    v2 = admin_version(boot_image.disk, tmp_path)
    run_cli("--repo", url, "import", str(v2), "bootlab:v2")
    run_cli("--repo", url, "boot-files", "set", "bootlab:v2", "--kernel", built["build"]["kernel"],
            "--initrd", str(initrd), "--cmdline", built["cmdline"])
    changed = len(json.loads(run_cli("--repo", url, "diff", "bootlab:v1", "bootlab:v2", "--json").stdout)[
        "changed"])
    before = chunks_served(url)
    assign(url, "check", "restore", "bootlab:v2")
    moved = netboot(disk, url, tmp_path / "console4.log")
    golden = int(restored.number(r"BP-CHECK OK files=(\d+)"))
    assert moved.check == "OK" and moved.number(r"BP-CHECK OK files=(\d+)") == golden + 1, moved.tail()
    assert "by diff" in moved.console, moved.tail()
    sent4 = chunks_served(url) - before
    print(f"update boot: {changed} chunks differ between v1 and v2, {sent4} sent; "
          f"BOOT-DONE after {moved.seconds:.1f} s")
    # the slack: fills of the previous boot's last moments, lost to its power-off (see step 3)
    assert 0 < sent4 <= changed + 16, moved.tail()

    agents = json.loads(run_cli("--repo", url, "agents", "--json").stdout)
    assert any(a["instance"] == "pc-" + MAC.replace(":", "-") and a["info"].get("host") == MAC
               for a in agents), agents


def test_before_boot_hydration_and_memory_pressure(netrepo: Repo, tmp_path: Path) -> None:
    """``--hydrate before-boot`` (the FOG model: everything on the disk first), then the guest fills
    its memory (a tmpfs of all but 48 MiB) while it writes to and reads back from its root: the
    agent serving that root (memory locked, PR_SET_IO_FLUSHER) keeps it working."""
    mac = "52:54:00:12:34:5b"
    disk = blank_disk(tmp_path / "pc2-disk.raw")
    assign(netrepo.url, "hog", "keep", hydrate="before-boot", mac=mac)
    before = chunks_served(netrepo.url)
    hog = netboot(disk, netrepo.url, tmp_path / "console.log", mac=mac)
    assert hog.done.get("hog") == "OK" and "BP-HOG OK" in hog.console, hog.tail()
    total = hog.number(r"hydrated before the boot: \d+/(\d+) chunks")
    assert hog.number(r"hydrated before the boot: (\d+)/\d+ chunks") == total, hog.tail()
    assert hog.sent_at_init is not None and hog.sent_at_init - before >= netrepo.unique
    assert "warning:" not in hog.console, hog.tail()  # mlockall, PR_SET_IO_FLUSHER, oom_score_adj all took
    print(f"before-boot: {hog.sent_at_init - before} chunks before the image's init; "
          f"{re.search(r'BP-HOG OK.*', hog.console).group(0)}; BOOT-DONE after {hog.seconds:.1f} s")


def test_keep_survives_reboots_and_the_repository_snapshots_a_running_pc(netrepo: Repo, tmp_path: Path) -> None:
    """``--policy keep``: an administrator's change survives the reboot, and while the PC runs the
    repository asks its agent for a snapshot (``snapshot --instance``), which becomes a version
    holding the change."""
    mac = "52:54:00:12:34:5c"
    disk = blank_disk(tmp_path / "pc3-disk.raw")
    assign(netrepo.url, "admin", "keep", mac=mac)
    admin = netboot(disk, netrepo.url, tmp_path / "console1.log", mac=mac)
    assert admin.done.get("mode") == "admin", admin.tail()
    assign(netrepo.url, "counter", "keep", mac=mac)
    answers: list[dict[str, Any]] = []

    def snapshot() -> None:
        p = run_cli("--repo", netrepo.url, "snapshot", "--instance", "pc-" + mac.replace(":", "-"),
                    "--to", "bootlab:pc3", "--wait", "120", "--json")
        answers.append(json.loads(p.stdout))

    running = netboot(disk, netrepo.url, tmp_path / "console2.log", mac=mac, until="BP-COUNT n=20 ",
                      action=snapshot)
    assert answers, running.tail()
    assert "reset on start" not in running.console
    out = tmp_path / "pc3.raw"
    run_cli("--repo", netrepo.url, "export", "bootlab:pc3", str(out))
    got = subprocess.run([require_tool("debugfs"), "-R", f"cat {bootvm.bootimage.ADMIN_CHANGE_PATH}", str(out)],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    assert got == bootvm.bootimage.ADMIN_CHANGE_CONTENT, answers
    changed = json.loads(run_cli("--repo", netrepo.url, "diff", "bootlab:v1", "bootlab:pc3", "--json").stdout)
    print(f"keep + snapshot --instance: {len(changed['changed'])} chunks differ from v1; answer {answers[0]}")


def cache_of(disk: Path, tmp_path: Path) -> tuple[Any, int]:
    """The chunk map the PC's disk holds (its metadata partition's cache directory, replayed as an
    agent would, nothing written) and the byte offset of its data partition."""
    from blockprov.cache.journal import load
    from blockprov.netboot import disk as layout

    tmp_path.mkdir(parents=True, exist_ok=True)
    meta = tmp_path / "meta.img"
    with open(disk, "rb") as src, open(meta, "wb") as dst:
        parts = layout.partitions(src.read(layout.SECTOR))  # boot, metadata, golden reserve, data
        src.seek(parts[1][1])
        dst.write(src.read(parts[1][2]))
    # replay the file system's journal as the kernel's mount would (debugfs reads without it)
    fsck = subprocess.run([require_tool("e2fsck"), "-fy", str(meta)], capture_output=True, timeout=120)
    assert fsck.returncode in (0, 1), fsck.stdout
    out = tmp_path / "meta"
    out.mkdir()
    subprocess.run([require_tool("debugfs"), "-R", f"rdump /cache {out}", str(meta)], capture_output=True,
                   check=True, timeout=60)
    return load(out / "cache"), parts[3][1]


def test_power_cut_during_hydration_resumes_and_serves_nothing_wrong(boot_image: bootvm.bootimage.Built,
                                                                     netrepo: Repo, tmp_path: Path) -> None:
    """kill -9 of the whole VM (a power cut) while the image is copied in the background: the disk
    holds the image's content wherever its map says present, and the next boot resumes."""
    from blockprov.cache.maps import MODIFIED, PRESENT

    mac = "52:54:00:12:34:5d"
    disk = blank_disk(tmp_path / "pc4-disk.raw")
    assign(netrepo.url, "counter", "keep", hydrate="background", mac=mac)
    before = chunks_served(netrepo.url)

    def hydrating() -> None:  # let the background copy get well under way, then cut the power
        end = time.monotonic() + 120
        while chunks_served(netrepo.url) - before < netrepo.unique // 3 and time.monotonic() < end:
            time.sleep(0.2)

    cut = netboot(disk, netrepo.url, tmp_path / "console1.log", mac=mac, until="blockprov-agent: serving",
                  action=hydrating)
    assert "blockprov-agent: serving" in cut.console, cut.tail()
    loaded, data_at = cache_of(disk, tmp_path / "cut")
    flags = loaded.map.flags
    present = [i for i in range(len(flags)) if flags[i] & PRESENT and not flags[i] & MODIFIED]
    cs = loaded.meta.chunk_size
    assert netrepo.unique // 10 < len(present) < netrepo.nonzero - 100, f"{len(present)} present: not mid-copy"
    with open(disk, "rb") as d, open(boot_image.disk, "rb") as img:
        for i in present:
            d.seek(data_at + i * cs)
            img.seek(i * cs)
            assert d.read(cs) == img.read(cs), f"chunk {i} is marked present but differs from the image"
    # the next boot resumes: it starts with what the map held, and the guest's check passes
    assign(netrepo.url, "check", "keep", hydrate="background", mac=mac)
    again = netboot(disk, netrepo.url, tmp_path / "console2.log", mac=mac)
    assert again.check == "OK", again.tail()
    at_start = again.number(r"present=(\d+)/\d+ chunks")
    assert at_start >= len(present), again.tail()
    print(f"power cut: {len(present)} chunks present and equal to the image after kill -9; the next boot "
          f"started with {at_start} local and passed its check")
