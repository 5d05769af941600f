"""The one alignment helper: split a byte range into chunk-sized pieces, and chunk indices into runs.

Pure arithmetic; every layer that works in chunks (cache, overlay, import) uses it so a request
is cut the same way everywhere. Ranges are half-open ([start, end)) throughout, as in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Piece(NamedTuple):
    chunk: int  # chunk index
    start: int  # offset inside the chunk
    length: int  # bytes in this chunk
    whole: bool  # the piece covers the whole chunk

    def offset(self, chunk_size: int) -> int:
        return self.chunk * chunk_size + self.start


def split(offset: int, length: int, chunk_size: int) -> Iterator[Piece]:
    """Cut [offset, offset+length) at chunk boundaries: unaligned head, aligned body, unaligned tail."""
    end = offset + length
    while offset < end:
        index, start = divmod(offset, chunk_size)
        n = min(chunk_size - start, end - offset)
        yield Piece(index, start, n, start == 0 and n == chunk_size)
        offset += n


def chunk_range(offset: int, length: int, chunk_size: int) -> range:
    """Indices of the chunks that [offset, offset+length) touches."""
    if length <= 0:
        return range(0)
    return range(offset // chunk_size, (offset + length - 1) // chunk_size + 1)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted distinct indices → maximal runs of consecutive ones, as half-open (start, end).

    The journal records ranges, so the cache turns the chunks a request touched into as few
    records as it can; ``[3, 4, 5, 9]`` → ``[(3, 6), (9, 10)]``. Unsorted input gives a run per
    break, still covering every index exactly once.
    """
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out
