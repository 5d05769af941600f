"""The repository over S3 (SeaweedFS), as users run it: the CLI and ``blockprov serve`` with ``--store s3://…``.

* The S3 server dies (kill -9) in the middle of an import: the import ends with one clear line and
  exit 7; after a restart on the same data the repository is consistent (earlier versions export
  identically, gc is fine) and the import can simply be run again.
* Two servers over one bucket and one catalog directory: what one commits the other serves.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from blockprov.repo.local import LocalRepository
from blockprov.store.s3 import S3ChunkStore
from tests.conftest import VENV_BIN, make_image, run_cli
from tests.procs import _env, start_server, wait_for
from tests.s3fixture import SeaweedFS


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_s3_server_killed_mid_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sw = SeaweedFS(tmp_path / "sw")
    sw.start()
    for k, v in sw.env().items():  # for the in-process store below; the CLI gets them in env
        monkeypatch.setenv(k, v)
    try:
        bucket = sw.new_bucket()
        spec = f"s3://{bucket}/repo"
        data = tmp_path / "data"
        env = sw.env() | {"BLOCKPROV_STORE": spec, "BLOCKPROV_S3_TIMEOUT": "3"}
        v1_img = make_image(tmp_path / "v1.img", 4 << 20, seed=3, data_fraction=0.8, pattern_every=256 << 10)
        run_cli("import", str(v1_img), "lab:v1", data=data, env=env)
        raw = sw.client()

        def objects() -> int:
            return sum(p.get("KeyCount", 0) for p in raw.get_paginator("list_objects_v2").paginate(Bucket=bucket))

        before = objects()
        big = tmp_path / "big.img"
        with open(big, "wb") as f:  # incompressible and unique: every chunk is a new PUT
            for i in range(48):
                f.write(hashlib.shake_256(i.to_bytes(4, "little")).digest(1 << 20))
        proc = subprocess.Popen([str(VENV_BIN / "blockprov"), "--data", str(data), "import", str(big), "lab:v2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
        try:
            assert wait_for(lambda: objects() > before + 100, timeout=60), "the import stored nothing"
            assert proc.poll() is None, "the import finished before the S3 server could be killed"
            sw.kill9()
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 7, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"blockprov: error: repository {spec} is unreachable"), err

        sw.start()  # same data directory, same ports
        images = run_cli("images", "--json", data=data, env=env)
        assert '"v2"' not in images.stdout and '"v1"' in images.stdout
        out1 = tmp_path / "v1.out"
        run_cli("export", "lab:v1", str(out1), data=data, env=env)
        assert sha(out1) == sha(v1_img)
        assert "removed 0 chunks" in run_cli("gc", data=data, env=env).stdout  # the hour's grace keeps all
        repo = LocalRepository(data, store=S3ChunkStore(spec, timeout=5, endpoint=sw.endpoint))
        try:
            st = repo.gc(grace=0.0)  # the dead import's chunks go; v1's stay
            assert st.chunks_removed > 100
        finally:
            repo.close()
        run_cli("export", "lab:v1", str(out1), "--force", data=data, env=env)
        assert sha(out1) == sha(v1_img)
        run_cli("import", str(big), "lab:v2", data=data, env=env)  # simply run again
        out2 = tmp_path / "v2.out"
        run_cli("export", "lab:v2", str(out2), data=data, env=env)
        assert sha(out2) == sha(big)
    finally:
        sw.stop()


def test_two_servers_over_one_bucket_and_catalog(tmp_path: Path, seaweed: SeaweedFS,
                                                s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = f"s3://{seaweed.new_bucket()}/shared"
    monkeypatch.setenv("BLOCKPROV_STORE", spec)
    data = tmp_path / "catalog"  # the shared catalog directory (SQLite: servers on one machine)
    a, url_a = start_server(data)
    b, url_b = start_server(data)
    try:
        img = make_image(tmp_path / "img", 4 << 20, seed=11, data_fraction=0.7, pattern_every=256 << 10)
        run_cli("--repo", url_a, "import", str(img), "lab:v1")
        shown = run_cli("--repo", url_b, "show", "lab:v1", "--json").stdout
        assert '"image": "lab"' in shown
        out = tmp_path / "out"
        run_cli("--repo", url_b, "export", "lab:v1", str(out))
        assert sha(out) == sha(img)
        with open(img, "r+b") as f:
            f.write(b"second version")
        run_cli("--repo", url_b, "import", str(img), "lab:v2")
        assert wait_for(lambda: '"v2"' in run_cli("--repo", url_a, "images", "--json").stdout, timeout=60)
        run_cli("--repo", url_a, "export", "lab:v2", str(out), "--force")
        assert sha(out) == sha(img)
        # and the pack store in that directory was never used: chunks live in the bucket only
        assert not any((data / "chunks").glob("packs/*.pack")) if (data / "chunks").exists() else True
    finally:
        a.stop()
        b.stop()
