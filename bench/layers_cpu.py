"""CPU cost of the cache's hot read calls, in-process: what issue 23 changed, measured where a
loaded machine cannot blur it.

End-to-end figures (bench/layers_ab.py) move by tens of percent from one run to the next when
other work shares the machine's two cores; the CPU time a call costs (``time.process_time`` over
many calls, this process only) hardly does. Run with each checkout's own interpreter, interleaved
(the script prints one JSON line per run):

    ../wt-base/.venv/bin/python bench/layers_cpu.py     # main before the change
    .venv/bin/python bench/layers_cpu.py                # after it

What it times, on a 256 MiB image of random data with 64 KiB chunks in an embedded repository,
every chunk local (no I/O is waited for: ``read`` answers with pieces of the data file, which the
NBD server would sendfile):

- ``CacheDevice.read`` of 4 KiB at random offsets of a hydrated cache (the 4 KiB QD16/QD1 path);
- ``CacheDevice.read`` of 1 MiB in order (the sequential path);
- the same two on an overlay over that cache (the read-through route: the base's pieces);
- a 4 KiB write to a chunk already modified (the common write).

Each is the median of ``--repeat`` runs of ``--calls`` calls, in µs of CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blockprov
from blockprov.cache.device import CacheDevice
from blockprov.imaging.importer import import_image
from blockprov.repo.local import LocalRepository

CS = 64 << 10
SIZE = 256 << 20


async def open_cache(path: Path, repo: LocalRepository, m: Any, base: CacheDevice | None = None,
                     base_cache: Path | None = None) -> CacheDevice:
    """Either version of ``CacheDevice.open``: before issue 23 it built its own source."""
    params = inspect.signature(CacheDevice.open).parameters
    if "source" in params and list(params)[1] == "source":  # after: the caller builds the layers
        from blockprov.cache import base_source, repository_source
        overlay = base is not None or base_cache is not None
        source = base_source(base) if overlay else repository_source(repo)
        kw: dict[str, Any] = {"base_cache": base_cache} if base_cache is not None else {}
        return await CacheDevice.open(path, source, m, repo=repo, **kw)
    kw = {"base": base} if base is not None else {}
    if base_cache is not None:
        kw["base_cache"] = base_cache
    return await CacheDevice.open(path, repo, m, **kw)  # type: ignore[arg-type]


async def cpu_per_call(calls: int, fn: Any, args: list[tuple[int, ...]]) -> float:
    t = time.process_time()
    for a in args[:calls]:
        await fn(*a)
    return (time.process_time() - t) / calls * 1e6


async def run(tmp: Path, calls: int, repeat: int) -> dict[str, float]:
    img = tmp / "img.raw"
    img.write_bytes(os.urandom(SIZE))
    repo = LocalRepository(tmp / "repo")
    import_image(repo, img, "bench:v1", chunk_size=CS)
    m = repo.resolve("bench:v1")
    dev = await open_cache(tmp / "c", repo, m)
    await dev.read(0, SIZE)  # hydrate
    await dev.settle()
    rnd = random.Random(23)
    small = [(rnd.randrange(SIZE // 4096) * 4096, 4096) for _ in range(calls)]
    seq = [((i * (1 << 20)) % SIZE, 1 << 20) for i in range(calls)]
    out: dict[str, list[float]] = {k: [] for k in ("cache 4K", "cache 1M seq", "overlay 4K", "overlay 1M seq",
                                                   "write 4K modified")}
    # an overlay over the hydrated cache (created, then opened over the open base)
    ov = await open_cache(tmp / "ov", repo, m, base=dev, base_cache=tmp / "c")
    await ov.write(0, b"w" * 4096)  # chunk 0 modified: the common write's target
    for _ in range(repeat):
        out["cache 4K"].append(await cpu_per_call(calls, dev.read, small))
        out["cache 1M seq"].append(await cpu_per_call(calls, dev.read, seq))
        out["overlay 4K"].append(await cpu_per_call(calls, ov.read, small))
        out["overlay 1M seq"].append(await cpu_per_call(calls, ov.read, seq))
        out["write 4K modified"].append(await cpu_per_call(
            calls, lambda o: ov.write(o, b"x" * 4096), [(rnd.randrange(16) * 4096,) for _ in range(calls)]))
    await ov.close()
    await dev.close()
    repo.close()
    return {k: round(statistics.median(v), 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BLOCKPROV_BENCH_WORK")) as d:
        got = asyncio.run(run(Path(d), a.calls, a.repeat))
    print(json.dumps({"tree": str(Path(blockprov.__file__).resolve().parents[2]), "cpu_us_per_call": got,
                      "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
