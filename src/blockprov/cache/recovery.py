"""A cache's recovery after an unclean stop: no manual step, before it serves.

``CacheDevice.open`` replays the journal (cache/journal.py); after an unclean stop it then
re-reads and re-hashes the chunks that replay marked present and not modified (at most what was
filled since the last checkpoint: ``checkpoint_fill_bytes`` bounds it) and forgets (``drop``)
any that do not match the manifest, so invariant 1 holds before the first read is answered;
then it checkpoints. Tests: tests/crash/.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from blockprov.align import runs
from blockprov.cache.core import Core
from blockprov.cache.maps import MODIFIED, PRESENT, ZERO, Kind
from blockprov.codec import ZERO_DIGEST, digest, is_zero

log = logging.getLogger("blockprov.cache.device")


async def verify(c: Core, present: list[tuple[int, int]]) -> tuple[int, int]:
    """Re-hash the chunks ``present`` names that are present and not modified; forget those that
    do not match. Returns (chunks verified, chunks dropped)."""
    fl = c.flags
    todo = sorted({i for a, b in present for i in range(a, b) if fl[i] & (PRESENT | MODIFIED | ZERO) == PRESENT})
    if not todo:
        return 0, 0
    step = max(1, len(todo) // 8 + 1)
    groups = [todo[k:k + step] for k in range(0, len(todo), step)]
    results = await asyncio.gather(*(c.run(_verify_group, c, g) for g in groups))
    bad = sorted(i for r in results for i in r)
    for x, y in runs(bad):
        c.state.apply(Kind.DROP, x, y)
    if bad:
        log.warning("cache %s: %d of %d recently filled chunk(s) did not match the manifest after an "
                    "unclean stop; they will be fetched again", c.cache_dir, len(bad), len(todo))
    return len(todo), len(bad)


def _verify_group(c: Core, chunks: Sequence[int]) -> list[int]:
    m = c.manifest
    bad = []
    for i in chunks:
        data = c.read_chunk(i)
        want = m.digest_at(i)
        ok = is_zero(data) if want == ZERO_DIGEST else digest(data) == want
        if not ok:
            bad.append(i)
    return bad
