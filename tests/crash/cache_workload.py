"""Child process of tests/crash/test_cache_crash.py: a mixed workload directly on a CacheDevice.

Usage: python cache_workload.py CACHE_DIR REPO_DIR LOG BASELINE GEN_BASE SEED RW_SECTORS

Four workers each own a disjoint run of 512-byte sectors within the first RW_SECTORS (run
boundaries fall inside chunks, so neighbouring workers share chunks) and loop over writes,
write-zeroes, trims, reads and flushes. A reader reads the rest of the image (never written), so
fills from the repository are in flight when the kill comes.
Sector ``s`` written by operation generation ``g`` holds ``pack("<QQ", s + 1, g) * 32`` (never
all zeros, even for the base's generation 0); zeros mean value -1. Reads are checked exactly
against the worker's model (exit 3 on a mismatch).

The log (append-only, one line per event) lets the parent decide what must have survived::

    B <op> <kind> <first sector> <sectors> <gen>   before an operation is issued
    E <op>                                          after it completed
    FB <flush> / FE <flush>                         around a flush (the log is fsynced after FE)

Writes survive a kill -9 in the page cache, so only FE needs an fsync of the log.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import sys
from pathlib import Path

from blockprov.cache import CacheDevice, repository_source
from blockprov.device.base import result_bytes
from blockprov.repo.local import LocalRepository

SECTOR = 512
WORKERS = 4


def sector_bytes(s: int, value: int) -> bytes:
    return bytes(SECTOR) if value < 0 else struct.pack("<QQ", s + 1, value) * (SECTOR // 16)


def decode_sector(s: int, data: bytes) -> int | None:
    """The value a sector holds, or None when it is neither zeros nor a valid pattern for s."""
    if data == bytes(SECTOR):
        return -1
    sec, gen = struct.unpack_from("<QQ", data)
    if sec != s + 1 or data != sector_bytes(s, gen):
        return None
    return gen


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def line(self, text: str, sync: bool = False) -> None:
        os.write(self.fd, (text + "\n").encode())
        if sync:
            os.fsync(self.fd)


async def worker(k: int, dev: CacheDevice, lo: int, hi: int, model: list[int], log: Log,
                 counter: list[int], rnd: random.Random) -> None:
    while True:
        first = rnd.randrange(lo, hi)
        n = min(rnd.randint(1, 24), hi - first)
        kind = rnd.choices(["w", "z", "t", "r", "f"], weights=[50, 8, 6, 30, 6])[0]
        counter[0] += 1
        op = counter[0]
        gen = counter[1] + op
        if kind == "f":
            log.line(f"FB {op}")
            await dev.flush()
            log.line(f"FE {op}", sync=True)
            continue
        if kind == "r":
            got = result_bytes(await dev.read(first * SECTOR, n * SECTOR))
            want = b"".join(sector_bytes(s, model[s]) for s in range(first, first + n))
            if got != want:
                bad = next(s for s in range(first, first + n)
                           if got[(s - first) * SECTOR:(s - first + 1) * SECTOR] != sector_bytes(s, model[s]))
                log.line(f"MISMATCH worker {k} sector {bad} expected {model[bad]}", sync=True)
                os._exit(3)
            continue
        log.line(f"B {op} {kind} {first} {n} {gen}")
        if kind == "w":
            data = b"".join(sector_bytes(s, gen) for s in range(first, first + n))
            await dev.write(first * SECTOR, data, fua=rnd.random() < 0.05)
            for s in range(first, first + n):
                model[s] = gen
        else:
            if kind == "z":
                await dev.write_zeroes(first * SECTOR, n * SECTOR)
            else:
                await dev.trim(first * SECTOR, n * SECTOR)
            for s in range(first, first + n):
                model[s] = -1
        log.line(f"E {op}")


async def reader(dev: CacheDevice, lo: int, hi: int, model: list[int], log: Log, rnd: random.Random) -> None:
    while True:
        first = rnd.randrange(lo, hi)
        n = min(rnd.randint(1, 128), hi - first)
        got = result_bytes(await dev.read(first * SECTOR, n * SECTOR))
        if got != b"".join(sector_bytes(s, model[s]) for s in range(first, first + n)):
            log.line(f"MISMATCH reader at sector {first}", sync=True)
            os._exit(3)


async def main(cache_dir: str, repo_dir: str, log_path: str, baseline_path: str, gen_base: int,
               seed: int, rw_sectors: int) -> None:
    repo = LocalRepository(repo_dir)
    dev = await CacheDevice.open(cache_dir, repository_source(repo, readahead=16 * 4096), repo=repo,
                                 checkpoint_records=40)
    model: list[int] = json.loads(Path(baseline_path).read_text())
    sectors = rw_sectors
    log = Log(log_path)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    rnd = random.Random(seed)
    # Boundaries 3 sectors past chunk starts: neighbouring workers share a chunk.
    step = sectors // WORKERS
    bounds = [0] + [min(sectors, (k * step // 8) * 8 + 3) for k in range(1, WORKERS)] + [sectors]
    counter = [0, gen_base]
    await asyncio.gather(reader(dev, sectors, len(model), model, log, random.Random(rnd.random())),
                         *(worker(k, dev, bounds[k], bounds[k + 1], model, log, counter,
                                  random.Random(rnd.random())) for k in range(WORKERS)))


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), int(a[6])))
