"""The DHCP configurations of docs/operations.md ("UEFI and Secure Boot") work as written (issue 25).

Real peers: dnsmasq and ISC Kea (with its flex-option hook) run the examples straight from the
document — only the interface, the TFTP directory and Kea's lease store are the test's — in a
network namespace of their own, joined by a veth pair to another where busybox's udhcpc poses as
each kind of PC, sending what its firmware sends: the client architecture (option 93), the
vendor class (60: ``PXEClient:…`` or ``HTTPClient:…``) and, for iPXE, the user class (77). Each
must be offered the boot file the document promises: ``undionly.kpxe`` (a BIOS's PXE),
``ipxe.efi`` (a UEFI PXE), the boot script's URL (iPXE, which expands ``${net0/mac}`` itself), and
the host's UEFI HTTP boot image with vendor class ``HTTPClient`` in the answer (the firmware's own
HTTP boot). The boot tests cannot: qemu's user network is its own DHCP server.

Nothing listens outside the namespaces; they and the veth pair are removed at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
MAC = "52:54:00:12:34:56"  # the PC the examples name
REPO = "http://192.0.2.10:8420"
# what each kind of PC sends: udhcpc's -V (option 60) and -x (93 client architecture, 77 user class)
CLIENTS = {
    "BIOS PXE": ["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"],
    "UEFI PXE": ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"],
    "iPXE": ["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007", "-x", "0x4d:" + b"iPXE".hex()],
    "UEFI HTTP boot": ["-V", "HTTPClient:Arch:00016:UNDI:003001", "-x", "0x5d:0010"],
}
EXPECTED = {"BIOS PXE": "undionly.kpxe", "UEFI PXE": "ipxe.efi", "iPXE": f"{REPO}/v1/boot/${{net0/mac}}",
            "UEFI HTTP boot": f"{REPO}/v1/boot/{MAC}/boot.img"}
# udhcpc runs this at each event; it keeps what the offer said (the file field, option 67, option 60)
SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
{ echo "boot_file=$boot_file"; echo "bootfile=$bootfile"; echo "vendor=$vendor"; echo "siaddr=$siaddr"; } > "$OUT"
"""


def example(kind: str, first_line: str) -> str:
    """The code block of the UEFI section whose language is ``kind`` and whose first line starts so."""
    text = DOC.read_text()
    section = text[text.index("### UEFI and Secure Boot"):]
    section = section[:section.index("\n## ")]
    blocks = re.findall(rf"```{kind}\n(.*?)```", section, re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"docs/operations.md: no single {kind} block starting {first_line!r}"
    return found[0]


@dataclass
class Net:
    server: str  # namespace
    client: str
    server_if: str
    client_if: str


def ip(*args: str) -> None:
    subprocess.run([require_tool("ip"), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def net() -> Iterator[Net]:
    """Two namespaces joined by a veth pair: the server's end 192.0.2.10/24, the client's with MAC."""
    tag = f"{os.getpid() % 100000}"
    n = Net(f"bp-dhcp-s{tag}", f"bp-dhcp-c{tag}", f"bpds{tag}", f"bpdc{tag}")
    ip("netns", "add", n.server)
    try:
        ip("netns", "add", n.client)
        ip("link", "add", n.server_if, "type", "veth", "peer", "name", n.client_if)
        ip("link", "set", n.server_if, "netns", n.server)
        ip("link", "set", n.client_if, "netns", n.client)
        ip("-n", n.server, "addr", "add", "192.0.2.10/24", "dev", n.server_if)
        ip("-n", n.server, "link", "set", n.server_if, "up")
        ip("-n", n.client, "link", "set", n.client_if, "address", MAC, "up")
        yield n
    finally:
        subprocess.run([require_tool("ip"), "netns", "del", n.client], capture_output=True, timeout=30)
        subprocess.run([require_tool("ip"), "netns", "del", n.server], capture_output=True, timeout=30)


def offers(n: Net, server: list[str], tmp: Path, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Start ``server`` in the server's namespace; each kind of client asks once; what each was offered."""
    script = tmp / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([require_tool("ip"), "netns", "exec", n.server, *server], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    got: dict[str, dict[str, str]] = {}
    try:
        for name, args in CLIENTS.items():
            res = tmp / f"{name.replace(' ', '-')}.env"
            for _ in range(5):  # the server may still be starting: udhcpc gives up after 3 quiet seconds
                assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
                subprocess.run([require_tool("ip"), "netns", "exec", n.client, require_tool("busybox"), "udhcpc",
                                "-f", "-q", "-n", "-t", "3", "-T", "1", "-i", n.client_if, "-s", str(script), *args],
                               env={**os.environ, "OUT": str(res)}, capture_output=True, timeout=60)
                if res.exists():
                    break
                time.sleep(1)
            assert res.exists(), (name, log.read_text(errors="replace")[-3000:])
            got[name] = dict(line.split("=", 1) for line in res.read_text().splitlines())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return got


def check(got: dict[str, dict[str, str]]) -> None:
    for name, want in EXPECTED.items():
        assert want in (got[name]["boot_file"], got[name]["bootfile"]), (name, got[name])
    assert got["UEFI HTTP boot"]["vendor"] == "HTTPClient", got["UEFI HTTP boot"]  # or the firmware ignores it
    for name in ("BIOS PXE", "UEFI PXE"):
        assert got[name]["siaddr"] == "192.0.2.10" and got[name]["vendor"] != "HTTPClient", (name, got[name])


def test_the_dnsmasq_example_offers_each_pc_its_boot_file(net: Net, tmp_path: Path) -> None:
    conf = example("ini", "# /etc/dnsmasq.d/blockprov.conf")
    (tmp_path / "tftp").mkdir()
    conf = conf.replace("tftp-root=/srv/tftp", f"tftp-root={tmp_path / 'tftp'}")
    assert f"tftp-root={tmp_path / 'tftp'}" in conf
    (tmp_path / "dnsmasq.conf").write_text(conf)
    got = offers(net, [require_tool("dnsmasq"), "--no-daemon", "--log-dhcp", f"--conf-file={tmp_path / 'dnsmasq.conf'}",
                       "--port=0", f"--dhcp-leasefile={tmp_path / 'leases'}", "--pid-file=",
                       f"--interface={net.server_if}", "--bind-interfaces"], tmp_path)
    check(got)


def test_the_kea_example_offers_each_pc_its_boot_file(net: Net, tmp_path: Path) -> None:
    conf = json.loads(example("json", '{"Dhcp4"'))
    hook = conf["Dhcp4"]["hooks-libraries"][0]["library"]
    assert Path(hook).is_file(), f"{hook} is missing: install the Debian package kea-dhcp4-server"
    conf["Dhcp4"]["interfaces-config"]["interfaces"] = [net.server_if]
    conf["Dhcp4"]["lease-database"] = {"type": "memfile", "persist": False}
    (tmp_path / "kea.json").write_text(json.dumps(conf))
    (tmp_path / "run").mkdir()
    run = str(tmp_path / "run")
    got = offers(net, [require_tool("kea-dhcp4"), "-c", str(tmp_path / "kea.json")], tmp_path,
                 {"KEA_PIDFILE_DIR": run, "KEA_LOCKFILE_DIR": run})
    check(got)
