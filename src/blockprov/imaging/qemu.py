"""Thin wrappers over ``qemu-img``, which reads every disk format we accept (qcow2, vmdk, vhdx, …).

We do not parse foreign formats ourselves: qemu-img is the reference reader, and a format it
cannot read gets its own message back to the user.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from blockprov.errors import SourceError, UsageError


def _qemu_img() -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise UsageError("qemu-img is needed for this format; install it (Debian: apt-get install qemu-utils)")
    return exe


def info(path: str | Path) -> dict[str, Any]:
    """``qemu-img info`` of a local file: its format and virtual size."""
    p = subprocess.run([_qemu_img(), "info", "--output=json", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SourceError(path=str(path), why=(p.stderr.strip() or "qemu-img info failed").splitlines()[-1])
    data: dict[str, Any] = json.loads(p.stdout)
    return data


def convert(src: str | Path, dst: str | Path, *, src_format: str | None = None, dst_format: str = "raw") -> None:
    cmd = [_qemu_img(), "convert", "-O", dst_format]
    if src_format:
        cmd += ["-f", src_format]
    cmd += [str(src), str(dst)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SourceError(path=str(src), why=(p.stderr.strip() or "qemu-img convert failed").splitlines()[-1])
