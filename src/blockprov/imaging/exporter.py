"""Export a version from a repository to a local file or block device (raw or qcow2).

Only non-zero chunks are fetched; a regular-file destination stays sparse where the image is
zero, a block device gets explicit zeros there. Chunks arrive in batches and are verified
(``codec.decode``) before they are written (docs/architecture.md, invariant 6). qcow2 goes through a raw scratch file
and ``qemu-img convert``.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockprov import codec
from blockprov.errors import CannotWrite, NoSpace, SourceError, UsageError
from blockprov.imaging import qemu
from blockprov.manifest import Manifest
from blockprov.names import Ref
from blockprov.repo.base import Repository

BATCH_BYTES = 8 << 20


def _batches(m: Manifest) -> Iterator[list[int]]:
    per = max(1, BATCH_BYTES // m.chunk_size)
    batch: list[int] = []
    for i in range(m.count):
        if m.is_zero(i):
            continue
        batch.append(i)
        if len(batch) >= per:
            yield batch
            batch = []
    if batch:
        yield batch


def export_image(repo: Repository, ref: Ref | str, dest: str | os.PathLike[str], *, fmt: str = "raw",
                 progress: Callable[[int], None] | None = None) -> Manifest:
    m = repo.resolve(ref)
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"unknown export format {fmt!r} (use raw or qcow2)")
    dest = Path(dest)
    is_block = _destination(dest)
    if fmt == "qcow2":
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.raw") if not is_block else \
            Path(tempfile.gettempdir()) / f".blockprov-export.{os.getpid()}.raw"
        try:
            _export_raw(repo, m, tmp, progress)
            try:
                qemu.convert(tmp, dest, src_format="raw", dst_format="qcow2")
            except SourceError as e:  # qemu-img read our own file: what failed is the write
                why = str(e.kwargs.get("why", e))
                if "No space left" in why:
                    raise NoSpace(msg=str(dest)) from None
                raise CannotWrite(path=str(dest), why=why) from None
        finally:
            tmp.unlink(missing_ok=True)
        return m
    _export_raw(repo, m, dest, progress)
    return m


def _destination(dest: Path) -> bool:
    """Whether ``dest`` is a block device (else a regular file, or nothing yet). Anything else —
    a character device, a FIFO, a socket — is refused before a byte is written: a failed export
    removes what it wrote, and ``export lab:v1 /dev/full`` once removed /dev/full (issue 27)."""
    try:
        mode = dest.stat().st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CannotWrite(path=str(dest), why=e.strerror or str(e)) from None
    if not stat.S_ISBLK(mode) and not stat.S_ISREG(mode):
        raise CannotWrite(path=str(dest), why="it is neither a regular file nor a block device (an export is a disk "
                                              "image written at offsets: a file, or a whole block device)")
    return stat.S_ISBLK(mode)


def _export_raw(repo: Repository, m: Manifest, dest: Path, progress: Callable[[int], None] | None) -> None:
    is_block = _destination(dest)
    try:
        fd = os.open(dest, os.O_WRONLY | (0 if is_block else os.O_CREAT | os.O_TRUNC), 0o644)
    except OSError as e:  # the write side failed: not a SourceError ("cannot read"), issue 17
        if e.errno in (28, 122):
            raise NoSpace(msg=str(dest)) from None
        raise CannotWrite(path=str(dest), why=e.strerror or str(e)) from None
    ok = False
    try:
        if is_block:
            if os.lseek(fd, 0, os.SEEK_END) < m.size:
                raise UsageError(f"{dest} is smaller than the image ({m.size} bytes)")
            zero = bytes(m.chunk_size)
            for i in range(m.count):
                if m.is_zero(i):
                    os.pwrite(fd, zero[:m.chunk_length(i)], i * m.chunk_size)
        else:
            os.ftruncate(fd, m.size)

        def fetch(batch: list[int]) -> list[tuple[int, bytes]]:
            ids = [m.digest_at(i) for i in batch]
            blobs = repo.get_blobs(ids)
            return [(i, codec.decode(b, cid)) for i, cid, b in zip(batch, ids, blobs, strict=True)]

        with ThreadPoolExecutor(3, thread_name_prefix="export") as pool:
            for done in pool.map(fetch, _batches(m)):
                for i, data in done:
                    os.pwrite(fd, data, i * m.chunk_size)
                if progress:
                    progress(sum(len(d) for _, d in done))
        os.fsync(fd)
        ok = True
    except OSError as e:
        if e.errno in (28, 122):  # ENOSPC, EDQUOT
            raise NoSpace(msg=str(dest)) from None
        raise
    finally:
        os.close(fd)
        if not ok and not is_block:  # no partial file left behind, as the qcow2 path does (issue 17)
            dest.unlink(missing_ok=True)
