"""Inherited boot profiles (issue 15 item 1): the first boot of a v2 made from a v1 that has a profile.

The boot test image (tools/bootimage.py) is imported as ``os:v1`` into an embedded repository and
given its boot profile by ``blockprov profile record`` (one headless boot, no client). ``os:v2`` is
made the way an administrator makes one (bench/versions.py: an ``admin`` boot of a v1 instance,
random data in about ``--changed`` of the chunks, ``blockprov snapshot``). Then, each on a fresh cache
and medians of ``--repeat`` boots (qemu TCG, time from qemu's start to the guest's done marker):

- (a) the raw file on the local disk (the floor);
- (f) v1 with its own profile (recorded by ``profile record``);
- (i) v2's first boot with the profile it inherits from v1 (the new path);
- (d) v2's first boot truly cold (``--no-profile``: what a new version cost before).

Goal (issue 15): (i) within 1.05× of (f).

Run: ``.venv/bin/python bench/bench_inherit.py [--size 1G] [--fill-mb 300] [--repeat 3]``.
Results: bench/out/inherit.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import VENV_BIN, WORK, drop_caches, write_results
from tests import bootvm
from tests.procs import start_agent
from versions import make_v2

BP = str(VENV_BIN / "blockprov")


def bp(data: Path, *args: str) -> str:
    return subprocess.run([BP, "--data", str(data), *args], check=True, capture_output=True, text=True,
                          timeout=900).stdout


def status(cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(subprocess.run([BP, "status", "--cache", str(cache), "--json"], check=True,
                                                    capture_output=True, text=True, timeout=60).stdout)
    return out


def attach_boot(data: Path, ref: str, tmp: Path, img: bootvm.bootimage.Built, *extra: str,
                mode: str = "plain") -> dict[str, Any]:
    """One boot of ``ref`` on a fresh cache: seconds to the marker and the agent's figures."""
    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    sock = tmp / "s.sock"
    drop_caches()
    agent, _ = start_agent(cache, ref, sock, *extra, data=data)
    try:
        r = bootvm.boot(img.kernel, img.initrd, f"nbd+unix:///?socket={sock}", mode=mode, timeout=600)
        if not r.ok:
            raise RuntimeError(f"boot of {ref} failed:\n{r.tail()}")
        st = status(cache)
    finally:
        agent.stop()
    return {"seconds": r.seconds, "guest_read_bytes": r.guest_read_bytes,
            "fetched_bytes": st.get("totals", {}).get("bytes_fetched", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--fill-mb", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.01, help="fraction of chunks v2 changes")
    args = ap.parse_args()
    img = bootvm.build_image(size=args.size, fill_mb=args.fill_mb)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="inherit", dir=WORK))
    data = tmp / "repo"
    try:
        bp(data, "import", str(img.disk), "os:v1")
        bp(data, "boot-files", "set", "os:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
           "--cmdline", "quiet panic=-1 bp.mode=plain")
        rec = json.loads(bp(data, "profile", "record", "os:v1", "--json"))
        v2 = make_v2(data, "os:v1", "os:v2", tmp, img, args.changed)
        inherited = json.loads(bp(data, "profile", "show", "os:v2", "--json"))
        assert inherited["inherited"], inherited
        rows: dict[str, list[dict[str, Any]]] = {"a": [], "f": [], "i": [], "d": []}
        for _ in range(args.repeat):
            drop_caches()
            r = bootvm.boot(img.kernel, img.initrd, img.disk, mode="plain", readonly=True, timeout=600)
            rows["a"].append({"seconds": r.seconds, "guest_read_bytes": r.guest_read_bytes, "fetched_bytes": 0})
            rows["f"].append(attach_boot(data, "os:v1", tmp, img))
            rows["i"].append(attach_boot(data, "os:v2", tmp, img))
            rows["d"].append(attach_boot(data, "os:v2", tmp, img, "--no-profile"))
        labels = {"a": "(a) local raw file", "f": "(f) v1, its own profile (profile record)",
                  "i": "(i) v2 first boot, profile inherited from v1", "d": "(d) v2 first boot, cold (--no-profile)"}
        med = {k: statistics.median(s["seconds"] for s in v) for k, v in rows.items()}
        table = [{"boot": labels[k], "seconds": round(med[k], 2), "x_local": round(med[k] / med["a"], 2),
                  "x_f": round(med[k] / med["f"], 2),
                  "fetched_mib": round(statistics.median(s["fetched_bytes"] for s in v) / (1 << 20), 1),
                  "samples": ", ".join(f"{s['seconds']:.2f}" for s in v)} for k, v in rows.items()]
        meta = {"image": f"{args.size} with {args.fill_mb} MB of files", "repeat": args.repeat,
                "recorded_profile_chunks": rec["chunks"], "record_seconds": rec["seconds"],
                "v2": v2, "inherited_profile_chunks": len(inherited["chunks"]),
                "goal": "(i) <= 1.05 x (f)", "i_over_f": round(med["i"] / med["f"], 3),
                "command": f"python bench/bench_inherit.py --size {args.size} --fill-mb {args.fill_mb} "
                           f"--repeat {args.repeat}"}
        write_results("inherit", table, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
