"""What a first boot without a profile can cost at best, from the boot's own read set (issue 15).

A cold agent learns which chunks a boot needs only when the guest asks; what it can choose is how
much to fetch around each miss. For the family of policies the fetcher has (an aligned region of
``R`` chunks brought with a miss), the boot's first-read order fixes both costs:

- serial round trips ≥ the number of regions the boot touches first (each costs at least one wait:
  the guest reads at queue depth 1, mostly);
- bytes sent = the compressed bytes of those regions' non-zero chunks.

Input: the disk image and the boot's read order (``blockprov profile show NAME:TAG --json`` of a
version whose profile a boot recorded). Chunks are compressed as the repository stores them
(``blockprov.codec``). Output: one row per region size, with the extra seconds those round trips
cost on the 20 ms / 1 Gbit/s link (20 ms + the region's transfer each) and at a measured per-miss
cost near the repository (``--near-ms``), and a plot of bytes against extra time.

Run: ``.venv/bin/python bench/bench_frontier.py --image DISK --profile PROFILE.json
[--guest-read-mib 79.2] [--near-ms 1.8]``. Results: bench/out/frontier.{json,md},
bench/results/boot-frontier.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results

from blockprov.codec import encode

MIB = 1 << 20
CHUNK = 64 << 10


def compressed_sizes(image: Path, chunk: int = CHUNK) -> dict[int, int]:
    """Stored size of every non-zero chunk (zero chunks are never sent)."""
    zero = bytes(chunk)
    sizes: dict[int, int] = {}
    with image.open("rb") as f:
        i = 0
        while b := f.read(chunk):
            if b != zero[:len(b)]:
                sizes[i] = len(encode(b))
            i += 1
    return sizes


def frontier(order: list[int], sizes: dict[int, int], *, rtt: float, rate: float, near: float,
             spans: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)) -> list[dict[str, Any]]:
    """One row per region size (in chunks): regions first touched, bytes, estimated extra seconds."""
    rows = []
    touched = [k for k in order if k in sizes]
    for r in spans:
        regions = list(dict.fromkeys(k // r for k in touched))
        per = [sum(sizes.get(g * r + j, 0) for j in range(r)) for g in regions]
        rows.append({"region KiB": r * CHUNK >> 10, "regions (serial waits)": len(regions),
                     "MiB sent": round(sum(per) / MIB, 1),
                     "far extra s": round(sum(rtt + b / rate for b in per), 1),
                     "near extra s": round(len(regions) * near, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--profile", type=Path, required=True, help="`blockprov profile show --json` output")
    ap.add_argument("--guest-read-mib", type=float, default=0.0, help="what the boot read (for sent/read)")
    ap.add_argument("--rtt", type=float, default=0.020, help="far link round trip (s)")
    ap.add_argument("--rate", type=float, default=125e6, help="far link bytes/s")
    ap.add_argument("--near-ms", type=float, default=1.8, help="a miss's measured cost near the repository (ms)")
    ap.add_argument("--local-s", type=float, default=8.5, help="the local boot's seconds (places the goals)")
    a = ap.parse_args()
    order = [int(k) for k in json.loads(a.profile.read_text())["chunks"]]
    sizes = compressed_sizes(a.image)
    rows = frontier(order, sizes, rtt=a.rtt, rate=a.rate, near=a.near_ms / 1000)
    if a.guest_read_mib:
        for r in rows:
            r["sent / read"] = round(r["MiB sent"] / a.guest_read_mib, 2)
    meta = {"image": f"{a.image} ({len(sizes)} non-zero chunks, {sum(sizes.values()) / MIB:.1f} MiB stored)",
            "boot touches": f"{sum(1 for k in order if k in sizes)} chunks",
            "far link": f"{a.rtt * 1000:g} ms, {a.rate * 8 / 1e9:g} Gbit/s", "near miss": f"{a.near_ms} ms",
            "local boot (places the goals)": f"{a.local_s} s",
            "command": f"python bench/bench_frontier.py --image {a.image} --profile {a.profile} "
                       f"--guest-read-mib {a.guest_read_mib} --near-ms {a.near_ms} --local-s {a.local_s}"}
    write_results("frontier", rows, meta)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [r["MiB sent"] / (a.guest_read_mib or 1) for r in rows]
    for key, label in (("far extra s", f"{a.rtt * 1000:g} ms link"), ("near extra s", f"near ({a.near_ms} ms a miss)")):
        ax.plot(x, [r[key] for r in rows], marker="o", label=label)
        for xi, r in zip(x, rows, strict=True):
            ax.annotate(f"{r['region KiB']}K", (xi, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if a.guest_read_mib:  # issue 15's goals: both must hold, the corner must lie above-right of the line
        for (bytes_goal, time_goal), colour, label in (((0.8, 0.3), "C0", "goal 20 ms: ≤ 1.3×, ≤ 0.8× bytes"),
                                                       ((0.6, 0.1), "C1", "goal near: ≤ 1.1×, ≤ 0.6× bytes")):
            ax.plot([bytes_goal], [time_goal * a.local_s], marker="*", markersize=14, color=colour, linestyle="none",
                    label=label)
    ax.set_yscale("log")
    ax.set_xlabel("bytes sent / bytes the guest read" if a.guest_read_mib else "MiB sent")
    ax.set_ylabel("extra seconds waiting (lower bound)")
    ax.set_title("First boot without a profile: one region per miss, bytes against waiting", fontsize=10)
    ax.legend()
    fig.tight_layout()
    out = ROOT / "bench" / "results" / "boot-frontier.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
