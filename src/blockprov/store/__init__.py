"""Chunk stores: where chunk blobs live. One interface, one module per backend."""

from .base import ChunkStore

__all__ = ["ChunkStore"]
