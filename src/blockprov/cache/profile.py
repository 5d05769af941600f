"""A cache's boot profile: the order in which chunks were first read over the cache's life.

The first boot of an image version reads its chunks in the order a boot needs them; the agent
hands that order to the repository (agent/instance.py) so later boots prefetch in that order.
The order is kept in the cache directory's ``profile`` file (u32 little endian chunk indices) so
it survives restarts. It is only a hint: it is written at checkpoints, and a crash loses at most
the reads since the last one; a file that does not fit the image is ignored.
"""

from __future__ import annotations

import logging
from array import array
from pathlib import Path

from blockprov.durable import atomic_write

log = logging.getLogger(__name__)

PROFILE_NAME = "profile"


class ReadOrder:
    """First-read order of chunks. ``seen`` is public so the device's read path can test it with
    one index (a read of chunks already seen, nearly all of them, costs no call)."""

    def __init__(self, count: int) -> None:
        self.seen = bytearray(count)
        self._order = array("I")
        self._saved = 0

    def record(self, a: int, b: int) -> None:
        """Chunks [a, b) were read."""
        seen = self.seen
        for i in range(a, b):
            if not seen[i]:
                seen[i] = 1
                self._order.append(i)

    def order(self) -> list[int]:
        return self._order.tolist()

    @property
    def unsaved(self) -> bool:
        return len(self._order) != self._saved

    def load(self, cache_dir: Path) -> None:
        try:
            raw = (cache_dir / PROFILE_NAME).read_bytes()
        except FileNotFoundError:
            return
        order = array("I")
        order.frombytes(raw[:len(raw) // 4 * 4])
        if order.itemsize != 4 or any(i >= len(self.seen) for i in order):
            log.warning("cache %s: ignoring a read-order profile that does not fit the image", cache_dir)
            return
        for i in order:
            if not self.seen[i]:
                self.seen[i] = 1
                self._order.append(i)
        self._saved = len(self._order)

    def save(self, cache_dir: Path) -> None:
        """Written at checkpoints (only a hint: a crash loses at most the reads since the last one)."""
        n = len(self._order)
        if n != self._saved:
            atomic_write(cache_dir / PROFILE_NAME, self._order[:n].tobytes())
            self._saved = n
