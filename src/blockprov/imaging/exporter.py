"""Export a version from a repository to a local file or block device (raw or qcow2).

Only non-zero chunks are fetched; a regular-file destination stays sparse where the image is
zero, a block device gets explicit zeros there. A file is written beside its name and renamed
over it when complete (``durable.replacing``): an existing one is replaced only when asked
(``force``), and a failed or interrupted export leaves what was there. Chunks arrive in batches and are verified
(``codec.decode``) before they are written (docs/architecture.md, invariant 6). qcow2 goes through a raw scratch file
and ``qemu-img convert``.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockprov import codec, durable
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
                 progress: Callable[[int], None] | None = None, force: bool = False) -> Manifest:
    """Write version ``ref`` to ``dest``: a new file, an existing one only with ``force`` (it is
    replaced whole, atomically: until the export is complete and durable the old file stays, and a
    failed export leaves it as it was), or a block device (written in place)."""
    m = repo.resolve(ref)
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"unknown export format {fmt!r} (use raw or qcow2)")
    dest = Path(os.path.realpath(dest))  # a symlink's target is what is written (replaced beside it, not the link)
    is_block = _destination(dest, force)
    try:
        if is_block:
            _write(repo, m, dest, fmt, progress, is_block=True)
        else:
            with durable.replacing(dest, mode=0o644) as tmp:
                _write(repo, m, tmp, fmt, progress, is_block=False)
    except OSError as e:  # the write side failed: not a SourceError ("cannot read"), issue 17
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(msg=str(dest)) from None
        raise CannotWrite(path=str(dest), why=e.strerror or str(e)) from None
    return m


def _destination(dest: Path, force: bool) -> bool:
    """Whether ``dest`` is a block device (else a regular file, or nothing yet). An existing file
    is refused unless ``force`` (an export replaced one without a word, issue 27). Anything else —
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
    if stat.S_ISREG(mode) and not force:
        raise CannotWrite(path=str(dest), why="it exists; give --force to replace it")
    return stat.S_ISBLK(mode)


def _write(repo: Repository, m: Manifest, out: Path, fmt: str, progress: Callable[[int], None] | None, *,
           is_block: bool) -> None:
    """The export into ``out`` (a new empty file, or a block device)."""
    if fmt == "raw":
        _export_raw(repo, m, out, progress, is_block=is_block)
        return
    scratch = out.with_name(f".{out.name}.raw") if not is_block else \
        Path(tempfile.gettempdir()) / f".blockprov-export.{os.getpid()}.raw"
    try:
        _export_raw(repo, m, scratch, progress, is_block=False)
        try:
            qemu.convert(scratch, out, src_format="raw", dst_format="qcow2")
        except SourceError as e:  # qemu-img read our own file: what failed is the write
            why = str(e.kwargs.get("why", e))
            if "No space left" in why:
                raise NoSpace(msg=str(out)) from None
            raise CannotWrite(path=str(out), why=why) from None
    finally:
        scratch.unlink(missing_ok=True)


def _export_raw(repo: Repository, m: Manifest, dest: Path, progress: Callable[[int], None] | None, *,
                is_block: bool) -> None:
    fd = os.open(dest, os.O_WRONLY | (0 if is_block else os.O_CREAT | os.O_TRUNC), 0o644)
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
    finally:
        os.close(fd)
