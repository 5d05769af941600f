"""Two network-booted PCs of one site boot through the site's cache (issue 26), qemu standing in for
the PCs as in test_netboot.py: their NICs' iPXE ROMs ask the site cache (``blockprov serve
--upstream``) for their boot scripts, the scripts name the site cache as their repository, and the
in-machine agents take their kernel, initramfs and chunks from it. The central repository sends the
first PC's working set once; the second PC's boot costs it almost nothing."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import assign, blank_disk, chunks_served, netboot
from tests.conftest import run_cli
from tests.procs import start_server

pytestmark = [pytest.mark.interop, pytest.mark.timeout(1800)]
MACS = ("52:54:00:12:34:6a", "52:54:00:12:34:6b")


def _sitecache(url: str, name: str) -> int:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        m = re.search(rf"^blockprov_sitecache_{name}_total (\S+)$", r.read().decode(), re.M)
    return int(float(m.group(1))) if m else 0


def test_the_netboot_initramfs_profile_is_prepared_by_a_network_boot(netrepo: NetRepo) -> None:
    """A version whose boot files are blockprov's initramfs gets its profile from a boot made as a
    PC makes it (issue 26 item 0): diskless, through qemu's user network, the fetches recorded."""
    assert netrepo.data is not None
    show = json.loads(run_cli("--repo", netrepo.url, "show", "bootlab:v1", "--json").stdout)
    assert not show["profile"]["ready"], show["profile"]  # nothing booted it yet
    # one TCG network boot (the preparation's own bound is 600 s, plus the initramfs's start)
    got = json.loads(run_cli("--data", str(netrepo.data), "profile", "prepare", "bootlab:v1", "--json",
                             timeout=1200).stdout)
    assert got["state"] == "done" and got["network_boot"] and got["chunks"] > 100, got
    show = json.loads(run_cli("--repo", netrepo.url, "show", "bootlab:v1", "--json").stdout)["profile"]
    assert show["ready"] and show["own"] and show["chunks"] >= got["chunks"], show
    assert show["preparation"]["state"] == "done", show
    agents = [a["instance"] for a in json.loads(run_cli("--repo", netrepo.url, "agents", "--json").stdout)]
    assert not any(a.startswith("pc-prepare-") for a in agents), agents  # the preparing boot's agent is gone
    # again: nothing to do, it has one
    again = json.loads(run_cli("--data", str(netrepo.data), "profile", "prepare", "bootlab:v1", "--json").stdout)
    assert again["state"] == "skipped" and "has a boot profile" in again["detail"], again


def test_two_pcs_of_a_site_boot_through_its_cache(netrepo: NetRepo, tmp_path: Path) -> None:
    cache, cache_url = start_server(tmp_path / "sc", "--upstream", netrepo.url)
    try:
        port = cache_url.rsplit(":", 1)[1]
        # the site's machines reach the site cache at 10.0.2.2 (qemu's user network: the host's loopback)
        run_cli("--repo", netrepo.url, "site", "add", "lab1", "--cache", f"http://10.0.2.2:{port}")
        for mac in MACS:
            assign(netrepo.url, "check", "restore", mac=mac)
            run_cli("--repo", netrepo.url, "host", "assign", mac, "bootlab:v1", "--site", "lab1")
        base = chunks_served(netrepo.url)
        first = netboot(blank_disk(tmp_path / "pc1.raw"), cache_url, tmp_path / "console1.log", mac=MACS[0],
                        count=False)
        assert first.check == "OK", first.tail()
        assert f"blockprov.repo=http://10.0.2.2:{port}" in first.console or "site lab1" in first.console, first.tail()
        assert "through the site cache" in first.console, first.tail()
        sent1 = chunks_served(netrepo.url) - base
        pulled1 = _sitecache(cache_url, "chunks_upstream")
        second = netboot(blank_disk(tmp_path / "pc2.raw"), cache_url, tmp_path / "console2.log", mac=MACS[1],
                         count=False)
        assert second.check == "OK", second.tail()
        sent2 = chunks_served(netrepo.url) - base - sent1
        hits = _sitecache(cache_url, "chunks_hit")
        print(f"first PC: the repository sent {sent1} chunks (the site cache pulled {pulled1}); second PC: "
              f"{sent2} more, {hits} served from the site cache")
        assert sent1 > 0 and pulled1 >= sent1 * 9 // 10
        # the second PC reads what the first read: from the site cache, not the repository (the
        # slack: what the second boot read that the first did not)
        assert sent2 <= max(16, sent1 // 20), (sent1, sent2)
        assert hits >= sent1 * 8 // 10, (hits, sent1)
        agents = {a["instance"]: a["info"] for a in json.loads(run_cli("--repo", netrepo.url, "agents",
                                                                        "--json").stdout)}
        for mac in MACS:
            info = agents["pc-" + mac.replace(":", "-")]
            assert info.get("site") == "lab1", info
            assert any(v.get("site_cache", {}).get("chunks") for v in (info.get("sources") or {}).values()), info
    finally:
        cache.stop()
