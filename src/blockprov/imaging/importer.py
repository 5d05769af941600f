"""Import a disk image into a repository: chunk, hash, deduplicate, compress, upload, commit.

Sparse-aware: holes found with SEEK_DATA/SEEK_HOLE are never read, and all-zero chunks become the
manifest's zero marker (never stored, never sent). Non-raw formats (qcow2, vmdk, vhdx, …) are
first converted to a sparse raw scratch file by ``qemu-img``, the reference reader.

Work is pipelined over a small thread pool: each worker takes a multi-megabyte segment, hashes
its chunks (BLAKE3 and zstd release the GIL), asks the repository which are missing (one batched
question per segment, so a remote repository costs one round trip per segment), compresses and
uploads only those. Segments finish in any order; ids are assembled in order.

Boot profiles (issue 15 item 1): an import under an image that has versions descends from one
(``parent``) and inherits its boot profile through it; one under a new name that shares most of
its chunks with an existing version that has a profile is labelled ``profile-from: IMAGE@ID``
and inherits through that (catalog/inherit.py), so no bootable import starts cold that need not.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockprov import codec
from blockprov.catalog.inherit import MIN_SHARED, PROFILE_FROM
from blockprov.errors import BlockprovError, ImageNotFound, SourceError, UsageError
from blockprov.imaging import qemu
from blockprov.manifest import DEFAULT_CHUNK, Manifest, check_geometry, chunk_count
from blockprov.names import Ref, parse_ref
from blockprov.repo.base import Repository

SEGMENT_BYTES = 8 << 20
DONOR_IMAGES = 32  # images looked at for a profile donor of a new image's import
DONOR_VERSIONS = 4  # newest versions of each image asked whether they have a profile
DONOR_CHECKS = 8  # versions with a profile whose manifests are compared
WORKERS = 4  # more than the cores: file reads and pack writes overlap the hashing and zstd

Progress = Callable[[int], None]


@dataclass
class ImportStats:
    source_bytes: int = 0  # virtual size
    bytes_read: int = 0  # bytes actually read (holes skipped)
    chunks: int = 0
    zero_chunks: int = 0
    unique_chunks: int = 0
    new_chunks: int = 0
    new_bytes_stored: int = 0  # compressed bytes added to the repository
    seconds: float = 0.0
    _seen: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def dedup_ratio(self) -> float:
        """Logical non-zero bytes per byte newly stored (higher is better)."""
        return self.bytes_read / self.new_bytes_stored if self.new_bytes_stored else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        d["dedup_ratio"] = None if self.new_bytes_stored == 0 else round(self.dedup_ratio, 3)
        d["throughput_mib_s"] = round(self.source_bytes / (1 << 20) / self.seconds, 1) if self.seconds else None
        return d


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the regions that may hold data; holes are skipped without reading."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains (or SEEK_DATA unsupported → whole file)
            if pos == 0 and not _supports_seek_data(fd):
                yield 0, size
            return
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:
            end = size
        yield start, end
        pos = end


def _supports_seek_data(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_HOLE)
        return True
    except OSError:
        return False


def _source_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def _chunk_has_data(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and e > start for s, e in extents)


def _process_segment(repo: Repository, fd: int, seg_start: int, seg_end: int, size: int, chunk_size: int,
                     extents: list[tuple[int, int]], stats: ImportStats, progress: Progress | None) -> list[bytes]:
    ids: list[bytes] = []
    fresh: dict[bytes, memoryview] = {}
    buf = bytearray(seg_end - seg_start)
    read = 0
    for s, e in extents:  # read only the data regions of this segment; holes stay zero
        s, e = max(s, seg_start), min(e, seg_end)
        if s < e:
            n = os.preadv(fd, [memoryview(buf)[s - seg_start:e - seg_start]], s)
            if n < e - s and s + n < size:
                raise SourceError(path=f"fd {fd}", why=f"short read at offset {s + n}")
            read += e - s
    mv = memoryview(buf)
    for off in range(seg_start, seg_end, chunk_size):
        end = min(off + chunk_size, seg_end)
        piece = mv[off - seg_start:end - seg_start]
        if not _chunk_has_data(extents, off, end) or codec.is_zero(piece):
            ids.append(codec.ZERO_DIGEST)
            continue
        cid = codec.digest(piece)
        ids.append(cid)
        if cid not in stats._seen:
            stats._seen.add(cid)
            fresh[cid] = piece
    new_bytes = 0
    items: list[tuple[bytes, bytes]] = []
    if fresh:
        missing = repo.missing(list(fresh))
        items = [(cid, codec.encode(fresh[cid])) for cid in missing]
        if items:
            repo.put_blobs(items, trusted=True)
            new_bytes = sum(len(b) for _, b in items)
    with stats._lock:
        stats.new_chunks += len(items)
        stats.new_bytes_stored += new_bytes
        stats.bytes_read += read
    if progress:
        progress(seg_end - seg_start)
    return ids


def import_image(repo: Repository, source: str | os.PathLike[str], ref: Ref | str, *,
                 chunk_size: int = DEFAULT_CHUNK, fmt: str | None = None, labels: dict[str, str] | None = None,
                 progress: Progress | None = None, on_size: Callable[[int], None] | None = None,
                 scratch_dir: str | os.PathLike[str] | None = None) -> tuple[str, ImportStats]:
    """Import ``source`` as a new version tagged ``ref`` (``NAME:TAG``); returns (version id, stats)."""
    target = ref if isinstance(ref, Ref) else parse_ref(ref, allow_version=False)
    if target.version is not None:
        raise UsageError("import needs NAME:TAG, not NAME@ID: version ids are assigned by the repository")
    src = Path(source)
    if not src.exists():
        raise SourceError(path=str(src), why="no such file")
    if not os.access(src, os.R_OK):
        raise SourceError(path=str(src), why="permission denied")
    if src.is_dir():
        raise SourceError(path=str(src), why="is a directory")
    mode = src.stat().st_mode
    if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):  # /dev/null was imported as an empty disk (issue 27)
        raise SourceError(path=str(src), why="is neither a regular file nor a block device, so not a disk image")
    if stat.S_ISREG(mode) and src.stat().st_size == 0:
        raise SourceError(path=str(src), why="is empty (0 bytes), so not a disk image")
    detected = fmt or _detect_format(src)
    if fmt is None and detected == "raw" and src.is_file() and src.stat().st_size % 512:
        # A disk is whole 512-byte sectors; anything else (a text file, a truncated download) would
        # be stored zero-padded as a tiny disk without a word (issue 17). --format raw insists.
        n = src.stat().st_size
        raise SourceError(path=str(src), why=f"{n} bytes is not a whole number of 512-byte sectors, so not a disk "
                                             "image (give --format raw to import it zero-padded anyway)")
    if detected != "raw":
        scratch = Path(scratch_dir or src.parent)
        tmp = scratch / f".blockprov-import-{os.getpid()}-{src.name}.raw"
        try:
            qemu.convert(src, tmp, src_format=detected)
            return _import_raw(repo, tmp, target, chunk_size, labels, progress, on_size, str(src))
        finally:
            tmp.unlink(missing_ok=True)
    return _import_raw(repo, src, target, chunk_size, labels, progress, on_size, str(src))


def _parent_of(repo: Repository, target: Ref) -> str | None:
    """The version a new import descends from: the one its tag points at now, else the image's
    newest version, else none (a new image)."""
    try:
        return repo.resolve(target).id
    except ImageNotFound:
        pass
    try:
        versions = repo.versions(target.name)
    except ImageNotFound:
        return None
    return versions[-1].id if versions else None


def _profile_donor(repo: Repository, ids: list[bytes]) -> str | None:
    """An existing version with a boot profile of its own that holds most (``MIN_SHARED``) of
    these chunk ids, the one holding the most, as ``IMAGE@ID``; None when there is none. Bounded:
    the newest profiled one of the ``DONOR_VERSIONS`` newest versions of at most ``DONOR_IMAGES``
    images, at most ``DONOR_CHECKS`` manifests compared. Only a hint: any repository error means
    no donor."""
    mine = set(ids)
    mine.discard(codec.ZERO_DIGEST)
    if not mine:
        return None
    best: tuple[float, str | None] = (MIN_SHARED, None)
    checks = 0
    try:
        for image in repo.images()[:DONOR_IMAGES]:
            for v in repo.versions(image.name)[::-1][:DONOR_VERSIONS]:
                if repo.get_profile(image.name, v.id, inherit=False):
                    break
            else:
                continue
            checks += 1
            donor = repo.resolve(f"{image.name}@{v.id}")
            shared = len(mine & donor.unique_digests()) / len(mine)
            if shared >= best[0]:
                best = (shared, f"{image.name}@{v.id}")
            if checks >= DONOR_CHECKS:
                break
    except BlockprovError:
        return None
    return best[1]


def _detect_format(src: Path) -> str:
    try:
        fmt = str(qemu.info(src).get("format", "raw"))
    except UsageError:  # no qemu-img on this machine: only raw can be read
        return "raw"
    if fmt not in ("raw", "qcow2", "qcow", "vmdk", "vhdx", "vpc", "vdi", "qed", "parallels", "dmg", "bochs", "cloop"):
        raise SourceError(path=str(src), why=f"unsupported format {fmt!r}")
    return fmt


def _import_raw(repo: Repository, path: Path, target: Ref, chunk_size: int, labels: dict[str, str] | None,
                progress: Progress | None, on_size: Callable[[int], None] | None,
                shown: str) -> tuple[str, ImportStats]:
    t0 = time.monotonic()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise SourceError(path=shown, why=e.strerror or str(e)) from None
    try:
        real_size = _source_size(fd)
        size = (real_size + 511) // 512 * 512  # virtual sizes are whole sectors; the tail reads as zeros
        check_geometry(size, chunk_size)
        if on_size:
            on_size(size)
        stats = ImportStats(source_bytes=size)
        extents = list(data_extents(fd, real_size))
        seg = max(chunk_size, SEGMENT_BYTES // chunk_size * chunk_size)
        parent = _parent_of(repo, target)
        ids: list[bytes] = []
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="import") as pool:
            pending: list[Future[list[bytes]]] = []
            for seg_start in range(0, size, seg):
                seg_end = min(seg_start + seg, size)
                seg_ext = [(s, e) for s, e in extents if s < seg_end and e > seg_start]
                pending.append(pool.submit(_process_segment, repo, fd, seg_start, seg_end, real_size, chunk_size,
                                           seg_ext, stats, progress))
                if len(pending) >= 2 * WORKERS:
                    ids.extend(pending.pop(0).result())
            for f in pending:
                ids.extend(f.result())
    finally:
        os.close(fd)
    stats.chunks = chunk_count(size, chunk_size)
    stats.zero_chunks = sum(1 for c in ids if c == codec.ZERO_DIGEST)
    stats.unique_chunks = len(stats._seen)
    labels = dict(labels or {})
    if parent is None and PROFILE_FROM not in labels:
        donor = _profile_donor(repo, ids)
        if donor is not None:
            labels[PROFILE_FROM] = donor
    m = Manifest(image=target.name, size=size, chunk_size=chunk_size, chunks=b"".join(ids), parent=parent,
                 labels=labels)
    vid = repo.commit(m, target.tag)
    stats.seconds = time.monotonic() - t0
    return vid, stats
