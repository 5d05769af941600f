"""Chunk stores: where chunk blobs live. One interface, one module per backend."""

from blockprov.store.base import ChunkStore

__all__ = ["ChunkStore"]
