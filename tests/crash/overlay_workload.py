"""Child process of tests/crash/test_overlay_crash.py: writes through several overlays of one base.

Usage: python overlay_workload.py BASE_DIR REPO_DIR GEN_BASE SEED RW_SECTORS OVERLAY LOG BASELINE [...]

Opens the base cache read-only and each OVERLAY over it, as the clones agent does, then runs
cache_workload's workers on every overlay at once: two workers per overlay over the same first
RW_SECTORS sectors (each overlay is its own disk), and a reader per overlay over the rest, which
the overlay reads through the base, so the base is filling from the repository at the kill.
Each overlay logs to its own LOG (format in cache_workload.py; a flush covers only its overlay).
Generations are unique across overlays (one counter), so a sector can tell which clone wrote it.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

from blockprov.cache import CacheDevice, base_source, repository_source
from blockprov.repo.local import LocalRepository
from tests.crash.cache_workload import Log, reader, worker

WORKERS_PER_OVERLAY = 2


async def main(base_dir: str, repo_dir: str, gen_base: int, seed: int, rw_sectors: int,
               overlays: list[tuple[str, str, str]]) -> None:
    repo = LocalRepository(repo_dir)
    base = await CacheDevice.open(base_dir, repository_source(repo, readahead=16 * 4096), repo=repo, create=False,
                                  read_only=True)
    devs = [await CacheDevice.open(d, base_source(base), repo=repo, create=False, checkpoint_records=40)
            for d, _, _ in overlays]
    rnd = random.Random(seed)
    counter = [0, gen_base]  # shared: op ids and generations are unique across overlays
    jobs = []
    step = rw_sectors // WORKERS_PER_OVERLAY
    # Boundaries 3 sectors past a chunk start: the two workers of an overlay share a chunk.
    bounds = [0] + [(k * step // 8) * 8 + 3 for k in range(1, WORKERS_PER_OVERLAY)] + [rw_sectors]
    for dev, (_, log_path, baseline_path) in zip(devs, overlays, strict=True):
        model: list[int] = json.loads(Path(baseline_path).read_text())
        log = Log(log_path)
        jobs.append(reader(dev, rw_sectors, len(model), model, log, random.Random(rnd.random())))
        jobs += [worker(k, dev, bounds[k], bounds[k + 1], model, log, counter, random.Random(rnd.random()))
                 for k in range(WORKERS_PER_OVERLAY)]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(*jobs)


if __name__ == "__main__":
    a = sys.argv[1:]
    rest = a[5:]
    asyncio.run(main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]),
                     [(rest[k], rest[k + 1], rest[k + 2]) for k in range(0, len(rest), 3)]))
