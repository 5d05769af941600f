"""kill -9 while first writes keep golden copies (cache/reserve.py): a restore then needs no repository.

A child opens a fully present cache with a golden reserve large enough for every chunk it will
write, and overwrites clean chunks at random (partial writes, whole chunks, trims), flushing now
and then, until it is killed at a random moment. Then, with the repository switched off, the
cache is reopened (recovery), reset, and read whole: it must equal the base image byte for byte —
every chunk whose data area the child changed had its golden copy durable first (the crash rule),
and a chunk whose copy was cut short was not changed either. Bounded: 6 kills, each child ~0.1–1.5 s.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import pytest

from blockprov import codec
from blockprov.cache import Reserve
from blockprov.device.base import result_bytes
from blockprov.errors import RepositoryUnavailable
from blockprov.manifest import build
from blockprov.repo.local import LocalRepository
from tests.caches import open_cache
from tests.crash.test_cache_crash import run_and_kill
from tests.unit.test_reserve import region

pytestmark = pytest.mark.crash

CS = 4096
CHUNKS = 256
KILLS = 6

WORKLOAD = r"""
import asyncio, random, sys
from blockprov.cache import CacheDevice, Reserve, repository_source
from blockprov.repo.local import LocalRepository
cache, repo_dir, reserve_path, seed = sys.argv[1:5]
CS = 4096

async def main():
    repo = LocalRepository(repo_dir)
    reserve = Reserve.open(reserve_path)
    dev = await CacheDevice.open(cache, reserve.source(repository_source(repo, readahead=0)), repo=repo)
    n = dev.manifest.count
    rnd = random.Random(int(seed))
    print("ready", flush=True)
    while True:
        c = rnd.randrange(n)
        kind = rnd.random()
        if kind < 0.5:
            await dev.write(c * CS + rnd.randrange(CS - 64), rnd.randbytes(64))
        elif kind < 0.85:
            await dev.write(c * CS, rnd.randbytes(CS * min(3, n - c)))
        else:
            await dev.trim(c * CS, CS)
        if rnd.random() < 0.1:
            await dev.flush()

asyncio.run(main())
"""


class Offline(LocalRepository):
    def get_blobs(self, ids: object) -> list[bytes]:  # type: ignore[override]
        raise RepositoryUnavailable(url=self.url, why="switched off by the test")


def test_kill9_during_first_writes_then_an_offline_restore_is_pristine(tmp_path: Path) -> None:
    repo = LocalRepository(tmp_path / "repo")
    rnd = random.Random(20261203)
    parts = [rnd.randbytes(CS) if i % 7 else bytes(CS) for i in range(CHUNKS)]
    ids = []
    for p in parts:
        if codec.is_zero(p):
            ids.append(codec.ZERO_DIGEST)
            continue
        cid = codec.digest(p)
        repo.put_blobs([(cid, codec.encode(p))])
        ids.append(cid)
    m = build("golden", CHUNKS * CS, CS, ids)
    repo.commit(m)
    content = b"".join(parts)
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    offline = Offline(tmp_path / "repo")
    kept_total = 0

    async def hydrate(cache: Path, reserve: Path) -> None:
        r = Reserve.open(reserve)
        dev = await open_cache(cache, repo, m, reserve=r)
        assert result_bytes(await dev.read(0, m.size)) == content
        await dev.close()
        r.close()

    async def restore_offline(cache: Path, reserve: Path) -> int:
        r = Reserve.open(reserve)
        dev = await open_cache(cache, offline, readahead=0, fetch_timeout=0.2, reserve=r)
        modified = len(dev.modified_chunks())
        await dev.reset_chunks()
        await dev.settle()
        got = result_bytes(await dev.read(0, m.size))
        assert got == content, "an offline restore after kill -9 is not the base image"
        await dev.close()
        r.close()
        return modified

    started = time.monotonic()
    for it in range(KILLS):
        cache, reserve = tmp_path / f"cache{it}", region(tmp_path / f"reserve{it}", CHUNKS)
        asyncio.run(hydrate(cache, reserve))
        pause = rnd.uniform(0.1, 1.5)
        run_and_kill([str(script), str(cache), str(tmp_path / "repo"), str(reserve), str(it)],
                     lambda _child, p=pause: time.sleep(p))
        kept_total += asyncio.run(restore_offline(cache, reserve))
    print(f"{KILLS} kills, {kept_total} modified chunks restored offline from the reserve, "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    assert kept_total > 0
