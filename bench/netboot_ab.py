"""A/B of in-machine agent builds (issue 13's first-boot speed): the same PC boots, interleaved,
from initramfs builds of different source trees (``NAME=SRC_DIR[|READAHEAD]``), on one repository
holding the 1 GiB test image (tools/bootimage.py, ``bp.mode=plain``), loopback, qemu TCG.

Why a tool of its own and not bench/bench_netboot.py: that one measures blockprov against the FOG
model with one build; an A/B needs two builds of the agent under the same conditions, and on this
shared machine (other engineers' guests: load 2–8) only interleaved pairs say anything.

Scenarios (``--scenario``):

* ``first``: a blank disk, ``hydrate=background``, then a reboot of that disk (``second``: the
  cache is open after a power cut, most of the image is local);
* ``local``: one disk provisioned with ``hydrate=before-boot``, then boots of copies of it
  (``hydrate=off``, ``loader=off``): every byte is local, only the per-request path is measured.

Printed per boot: seconds from qemu's start to the marker, the guest's phases (agent: network up →
root serving; read: the image's read phase, ``readdone - mounted``), chunks the repository
sent and the load average. ``--warmup`` first boots once untimed, so every measured first boot
finds the version's boot profile (the first cold session records it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ROOT, VENV_BIN, WORK
from tests import bootvm
from tests.boot.netboot_helpers import assign, blank_disk, chunks_served, netboot
from tests.procs import start_server

REF = "lab:v1"
DISK = 2 << 30


def cli(*args: str, src: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("BLOCKPROV_REPO", None)
    if src:
        env["PYTHONPATH"] = f"{src}:{ROOT}"
    return subprocess.run([str(VENV_BIN / "blockprov"), *args], check=True, capture_output=True, text=True,
                          timeout=900, env=env).stdout


def phases(console: str) -> dict[str, Any]:
    def num(p: str) -> float | None:
        m = re.search(p, console)
        return float(m.group(1)) if m else None

    up, serving = num(r"network up on \w+ at uptime ([\d.]+)"), num(r"root serving from \S+ at uptime ([\d.]+)")
    mounted, done = num(r"mounted=([\d.]+)"), num(r"readdone=([\d.]+)")
    verify = re.search(r"re-verified (\d+) chunk.*opened in ([\d.]+) s", console)
    return {"agent": round(serving - up, 1) if up and serving else None,
            "read": round(done - mounted, 1) if done and mounted else None,
            "verified": f"{verify.group(1)} in {verify.group(2)} s" if verify else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+", help="NAME=SRC_DIR or NAME=SRC_DIR|READAHEAD (blockprov.readahead)")
    ap.add_argument("--scenario", choices=("first", "local"), default="first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="one untimed first boot (records the boot profile)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (consoles, disks) and say where")
    a = ap.parse_args()
    specs = dict(v.split("=", 1) for v in a.variants)
    srcs = {n: v.split("|")[0] for n, v in specs.items()}
    readahead = {n: (v.split("|")[1] if "|" in v else None) for n, v in specs.items()}
    image = bootvm.build_image(size="1G", fill_mb=300)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="netboot-ab-"))
    data = tmp / "repo"
    print(f"load at start: {os.getloadavg()[0]:.2f}", flush=True)
    try:
        cli("--data", str(data), "import", str(image.disk), REF)
        built: dict[str, dict[str, Any]] = {}
        for name, src in srcs.items():
            same = next((n for n in built if srcs[n] == src), None)
            if same is not None:
                built[name] = built[same]
                continue
            out = tmp / f"initrd-{name}.img"
            # built in a repository of the variant's own making: an older tree may not read the
            # catalog a newer one wrote (its schema moved on); the file is then set in the head's
            own = tmp / f"repo-{name}"
            cli("--data", str(own), "import", str(image.disk), REF, src=src)
            built[name] = json.loads(cli("--data", str(own), "boot-files", "build", REF, "--output", str(out),
                                         "--json", src=src)) | {"file": str(out)}
            shutil.rmtree(own, ignore_errors=True)
            print(f"{name}: initramfs {built[name]['build']['initrd_bytes']} bytes", flush=True)
        server, url = start_server(data)
        results: dict[str, dict[str, list[float]]] = {n: {} for n in srcs}

        def use(name: str) -> None:
            b = built[name]
            cli("--data", str(data), "boot-files", "set", REF, "--kernel", b["build"]["kernel"], "--initrd", b["file"],
                "--cmdline", b["cmdline"])

        def boot(name: str, label: str, disk: Path, hydrate: str, extra: str = "") -> None:
            assign(url, "plain", "restore", ref=REF, hydrate=hydrate, readahead=readahead[name], extra=extra)
            c0, load = chunks_served(url), os.getloadavg()[0]
            b = netboot(disk, url, tmp / f"{name}-{label}.log", timeout=a.timeout)
            ph = phases(b.console)
            print(f"  {name:8} {label:7} {b.seconds:6.1f} s  ok={bool(b.done)}  chunks={chunks_served(url) - c0}  "
                  f"load={load:.2f}  {ph}", flush=True)
            if b.done:
                results[name].setdefault(label, []).append(b.seconds)
                if ph["read"] is not None:
                    results[name].setdefault(f"{label}-read", []).append(ph["read"])

        try:
            names = list(srcs)
            if a.warmup or a.scenario == "local":
                use(names[0])
                gold = blank_disk(tmp / "gold.raw", DISK)
                boot(names[0], "prepare", gold, "before-boot" if a.scenario == "local" else "off")
            for r in range(a.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    use(name)
                    disk = tmp / f"disk-{name}.raw"
                    if a.scenario == "local":
                        subprocess.run(["cp", "--sparse=always", str(gold), str(disk)], check=True, timeout=300)
                        boot(name, "local", disk, "off", "blockprov.loader=off")
                    else:
                        blank_disk(disk, DISK)
                        boot(name, "first", disk, "background")
                        boot(name, "second", disk, "background")
                    disk.unlink()
        finally:
            server.stop()
        print(f"load at end: {os.getloadavg()[0]:.2f}")
        for name, d in results.items():
            for label, xs in d.items():
                print(f"{name:8} {label:12} median {statistics.median(xs):6.1f}  samples {[round(x, 1) for x in xs]}")
    finally:
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
