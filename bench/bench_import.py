"""Import throughput of a realistic ≥ 2 GiB image vs ``qemu-img convert -O raw`` of the same image,
and the new bytes stored for a version with 1% of its chunks changed.

Goals (issue 2): import ≥ 0.5× qemu-img convert's throughput; a 1%-changed version stores ≤ 1.5% of
the image. Run: ``.venv/bin/python bench/bench_import.py [--size 2G] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VENV_BIN, WORK, drop_caches, median_of, realistic_image, write_results

from blockprov.humanize import parse_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2G")
    ap.add_argument("--fill", default="1400M", help="bytes of real files inside the image")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-size", default="64K")
    a = ap.parse_args()
    size, fill = parse_size(a.size), parse_size(a.fill)
    WORK.mkdir(parents=True, exist_ok=True)
    img = realistic_image(WORK / f"golden-{a.size}.img", size, ["/usr/lib", "/usr/share", "/usr/bin"], fill)
    env = dict(os.environ, BLOCKPROV_DATA=str(WORK / "import-data"))

    def ours() -> float:
        shutil.rmtree(WORK / "import-data", ignore_errors=True)
        drop_caches()
        t = time.perf_counter()
        subprocess.run([str(VENV_BIN / "blockprov"), "import", str(img), "bench:v1", "--chunk-size", a.chunk_size],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t

    def peer() -> float:
        out = WORK / "convert-out.raw"
        out.unlink(missing_ok=True)
        drop_caches()
        t = time.perf_counter()
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(img), str(out)], check=True)
        subprocess.run(["sync", str(out)], check=True)
        d = time.perf_counter() - t
        out.unlink()
        return d

    t_ours, s_ours = median_of(a.repeat, ours)
    t_peer, s_peer = median_of(a.repeat, peer)
    gib = size / (1 << 30)

    # 1% of the non-zero chunks changed in place → second version
    v2 = WORK / "golden-v2.img"
    shutil.copyfile(img, v2)
    show = json.loads(subprocess.run([str(VENV_BIN / "blockprov"), "show", "bench:v1", "--json"], env=env,
                                     check=True, capture_output=True, text=True).stdout)
    cs = show["chunk_size"]
    nchunks = show["chunks"]
    rnd = random.Random(42)
    changed = rnd.sample(range(nchunks), max(1, nchunks // 100))
    with open(v2, "r+b") as f:
        for i in changed:
            f.seek(i * cs + rnd.randrange(cs - 512))
            f.write(rnd.randbytes(512))
    p = subprocess.run([str(VENV_BIN / "blockprov"), "import", str(v2), "bench:v2", "--json",
                        "--chunk-size", a.chunk_size], env=env, check=True, capture_output=True, text=True)
    st2 = json.loads(p.stdout)
    v2.unlink()
    rows = [
        {"what": "import throughput (GiB/s of virtual disk)", "blockprov": gib / t_ours,
         "qemu-img convert -O raw": gib / t_peer, "ratio": t_peer / t_ours, "goal": "≥ 0.5×"},
        {"what": "new bytes for 1% changed chunks (% of image)", "blockprov": 100 * st2["new_bytes_stored"] / size,
         "qemu-img convert -O raw": 100.0, "ratio": st2["new_bytes_stored"] / size, "goal": "≤ 1.5%"},
    ]
    write_results("import", rows, {
        "image": f"{a.size} ext4 with {a.fill} of files from /usr, chunk size {a.chunk_size}",
        "repeats": a.repeat, "blockprov seconds": [round(x, 2) for x in s_ours],
        "qemu-img seconds": [round(x, 2) for x in s_peer],
        "changed chunks": len(changed), "v2 new chunks": st2["new_chunks"],
        "command": f"python bench/bench_import.py --size {a.size} --repeat {a.repeat}",
    })


if __name__ == "__main__":
    main()
