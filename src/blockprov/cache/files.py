"""The cache's dealings with its files: the lock, the data file, hole punching, positioned writes.

Kept apart from cache/device.py so that the device reads as chunk states and orders of
operations; what here touches the operating system is small and blocking (the device runs the
slow parts in its thread pool). Errors of the data file become ``DeviceError``s the NBD server
can answer with (ENOSPC stays ENOSPC, so a guest sees a full disk, not an I/O error).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockprov.errors import CacheError, CacheLocked, DeviceError, DeviceIOError, NoSpace

LOCK_NAME = "lock"
_IOV_MAX = 512

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _fallocate: Any = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux: no hole punching, zero chunks keep their old blocks
    _fallocate = None


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of a range; False when the file system or device cannot."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


def io_error(e: OSError, what: str) -> DeviceError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(msg=f"{what}: {e.strerror}")
    return DeviceIOError(msg=f"{what}: {e}")


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    while bufs:
        n = os.pwritev(fd, bufs[:_IOV_MAX], offset)
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:], *bufs[1:]]


def write_groups(fd: int, writes: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
    """Write pieces at their offsets; contiguous pieces go out as one pwritev."""
    if len(writes) == 1:
        off, data = writes[0]
        pwrite_all(fd, data, off)
        return
    ordered = sorted(writes, key=lambda w: w[0])
    start = ordered[0][0]
    bufs: list[memoryview] = []
    end = start
    for off, data in ordered:
        if off != end and bufs:
            pwritev_all(fd, bufs, start)
            bufs, start = [], off
        bufs.append(memoryview(data).cast("B"))
        end = off + len(data)
    if bufs:
        pwritev_all(fd, bufs, start)


def take_lock(d: Path) -> int:
    """flock the cache directory's lock file (one agent per cache) and leave our pid in it for
    the error message of the next one that tries."""
    fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CacheLocked(path=str(d), pid=holder) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # a full disk: say where (the CLI's one line names the file)
        os.close(fd)
        raise OSError(e.errno, e.strerror, str(d / LOCK_NAME)) from None
    return fd


def open_data(path: Path, size: int, *, fresh: bool, internal: bool) -> int:
    """Open (or, for a new cache, create) the data file. An existing cache's data file is never
    created or grown here: a missing or short one would serve zeros for present chunks."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if fresh else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise CacheError(f"cannot open cache data {path}: {e.strerror}"
                         + ("" if fresh else "; remove the cache directory to start over")) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            have = os.lseek(fd, 0, os.SEEK_END)
            if have < size:
                raise CacheError(f"block device {path} has {have} bytes; the image needs {size}")
        elif stat.S_ISREG(st.st_mode):
            if fresh and internal:
                os.ftruncate(fd, 0)  # leftovers of an interrupted creation: give the space back
            if fresh and (internal or st.st_size < size):
                os.ftruncate(fd, size)
            elif st.st_size < size:
                raise CacheError(f"cache data {path} has {st.st_size} bytes, expected {size}: it was "
                                 "truncated; remove the cache directory to start over")
        else:
            raise CacheError(f"cache data {path} is neither a regular file nor a block device")
    except BaseException:
        os.close(fd)
        raise
    return fd
