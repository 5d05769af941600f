"""Replay a boot's read trace through NBD exports, one thread per export, all starting at one moment.

Run under Debian's python3 (its libnbd bindings: ``/usr/bin/python3 bench/storm_replay.py …``), by
bench/bench_storm.py. The trace (bench_storm.py ``capture``) holds every read a real boot of the
test image made: when it was submitted, when it completed, offset and length. A replay keeps the
boot's concurrency and its think times: a read is issued once the read that completed last before
it was submitted in the boot has completed here, plus the time the guest then spent before
submitting it (its CPU work); a read that had no completion before it is issued at its own time
from the start. So a slow read delays what depended on it, as in a real boot, and reads that were
in flight together are in flight together.

Every read's bytes are compared with the image's (``--image``): a single wrong byte is counted
(``mismatches``); a read that failed (EIO) is counted apart (``errors``), its buffer not compared.

Prints one JSON object: per export, ``ready`` (seconds from the start to the last completion),
``reads``, ``bytes``, ``mismatches``, ``errors``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import mmap
import sys
import threading
import time

import nbd  # Debian's python3-libnbd


def plan(trace: list[list[float]]) -> tuple[list[int], list[float]]:
    """For each read: the read it waits for (-1: none) and its delay after that one completed (or,
    for -1, after the start)."""
    done = sorted((c, j) for j, (_s, c, _o, _n) in enumerate(trace))
    times = [c for c, _j in done]
    deps, waits = [], []
    for s, _c, _o, _n in trace:
        k = bisect.bisect_right(times, s) - 1
        if k < 0:
            deps.append(-1)
            waits.append(s)
        else:
            deps.append(done[k][1])
            waits.append(s - done[k][0])
    return deps, waits


def replay(uri: str, trace: list[list[float]], deps: list[int], waits: list[float], start: float,
           image: mmap.mmap | None, out: dict[str, object]) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    n = len(trace)
    finished: list[float | None] = [None] * n
    inflight: dict[int, tuple[int, nbd.Buffer]] = {}
    nxt = completed = mismatches = errors = total = 0
    while completed < n:
        now = time.time()
        wake: float | None = None
        while nxt < n:
            d = deps[nxt]
            if d >= 0 and finished[d] is None:
                break
            at = (finished[d] + waits[nxt]) if d >= 0 else start + waits[nxt]  # type: ignore[operator]
            if at > now:
                wake = at
                break
            _s, _c, off, length = trace[nxt]
            buf = nbd.Buffer(int(length))
            inflight[h.aio_pread(buf, int(off))] = (nxt, buf)
            nxt += 1
        if inflight:
            h.poll(-1 if wake is None else max(0, int((wake - time.time()) * 1000)))
        elif wake is not None:
            time.sleep(max(0.0, wake - time.time()))
        while inflight:
            try:
                cookie = h.aio_peek_command_completed()
            except nbd.Error:
                break
            if cookie == 0:
                break
            i, buf = inflight.pop(cookie)
            failed = False
            try:
                h.aio_command_completed(cookie)
            except nbd.Error:
                errors += 1
                failed = True
            finished[i] = time.time()
            completed += 1
            _s, _c, off, length = trace[i]
            total += int(length)
            # a failed read (EIO) is an error, not wrong bytes: its buffer holds nothing it was given
            if not failed and image is not None and buf.to_bytearray() != image[int(off):int(off) + int(length)]:
                mismatches += 1
    h.shutdown()
    out.update(ready=max(f for f in finished if f is not None) - start, reads=n, bytes=total,
               mismatches=mismatches, errors=errors)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, help="the trace JSON ({'reads': [[submit, complete, offset, length]]})")
    ap.add_argument("--start", type=float, required=True, help="unix time at which every replay starts")
    ap.add_argument("--image", help="the raw image: every read is compared with it")
    ap.add_argument("uris", nargs="+")
    a = ap.parse_args()
    with open(a.trace) as f:
        trace = json.load(f)["reads"]
    deps, waits = plan(trace)
    image = None
    if a.image:
        with open(a.image, "rb") as f:
            image = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    results: list[dict[str, object]] = [{"uri": u} for u in a.uris]

    def run(k: int) -> None:
        try:
            replay(a.uris[k], trace, deps, waits, a.start, image, results[k])
        except Exception as e:  # one export's failure is reported, the others go on
            results[k]["failed"] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(a.uris))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump({"results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
