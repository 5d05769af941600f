"""Reset, snapshot, update and hydration through `blockprov` commands, with real NBD clients
(qemu-io writes, qemu-img compare / nbdcopy reads) against running and stopped agents, and the
faults of issue 4: missing, foreign or stuck caches, an unreachable repository, a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from blockprov.repo.remote import RemoteRepository
from tests.conftest import make_image, run_cli
from tests.procs import Proc, nbd_uri, start_agent, start_server, wait_for

pytestmark = pytest.mark.interop
CS = 64 << 10
SIZE = 16 << 20


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def status(cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(run_cli("status", "--cache", str(cache), "--json").stdout)
    return out


def qemu_dirty(sock: Path) -> None:
    """A session's writes: data, zeroes, a discard, and a partial write into a chunk."""
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 256k", "-c", "write -P 0x11 3m 4k",
       "-c", "write -z 5m 128k", "-c", "discard 8m 64k", "-c", "write -P 0x22 12m 70k", nbd_uri(sock))


@pytest.fixture
def golden(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "golden.img", SIZE, seed=41, data_fraction=0.8, pattern_every=CS)
    r = LocalRepository(data)
    import_image(r, src, "lab:v1")
    r.close()
    return data, src


@pytest.fixture
def running(tmp_path: Path, golden: tuple[Path, Path]) -> Iterator[tuple[Proc, Path, Path]]:
    data, _ = golden
    sock = tmp_path / "nbd.sock"
    cache = tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, data=data)
    try:
        yield proc, cache, sock
    finally:
        proc.stop()


def test_reset_of_a_stopped_instance(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, src = golden
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, data=data)
    qemu_dirty(sock)
    assert sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock), check=False).returncode
    assert proc.stop() == 0
    assert status(cache)["chunks_modified"] > 0
    out = json.loads(run_cli("reset", "--cache", str(cache), "--json", data=data).stdout)
    assert out["chunks_reset"] > 0 and status(cache)["chunks_modified"] == 0
    proc, _ = start_agent(cache, None, sock, data=data)
    try:
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))
    finally:
        proc.stop()


def test_reset_through_a_running_agent_lazy_and_eager(running: tuple[Proc, Path, Path],
                                                      golden: tuple[Path, Path]) -> None:
    _, cache, sock = running
    data, src = golden
    for eager in (False, True):
        qemu_dirty(sock)
        out = json.loads(run_cli("reset", "--cache", str(cache), "--json", *(["--eager"] if eager else []),
                                 data=data).stdout)
        assert out["chunks_reset"] > 0
        if eager:
            assert out["chunks_refetched"] > 0
            st = status(cache)
            assert st["chunks_modified"] == 0
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))


def test_reset_on_start_is_reboot_to_restore(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, src = golden
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    for _session in range(2):
        proc, _ = start_agent(cache, "lab:v1", sock, "--reset-on-start", data=data)
        try:
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))
            qemu_dirty(sock)
        finally:
            assert proc.stop() == 0


def test_snapshot_via_agent_then_export_equals_the_disk(running: tuple[Proc, Path, Path],
                                                        golden: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache, sock = running
    data, _ = golden
    qemu_dirty(sock)
    out = json.loads(run_cli("snapshot", "--cache", str(cache), "--to", "lab:s1", "--json", data=data).stdout)
    assert out["chunks_sent"] > 0 and out["chunks_sent"] <= out["chunks_modified"]
    run_cli("export", "lab:s1", str(tmp_path / "s1.raw"), data=data)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "s1.raw"), nbd_uri(sock))
    again = json.loads(run_cli("snapshot", "--cache", str(cache), "--to", "lab:s2", "--json", data=data).stdout)
    assert again["chunks_sent"] == 0 and again["bytes_sent"] == 0
    st = status(cache)
    assert st["targets"]["default"] == {"unsynced_chunks": 0, "last_snapshot": again["version"]}


def test_update_transfers_only_the_difference(running: tuple[Proc, Path, Path], golden: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    _, cache, sock = running
    data, src = golden
    v2 = bytearray(src.read_bytes())
    for i in (2, 50, 51, 200):
        v2[i * CS:i * CS + 100] = os.urandom(100)
    (tmp_path / "v2.img").write_bytes(v2)
    run_cli("import", str(tmp_path / "v2.img"), "lab:v2", data=data)
    sh("nbdcopy", nbd_uri(sock), "null:")  # the instance is fully local
    before = status(cache)["totals"]["chunks_fetched"]
    out = json.loads(run_cli("update", "--cache", str(cache), "--to", "lab:v2", "--json", data=data).stdout)
    assert out["chunks_changed"] == 4 and out["chunks_refetched"] == 4
    assert out["bytes_fetched"] == 4 * CS
    assert status(cache)["totals"]["chunks_fetched"] == before + 4
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "v2.img"), nbd_uri(sock))


def test_hydration_reaches_100_percent_and_stops(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, src = golden
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, "--hydrate", data=data)
    try:
        assert wait_for(lambda: status(cache).get("hydration", {}).get("state") == "done", 60)
        st = status(cache)
        assert st["chunks_missing"] == 0 and st["hydration"]["percent"] == 100.0
        out = json.loads(run_cli("hydrate", "--cache", str(cache), "--json", data=data).stdout)
        assert out["state"] == "done"
    finally:
        assert proc.stop() == 0
    assert status(cache)["hydrated"] is not None
    proc, _ = start_agent(cache, None, sock, data=data)
    try:
        sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), nbd_uri(sock))
    finally:
        proc.stop()


def test_hydrate_command_on_a_stopped_cache(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, _ = golden
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, "--no-register", data=data)
    proc.stop()
    out = json.loads(run_cli("hydrate", "--cache", str(cache), "--json").stdout)  # repository from the cache
    assert out["state"] == "done" and out["percent"] == 100.0
    assert status(cache)["chunks_missing"] == 0


def test_repository_asks_a_registered_agent_for_a_snapshot(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, _ = golden
    server, url = start_server(data)
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    try:
        proc, banner = start_agent(cache, "lab:v1", sock, "--instance", "pc-07", repo_url=url)
        try:
            assert banner["instance"] == "pc-07"
            assert wait_for(lambda: any(a["instance"] == "pc-07" for a in json.loads(
                run_cli("--repo", url, "agents", "--json").stdout)), 30)
            qemu_dirty(sock)
            out = json.loads(run_cli("--repo", url, "snapshot", "--instance", "pc-07", "--to", "lab:from-repo",
                                     "--json", "--wait", "60").stdout)
            assert out["chunks_sent"] > 0
            run_cli("--repo", url, "export", "lab:from-repo", str(tmp_path / "r.raw"))
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "r.raw"), nbd_uri(sock))
            bad = run_cli("--repo", url, "snapshot", "--instance", "nobody", "--to", "lab:x", check=False)
            assert bad.returncode == 3 and "nobody" in bad.stderr

            # The registration carries the instance's live state (what the console and `agents` show).
            def info() -> dict[str, Any]:
                agents = json.loads(run_cli("--repo", url, "agents", "--json").stdout)
                return dict(next(a["info"] for a in agents if a["instance"] == "pc-07"))

            assert wait_for(lambda: info().get("modified_chunks", 0) > 0, 30)
            live = info()
            assert 0 < live["hydration"]["percent"] <= 100 and live["host"] and live["last_error"] is None
            # The repository may ask for a reset too (the café's restore, from the console).
            with RemoteRepository(url) as repo:
                rid = repo.post_request("pc-07", "reset")
                done = repo.get_request("pc-07", rid, wait=60)
            assert done["state"] == "done", done
            assert status(cache)["chunks_modified"] == 0
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", str(golden[1]), nbd_uri(sock))
            assert wait_for(lambda: info().get("modified_chunks") == 0, 30)
        finally:
            proc.stop()
    finally:
        server.stop()


def test_bad_caches_are_refused_and_left_untouched(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    data, _ = golden
    p = run_cli("reset", "--cache", str(tmp_path / "nope"), data=data, check=False)
    assert p.returncode == 8 and "not a blockprov cache" in p.stderr
    other = make_image(tmp_path / "o.img", SIZE, seed=3)
    run_cli("import", str(other), "other:v1", data=data)
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, data=data)
    try:
        qemu_dirty(sock)
        p = run_cli("update", "--cache", str(cache), "--to", "other:v1", data=data, check=False)
        assert p.returncode == 8 and "other" in p.stderr
        # An agent that holds the cache but does not answer: refused, nothing changed.
        modified = status(cache)["chunks_modified"]
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            p = run_cli("reset", "--cache", str(cache), data=data, check=False)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        assert p.returncode == 8 and "does not answer" in p.stderr
        assert status(cache)["chunks_modified"] == modified
    finally:
        proc.stop()


def test_snapshot_with_the_repository_down_keeps_state_and_retries(tmp_path: Path,
                                                                   golden: tuple[Path, Path]) -> None:
    data, _ = golden
    server, url = start_server(data)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    sock, cache = tmp_path / "s.sock", tmp_path / "cache"
    proc, _ = start_agent(cache, "lab:v1", sock, "--no-register", repo_url=url)
    try:
        qemu_dirty(sock)
        modified = status(cache)["chunks_modified"]
        server.stop()
        p = run_cli("snapshot", "--cache", str(cache), "--to", "lab:s1", check=False)
        assert p.returncode == 7 and "Traceback" not in p.stderr
        st = status(cache)
        assert st["chunks_modified"] == modified and st["targets"]["default"]["unsynced_chunks"] == modified
        server, url = start_server(data, port=port)
        out = json.loads(run_cli("snapshot", "--cache", str(cache), "--to", "lab:s1", "--json").stdout)
        assert out["chunks_modified"] == modified
        assert status(cache)["targets"]["default"]["unsynced_chunks"] == 0
    finally:
        proc.stop()
        server.stop()


def test_hydration_pauses_on_a_full_disk_and_serving_goes_on(tmp_path: Path,
                                                             small_fs: Callable[[str], Path]) -> None:
    data = tmp_path / "repo"
    src = make_image(tmp_path / "g.img", 32 << 20, seed=43, data_fraction=1.0)
    r = LocalRepository(data)
    import_image(r, src, "full:v1")
    r.close()
    cache = small_fs("12m") / "cache"
    sock = tmp_path / "s.sock"
    proc, _ = start_agent(cache, "full:v1", sock, "--hydrate", data=data)
    try:
        assert wait_for(lambda: status(cache).get("hydration", {}).get("state") == "paused", 60)
        st = status(cache)
        assert "no space" in st["hydration"]["message"] or "full" in st["hydration"]["message"]
        # Serving goes on: a read of what is local, and the agent answers.
        sh("qemu-io", "-f", "raw", "-c", "read 0 64k", nbd_uri(sock))
        assert proc.proc.poll() is None
    finally:
        proc.stop()


def first_session(cache: Path, data: Path, sock: Path, ref: str = "lab:v1") -> list[int]:
    """A first session of ``ref`` that reads at 5 MiB, 1 MiB and 9 MiB (128 KiB): the profile it
    leaves the version (chunks 80, 16, 144, 145 at 64 KiB chunks)."""
    proc, _ = start_agent(cache, ref, sock, "--readahead", "0", data=data)
    try:
        sh("qemu-io", "-f", "raw", "-c", "read 5m 64k", "-c", "read 1m 4k", "-c", "read 9m 128k", nbd_uri(sock))
    finally:
        assert proc.stop() == 0
    order: list[int] = json.loads(run_cli("profile", "show", ref, "--json", data=data).stdout)["chunks"]
    return order


def test_a_cold_first_session_gives_the_version_its_boot_profile(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    """The first machine to read a version pays the cold start; it leaves its read order in the
    repository, and the next machine's agent prefetches in that order by itself."""
    data, _ = golden
    sock = tmp_path / "s.sock"
    assert first_session(tmp_path / "pc1", data, sock)[:4] == [80, 16, 144, 145]
    proc, _ = start_agent(tmp_path / "pc2", "lab:v1", sock, data=data)
    try:
        assert wait_for(lambda: status(tmp_path / "pc2").get("hydration", {}).get("state") == "done", 30)
        st = status(tmp_path / "pc2")
        assert st["hydration"]["profile_only"] and st["chunks_present"] >= 3
    finally:
        proc.stop()


def test_sigterm_right_after_the_banner_is_a_clean_stop(tmp_path: Path, golden: tuple[Path, Path]) -> None:
    """A supervisor may stop an agent the moment it reports ready: the signal must not kill it
    before its handlers are in place (that left the cache unclean, exit 143)."""
    data, _ = golden
    for n in range(3):
        cache = tmp_path / f"cache{n}"
        proc, _banner = start_agent(cache, "lab:v1", tmp_path / f"s{n}.sock", "--no-register", data=data)
        assert proc.stop(signal.SIGTERM) == 0
        assert status(cache)["clean_shutdown"] is True
