"""kill -9 the agent during a mixed read/write/flush workload from a real NBD client (libnbd),
restart it, and check DESIGN.md's invariants:

1. every present chunk that is not modified holds exactly the manifest's data;
3. every write acknowledged before a completed flush is there after the crash.

Bounded: a fixed number of iterations, each killing the agent after at most ~1.5 s (or, for the
half that kill just after a given flush, 30 s if the workload stalls).
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.cache import load_state
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository
from tests.conftest import make_image
from tests.crash.nbd_workload import OPS_PER_RUN, SLOT, plan
from tests.procs import NBDSH_PY, nbd_uri, start_agent

pytestmark = pytest.mark.crash
ITERATIONS = 10
SIZE = 32 << 20  # 512 slots of 64 KiB; 10 runs × 40 writes use 400


def check_present_chunks(cache: Path, repo: LocalRepository) -> int:
    """Invariant 1, read straight from the crashed cache's files (nothing repaired first)."""
    st = load_state(cache)
    m = repo.resolve(f"{st.image}@{st.version}")
    data = (cache / "data").read_bytes()
    checked = 0
    ch = st.chunks
    for i in range(m.count):
        if ch.present(i) and not (ch.modified(i) or ch.zero(i)) and not m.is_zero(i):
            piece = data[i * m.chunk_size:(i + 1) * m.chunk_size]
            assert codec.digest(piece) == m.digest_at(i), f"chunk {i} present but not the manifest's data"
            checked += 1
    return checked


MID_FLUSHES = (3, 7, 11, 15, 19, 23, 27)  # flush points with at least 12 writes still to come


def _after_flush(log: Path, seed: int, n: int, client: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Return once the workload of ``seed`` logged its flush after write ``n`` (or ended, or timed out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and client.poll() is None:
        text = log.read_text() if log.exists() else ""
        if any(line.split() and int(line.split()[0]) == seed and int(line.split()[1]) >= n
               for line in text.splitlines()):
            return
        time.sleep(0.002)


def test_kill9_during_workload(tmp_path: Path) -> None:
    data = tmp_path / "repo"
    golden = make_image(tmp_path / "g.img", SIZE, seed=41, data_fraction=0.8)
    repo = LocalRepository(data)
    import_image(repo, golden, "crash:v1")
    cache, sock, log = tmp_path / "cache", tmp_path / "s", tmp_path / "flushed.log"
    rnd = random.Random(7)
    client_script = Path(__file__).with_name("nbd_workload.py")
    checked = 0
    for it in range(ITERATIONS):
        agent, _ = start_agent(cache, "crash:v1" if it == 0 else None, sock, data=data)
        client = subprocess.Popen([NBDSH_PY, str(client_script), str(sock), str(100 + it), str(it * OPS_PER_RUN),
                                   str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if it % 2:  # anywhere: before the client connects, mid-workload, or after it finished
            time.sleep(rnd.uniform(0.02, 0.6))
        else:  # surely mid-workload, whatever this machine's speed: just after a given flush
            _after_flush(log, 100 + it, rnd.choice(MID_FLUSHES), client)
            time.sleep(rnd.uniform(0, 0.005))
        agent.kill9()
        client.kill()
        client.wait()
        checked += check_present_chunks(cache, repo)
    # restart once more and read everything through a real client
    agent, _ = start_agent(cache, None, sock, data=data)
    try:
        out = tmp_path / "after.raw"
        subprocess.run(["nbdcopy", nbd_uri(sock), str(out)], check=True, timeout=120)
    finally:
        assert agent.stop() == 0
    disk, gold = out.read_bytes(), golden.read_bytes()
    flushed: dict[int, int] = {}
    for line in log.read_text().split("\n"):
        if line.strip():
            seed, n = map(int, line.split())
            flushed[seed] = max(flushed.get(seed, -1), n)
    acked = 0
    touched: set[int] = set()
    for it in range(ITERATIONS):
        ops = plan(100 + it, it * OPS_PER_RUN)
        for n, (off, ln, fill, slot) in enumerate(ops):
            touched.add(slot)
            if n <= flushed.get(100 + it, -1):
                assert disk[off:off + ln] == bytes([fill]) * ln, f"flushed write {it}/{n} lost"
                acked += 1
    for slot in range(SIZE // SLOT):  # never-written slots read as the golden image
        if slot not in touched:
            assert disk[slot * SLOT:(slot + 1) * SLOT] == gold[slot * SLOT:(slot + 1) * SLOT], f"slot {slot}"
    assert acked > 0, "the workload never completed a flush: the test proved nothing"
    cut = sum(1 for it in range(ITERATIONS) if flushed.get(100 + it, -1) < OPS_PER_RUN - 1)
    assert cut >= 3, "too few kills landed mid-workload: the test proved little"
    print(f"{ITERATIONS} kills, {acked} flushed writes verified, {checked} present chunks verified")
    repo.close()
    os.sync()
