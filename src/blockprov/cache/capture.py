"""Snapshot capture: a snapshot reads a quiesced cache's chunks while clients go on writing.

A snapshot (agent/lifecycle.py) starts the capture while the cache is quiesced, then reads its
chunks in groups with clients served in between. The first write to a chunk the snapshot has not
read yet saves the chunk's old content here before changing it, so the snapshot gets the disk as
it was at the quiesce. Everything touching a capture runs on the event loop thread, so a chunk is
either read by the snapshot before any write changes it, or saved by the first write before its
data changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence


class Capture:
    """What a snapshot still has to read (``pending``) and old content saved for it by writes."""

    def __init__(self, pending: Iterable[int], read_chunk: Callable[[int], bytes]) -> None:
        self.pending = set(pending)
        self.captured: dict[int, bytes] = {}
        self._read_chunk = read_chunk  # the chunk as the data file holds it now

    def save_old(self, chunks: Iterable[int]) -> None:
        """Before these chunks change: keep the content of those the snapshot has yet to read."""
        for c in chunks:
            if c in self.pending:
                self.pending.discard(c)
                self.captured[c] = self._read_chunk(c)

    def read(self, indices: Sequence[int]) -> list[bytes]:
        """Content of chunks as they were when the capture began (raises OSError)."""
        out = []
        for i in indices:
            data = self.captured.pop(i, None)
            if data is None:
                self.pending.discard(i)
                data = self._read_chunk(i)
            out.append(data)
        return out
