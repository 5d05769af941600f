"""Clones and pools (issue 6) with real peers: qemu-io / qemu-img / nbdcopy through the exports,
debugfs reading the clones' ext4 file systems, a real `blockprov serve` counting fetches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image, run_cli
from tests.interop.test_control_hostile import every_op_refuses_an_unknown_argument
from tests.procs import Proc, start_server, start_serving, wait_for

pytestmark = pytest.mark.interop
SIZE = 16 << 20


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def start(*args: str, data: Path | None = None, repo_url: str | None = None) -> tuple[Proc, dict[str, Any]]:
    return start_serving(*args, data=data, repo_url=repo_url)


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "golden.img", SIZE, seed=51, data_fraction=0.8)
    r = LocalRepository(data)
    import_image(r, src, "lab:v1")
    r.close()
    return data, src


@pytest.fixture
def ext4_golden(tmp_path: Path) -> tuple[Path, Path]:
    """A small ext4 root with /etc/hostname and /etc/machine-id, like a real golden image."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("golden\n")
    (root / "etc" / "machine-id").write_text("0" * 32 + "\n")
    (root / "usr").mkdir()
    (root / "usr" / "data.bin").write_bytes(os.urandom(1 << 20))
    img = tmp_path / "root.img"
    sh("mkfs.ext4", "-q", "-F", "-d", str(root), str(img), "32M")
    data = tmp_path / "repo"
    r = LocalRepository(data)
    import_image(r, img, "os:v1")
    r.close()
    return data, img


def debugfs_cat(img: Path, path: str) -> str:
    return sh("debugfs", "-R", f"cat {path}", str(img)).stdout.strip()


def test_clone_writes_stay_private_and_the_base_is_fetched_once(golden: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    data, src = golden
    server, url = start_server(data)
    root, sock = tmp_path / "clones", tmp_path / "c.sock"
    try:
        out = json.loads(run_cli("--repo", url, "clone", "lab:v1", "--count", "20", "--dir", str(root),
                                 "--json").stdout)
        assert len(out["instances"]) == 20 and out["seconds_per_instance"] < 1.0
        proc, banner = start("clones", "serve", "--dir", str(root), "--socket", str(sock), repo_url=url)
        try:
            assert sorted(banner["instances"]) == sorted(out["instances"])
            sh("qemu-io", "-f", "raw", "-c", "write -P 0x7e 0 200k", "-c", "write -z 4m 64k",
               uri(sock, "lab-1"))
            for name in out["instances"][1:]:  # 19 clones read everything: the base fetches once
                sh("nbdcopy", uri(sock, name), "null:")
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock, "lab-2"))
            assert sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), uri(sock, "lab-1"),
                      check=False).returncode == 1
            base = json.loads(run_cli("status", "--cache", str(next((root / "bases").iterdir())), "--json").stdout)
            r = LocalRepository(data)
            m = r.resolve("lab:v1")
            r.close()
            nonzero = sum(1 for i in range(m.count) if not m.is_zero(i))
            assert base["chunks_fetched"] == nonzero  # each chunk served by the repository once
            listing = json.loads(run_cli("clones", "list", "--dir", str(root), "--json").stdout)
            held = {x["instance"]: x["chunks_modified"] for x in listing}
            assert held["lab-1"] > 0 and all(v == 0 for k, v in held.items() if k != "lab-1")
            # Reset of one instance: only its overlay goes.
            run_cli("reset", "--cache", str(root / "instances" / "lab-1"))
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock, "lab-1"))
            # A clone made while the server runs is served at once; removed ones go away.
            run_cli("--repo", url, "clone", "lab:v1", "--dir", str(root))
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri(sock, "lab-21"))
            run_cli("clones", "rm", "lab-21", "--dir", str(root))
            assert sh("qemu-img", "info", uri(sock, "lab-21"), check=False).returncode != 0
        finally:
            assert proc.stop() == 0
    finally:
        server.stop()


def test_snapshot_of_one_clone_sends_its_overlay(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = golden
    root, sock = tmp_path / "clones", tmp_path / "c.sock"
    run_cli("clone", "lab:v1", "--count", "2", "--dir", str(root), data=data)
    proc, _ = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=data)
    try:
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x31 1m 128k", uri(sock, "lab-2"))
        out = json.loads(run_cli("snapshot", "--cache", str(root / "instances" / "lab-2"), "--to", "lab:c2",
                                 "--json", data=data).stdout)
        assert out["chunks_modified"] == 2 and out["chunks_sent"] == 1  # two equal chunks: stored once
        run_cli("export", "lab:c2", str(tmp_path / "c2.raw"), data=data)
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "c2.raw"), uri(sock, "lab-2"))
        # the clones server's control socket and an instance's: every op refuses an argument it does not take
        assert {"status", "rescan", "remove", "seal", "stop"} <= set(every_op_refuses_an_unknown_argument(root))
        every_op_refuses_an_unknown_argument(root / "instances" / "lab-1")
    finally:
        proc.stop()


def test_identity_customizer_gives_each_clone_its_own_machine_id(ext4_golden: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    data, _ = ext4_golden
    root, sock = tmp_path / "clones", tmp_path / "c.sock"
    scratch = Path(tempfile.mkdtemp(prefix="bpt", dir="/tmp"))  # short: a unix socket goes in it
    try:
        run_cli("clone", "os:v1", "--count", "3", "--dir", str(root), "--customize", "builtin:identity", data=data,
                env={"TMPDIR": str(scratch)})
        assert not list(scratch.iterdir())  # the temporary agent's socket directory, mounts: all gone
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    deep = tmp_path / ("d" * 60)  # a TMPDIR too long for a unix socket's path: the socket goes to /tmp
    deep.mkdir()
    run_cli("clone", "os:v1", "--count", "1", "--dir", str(tmp_path / "more"), "--customize", "builtin:identity",
            data=data, env={"TMPDIR": str(deep)})
    proc, _ = start("clones", "serve", "--dir", str(root), "--socket", str(sock), data=data)
    ids = set()
    try:
        for k in (1, 2, 3):
            out = tmp_path / f"os-{k}.raw"
            sh("nbdcopy", uri(sock, f"os-{k}"), str(out))
            assert debugfs_cat(out, "/etc/hostname") == f"os-{k}"
            ids.add(debugfs_cat(out, "/etc/machine-id"))
            sh("e2fsck", "-fn", str(out))  # the file system is consistent after the edit
    finally:
        proc.stop()
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_a_failing_customizer_hands_nothing_out(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = golden
    root = tmp_path / "clones"
    p = run_cli("clone", "lab:v1", "--count", "2", "--dir", str(root), "--customize",
                'test "$BLOCKPROV_INSTANCE" != lab-2 || { echo "no license left" >&2; exit 3; }',
                data=data, check=False)
    assert p.returncode == 9 and "no license left" in p.stderr and "lab-2" in p.stderr
    listing = json.loads(run_cli("clones", "list", "--dir", str(root), "--json").stdout)
    assert [x["instance"] for x in listing] == ["lab-1"]


def pool_status(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run_cli("pool", "status", "p", "--dir", str(root), "--json").stdout)
    return out


def test_pool_create_acquire_restart_release(ext4_golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, img = ext4_golden
    root = tmp_path / "pool"
    # The configuring writes the boot sector (ext4 leaves the first 1 KiB alone): a configure that
    # changes nothing makes no new version (the snapshot answers with the source itself).
    configure = 'qemu-io -f raw -c "write -P 0x42 0 512" "$BLOCKPROV_NBD" > /dev/null && echo configured'
    run_cli("pool", "create", "p", "--from", "os:v1", "--size", "2", "--configure", configure,
            "--customize", "builtin:identity", "--dir", str(root), data=data)
    st = pool_status(root)
    assert st["configured"] != st["source"] and st["configured"].startswith("os@")
    assert sorted(v["state"] for v in st["instances"].values()) == ["ready", "ready"]
    versions = json.loads(run_cli("versions", "os", "--json", data=data).stdout)
    assert any("pool-p" in v["tags"] for v in versions)  # the configured layer is in the repository
    proc, _ = start("pool", "serve", "p", "--dir", str(root), data=data)
    try:
        got = json.loads(run_cli("pool", "acquire", "p", "--host", "pc1", "--dir", str(root), "--json").stdout)
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x66 20m 64k", got["uri"])
        assert wait_for(lambda: sum(v["state"] == "ready" for v in pool_status(root)["instances"].values()) == 2, 60)
        # The managing process dies; the mapping survives and a new one serves on.
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        proc, _ = start("pool", "serve", "p", "--dir", str(root), data=data)
        st = pool_status(root)
        mapped = st["instances"][got["instance"]]
        assert (mapped["state"], mapped["host"]) == ("in-use", "pc1")
        again = json.loads(run_cli("pool", "acquire", "p", "--host", "pc1", "--dir", str(root), "--json").stdout)
        assert again["instance"] == got["instance"]
        other = json.loads(run_cli("pool", "acquire", "p", "--host", "pc2", "--dir", str(root), "--json").stdout)
        assert other["instance"] != got["instance"]
        # Release: the host's writes are gone; the instance is ready again with a fresh identity.
        run_cli("pool", "release", "p", "--host", "pc1", "--dir", str(root), data=data)
        assert pool_status(root)["instances"][got["instance"]]["state"] == "ready"
        out = tmp_path / "released.raw"
        sh("nbdcopy", got["uri"], str(out))
        assert out.read_bytes()[20 << 20:(20 << 20) + 65536] == img.read_bytes()[20 << 20:(20 << 20) + 65536]
        assert debugfs_cat(out, "/etc/hostname") == got["instance"]
    finally:
        proc.stop()


def test_an_exhausted_pool_says_so(golden: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = golden
    root = tmp_path / "pool"
    run_cli("pool", "create", "p", "--from", "lab:v1", "--size", "1", "--dir", str(root), data=data)
    run_cli("pool", "acquire", "p", "--host", "a", "--dir", str(root))
    p = run_cli("pool", "acquire", "p", "--host", "b", "--dir", str(root), check=False)
    assert p.returncode == 5 and "exhausted" in p.stderr
    proc, _ = start("pool", "serve", "p", "--dir", str(root), data=data)
    try:  # with the server running, a waiting acquire gets the refilled instance
        got = json.loads(run_cli("pool", "acquire", "p", "--host", "b", "--wait", "60", "--dir", str(root),
                                 "--json").stdout)
        sh("qemu-img", "info", got["uri"])
        ops = every_op_refuses_an_unknown_argument(root)
        assert {"pool-status", "pool-acquire", "pool-release"} <= set(ops), ops
    finally:
        proc.stop()


def test_pools_and_clones_report_to_the_repository(golden: tuple[Path, Path], tmp_path: Path) -> None:
    """`pool serve` and `clones serve` register with a real `blockprov serve` (the mechanism
    `attach` uses) and report the pool (base version, ready, in use, target size, refill error) and
    their clones with versions; a hand-out shows at once; --no-register reports nothing."""
    data, _ = golden
    server, url = start_server(data)
    pool_root, clones_root = tmp_path / "pool", tmp_path / "clones"
    procs: list[Proc] = []

    def agents() -> dict[str, dict[str, Any]]:
        rows = json.loads(run_cli("--repo", url, "agents", "--json").stdout)
        return {a["instance"]: a["info"] for a in rows}

    try:
        run_cli("--repo", url, "pool", "create", "p", "--from", "lab:v1", "--size", "2", "--dir", str(pool_root))
        vid = pool_status(pool_root)["configured"]
        run_cli("--repo", url, "clone", "lab:v1", "--count", "2", "--dir", str(clones_root))
        procs.append(start("pool", "serve", "p", "--dir", str(pool_root), "--instance", "pool-p-test",
                           repo_url=url)[0])
        procs.append(start("clones", "serve", "--dir", str(clones_root), "--socket", str(tmp_path / "c.sock"),
                           repo_url=url)[0])
        assert wait_for(lambda: len(agents()) == 2, 60), agents()
        got = agents()
        pool_info = got["pool-p-test"]
        assert pool_info["kind"] == "pool"
        assert pool_info["pools"] == [{"name": "p", "source": vid, "base": vid, "size": 2, "ready": 2, "in_use": 0,
                                       "error": None}]
        assert sorted((c["name"], c["state"]) for c in pool_info["clones"]) == [("p-1", "ready"), ("p-2", "ready")]
        (clones_name,) = set(got) - {"pool-p-test"}
        clones_info = got[clones_name]
        assert clones_name.startswith("clones-clones-") and clones_info["kind"] == "clones"
        assert clones_info["dir"] == str(clones_root.resolve()) and clones_info["clones_total"] == 2
        assert [(c["name"], f"{c['image']}@{c['version']}") for c in clones_info["clones"]] == \
            [("lab-1", vid), ("lab-2", vid)]
        # a hand-out is reported at once (the pool refills afterwards: in use 1, ready back to 2)
        run_cli("pool", "acquire", "p", "--host", "pc1", "--dir", str(pool_root))
        assert wait_for(lambda: agents()["pool-p-test"]["pools"][0]["in_use"] == 1, 30), agents()
        text = run_cli("--repo", url, "agents").stdout
        assert "pool p of " + vid in text and "1 in use, target 2" in text and "clone lab-1: " + vid in text
        # --no-register: serves, reports nothing
        for p in procs:
            assert p.stop() == 0
        procs.clear()
        run_cli("--repo", url, "pool", "create", "q", "--from", "lab:v1", "--size", "1", "--dir",
                str(tmp_path / "q"))
        procs.append(start("pool", "serve", "q", "--dir", str(tmp_path / "q"), "--no-register", repo_url=url)[0])
        run_cli("pool", "acquire", "q", "--host", "pc2", "--dir", str(tmp_path / "q"))
        assert not any(i.startswith("pool-q-") for i in agents())
    finally:
        for p in procs:
            p.stop()
        server.stop()


def _fuse_mounts() -> set[str]:
    return {ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if "blockprov-fuse-" in ln}


@pytest.fixture(autouse=True)
def _no_leftover_fuse() -> Iterator[None]:
    """Mounts made by this test are gone after it (another worker's, made meanwhile, are its own)."""
    before = _fuse_mounts()
    yield
    left = {m for m in _fuse_mounts() - before if not wait_for(lambda m=m: m not in _fuse_mounts(), 30)}
    assert not left, f"nbdfuse mounts left behind: {left}"
