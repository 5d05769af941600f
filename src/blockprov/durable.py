"""The one durability helper: every persistent file write in blockprov goes through here.

Crash rule: ``atomic_write`` (bytes) and ``replacing`` (a file written by any means, an export)
leave either the old file or the complete new one, never a mix; after they return the new content
and its name are on stable storage (temp → fsync → rename → fsync directory). A crash meanwhile
can leave a ``.NAME.XXXXXXXX.tmp`` beside it, never read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes], *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with replacing(path, sync_dir=sync_dir) as tmp, open(tmp, "wb") as f:
        if isinstance(data, bytes | bytearray | memoryview):
            f.write(data)
        else:
            for part in data:
                f.write(part)


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, mode: int = 0o600, sync_dir: bool = True) -> Iterator[Path]:
    """A new, empty file beside ``path`` (created with ``mode``, less the umask) for the caller to
    write whole, by any means (``pwrite`` at offsets, another program): when the block ends it is
    fsynced and renamed over ``path``, and the directory fsynced; when it raises, it is removed
    and ``path`` is as it was (an export that fails leaves the file it would have replaced)."""
    path = Path(path)
    while True:  # a name nobody else has (O_EXCL), as mkstemp's, but with the caller's mode
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk says where (the CLI's one line)
            e.filename = str(path)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p
