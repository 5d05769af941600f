"""Every CLI command against a remote repository (``--repo URL`` / ``BLOCKPROV_REPO``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image, run_cli
from tests.procs import start_server

pytestmark = pytest.mark.interop


def test_cli_against_server(tmp_path: Path) -> None:
    server, url = start_server(tmp_path / "repo")
    env = {"BLOCKPROV_REPO": url}
    try:
        src = make_image(tmp_path / "a.raw", 8 << 20, seed=51)
        out = json.loads(run_cli("import", str(src), "r:v1", "--json", env=env).stdout)
        assert out["new_chunks"] > 0
        with open(src, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"changed!" * 512)
        qcow = tmp_path / "a.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src), str(qcow)], check=True)
        out2 = json.loads(run_cli("--repo", url, "import", str(qcow), "r:v2", "--json").stdout)
        assert out2["new_chunks"] == 1
        show = json.loads(run_cli("show", "r:v2", "--json", env=env).stdout)
        assert show["raw_url"] == f"{url}/v1/images/r/raw/v2"
        assert json.loads(run_cli("diff", "r:v1", "r:v2", "--json", env=env).stdout)["changed"] == [16]
        run_cli("tag", f"r@{show['id']}", "r:prod", env=env)
        images = json.loads(run_cli("images", "--json", env=env).stdout)
        assert images[0]["tags"]["prod"] == show["id"]
        run_cli("export", "r:prod", str(tmp_path / "out.raw"), env=env)
        assert (tmp_path / "out.raw").read_bytes() == src.read_bytes()
        versions = json.loads(run_cli("versions", "r", "--json", env=env).stdout)
        assert len(versions) == 2 and versions[1]["parent"] == versions[0]["id"]
        run_cli("rm", "r:prod", env=env)
        assert run_cli("show", "r:prod", env=env, check=False).returncode == 3
        assert json.loads(run_cli("gc", "--json", env=env).stdout)["chunks_removed"] == 0
        # the raw view the show command points at is readable by curl
        p = subprocess.run(["curl", "-sf", "-r", "0-511", show["raw_url"]], capture_output=True, check=True)
        assert p.stdout == src.read_bytes()[:512]
    finally:
        server.stop()
