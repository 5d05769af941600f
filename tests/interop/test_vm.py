"""Running-VM clones (issue 14) with real qemu (TCG): a guest application keeps a counter in memory;
``vm template`` freezes it, ``vm clone --count 3`` resumes three copies that go on counting where the
template was (no reboot), each with its own disk, MAC and identity, sharing the template's RAM.

One module-scoped setup does the expensive part once (one boot, one template, three clones); every
wait is bounded and nothing asserts on wall time. The test image is the small one of
tools/bootimage.py in ``bp.mode=counter``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.conftest import require_tool, run_cli

# a missing qemu-system-x86_64 fails naming its package (tests/conftest.py); the module's first test sets up one
# boot, a template and three clones: bounded for a shared, loaded machine
pytestmark = [pytest.mark.interop, pytest.mark.timeout(1200)]
COUNT = re.compile(r"BP-COUNT n=(\d+) host=")  # whole lines only: a paused guest may stop mid-line
CLONES = 3


def counts(console: Path) -> list[int]:
    try:
        return [int(x) for x in COUNT.findall(console.read_text(errors="replace"))]
    except FileNotFoundError:
        return []


def agent_runs(disks: Path) -> bool:
    from blockprov.agent import control
    from blockprov.errors import BlockprovError

    try:
        control.call(disks, "status", timeout=30.0)
    except (BlockprovError, OSError):
        return False
    return True


def wait_until(what: str, cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


class Lab:
    def __init__(self, data: Path, root: Path) -> None:
        self.data, self.root = data, root

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args[:2], "--dir", str(self.root), *args[2:], data=self.data, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args[:2], "--json", *args[2:]).stdout)

    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["name"]: r for r in self.json("vm", "list")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    img = bootvm.build_image(size="256M", fill_mb=40)
    data = tmp_path_factory.mktemp("vmrepo") / "repo"
    root = Path(tempfile.mkdtemp(prefix="bpvm", dir="/tmp"))  # short: unix socket paths ≤ 107 bytes
    run_cli("import", str(img.disk), "lab:v1", data=data)
    run_cli("boot-files", "set", "lab:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
            "--cmdline", "console=ttyS0 quiet panic=-1 bp.mode=counter", data=data)
    lab = Lab(data, root)
    try:
        lab.cli("vm", "run", "lab:v1", "--name", "app", "--memory", "256")  # MiB, as qemu -m (issue 27)
        started = lab.json("vm", "status", "app")  # `vm run` returned once QMP said the guest runs
        app_console = root / "vms" / "app" / "console.log"
        wait_until("the template VM's counter", lambda: len(counts(app_console)) >= 3, 90)
        before = lab.rows()["app"]
        tpl = lab.json("vm", "template", "tpl", "--from", "app")
        last = max(counts(app_console))
        made = lab.json("vm", "clone", "tpl", "--count", str(CLONES), "--customize", "builtin:identity")
        consoles = {n: root / "vms" / n / "console.log" for n in made["clones"]}
        for n, c in consoles.items():  # each has counted on a little since it resumed
            wait_until(f"{n} counting on", lambda c=c: len([x for x in counts(c) if x > last + 1]) >= 2, 60)
        yield {"lab": lab, "root": root, "template": tpl, "made": made, "last": last, "before": before,
               "started": started, "app_console": app_console, "consoles": consoles, "rows": lab.rows()}
    finally:
        for n in lab.rows():
            lab.cli("vm", "rm", "--force", n, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_template_vm_ran_with_its_ram_in_a_file(lab: dict[str, Any]) -> None:
    before = lab["before"]
    assert lab["started"]["state"] == "running" and lab["started"]["memory_size"] == 256 << 20
    assert before["state"] == "running" and before["pid"]
    assert before["guest_ram"]["rss"] > 0  # its RAM is the memory file's mapping
    assert before["console"] == str(lab["app_console"])
    assert lab["rows"]["app"]["state"].startswith("templated as tpl") and lab["rows"]["app"]["pid"] is None
    t = lab["template"]
    assert t["memory"] == 256 << 20 and t["disk"].startswith("lab@")
    tdir = Path(t["dir"])
    assert (tdir / "memory").stat().st_mode & 0o777 == 0o644  # its owner's qemu opens it O_RDWR (never writes)
    assert (tdir / "state").stat().st_mode & 0o222 == 0  # a template never changes once clones map it
    manifest = json.loads((tdir / "template.json").read_text())
    assert manifest["machine"]["machine"].startswith("pc-i440fx-") and manifest["machine"]["memory"] == 256 << 20


def test_clones_resume_where_the_template_was(lab: dict[str, Any]) -> None:
    assert len(lab["made"]["clones"]) == CLONES and not lab["made"]["failed"]
    for n, c in lab["consoles"].items():
        text = c.read_text(errors="replace")
        assert "BLOCKPROV-INIT" not in text and "BP-COUNTER-START" not in text, f"{n} rebooted:\n{text[:500]}"
        seen = counts(c)
        assert seen[0] >= lab["last"], (n, seen[:5], lab["last"])  # continues, does not restart at 1
        assert seen[0] <= lab["last"] + 2  # from the template's instant, not from elsewhere
        assert seen == sorted(seen)
        assert lab["rows"][n]["state"] == "running" and lab["rows"][n]["template"] == "tpl"


def test_clones_have_their_own_identity_mac_and_disk(lab: dict[str, Any]) -> None:
    rows, names = lab["rows"], lab["made"]["clones"]
    assert len({rows[n]["mac"] for n in names} | {rows["app"]["mac"]}) == CLONES + 1
    ids = {n: lab["made"]["customized"][n]["machine_id"] for n in names}
    assert len(set(ids.values())) == CLONES and all(re.fullmatch(r"[0-9a-f]{32}", m) for m in ids.values()), ids
    for n in names:
        assert lab["made"]["customized"][n] == {"identity": n, "machine_id": ids[n], "acknowledged": True}
        text = lab["consoles"][n].read_text()
        assert f"BP-IDENTITY name={n} machine-id={ids[n]} " in text  # the guest applied both
        assert "BP-COUNT n=" in text and f"host={n}" in text
    # Each guest wrote its name to /bp-identity on its own disk: read every disk through its export.
    sock = lab["root"] / "disks" / "nbd.sock"
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for n in names:
            raw = Path(tmp) / f"{n}.raw"
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///{n}?socket={sock}",
                            str(raw)], check=True, capture_output=True, timeout=120)
            for path, want in (("/bp-identity", n), ("/etc/machine-id", ids[n])):
                got = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, text=True,
                                     timeout=60).stdout.strip()
                assert got == want, (n, path)  # its own write, and none of the others'
            raw.unlink()


def test_clones_share_the_template_memory(lab: dict[str, Any]) -> None:
    rows = [lab["rows"][n] for n in lab["made"]["clones"]]
    ram_rss = sum(r["guest_ram"]["rss"] for r in rows)
    ram_pss = sum(r["guest_ram"]["pss"] for r in rows)
    assert ram_rss > 0
    assert ram_pss < 0.6 * ram_rss, rows  # the template's pages are mapped by all of them, counted once
    assert sum(r["guest_ram"]["shared"] for r in rows) > sum(r["guest_ram"]["private"] for r in rows)
    whole_pss = sum(r["memory"]["pss"] for r in rows)
    assert whole_pss < 0.9 * sum(r["memory"]["rss"] for r in rows)  # qemu's own heap is private


def test_a_vm_directory_with_only_the_repository_clones_too(lab: dict[str, Any]) -> None:
    lb: Lab = lab["lab"]
    pushed = lb.json("vm", "push", "tpl")
    assert pushed["memory"].startswith("vmtpl-tpl@") and pushed["state"].startswith("vmtpl-tpl@")
    refused = Lab(lb.data, Path(tempfile.mkdtemp(prefix="bpvm5", dir="/tmp")))
    try:  # fetched, then refused: the disks agent started while it was fetched does not stay behind
        r = refused.cli("vm", "clone", "tpl", "--count", "1000", check=False)
        assert r.returncode == 5 and "not enough host memory" in r.stderr
        wait_until("no disks agent left", lambda: not agent_runs(refused.root / "disks"), 30)
    finally:
        shutil.rmtree(refused.root, ignore_errors=True)
    other = Lab(lb.data, Path(tempfile.mkdtemp(prefix="bpvm2", dir="/tmp")))  # no local template
    try:
        made = other.json("vm", "clone", "tpl", "--count", "1")
        assert made["pulled"] and len(made["clones"]) == 1, made
        console = other.root / "vms" / made["clones"][0] / "console.log"
        wait_until("the pulled clone counting", lambda: len(counts(console)) >= 2, 60)
        text = console.read_text(errors="replace")
        assert "BLOCKPROV-INIT" not in text and lab["last"] <= counts(console)[0] <= lab["last"] + 2
        assert json.loads((other.root / "templates" / "tpl" / "template.json").read_text())["name"] == "tpl"
    finally:
        for n in other.rows():
            other.cli("vm", "rm", "--force", n, check=False)
        shutil.rmtree(other.root, ignore_errors=True)


def test_a_lazy_clone_maps_the_memory_before_it_is_copied(lab: dict[str, Any]) -> None:
    lb: Lab = lab["lab"]
    lb.cli("vm", "push", "tpl")  # again: the same chunks, nothing new stored
    other = Lab(lb.data, Path(tempfile.mkdtemp(prefix="bpvm3", dir="/tmp")))
    tdir = other.root / "templates" / "tpl"
    try:
        made = other.json("vm", "clone", "tpl", "--count", "2", "--lazy")
        assert made["pulled"] and len(made["clones"]) == 2, made
        assert not (tdir / "memory").exists() and (tdir / "mnt" / "memory").stat().st_size == 256 << 20
        assert json.loads((tdir / "template.json").read_text())["extra"]["lazy"] is True
        for n in made["clones"]:
            console = other.root / "vms" / n / "console.log"
            wait_until(f"lazy clone {n} counting", lambda c=console: len(counts(c)) >= 2, 60)
            text = console.read_text(errors="replace")
            assert "BLOCKPROV-INIT" not in text and lab["last"] <= counts(console)[0] <= lab["last"] + 2
        # The first lazy clone of this memory version anywhere recorded its resume profile: the chunks its
        # guests read first, in that order, which later lazy clones (any host) prefetch ahead of their faults.
        assert made["resume_profile"]["recorded"] is True and made["resume_profile"]["chunks"] > 0, made
        rows = [other.rows()[n] for n in made["clones"]]
        assert all(r["state"] == "running" for r in rows)
        # Both map the one FUSE file privately: the pages they read are the page cache's, shared.
        assert sum(r["guest_ram"]["pss"] for r in rows) < 0.75 * sum(r["guest_ram"]["rss"] for r in rows), rows
        third = Lab(lb.data, Path(tempfile.mkdtemp(prefix="bpvm4", dir="/tmp")))  # another host: uses it
        try:
            again = third.json("vm", "clone", "tpl", "--count", "1", "--lazy")
            assert again["resume_profile"] == {"recorded": False, "reason": "the version has one"}, again
            # Where its start went: the profile's prefetch began before qemu did (and still ran, or
            # had finished, when the clone resumed).
            st = again["steps"]
            assert st["template found"] <= st["memory prefetch started"] <= st["qemu started"] <= st["resumed"], st
            assert st["memory fetched at resume"]["prefetch"] in ("running", "done"), st
            console = third.root / "vms" / again["clones"][0] / "console.log"
            wait_until("the profiled lazy clone counting", lambda: len(counts(console)) >= 2, 60)
            assert lab["last"] <= counts(console)[0] <= lab["last"] + 2
        finally:
            for n in third.rows():
                third.cli("vm", "rm", "--force", n, check=False)
            shutil.rmtree(third.root, ignore_errors=True)
    finally:
        for n in other.rows():
            other.cli("vm", "rm", "--force", n, check=False)
        subprocess.run(["umount", str(tdir / "mnt")], capture_output=True, check=False)
        shutil.rmtree(other.root, ignore_errors=True)
    assert not (tdir / "mnt").is_mount()


def test_ctrl_c_during_a_lazy_clone_leaves_nothing_behind(lab: dict[str, Any]) -> None:
    """Issue 27: Ctrl-C during `vm clone --lazy` left a paused qemu, the FUSE mount, the disks agent
    and an overlay `vm list` never showed. Interrupted once its first clone's qemu runs (paused,
    waiting for its device state): exit 130, and none of those remain. The template's lazy memory
    instance (tplmem-NAME) and its base cache stay: they are the template's, reused by the next clone."""
    lb: Lab = lab["lab"]
    lb.cli("vm", "push", "tpl")
    other = Lab(lb.data, Path(tempfile.mkdtemp(prefix="bpvm6", dir="/tmp")))
    tdir = other.root / "templates" / "tpl"
    try:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "blockprov"), "--data", str(lb.data), "vm", "clone",
                                 "tpl", "--count", "2", "--lazy", "--dir", str(other.root)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until("the first lazy clone's qemu", lambda: any(
            json.loads(r.read_text()).get("pid") for r in (other.root / "vms").glob("*/vm.json")
            if r.stat().st_size), 120)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and err.strip() == "blockprov: interrupted", (proc.returncode, err)
        assert other.rows() == {}  # no record: no VM of its own, no half-started clone
        assert not agent_runs(other.root / "disks")
        assert not (tdir / "mnt").is_mount()
        assert {p.name for p in (other.root / "disks" / "instances").iterdir()} <= {"tplmem-tpl"}
        assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
                    .splitlines() if str(other.root) in line]
    finally:
        for n in other.rows():
            other.cli("vm", "rm", "--force", n, check=False)
        subprocess.run(["umount", str(tdir / "mnt")], capture_output=True, check=False)
        shutil.rmtree(other.root, ignore_errors=True)


def test_bad_input_is_refused_before_anything_starts(lab: dict[str, Any]) -> None:
    lb: Lab = lab["lab"]
    before = set(lb.rows())
    r = lb.cli("vm", "template", "again", "--from", "app", check=False)
    assert r.returncode == 5 and "not running" in r.stderr
    r = lb.cli("vm", "clone", "tpl", "--memory", "512M", check=False)
    assert r.returncode == 5 and "memory is 256.0 MiB" in r.stderr
    r = lb.cli("vm", "clone", "tpl", "--", "-device", "virtio-rng-pci", check=False)
    assert r.returncode == 5 and "qemu arguments" in r.stderr
    r = lb.cli("vm", "clone", "tpl", "--count", "1000", check=False)
    assert r.returncode == 5 and "not enough host memory" in r.stderr
    r = lb.cli("vm", "template", "again", "--from", "nosuch", check=False)
    assert r.returncode == 3 and "no VM nosuch" in r.stderr
    assert set(lb.rows()) == before


def test_a_clone_that_fails_to_start_is_reported_and_the_others_run(lab: dict[str, Any]) -> None:
    """The second of two clones fails (its --customize exits 1): it is removed with its disk and
    reported (exit 1, its name and why), the first runs on."""
    lb: Lab = lab["lab"]
    before = set(lb.rows())
    r = lb.cli("vm", "clone", "tpl", "--count", "2", "--customize", 'test "$BLOCKPROV_INDEX" != 1', "--json",
               check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = json.loads(r.stdout)
    (ok,), (bad,) = out["clones"], list(out["failed"])
    assert "--customize exited with 1" in out["failed"][bad]
    assert "1 of 2 clone(s)" in r.stderr
    rows = lb.rows()
    assert bad not in rows and bad not in os.listdir(lb.root / "disks" / "instances")  # not kept half made
    assert rows[ok]["state"] == "running"
    c = lb.root / "vms" / ok / "console.log"
    wait_until(f"{ok} counting", lambda: len(counts(c)) >= 2, 60)
    lb.cli("vm", "rm", "--force", ok)
    assert set(lb.rows()) == before


def test_a_dead_clone_is_reported_and_the_others_go_on(lab: dict[str, Any]) -> None:
    lb: Lab = lab["lab"]
    victim, *others = lab["made"]["clones"]
    os.kill(lab["rows"][victim]["pid"], signal.SIGKILL)
    wait_until("the killed clone to be reported dead", lambda: lb.rows()[victim]["state"] == "dead", 30)
    mark = {n: max(counts(lab["consoles"][n])) for n in others}
    for n in others:
        wait_until(f"{n} counting on", lambda n=n: max(counts(lab["consoles"][n])) > mark[n] + 1, 30)
        assert lb.rows()[n]["state"] == "running"
    assert "qemu exited without" in lb.rows()[victim]["why"]


def test_a_damaged_or_missing_memory_file_starts_no_clone(lab: dict[str, Any]) -> None:
    lb: Lab = lab["lab"]
    src = Path(lab["template"]["dir"])
    broken = src.parent / "broken"  # a copy: the real template's file is mapped by running clones
    shutil.copytree(src, broken)
    before = set(lb.rows())
    mem = broken / "memory"
    mem.chmod(0o644)
    with open(mem, "r+b") as f:
        f.seek(100 << 20)
        f.write(b"\xff" * 16)
    r = lb.cli("vm", "clone", "broken", check=False)
    assert r.returncode == 4 and "damaged" in r.stderr and "BLAKE3" in r.stderr, r.stderr
    mem.unlink()
    r = lb.cli("vm", "clone", "broken", check=False)
    assert r.returncode == 4 and "missing" in r.stderr, r.stderr
    assert set(lb.rows()) == before
    shutil.rmtree(broken)


def test_a_template_whose_disk_was_removed_says_so_and_starts_nothing(lab: dict[str, Any]) -> None:
    """``rm NAME@ID`` of the version a template's disk is: ``vm clone`` names the template, the
    missing version and what to do, exits 3 (NotFound, docs/operations.md), and leaves no clone, disk
    or directory behind."""
    lb: Lab = lab["lab"]
    img = bootvm.build_image(size="256M", fill_mb=40)  # the lab's image (cached): its chunks are stored already
    run_cli("import", str(img.disk), "gonelab:v1", data=lb.data)
    vid = json.loads(run_cli("show", "gonelab:v1", "--json", data=lb.data).stdout)["id"]
    src = Path(lab["template"]["dir"])
    gone = src.parent / "gone"  # a copy of the lab's template, its disk the version about to be removed
    shutil.copytree(src, gone)
    manifest = gone / "template.json"
    manifest.chmod(0o644)
    t = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**t, "name": "gone", "image": "gonelab", "version": vid}))
    before = set(lb.rows()), set(os.listdir(lb.root / "disks" / "instances")), set(os.listdir(lb.root / "vms"))
    try:
        assert f"removed gonelab@{vid}" in run_cli("rm", f"gonelab@{vid}", data=lb.data).stdout
        r = lb.cli("vm", "clone", "gone", "--count", "2", check=False)
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert f"template gone's disk, gonelab@{vid}, is no longer in the repository" in r.stderr, r.stderr
        assert "blockprov vm template" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == ""
        after = set(lb.rows()), set(os.listdir(lb.root / "disks" / "instances")), set(os.listdir(lb.root / "vms"))
        assert after == before
    finally:
        shutil.rmtree(gone, ignore_errors=True)


def test_an_unprivileged_owner_maps_its_template_memory() -> None:
    """Why ``vm clone`` once needed root: qemu 7.2 opens a ``share=off`` memory file read-write, so
    the 0444 the first templates had refused everyone but root. With the owner's write bit
    (template.MEMORY_MODE) an unprivileged owner's qemu maps it; the 0444 file still fails, as
    template.memory_refusal says before anything starts. Run as ``nobody`` when the tests run as root."""
    from blockprov.vm import qemu as vmq
    from blockprov.vm import template as vmt

    d = Path(tempfile.mkdtemp(prefix="bpvmu", dir="/tmp"))
    try:
        d.chmod(0o755)
        mem = d / "memory"
        with open(mem, "wb") as f:
            f.truncate(16 << 20)
        as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if as_user:
            os.chown(mem, uid, uid)
        outcomes = {}
        for mode in (vmt.MEMORY_MODE, 0o444):
            mem.chmod(mode)
            r = subprocess.run([*as_user, vmq.QEMU, "-machine", "pc,accel=tcg,memory-backend=ram", "-m", "16M",
                                "-object", f"memory-backend-file,id=ram,size=16M,mem-path={mem},share=off",
                                "-display", "none", "-nodefaults", "-S", "-qmp", "stdio"],
                               input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
                               capture_output=True, text=True, timeout=60)
            outcomes[mode] = r
            st = mem.stat()
            refusal = vmt.memory_refusal(mem, st.st_mode, st.st_uid, st.st_gid, uid, {uid})
            assert (refusal is None) == (mode == vmt.MEMORY_MODE)
        ok, sealed = outcomes[vmt.MEMORY_MODE], outcomes[0o444]
        assert ok.returncode == 0 and '"return"' in ok.stdout, ok.stderr
        assert sealed.returncode != 0 and "Permission denied" in sealed.stderr, sealed.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_version_without_boot_files_boots_from_its_own_boot_loader(lab: dict[str, Any]) -> None:
    """``vm run`` of a version with no boot files: qemu gets no ``-kernel``; SeaBIOS runs the disk's
    MBR, which starts syslinux from the disk's boot partition (tools/bootdisk.py), which starts the
    kernel. The application then counts, and the VM templates and clones like any other."""
    for tool in ("syslinux", "mcopy", "mkfs.fat"):
        require_tool(tool)
    lb: Lab = lab["lab"]
    img = bootvm.build_image(size="256M", fill_mb=40)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        disk = bootvm.bootable_disk(img, Path(tmp) / "disk.raw", "console=ttyS0 quiet panic=-1 bp.mode=counter")
        run_cli("import", str(disk), "lab:bootloader", data=lb.data)
    rec = lb.json("vm", "run", "lab:bootloader", "--name", "bl", "--memory", "256M")
    try:
        assert rec["machine"]["kernel"] is False and rec["machine"]["append"] == ""
        cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"-kernel" not in cmdline and b"-initrd" not in cmdline
        console = Path(rec["console"])
        wait_until("the boot-loader VM's counter", lambda: len(counts(console)) >= 3, 120)
        assert "SYSLINUX" in console.read_text(errors="replace")  # the disk's own boot loader ran
        lb.json("vm", "template", "bltpl", "--from", "bl")
        last = max(counts(console))
        made = lb.json("vm", "clone", "bltpl", "--count", "1")
        c = lb.root / "vms" / made["clones"][0] / "console.log"
        wait_until("the boot-loader clone counting on", lambda: len(counts(c)) >= 2, 60)
        assert last <= counts(c)[0] <= last + 2 and "SYSLINUX" not in c.read_text(errors="replace")
        lb.cli("vm", "rm", "--force", made["clones"][0])
    finally:
        lb.cli("vm", "rm", "--force", "bl", check=False)
