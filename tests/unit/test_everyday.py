"""The every-day boot (issue 24 item 4): the one rule that says a PC's disk is complete and current
(boot.py's ``disk_verdict``), the iPXE script's ``exit`` and the disk's initramfs's question
through the real app (service/routes/boot.py over catalog/machines.py), a forced re-provision,
the plan the initramfs reads (netboot/everyday.py), its script's syntax under busybox, and the
initramfs's two parts on the disk's loader (netboot/loader.py)."""

from __future__ import annotations

import gzip
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import boot
from blockprov.imaging.importer import import_image
from blockprov.netboot import everyday, loader
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import make_image, require_tool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MAC = "52:54:00:ab:cd:ef"
KERNEL = os.urandom(boot.PIECE + 1000)
INITRD = gzip.compress(b"fast part") + gzip.compress(b"the rest")
IPXE = {"user-agent": "iPXE/1.21.1", "host": "10.0.2.2:8420"}
BASE = "http://10.0.2.2:8420"


def test_the_verdict() -> None:
    now = 1000.0
    s = boot.DiskState("lab@aaaa", "f" * 32, said=900.0)
    ok = {"version": "lab@aaaa", "fingerprint": "f" * 32, "now": now}
    assert boot.disk_verdict(s, **ok, from_disk=False) is None
    assert "not heard" in str(boot.disk_verdict(None, **ok, from_disk=True))
    assert "assigned lab@bbbb" in str(boot.disk_verdict(s, **{**ok, "version": "lab@bbbb"}, from_disk=True))
    assert "command line" in str(boot.disk_verdict(s, **{**ok, "fingerprint": "e" * 32}, from_disk=False))
    told = boot.DiskState("lab@aaaa", "f" * 32, told=990.0, seen=500.0)  # told, and the disk never asked
    assert "did not come up" in str(boot.disk_verdict(told, **ok, from_disk=False))
    assert boot.disk_verdict(told, **ok, from_disk=True) is None  # the disk asking is the disk up
    assert boot.disk_verdict(told, **{**ok, "now": 990.0 + boot.DISK_GRACE + 1}, from_disk=False) is None
    seen = boot.DiskState("lab@aaaa", "f" * 32, told=990.0, seen=995.0)
    assert boot.disk_verdict(seen, **ok, from_disk=False) is None
    assert boot.DiskState.from_dict(s.to_dict()) == s and boot.DiskState.from_dict({"version": 1}) is None


def test_what_a_disk_boots_is_the_network_boot_without_what_a_loader_adds() -> None:
    net = "console=ttyS0 bp.mode=check blockprov.repo=http://r blockprov.image=lab@aa initrd=initrd.img"
    assert boot.disk_cmdline(net) == "console=ttyS0 bp.mode=check blockprov.repo=http://r blockprov.image=lab@aa " \
                                     "blockprov.from=disk"
    assert boot.disk_cmdline(boot.disk_cmdline(net) + " BOOT_IMAGE=vmlinuz") == boot.disk_cmdline(net)
    fp = boot.disk_fingerprint("k1", "i1", boot.disk_cmdline(net))
    assert len(fp) == 32 and fp != boot.disk_fingerprint("k1", "i2", boot.disk_cmdline(net))
    # the loader's record carries the same fingerprint the repository computes
    assert loader.wanted("k1", "i1", net)["fingerprint"] == fp
    assert boot.parse_script(boot.disk_script("pc1", "lab@aa")) == {"disk": True}


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = LocalRepository(tmp / "repo")
        src = make_image(tmp / "src.img", 1 << 20, seed=5)
        self.vid, _ = import_image(self.repo, src, "lab:v1")
        self.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0")
        self.c = TestClient(create_app(self.repo))
        assert self.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1", "policy": "restore"}).status_code == 200

    def script(self) -> str:
        r = self.c.get(f"/v1/boot/{MAC}", headers=IPXE)
        assert r.status_code == 200
        return r.text

    def fingerprint(self) -> str:
        """What the PC's loader would record after this network boot (netboot/loader.py)."""
        s = boot.parse_script(self.script())
        info = self.repo.get_boot_files("lab:v1")
        assert info is not None
        return str(loader.wanted(info.kernel.id, info.initrd.id, " ".join(s["args"]))["fingerprint"])

    def say(self, fingerprint: str) -> None:
        """The PC's agent says its disk holds the version whole and its loader boots ``fingerprint``."""
        r = self.c.put(f"/v1/boot/{MAC}/disk", json={"version": f"lab@{self.vid}", "fingerprint": fingerprint})
        assert r.status_code == 200

    def ask(self, fingerprint: str, version: str | None = None) -> str:
        r = self.c.post(f"/v1/boot/{MAC}/disk", headers={"host": "10.0.2.2:8420"},
                        json={"version": version or f"lab@{self.vid}", "fingerprint": fingerprint})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.c.close()
    e.repo.close()


def test_ipxe_is_told_to_boot_the_disk_only_while_it_is_current(env: Env) -> None:
    assert "kernel" in boot.parse_script(env.script())  # nothing heard of the disk: a network boot
    fp = env.fingerprint()
    # the disk's question writes nothing (anyone may send it under --anonymous-boot): only the
    # PC's agent says what its disk holds
    assert env.ask(fp).startswith("network: the disk's word differs")
    assert "kernel" in boot.parse_script(env.script())
    env.say(fp)
    assert env.ask(fp, version="lab@" + "0" * 16).startswith("network: the disk's word differs")
    # an operator looking is shown what the PC would get, and it records nothing
    for _ in range(2):
        look = env.c.get(f"/v1/boot/{MAC}", headers={"host": "10.0.2.2:8420"}).text
        assert boot.parse_script(look) == {"disk": True}
    assert boot.parse_script(env.script()) == {"disk": True}
    # iPXE told to boot the disk, then asking again without the disk having asked: it did not come up
    assert "kernel" in boot.parse_script(env.script())
    assert env.ask(fp) == "disk\n"  # the disk's initramfs asks: it is up, and current
    assert boot.parse_script(env.script()) == {"disk": True}
    h = env.c.get(f"/v1/hosts/{MAC}").json()
    assert h["last_boot_version"] == env.vid  # the disk's question is the host's boot
    # a changed setting changes what the disk should boot: the network boot again, and the question says why
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1", "policy": "keep"}).status_code == 200
    assert "kernel" in boot.parse_script(env.script())
    assert env.ask(fp).startswith("network: the disk's kernel, initramfs or command line")
    fp2 = env.fingerprint()
    env.say(fp2)  # the network boot's agent rewrote the loader, and says so
    assert env.ask(fp2) == "disk\n"
    # a new version
    src = make_image(env.tmp / "v2.img", 1 << 20, seed=6)
    import_image(env.repo, src, "lab:v1")
    assert "no boot files" in env.ask(fp2)  # said as it is, and the PC's agent says more
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0")
    assert env.ask(fp2).startswith("network: the host is assigned lab@")


def test_a_forced_reprovision_reaches_the_pc(env: Env) -> None:
    fp = env.fingerprint()
    env.say(fp)
    assert env.ask(fp) == "disk\n"
    r = env.c.post(f"/v1/hosts/{MAC}/reprovision")
    assert r.status_code == 200
    token = r.json()["reprovision"]
    s = boot.parse_script(env.script())
    assert s["params"]["blockprov.reprovision"] == token  # the agent compares it with its disk's label
    assert env.ask(fp).startswith("network:")
    fp3 = env.fingerprint()
    env.say(fp3)  # the re-provisioned disk's agent
    assert env.ask(fp3) == "disk\n"  # once its loader boots that command line


def test_bad_words_about_a_disk_are_refused(env: Env) -> None:
    for body in ({}, {"version": "lab@x", "fingerprint": 3}, {"version": "lab:v1", "fingerprint": "f" * 32},
                 {"version": f"lab@{env.vid}", "fingerprint": "not hex"},
                 {"version": f"lab@{env.vid}", "fingerprint": "f" * 32, "fingerprnt": "f" * 32}):
        for method in ("post", "put"):
            r = getattr(env.c, method)(f"/v1/boot/{MAC}/disk", json=body)
            assert r.status_code == 400, (method, body, r.text)
    assert env.c.post("/v1/boot/unknown-host/disk", json={"version": f"lab@{env.vid}", "fingerprint": "f" * 32}
                      ).status_code == 404


def test_the_plan_round_trips_and_the_init_parses(tmp_path: Path) -> None:
    text = everyday.plan_text(image="lab@aa", policy="restore", disk="nvme0n1",
                              parts=["nvme0n1p1", "nvme0n1p2", "nvme0n1p3", "nvme0n1p4"], sectors=2097152,
                              chunk_sectors=128, cow=[("nvme0n1p3", 0, 2048), ("nvme0n1p4", 2097152, 4096)],
                              era_block=2048, era_file="era.meta", per_chunk=16)
    plan = everyday.parse_plan(text)
    assert plan["BP_CHUNK"] == "128" and plan["BP_PER_CHUNK"] == "16"
    assert plan["BP_COW"] == "nvme0n1p3:0:2048 nvme0n1p4:2097152:4096" and plan["BP_DATA"] == "nvme0n1p4"
    everyday.write_plan(tmp_path, text)
    assert (tmp_path / everyday.PLAN).read_text() == text
    everyday.remove_plan(tmp_path)
    everyday.remove_plan(tmp_path)
    assert not (tmp_path / everyday.PLAN).exists()
    # the shell sources it: the same values
    got = subprocess.run([require_tool("busybox"), "sh", "-c", ". /dev/stdin; echo \"$BP_COW|$BP_IMAGE\""],
                         input=text, capture_output=True, text=True, check=True).stdout
    assert got == "nvme0n1p3:0:2048 nvme0n1p4:2097152:4096|lab@aa\n"
    init = tmp_path / "init"
    init.write_text(everyday.INIT)
    subprocess.run([require_tool("busybox"), "sh", "-n", str(init)], check=True)


def test_the_loader_keeps_the_initramfs_in_its_two_parts() -> None:
    fast, rest = gzip.compress(b"f" * 100_000, mtime=0), gzip.compress(b"r" * 300_000, mtime=0)
    assert loader.split_initramfs(fast + bytes(-len(fast) % 4) + rest) == (fast, rest)
    assert loader.split_initramfs(fast) == (fast, b"")
    with pytest.raises(Exception, match="not gzip"):
        loader.split_initramfs(b"not an initramfs")
    assert "INITRD /fast.img" in loader.syslinux_cfg("x")
    # GRUB on the disk's EFI System Partition boots the fast part too; the whole initramfs stays beside it
    _vol, content = loader.volume({"kernel": b"k", "initrd": fast + rest}, loader.wanted("k", "i", "x"))
    assert b"\ninitrd /fast.img\n" in content[boot.GRUB_CFG] and content["initrd.img"] == fast + rest
    # a loader written before the two parts (its record without the fingerprint) is out of date
    want = loader.wanted("k", "i", "x")
    assert loader.comparable({k: v for k, v in want.items() if k != "fingerprint"}) != want


def quiet_wait(tmp_path: Path, busy_jiffies: int, busy_ms: int, most: int) -> tuple[int, str]:
    """The every-day boot's quiet rule (``everyday.QUIET_WAIT``) under busybox, over /proc/stat and
    a disk's stat written here: each ``sleep`` of the window moves the machine on by 500 jiffies
    (5 s), ``busy_jiffies`` of them busy, and the disk by ``busy_ms`` of I/O."""
    stat, dstat = tmp_path / "stat", tmp_path / "dstat"
    stat.write_text("cpu  100 0 50 1000 20 0 0 0 0 0\ncpu0 100 0 50 1000 20 0 0 0 0 0\n")
    dstat.write_text("1 0 2 3 4 0 5 6 0 700 800 0 0 0 0\n")
    script = everyday.QUIET_WAIT + f"""
    sleep() {{  # the window passes: the machine's counters move on
        read -r c u n s i rest <"$BP_STAT"
        echo "cpu $((u + {busy_jiffies})) $n $s $((i + 500 - {busy_jiffies})) $rest" >"$BP_STAT"
        set -- $(cat "$BP_DSTAT"); echo "$1 $2 $3 $4 $5 $6 $7 $8 $9 $((${{10}} + {busy_ms})) ${{11}}" >"$BP_DSTAT"
    }}
    quiet_wait vda {everyday.QUIET_CPU} {everyday.QUIET_DISK} 5 {most}; echo "$? $WHY"
    """
    out = subprocess.run([require_tool("busybox"), "sh", "-c", script], capture_output=True, text=True, check=True,
                         env={"BP_STAT": str(stat), "BP_DSTAT": str(dstat), "PATH": os.environ["PATH"]}).stdout
    code, why = out.strip().split(" ", 1)
    return int(code), why


def test_the_resident_agent_starts_once_the_machine_is_quiet_or_after_waiting_its_most(tmp_path: Path) -> None:
    # quiet: 10 % CPU, 2 % disk over the window
    assert quiet_wait(tmp_path, 50, 100, 300) == (0, "quiet (CPU 9 %, disk 2 % busy over 5 s) after 5 s")
    # the CPU busy (fio's start under emulation), then the disk (fio's I/O): never quiet, bounded
    assert quiet_wait(tmp_path, 400, 100, 20) == (1, "busy for 20 s: starting anyway at idle priority")
    assert quiet_wait(tmp_path, 20, 4000, 20) == (1, "busy for 20 s: starting anyway at idle priority")
