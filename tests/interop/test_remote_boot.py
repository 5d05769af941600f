"""Remote boot against a live ``blockprov serve``: the CLI, curl, and qemu's own iPXE firmware.

The qemu test is the real thing the boot endpoint exists for: qemu's virtio-net option ROM
(iPXE, from Debian's ipxe-qemu) gets the boot script's URL from qemu's user-net DHCP, fetches
``/v1/boot/<mac>`` from the server on 127.0.0.1 (user-net maps 10.0.2.2 to the host's loopback),
downloads the kernel and initrd the script names and starts the kernel, which prints its banner and
the command line (with the ``blockprov.*`` parameters) on the serial console.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from blockprov import boot
from blockprov.repo.remote import RemoteRepository
from tests.conftest import make_image, run_cli
from tests.procs import Proc, start_server

pytestmark = pytest.mark.interop

MAC = "52:54:00:12:34:56"
IPXE_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom"  # Debian ipxe-qemu (a dependency of qemu-system-x86)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", *args], capture_output=True, timeout=60)


def test_cli_and_curl_against_server(tmp_path: Path) -> None:
    server, url = start_server(tmp_path / "repo")
    env = {"BLOCKPROV_REPO": url}
    try:
        src = make_image(tmp_path / "a.raw", 2 << 20, seed=61)
        v1 = json.loads(run_cli("import", str(src), "lab:v1", "--json", env=env).stdout)["id"]
        kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
        kernel.write_bytes(os.urandom(boot.PIECE * 2 + 777))
        initrd.write_bytes(b"initrd!" * 10000)
        out = json.loads(run_cli("boot-files", "set", "lab:v1", "--kernel", str(kernel), "--initrd", str(initrd),
                                 "--cmdline", "console=ttyS0", "--json", env=env).stdout)
        assert out["kernel"]["size"] == kernel.stat().st_size and out["version"] == v1
        shown = json.loads(run_cli("boot-files", "show", "lab:v1", "--json", env=env).stdout)
        assert shown["kernel"]["id"] == out["kernel"]["id"] and shown["cmdline"] == "console=ttyS0"
        assert "kernel" in run_cli("boot-files", "show", "lab:v1", env=env).stdout

        # an unknown host: a clear 404 for iPXE and curl, exit 3 for the CLI
        p = curl("-f", f"{url}/v1/boot/{MAC}")
        assert p.returncode == 22
        p = curl(f"{url}/v1/boot/{MAC}")
        assert p.stdout.decode() == f"blockprov: no boot assignment for host {MAC} (assign one with: blockprov " \
                                    f"host assign {MAC} NAME:TAG)\n"
        p = run_cli("host", "script", MAC, env=env, check=False)
        assert p.returncode == 3 and "no boot assignment for host" in p.stderr
        # malformed hosts: 400 and exit 2
        assert curl("-o", "/dev/null", "-w", "%{http_code}", f"{url}/v1/boot/zz:zz").stdout == b"400"
        for bad in ("zz:zz:zz:zz:zz:zz", "Pc_1"):
            p = run_cli("host", "assign", bad, "lab:v1", env=env, check=False)
            assert p.returncode == 2 and "invalid host" in p.stderr, p.stderr
        p = run_cli("host", "assign", "pc1", "lab:v1", "--args", "a|b", env=env, check=False)
        assert p.returncode == 2 and "invalid kernel arguments" in p.stderr

        run_cli("host", "assign", MAC.upper().replace(":", "-"), "lab:v1", "--args", "ip=dhcp", env=env)
        hosts = json.loads(run_cli("host", "list", "--json", env=env).stdout)
        assert [(h["host"], h["ref"], h["version"], h["args"]) for h in hosts] == [(MAC, "lab:v1", v1, "ip=dhcp")]
        assert MAC in run_cli("host", "list", env=env).stdout

        # the script curl gets (dash MAC, as some tools write it) is the script the CLI prints
        p = curl("-f", f"{url}/v1/boot/{MAC.replace(':', '-')}")
        assert p.returncode == 0
        text = p.stdout.decode()
        assert text == run_cli("host", "script", MAC, env=env).stdout
        s = boot.parse_script(text)
        assert s["params"]["blockprov.image"] == f"lab@{v1}" and s["params"]["blockprov.repo"] == url
        assert s["params"]["blockprov.host"] == MAC and s["args"][:2] == ["console=ttyS0", "ip=dhcp"]
        js = json.loads(run_cli("host", "script", MAC, "--base-url", "http://10.0.2.2:8420", "--json",
                                env=env).stdout)
        assert js["kernel"].startswith("http://10.0.2.2:8420/v1/images/lab/")
        # a Host header that would break the script never reaches it (validated; Starlette also
        # falls back to the server's address for a malformed one)
        p = curl("-f", "-H", "Host: evil kernel", f"{url}/v1/boot/{MAC}")
        assert p.returncode == 0 and b"evil" not in p.stdout
        p = curl("-w", "%{http_code}", f"{url}/v1/boot/{MAC}?base=http://x/%0Ashell")
        assert p.stdout.endswith(b"400") and p.stdout.count(b"\n") == 1

        # the files the script names download with curl: whole, ranged, resumed
        p = curl("-f", s["kernel"])
        assert p.returncode == 0 and p.stdout == kernel.read_bytes()
        p = curl("-f", "-r", f"{boot.PIECE - 3}-{boot.PIECE + 3}", s["kernel"])
        assert p.stdout == kernel.read_bytes()[boot.PIECE - 3:boot.PIECE + 4]
        part = tmp_path / "part"
        part.write_bytes(initrd.read_bytes()[:1000])
        assert curl("-f", "-C", "-", "-o", str(part), s["initrd"]).returncode == 0
        assert part.read_bytes() == initrd.read_bytes()
        head = curl("-f", "-I", s["initrd"]).stdout.decode().lower()
        assert f"content-length: {initrd.stat().st_size}" in head and "etag:" in head

        # a tag move is followed by the next boot
        src.write_bytes(src.read_bytes()[::-1])
        v2 = json.loads(run_cli("import", str(src), "lab:v2", "--json", env=env).stdout)["id"]
        run_cli("tag", "lab:v2", "lab:v1", env=env)
        p = curl(f"{url}/v1/boot/{MAC}", "-w", "\n%{http_code}")
        assert p.stdout.decode().endswith("409") and "has no boot files" in p.stdout.decode()
        run_cli("boot-files", "set", "lab:v2", "--kernel", str(kernel), "--initrd", str(initrd), env=env)
        s2 = boot.parse_script(curl("-f", f"{url}/v1/boot/{MAC}").stdout.decode())
        assert s2["params"]["blockprov.image"] == f"lab@{v2}"
        # a fetch of the script is no boot (issue 27 item 5), nor are a ranged or resumed initrd
        # above: the host boots once it has fetched the whole initrd its script names
        assert json.loads(run_cli("host", "show", MAC, "--json", env=env).stdout)["last_boot"] is None
        assert s2["initrd"].endswith(f"/initrd?host={MAC}&platform=${{platform}}")
        assert curl("-f", "-o", str(tmp_path / "whole"), s2["initrd"]).returncode == 0
        shown = json.loads(run_cli("host", "show", MAC.replace(":", "-"), "--json", env=env).stdout)
        assert shown["last_boot_version"] == v2 and shown["last_boot"] <= time.time()
        assert shown == json.loads(run_cli("host", "list", "--json", env=env).stdout)[0]
        assert f"booted {datetime.datetime.fromtimestamp(shown['last_boot']).isoformat(timespec='seconds')}" \
            in run_cli("host", "list", env=env).stdout
        assert f"version {v2}" in run_cli("host", "show", MAC, env=env).stdout
        p = run_cli("host", "show", "pc-none", env=env, check=False)
        assert p.returncode == 3 and "no boot assignment for host pc-none" in p.stderr

        # profiles and agents through the same server
        with RemoteRepository(url) as repo:
            repo.put_profile("lab", v2, [3, 1, 2])
            repo.register_agent("pc1-agent", {"image": "lab", "version": v2, "host": "pc1", "pid": 4242})
            rid = repo.post_request("pc1-agent", "snapshot", {"to": "lab:snap"})
            got = repo.next_request("pc1-agent", 2.0)
            assert got is not None and got["id"] == rid
            later = threading.Timer(0.5, lambda: repo.complete_request("pc1-agent", rid, True, {"id": "x"}))
            later.start()
            t0 = time.monotonic()
            assert repo.get_request("pc1-agent", rid, 10.0)["state"] == "done"
            assert time.monotonic() - t0 < 5
            later.join()
        assert json.loads(run_cli("profile", "show", f"lab@{v2}", "--json", env=env).stdout)["chunks"] == [3, 1, 2]
        assert "3 chunks" in run_cli("profile", "show", "lab:v2", env=env).stdout
        agents = json.loads(run_cli("agents", "--json", env=env).stdout)
        assert agents[0]["instance"] == "pc1-agent" and agents[0]["info"]["pid"] == 4242
        assert "pc1-agent" in run_cli("agents", env=env).stdout

        run_cli("host", "rm", MAC, env=env)
        assert run_cli("host", "rm", MAC, env=env, check=False).returncode == 3
        assert json.loads(run_cli("host", "list", "--json", env=env).stdout) == []
    finally:
        assert server.stop() == 0


def test_cli_embedded_repository(tmp_path: Path) -> None:
    data = tmp_path / "data"
    src = make_image(tmp_path / "a.raw", 1 << 20, seed=62)
    run_cli("import", str(src), "lab:v1", data=data)
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "i").write_bytes(b"initrd")
    run_cli("boot-files", "set", "lab:v1", "--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "i"),
            data=data)
    run_cli("host", "assign", "pc1", "lab:v1", data=data)
    p = run_cli("host", "script", "pc1", data=data, check=False)
    assert p.returncode == 2 and "--base-url" in p.stderr
    text = run_cli("host", "script", "pc1", "--base-url", "http://192.0.2.1:8420", data=data).stdout
    assert boot.parse_script(text)["kernel"].startswith("http://192.0.2.1:8420/v1/images/lab/versions/")
    assert "no agents" in run_cli("agents", data=data).stdout
    assert "no boot profile" in run_cli("profile", "show", "lab:v1", data=data).stdout


class _LineLog:
    """Collects a process's output lines in threads (uvicorn's access log goes to stdout)."""

    def __init__(self, proc: Proc) -> None:
        self.lines: list[str] = []
        for stream in (proc.proc.stdout, proc.proc.stderr):
            assert stream is not None
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, f: object) -> None:
        for line in f:  # type: ignore[attr-defined]
            self.lines.append(line)

    def requested(self, path: str) -> bool:
        return any(f'"GET {path} ' in urllib.parse.unquote(ln) for ln in list(self.lines))


def test_qemu_ipxe_boots_from_the_repository(tmp_path: Path) -> None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    assert kernels, "no kernel in /boot: scripts/setup.sh installs linux-image-amd64"
    assert Path(IPXE_ROM).exists(), f"{IPXE_ROM} missing: install ipxe-qemu (scripts/setup.sh)"
    server, url = start_server(tmp_path / "repo", "--access-log")
    log = _LineLog(server)
    port = url.rsplit(":", 1)[1]
    console = tmp_path / "console.log"
    qemu: subprocess.Popen[bytes] | None = None
    try:
        src = make_image(tmp_path / "a.raw", 1 << 20, seed=63)
        run_cli("--repo", url, "import", str(src), "lab:v1")
        initrd = tmp_path / "initrd.img"
        initrd.write_bytes(b"not a real initramfs" * 100)  # the kernel says so and panics: fine
        run_cli("--repo", url, "boot-files", "set", "lab:v1", "--kernel", kernels[-1], "--initrd", str(initrd),
                "--cmdline", "console=ttyS0 panic=-1")
        run_cli("--repo", url, "host", "assign", MAC, "lab:v1", "--args", "loglevel=7")
        vid = json.loads(run_cli("--repo", url, "show", "lab:v1", "--json").stdout)["id"]
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "accel=tcg", "-m", "512", "-display", "none", "-monitor", "none",
             "-serial", f"file:{console}", "-no-reboot",
             "-netdev", f"user,id=n,bootfile=http://10.0.2.2:{port}/v1/boot/{MAC}",
             # qemu loads its default ROM for the NIC (IPXE_ROM); bootindex, not "-boot n", makes
             # SeaBIOS run it first (with "-boot n", or with an explicit romfile=, it never ran here)
             "-device", f"virtio-net-pci,netdev=n,mac={MAC},bootindex=1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        files = f"/v1/images/lab/versions/{vid}/boot"
        deadline = time.monotonic() + 240  # the kernel panics without a root (panic=-1, -no-reboot: qemu exits)
        while time.monotonic() < deadline and qemu.poll() is None:
            text = console.read_text(errors="replace") if console.exists() else ""
            if "Command line:" in text and "blockprov.host=" in text:
                break
            time.sleep(0.5)
        text = console.read_text(errors="replace") if console.exists() else ""
        booted = "Linux version" in text and "Command line:" in text
        assert log.requested(f"/v1/boot/{MAC}"), "".join(log.lines)[-3000:]
        assert log.requested(f"{files}/kernel"), "".join(log.lines)[-3000:]
        # its last boot (issue 27), and its firmware as iPXE says it (issue 25): SeaBIOS, so pcbios
        assert log.requested(f"{files}/initrd?host={MAC}&platform=pcbios"), "".join(log.lines)[-3000:]
        assert booted, f"the kernel did not start; console:\n{text[-3000:]}"
        assert f"blockprov.image=lab@{vid}" in text and f"blockprov.repo=http://10.0.2.2:{port}" in text
        assert "console=ttyS0 panic=-1 loglevel=7" in text
        shown = json.loads(run_cli("--repo", url, "host", "show", MAC, "--json").stdout)
        assert shown["last_boot_version"] == vid, shown  # real iPXE fetched the whole initrd: a boot
    finally:
        if qemu is not None:
            qemu.kill()
            qemu.wait(timeout=30)
        server.stop()
