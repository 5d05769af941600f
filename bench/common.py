"""Shared helpers for benchmarks: medians of repeats, realistic images, result tables.

Benchmarks are not tests: they run our system and the named peer on the same work in the same run,
print both figures and the ratio, and write a JSON + Markdown table under bench/out/.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = Path(os.environ.get("BLOCKPROV_BENCH_WORK", ROOT / "bench" / "work"))
VENV_BIN = ROOT / ".venv" / "bin"
# A version given boot files gets its boot profile prepared in the background (a headless qemu boot:
# vm/prepare.py); a benchmark asks for that where it measures it (bench_boot's (h)), nowhere else.
os.environ.setdefault("BLOCKPROV_PREPARE", "0")


def median_of(n: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    samples = [fn() for _ in range(n)]
    return statistics.median(samples), samples


def timed(cmd: list[str], **kw: Any) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def drop_caches() -> None:
    """Drop the page cache when allowed (root); otherwise runs stay warm and say so."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def realistic_image(path: Path, size: int, fill_from: list[str], fill_bytes: int,
                    files: dict[str, str] | None = None) -> Path:
    """An ext4 disk of ``size`` bytes holding up to ``fill_bytes`` of real files copied from the
    machine (binaries, libraries, text): compressible in parts, partly empty — like a golden image.
    ``files``: extra small files (path → text), e.g. /etc/hostname. Walked in sorted order, so the
    same machine makes the same image."""
    if path.exists() and path.stat().st_size == size:
        return path
    root = path.with_suffix(".root")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for rel, text in (files or {}).items():
        (root / rel.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / rel.lstrip("/")).write_text(text)
    copied = 0
    for src in fill_from:
        for dirpath, dirs, names in os.walk(src):
            dirs.sort()
            for f in sorted(names):
                p = os.path.join(dirpath, f)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    n = os.path.getsize(p)
                    if copied + n > fill_bytes:
                        continue
                    dst = root / os.path.relpath(p, "/")
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, dst)
                    copied += n
                except OSError:
                    continue
            if copied >= fill_bytes * 0.98:
                break
    tmp = path.with_suffix(".tmp")  # an interrupted build never leaves a full-size but empty image
    tmp.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", str(size), str(tmp)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(tmp)], check=True)
    os.replace(tmp, path)
    shutil.rmtree(root, ignore_errors=True)
    return path


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    md = OUT / f"{name}.md"
    md.write_text(f"### {name}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items())
                  + "\n")
    print(md.read_text())
    return md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
