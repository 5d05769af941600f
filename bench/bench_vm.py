"""Running-VM clones benchmarks (issue 14), each against its peer in the same run:

1. time to the application answering: ``blockprov vm clone TPL --count 1`` (from the command's start
   to the clone's first new ``BP-COUNT`` line on its serial console) vs a cold boot of the same
   version to the same point (``vm run``, to its first ``BP-COUNT`` line). Goal ≤ 0.1×.
2. host memory of N idle clones vs N booted VMs of the same version (default N = 10, as the issue
   says): the clones started by one ``vm clone --count N``, the VMs booted one after another (each
   started once the one before answered, so N TCG boots do not fight for the cores), all left to
   settle for ``--settle`` seconds after the last answered: the sum of the qemu processes' PSS
   (``/proc/PID/smaps_rollup``). Goal ≤ 0.3×.
3. the first clone on a VM directory without the template, over a 20 ms RTT link (bench/wanproxy.py
   in front of ``blockprov serve``): ``vm clone --lazy`` (memory mapped before it is copied, pages
   fetched on first touch) vs copying the template first (``vm clone`` without ``--lazy``), both to
   the clone's first ``BP-COUNT`` line. Goal ≤ 0.3×. The lazy clones measured follow the template's
   resume profile, recorded by one lazy clone before them (its own time is reported apart).

The guest: tools/bootimage.py's test image (256 MiB disk) in ``bp.mode=counter``, direct kernel
boot, TCG, ``--memory`` of RAM. Run: ``.venv/bin/python bench/bench_vm.py [--count 10] [--repeat 3]
[--parts 1,2,3]``. Results: bench/out/vm.{json,md}, with the load average at the start and the end.

The ``blockprov`` commands run as an installed package does, with their bytecode cached (in a
``PYTHONPYCACHEPREFIX`` under the work directory, filled by the untimed set-up commands): a shell
that sets ``PYTHONDONTWRITEBYTECODE`` would otherwise compile every module on every command (the
CLI and the disks agent it starts: ~0.1 s of each clone's start), for the peers as for blockprov.
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
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import VENV_BIN, write_results
from tests import bootvm
from tests.procs import start_server
from wanproxy import ProxyThread

BP = str(VENV_BIN / "blockprov")
PYCACHE: dict[str, str] = {}  # PYTHONPYCACHEPREFIX of the commands run (set by main)
COUNT = re.compile(r"BP-COUNT n=(\d+) host=")  # whole lines only: a paused guest may stop mid-line


def bp(*args: str, repo: list[str]) -> Any:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BLOCKPROV_REPO", "BLOCKPROV_DATA", "PYTHONDONTWRITEBYTECODE")}
    env.update(PYCACHE)
    p = subprocess.run([BP, *repo, *args], capture_output=True, text=True, timeout=900, env=env)
    if p.returncode != 0:
        raise SystemExit(f"blockprov {' '.join(args)} failed: {p.stderr}")
    return json.loads(p.stdout) if "--json" in args else p.stdout


def first_count(console: Path, t0: float, timeout: float = 300) -> float:
    """Seconds from ``t0`` until ``console`` shows a BP-COUNT line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if COUNT.search(console.read_text(errors="replace")):
                return time.monotonic() - t0
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"no BP-COUNT in {console} after {timeout:g} s")


def pss(root: Path, repo: list[str], names: list[str]) -> int:
    rows = {r["name"]: r for r in bp("vm", "list", "--dir", str(root), "--json", repo=repo)}
    return sum(int(rows[n]["memory"].get("pss", 0)) for n in names)


def first_clone_lazy_vs_copy(work: Path, tpl: str, remote: list[str], repeat: int) -> tuple[dict[str, Any],
                                                                                              dict[str, Any]]:
    """Benchmark 3 for one template: its very first lazy clone anywhere (which records the resume
    profile), then ``repeat`` pairs of a lazy clone and a copy-first clone, each in a new VM directory."""
    r2 = work / f"{tpl}-lazyfirst"
    t0 = time.monotonic()
    made = bp("vm", "clone", tpl, "--count", "1", "--dir", str(r2), "--json", "--lazy", repo=remote)
    first_lazy_s = first_count(r2 / "vms" / made["clones"][0] / "console.log", t0)
    profile = made.get("resume_profile", {})
    bp("vm", "rm", "--force", made["clones"][0], "--dir", str(r2), repo=remote)
    lazy_s: list[float] = []
    copy_s: list[float] = []
    steps: dict[str, list[dict[str, Any]]] = {"lazy": [], "copy": []}
    for k in range(repeat):
        for mode, out in (("lazy", lazy_s), ("copy", copy_s)):
            r2 = work / f"{tpl}-{mode}{k}"
            t0 = time.monotonic()
            made = bp("vm", "clone", tpl, "--count", "1", "--dir", str(r2), "--json",
                      *(["--lazy"] if mode == "lazy" else []), repo=remote)
            out.append(first_count(r2 / "vms" / made["clones"][0] / "console.log", t0))
            steps[mode].append({**made.get("steps", {}), "answering (from the command's start)": out[-1]})
            bp("vm", "rm", "--force", made["clones"][0], "--dir", str(r2), repo=remote)
    lz, cp = statistics.median(lazy_s), statistics.median(copy_s)
    row = {"what": "", "blockprov": lz, "peer": cp, "peer is": "copy the template first", "ratio": lz / cp,
           "goal": "≤ 0.3×"}
    return row, {"lazy seconds": lazy_s, "copy-first seconds": copy_s,
                 "first lazy clone seconds (recording the resume profile)": first_lazy_s, "resume profile": profile,
                 "lazy steps (median s from the command's call of vm.clone)": median_steps(steps["lazy"]),
                 "copy-first steps (median s)": median_steps(steps["copy"]),
                 "lazy memory fetched": [s.get("memory fetched at resume") for s in steps["lazy"]]}


def median_steps(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The median time of each step ``vm clone --json`` reports, over runs (numbers only)."""
    keys = [k for k in (runs[0] if runs else {}) if all(isinstance(r.get(k), int | float) for r in runs)]
    return {k: round(statistics.median(float(r[k]) for r in runs), 3) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--rtt", default="20ms")
    ap.add_argument("--ballast-mb", type=int, default=0,
                    help="also measure 3. with a template whose guest holds this much random data in RAM")
    ap.add_argument("--ballast-memory", default="768M")
    ap.add_argument("--parts", default="1,2,3", help="which benchmarks to run (comma-separated: 1, 2, 3)")
    a = ap.parse_args()
    parts = {int(x) for x in a.parts.split(",") if x.strip()}
    load_start = os.getloadavg()
    img = bootvm.build_image(size="256M", fill_mb=40)
    work = Path(tempfile.mkdtemp(prefix="bpvb", dir="/tmp"))  # short: unix sockets live inside
    PYCACHE["PYTHONPYCACHEPREFIX"] = str(work / "pyc")
    data = work / "repo"
    local = ["--data", str(data)]
    rows: list[dict[str, Any]] = []
    clone_s: list[float] = []
    boot_s: list[float] = []
    clone_steps: list[dict[str, Any]] = []
    try:
        bp("--version", repo=[])  # untimed: fills the bytecode cache
        bp("import", str(img.disk), "lab:v1", repo=local)
        bp("boot-files", "set", "lab:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd), "--cmdline",
           "console=ttyS0 quiet panic=-1 bp.mode=counter", repo=local)
        root = work / "v"
        d = ["--dir", str(root)]
        t0 = time.monotonic()
        bp("vm", "run", "lab:v1", "--name", "app", "--memory", a.memory, *d, repo=local)
        first_count(root / "vms" / "app" / "console.log", t0)
        time.sleep(2)
        bp("vm", "template", "tpl", "--from", "app", "--push", *d, repo=local)

        # 1. clone vs cold boot, to the first counter line
        for k in range(a.repeat if 1 in parts else 0):
            t0 = time.monotonic()
            made = bp("vm", "clone", "tpl", "--count", "1", *d, "--json", repo=local)
            clone_s.append(first_count(root / "vms" / made["clones"][0] / "console.log", t0))
            clone_steps.append({**made.get("steps", {}), "answering (from the command's start)": clone_s[-1]})
            t0 = time.monotonic()
            bp("vm", "run", "lab:v1", "--name", f"cold{k}", "--memory", a.memory, *d, repo=local)
            boot_s.append(first_count(root / "vms" / f"cold{k}" / "console.log", t0))
            bp("vm", "rm", "--force", made["clones"][0], f"cold{k}", *d, repo=local)
        if clone_s:
            c, b = statistics.median(clone_s), statistics.median(boot_s)
            rows.append({"what": "seconds to the application answering", "blockprov": c, "peer": b,
                         "peer is": "cold boot (vm run)", "ratio": c / b, "goal": "≤ 0.1×"})

        # 2. memory of N idle clones vs N booted VMs (booted one after another)
        boot_each: list[float] = []
        if 2 in parts:
            t0 = time.monotonic()
            made = bp("vm", "clone", "tpl", "--count", str(a.count), *d, "--json", repo=local)
            for n in made["clones"]:
                first_count(root / "vms" / n / "console.log", t0, timeout=600)
            time.sleep(a.settle)
            clones_pss = pss(root, local, made["clones"])
            bp("vm", "rm", "--force", *made["clones"], *d, repo=local)
            booted = [f"boot{k}" for k in range(a.count)]
            for n in booted:
                t0 = time.monotonic()
                bp("vm", "run", "lab:v1", "--name", n, "--memory", a.memory, *d, repo=local)
                boot_each.append(first_count(root / "vms" / n / "console.log", t0, timeout=600))
            time.sleep(a.settle)
            booted_pss = pss(root, local, booted)
            bp("vm", "rm", "--force", *booted, *d, repo=local)
            rows.append({"what": f"host memory of {a.count} idle VMs (MiB, sum of PSS)",
                         "blockprov": clones_pss / 2**20, "peer": booted_pss / 2**20, "peer is": "booted VMs",
                         "ratio": clones_pss / booted_pss, "goal": "≤ 0.3×"})

        # 3. first clone without the template over the link: lazy vs copy first
        extra: dict[str, Any] = {}
        if a.ballast_mb and 3 in parts:  # a second template: the same guest holding random data in RAM (a warm service)
            bp("import", str(img.disk), "ballast:v1", repo=local)  # its own image: its own boot files
            bp("boot-files", "set", "ballast:v1", "--kernel", str(img.kernel), "--initrd", str(img.initrd),
               "--cmdline", f"console=ttyS0 quiet panic=-1 bp.mode=counter bp.ballast={a.ballast_mb}", repo=local)
            t0 = time.monotonic()
            bp("vm", "run", "ballast:v1", "--name", "big", "--memory", a.ballast_memory, *d, repo=local)
            first_count(root / "vms" / "big" / "console.log", t0, timeout=900)
            time.sleep(2)
            bp("vm", "template", "bigtpl", "--from", "big", "--push", *d, repo=local)
        server, url = start_server(data)
        try:
            host, port = url.split("//")[1].rsplit(":", 1)
            with ProxyThread((host, int(port)), rtt=float(a.rtt.rstrip("ms")) / 1000) as proxy:
                remote = ["--repo", proxy.url]
                templates = [("tpl", "")]
                if a.ballast_mb:
                    templates.append(("bigtpl", f", {a.ballast_mb} MiB of random data in {a.ballast_memory} RAM"))
                for tpl_name, label in templates if 3 in parts else []:
                    row, figures = first_clone_lazy_vs_copy(work, tpl_name, remote, a.repeat)
                    row["what"] = f"seconds to the first clone answering, no local template, {a.rtt} RTT{label}"
                    rows.append(row)
                    extra[tpl_name] = figures
        finally:
            server.stop()
        write_results("vm", rows, {"memory": a.memory, "count": a.count, "repeat": a.repeat,
                                   "clone seconds": clone_s, "boot seconds": boot_s,
                                   "clone steps (median s from the command's call of vm.clone)":
                                       median_steps(clone_steps),
                                   "seconds each booted VM took to answer (part 2)": boot_each,
                                   "load average at start": load_start, "load average at end": os.getloadavg(),
                                   **{f"{k} ({n})": v for n, f in extra.items() for k, v in f.items()},
                                   "command": "python bench/bench_vm.py " + " ".join(sys.argv[1:])})
    finally:
        for r in [work / "v", *work.glob("*lazy*"), *work.glob("*copy*")]:
            if (r / "vms").is_dir():
                for n in os.listdir(r / "vms"):
                    subprocess.run([BP, *local, "vm", "rm", "--force", n, "--dir", str(r)], capture_output=True,
                                   check=False)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
