"""A deterministic NBD workload for the crash test, run by Debian's python with libnbd.

Stdlib + libnbd only: the test imports ``plan`` to know what each write was, and runs this file as
the client (``/usr/bin/python3 nbd_workload.py SOCK SEED FIRST_SLOT LOG``). Each write goes to its
own 64 KiB slot (never rewritten), so after a crash every write acknowledged before a completed
flush can be checked exactly. After each completed flush the index of the last write it covers is
appended to LOG and fsynced.
"""

from __future__ import annotations

import os
import random
import sys

SLOT = 64 * 1024
OPS_PER_RUN = 40


def plan(seed: int, first_slot: int) -> list[tuple[int, int, int, int]]:
    """[(offset, length, fill byte, slot)] for one run: partial and whole-chunk writes."""
    rnd = random.Random(seed)
    ops = []
    for k in range(OPS_PER_RUN):
        slot = first_slot + k
        if rnd.random() < 0.3:
            off, ln = 0, SLOT  # whole chunk: no fetch needed
        else:
            off = rnd.randrange(0, SLOT - 512, 512)
            ln = rnd.randrange(512, SLOT - off + 1, 512)
        ops.append((slot * SLOT + off, ln, 1 + (seed * 31 + k) % 255, slot))
    return ops


def main() -> None:
    import nbd  # Debian's libnbd bindings

    sock, seed, first_slot, log_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rnd = random.Random(seed ^ 0x5A5A)
    h = nbd.NBD()
    h.connect_unix(sock)
    size = h.get_size()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for n, (off, ln, fill, _slot) in enumerate(plan(seed, first_slot)):
        h.pwrite(bytes([fill]) * ln, off)
        for _ in range(2):  # reads fill missing chunks (fetch path) while writes happen
            roff = rnd.randrange(0, size - 65536, 512)
            h.pread(rnd.randrange(512, 65536, 512), roff)
        if n % 4 == 3:
            h.flush()
            os.write(fd, f"{seed} {n}\n".encode())
            os.fsync(fd)
    h.shutdown()


if __name__ == "__main__":
    main()
