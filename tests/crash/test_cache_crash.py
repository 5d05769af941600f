"""kill -9 the agent's cache at random moments; the next open must recover with no manual step.

Checked after every kill, before and after recovery:
- (docs/architecture.md, invariant 1) on the raw on-disk state (meta + journal replay, nothing repaired yet): every
  chunk marked present and not modified holds exactly the manifest's data;
- (docs/architecture.md, invariant 3) every write or zeroing acknowledged before a completed FLUSH reads back; a sector
  touched after that flush holds its flushed value or the value of one of the later operations,
  never anything else (no torn chunk, no resurrected base data, no garbage).
The image has a written part and a larger read-only part whose fills are in flight at the kill; a
fresh cache is started every ``KILLS_PER_CACHE`` kills so there is always something to fill.
Bounded: 15 kills, each child living at most ~2 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.cache import load_state
from blockprov.device.base import result_bytes
from blockprov.manifest import Manifest, build
from blockprov.repo.local import LocalRepository
from tests.caches import open_cache
from tests.crash.cache_workload import SECTOR, decode_sector, sector_bytes

pytestmark = pytest.mark.crash

CS = 4096
RW_CHUNKS = 96
CHUNKS = RW_CHUNKS + 1024
SECTORS = CHUNKS * CS // SECTOR
RW_SECTORS = RW_CHUNKS * CS // SECTOR
ITERATIONS = 15
KILLS_PER_CACHE = 5
WORKLOAD = Path(__file__).with_name("cache_workload.py")


def make_base(repo: LocalRepository) -> tuple[Manifest, list[int]]:
    """Base image: sector s holds value 0 (its pattern), except every 5th chunk is all zeros."""
    values = [-1 if (s * SECTOR // CS) % 5 == 4 else 0 for s in range(SECTORS)]
    ids = []
    for c in range(CHUNKS):
        per = CS // SECTOR
        data = b"".join(sector_bytes(s, values[s]) for s in range(c * per, (c + 1) * per))
        if codec.is_zero(data):
            ids.append(codec.ZERO_DIGEST)
            continue
        cid = codec.digest(data)
        repo.put_blobs([(cid, codec.encode(data))])
        ids.append(cid)
    m = build("crash", CHUNKS * CS, CS, ids)
    repo.commit(m)
    return m, values


def parse_log(path: Path) -> tuple[dict[int, tuple[str, int, int, int]], list[int], int]:
    """Operations (op → kind, first, n, gen) in issue order, the ops whose completion was
    logged before the start of the last completed flush, and how many flushes completed."""
    ops: dict[int, tuple[str, int, int, int]] = {}
    ended_at: dict[int, int] = {}
    flush_begin: dict[int, int] = {}
    last_flush_begin = -1
    flushes = 0
    lines = path.read_text().split("\n") if path.exists() else []
    if lines and lines[-1] != "":
        lines = lines[:-1]  # a torn last line
    for pos, line in enumerate(lines):
        f = line.split()
        if not f:
            continue
        if f[0] == "B":
            ops[int(f[1])] = (f[2], int(f[3]), int(f[4]), int(f[5]))
        elif f[0] == "E":
            ended_at[int(f[1])] = pos
        elif f[0] == "FB":
            flush_begin[int(f[1])] = pos
        elif f[0] == "FE":
            last_flush_begin = flush_begin[int(f[1])]
            flushes += 1
        elif f[0] == "MISMATCH":
            raise AssertionError(f"the workload saw a wrong read: {line}")
    durable = [op for op, pos in ended_at.items() if pos < last_flush_begin]
    return ops, durable, flushes


def candidates(baseline: list[int], ops: dict[int, tuple[str, int, int, int]], durable: list[int]) -> list[set[int]]:
    """Values each sector may hold after the crash."""
    durable_set = set(durable)
    state = list(baseline)
    later: list[set[int]] = [set() for _ in baseline]
    for op in sorted(ops):
        kind, first, n, gen = ops[op]
        value = gen if kind == "w" else -1
        for s in range(first, first + n):
            if op in durable_set:
                state[s] = value
                later[s] = set()  # per sector, operations are sequential (one worker)
            else:
                later[s].add(value)
    return [{state[s]} | later[s] for s in range(len(baseline))]


def check_invariant_1(cache: Path, m: Manifest) -> int:
    """On the raw crashed state: present and not modified ⇒ the manifest's bytes. Returns count."""
    ch = load_state(cache).chunks
    checked = 0
    with open(cache / "data", "rb") as f:
        for i in range(m.count):
            if ch.present(i) and not ch.modified(i) and not ch.zero(i):
                f.seek(i * CS)
                data = f.read(m.chunk_length(i))
                want = m.digest_at(i)
                ok = codec.is_zero(data) if want == codec.ZERO_DIGEST else codec.digest(data) == want
                assert ok, f"invariant 1: chunk {i} is present, not modified, and not the manifest's data"
                checked += 1
    return checked


def run_and_kill(args: list[str], wait: Callable[[subprocess.Popen[bytes]], None]) -> None:
    """Run a workload script (``args``: script and its arguments) until it says ready, let ``wait``
    pick the moment, and kill -9 it there."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        ready = child.stdout.readline()
        if ready != b"ready\n":
            err = child.stderr.read().decode() if child.stderr else ""
            raise AssertionError(f"workload did not start: {ready!r} {err}")
        wait(child)
        if child.poll() is not None:
            err = child.stderr.read().decode() if child.stderr else ""
            raise AssertionError(f"workload exited by itself ({child.returncode}): {err}")
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(10)


def sector_values(data: bytes, allowed: list[set[int]], what: str) -> list[int]:
    """The value of each sector of ``data``, each checked against the values it may hold."""
    observed = []
    for s in range(len(allowed)):
        v = decode_sector(s, data[s * SECTOR:(s + 1) * SECTOR])
        assert v is not None, f"{what}: sector {s} holds garbage"
        assert v in allowed[s], f"{what}: sector {s} holds {v}, allowed {sorted(allowed[s])}"
        observed.append(v)
    return observed


async def recover_and_read(cache: Path, repo: LocalRepository) -> bytes:
    """Reopen (recovery), read the written part, check invariant 1 again, close."""
    dev = await open_cache(cache, repo, readahead=0)
    try:
        data = result_bytes(await dev.read(0, RW_SECTORS * SECTOR))
        await dev.settle()
    finally:
        await dev.close()
    check_invariant_1(cache, dev.manifest)
    return data


def test_kill9_during_mixed_workload(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    m, base = make_base(repo)

    async def create(cache: Path) -> None:
        dev = await open_cache(cache, repo, m)
        await dev.close()

    rnd = random.Random(20240607)
    total_flushes = total_durable = total_checked = 0
    started = time.monotonic()
    cache = tmp_path
    baseline = base
    for it in range(ITERATIONS):
        if it % KILLS_PER_CACHE == 0:
            cache = tmp_path / f"cache{it}"
            asyncio.run(create(cache))
            baseline = base
        log_path = tmp_path / f"log{it}"
        base_path = tmp_path / f"baseline{it}.json"
        base_path.write_text(json.dumps(baseline))
        pause = rnd.uniform(0.05, 1.5)  # the kill's moment
        run_and_kill([str(WORKLOAD), str(cache), str(tmp_path / "repo"), str(log_path), str(base_path),
                      str((it + 1) * 10_000_000), str(rnd.randrange(1 << 30)), str(RW_SECTORS)],
                     lambda _child, pause=pause: time.sleep(pause))
        ops, durable, flushes = parse_log(log_path)
        total_flushes += flushes
        total_durable += len(durable)
        total_checked += check_invariant_1(cache, m)
        allowed = candidates(baseline, ops, durable)
        data = asyncio.run(recover_and_read(cache, repo))
        observed = sector_values(data, allowed[:RW_SECTORS], f"iteration {it}")
        baseline = observed + base[RW_SECTORS:]  # close() flushed: this is durable now
    repo.close()
    assert total_flushes > 0 and total_durable > 0 and total_checked > 0
    assert time.monotonic() - started < 120
