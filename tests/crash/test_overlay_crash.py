"""kill -9 a process writing through several overlays (clones) of one shared base cache.

Each overlay is its own disk over the same read-only base (cache/overlay.py). Checked after every
kill, on the raw crashed state and after reopening as the clones agent does:
- (docs/architecture.md, invariant 1) in the base and in every overlay, a chunk marked present
  and not modified holds exactly the manifest's data (an overlay's copy-on-write copies included);
- (docs/architecture.md, invariant 3) every write or zeroing acknowledged through an overlay
  before a completed FLUSH of that overlay is in that overlay; a sector touched after that flush
  holds its flushed value or the value of a later operation *on the same overlay*; generations
  are unique across overlays, so a write that leaked into another clone fails the check;
- the base still reads as the image: nothing written through an overlay reaches it.
Half the kills land just after a given flush (mid-workload on any machine), half at a random
moment. Bounded: 6 kills, a fresh base and overlays every 3, each child living at most ~5 s (~1 s usually).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from blockprov.cache import CacheDevice
from blockprov.device.base import result_bytes
from blockprov.manifest import Manifest
from blockprov.repo.local import LocalRepository
from tests.caches import open_cache
from tests.crash.cache_workload import SECTOR
from tests.crash.test_cache_crash import (
    RW_SECTORS,
    candidates,
    check_invariant_1,
    make_base,
    parse_log,
    run_and_kill,
    sector_values,
)

pytestmark = pytest.mark.crash

CLONES = 3
ITERATIONS = 6
KILLS_PER_ROOT = 3
WAIT_FOR_FLUSH = 5.0
WORKLOAD = Path(__file__).with_name("overlay_workload.py")


async def create(root: Path, repo: LocalRepository, m: Manifest) -> None:
    dev = await open_cache(root / "base", repo, m, read_only=True)
    await dev.close()
    for k in range(CLONES):
        dev = await open_cache(root / f"o{k}", repo, m, base_cache=root / "base")
        await dev.close()


async def recover_and_read(root: Path, repo: LocalRepository) -> tuple[bytes, list[bytes]]:
    """Reopen base and overlays (recovery), read the written part of each, close."""
    base = await open_cache(root / "base", repo, create=False, read_only=True, readahead=0)
    overlays: list[CacheDevice] = []
    try:
        for k in range(CLONES):
            overlays.append(await open_cache(root / f"o{k}", repo, create=False, base=base))
        got = [result_bytes(await dev.read(0, RW_SECTORS * SECTOR)) for dev in overlays]
        base_got = result_bytes(await base.read(0, RW_SECTORS * SECTOR))
        await base.settle()
    finally:
        for dev in overlays:
            await dev.close()
        await base.close()
    return base_got, got


async def read_base_image(cache: Path, repo: LocalRepository, m: Manifest) -> bytes:
    """The written part of the image as a plain cache of it reads (what every base must read as)."""
    dev = await open_cache(cache, repo, m, readahead=0)
    try:
        return result_bytes(await dev.read(0, RW_SECTORS * SECTOR))
    finally:
        await dev.close()


def flushes_logged(logs: list[Path]) -> int:
    return sum(("\n" + p.read_text()).count("\nFE ") for p in logs if p.exists())


def kill_moment(child: subprocess.Popen[bytes], logs: list[Path], rnd: random.Random, it: int) -> None:
    """Return when the workload is to be killed."""
    if it % 2:
        time.sleep(rnd.uniform(0.05, 0.5))
        return
    # Surely mid-workload whatever this machine's speed: just after the n-th completed flush.
    n = rnd.randint(1, 4)
    deadline = time.monotonic() + WAIT_FOR_FLUSH
    while flushes_logged(logs) < n and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)


def test_kill9_writing_through_several_overlays_of_one_base(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    m, base_values = make_base(repo)
    base_bytes = None
    rnd = random.Random(20261202)
    total_flushes = total_durable = total_checked = 0
    started = time.monotonic()
    root = tmp_path
    baselines: list[list[int]] = []
    for it in range(ITERATIONS):
        if it % KILLS_PER_ROOT == 0:
            root = tmp_path / f"clones{it}"
            asyncio.run(create(root, repo, m))
            baselines = [list(base_values) for _ in range(CLONES)]
        args: list[str] = []
        logs: list[Path] = []
        for k in range(CLONES):
            logs.append(tmp_path / f"log{it}-{k}")
            baseline_path = tmp_path / f"baseline{it}-{k}.json"
            baseline_path.write_text(json.dumps(baselines[k]))
            args += [str(root / f"o{k}"), str(logs[-1]), str(baseline_path)]
        run_and_kill([str(WORKLOAD), str(root / "base"), str(tmp_path / "repo"), str((it + 1) * 10_000_000),
                      str(rnd.randrange(1 << 30)), str(RW_SECTORS), *args],
                     functools.partial(kill_moment, logs=logs, rnd=rnd, it=it))
        allowed = []
        for k in range(CLONES):
            ops, durable, flushes = parse_log(logs[k])
            total_flushes += flushes
            total_durable += len(durable)
            allowed.append(candidates(baselines[k], ops, durable))
            total_checked += check_invariant_1(root / f"o{k}", m)
        total_checked += check_invariant_1(root / "base", m)
        base_got, got = asyncio.run(recover_and_read(root, repo))
        if base_bytes is None:
            base_bytes = asyncio.run(read_base_image(tmp_path / "reference", repo, m))
        assert base_got == base_bytes, f"iteration {it}: the shared base changed"
        for k in range(CLONES):
            observed = sector_values(got[k], allowed[k][:RW_SECTORS], f"iteration {it}: overlay {k}")
            baselines[k] = observed + base_values[RW_SECTORS:]  # close() flushed: durable now
            check_invariant_1(root / f"o{k}", m)
    repo.close()
    assert total_flushes > 0 and total_durable > 0 and total_checked > 0, (total_flushes, total_durable)
    assert time.monotonic() - started < 60

