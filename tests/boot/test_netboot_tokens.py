"""A PC boots from a repository that enforces tokens (issue 13, tokens inside the machine).

Without ``serve --anonymous-boot`` the repository refuses the firmware's boot request (iPXE sends no
token): the PC's screen says why (issue 27 item 2: iPXE used to show "Permission denied" and fall
through to its disk), the server log names the refused request, and ``host show`` records it.
The firmware fetches its boot script and boot files anonymously (``serve --anonymous-boot``: iPXE
sends no Authorization header); the in-machine agent sends the host's token, carried in its boot
script as ``blockprov.token=`` (set with ``host assign --args``; docs/operations.md "Tokens" says
what that exposes). Without it the machine says why on its console instead of hanging.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import bootvm
from tests.boot.conftest import NetRepo
from tests.boot.netboot_helpers import blank_disk, netboot
from tests.conftest import run_cli
from tests.procs import start_server

# a boot under TCG takes 1–3 min on a loaded 2-core machine: the default 300 s is too tight for a test of two boots
pytestmark = [pytest.mark.interop, pytest.mark.timeout(1500)]

MAC = "52:54:00:12:34:8a"


def test_pc_agent_authenticates_with_the_token_of_its_boot_script(netrepo: NetRepo, tmp_path: Path,
                                                                  boot_image: bootvm.bootimage.Built) -> None:
    data = tmp_path / "repo"
    run_cli("--data", str(data), "import", str(boot_image.disk), "bootlab:v1")
    run_cli("--data", str(data), "boot-files", "set", "bootlab:v1", "--kernel", netrepo.built["build"]["kernel"],
            "--initrd", str(netrepo.initrd), "--cmdline", netrepo.built["cmdline"])
    admin = json.loads(run_cli("--data", str(data), "token", "create", "--scope", "write", "--json").stdout)["token"]
    pc = json.loads(run_cli("--data", str(data), "token", "create", "--scope", "agent", "--name", "lab-pcs",
                            "--json").stdout)["token"]
    env = {"BLOCKPROV_TOKEN": admin}
    # tokens on and no --anonymous-boot: the firmware's request is refused, and said so everywhere
    server, url = start_server(data)
    try:
        run_cli("--repo", url, "host", "assign", MAC, "bootlab:v1", "--policy", "keep", env=env)
        screen = netboot(blank_disk(tmp_path / "disk0.raw"), url, tmp_path / "console0.log", mac=MAC, timeout=600,
                         count=False, until="asking the repository again in")
        shown = " ".join(screen.console.split())  # the screen wraps long lines at 80 columns
        assert "requires access tokens and iPXE cannot send one" in shown, screen.tail()
        assert "--anonymous-boot" in shown and "[401]" in shown, screen.tail()
        assert "Permission denied" not in screen.console, screen.tail()
        host = json.loads(run_cli("--repo", url, "host", "show", MAC, "--json", env=env).stdout)
        assert host["last_refused"] is not None and "--anonymous-boot" in host["refused_why"], host
        assert host["last_boot"] is None, host  # a refused boot is no boot
        text = run_cli("--repo", url, "host", "show", MAC, env=env).stdout
        assert "refused" in text and "iPXE cannot send one" in text, text
        listed = run_cli("--repo", url, "host", "list", env=env).stdout
        assert "REFUSED" in listed, listed
    finally:
        server.stop()
    log = server.proc.stderr.read() if server.proc.stderr else ""
    assert f"boot request of host {MAC}" in log and "refused" in log, log[-2000:]
    assert "--anonymous-boot" in log, log[-2000:]  # the start-up warning and the refusal name it

    server, url = start_server(data, "--anonymous-boot")
    try:
        def assign(extra: str) -> None:
            run_cli("--repo", url, "host", "assign", MAC, "bootlab:v1", "--policy", "keep", "--hydrate", "off",
                    "--args", f"quiet panic=-1 bp.mode=plain {extra}".strip(), env=env)

        # no token for the agent: the machine says why (and would retry after a pause)
        assign("")
        refused = netboot(blank_disk(tmp_path / "disk1.raw"), url, tmp_path / "console1.log", mac=MAC, timeout=600,
                          count=False)
        assert "BLOCKPROV-NETBOOT-FAIL the repository needs a token" in refused.console, refused.tail()
        # the agent's token in the boot script: it boots, and registers as the lab PC
        assign(f"blockprov.token={pc}")
        b = netboot(blank_disk(tmp_path / "disk2.raw"), url, tmp_path / "console2.log", mac=MAC, timeout=600,
                    count=False)
        assert b.done.get("mode") == "plain", b.tail()
        agents = json.loads(run_cli("--repo", url, "agents", "--json", env=env).stdout)
        assert any(a["instance"] == "pc-" + MAC.replace(":", "-") for a in agents), agents
        print(f"tokens: refused without one ({refused.tail(3).splitlines()[-1][:120]}); with it BOOT-DONE "
              f"after {b.seconds:.0f} s")
    finally:
        server.stop()
