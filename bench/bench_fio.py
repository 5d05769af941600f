"""I/O in the running OS (issue 24's goal: "fio inside the guest … reaches ≥ 0.95× the same fio on
the plain disk"). The same emulated PC (qemu TCG, SeaBIOS, its NIC first and its disk second, as
bench_netboot's every-day rows) boots the same image (tools/bootimage.py built with ``fio=True``,
``bp.mode=fio``), whose init lays out a 256 MiB file in its root file system with fio and then runs
four jobs on it, direct I/O through libaio, each three times for a few seconds (``BP-FIO job=…``
lines): 4 KiB random read at QD1 (``rr1``) and QD16 (``rr16``), 1 MiB sequential read (``sr``,
QD4) and 1 MiB sequential write (``sw``, QD4).

Three disks, the same image:

- ``plain``: no blockprov: the image made bootable by tools/bootdisk.py (as bench_netboot's plain
  row) on a network whose DHCP names no boot file;
- ``restore``, ``keep``: a PC blockprov provisioned (``before-boot``; its next boot is the
  warm-up's), booting every day from its own disk: the repository answers ``exit``, the disk's loader boots the fast
  initramfs, the root is the native data path (restore: a dm-snapshot of the image over the
  golden reserve, the last session's store dropped at boot, so the file is laid out afresh in the
  store; keep: dm-era straight over the image in place).

The blockprov PC's resident agent starts only once the machine is quiet (netboot/everyday.py): each
sample records the uptime it started at (``resident_at``, None if not before the power-off) beside
fio's end (``done_at``), so the figures say whether it ran during fio.

The host (2 cores shared, qemu TCG) drifts by more than the goal's 5 % within one run, so the
comparison is made robust rather than trusted to medians of a few boots:

- a warm-up round (``--warmup``, default 1) of all three disks runs first, its figures printed and
  written (``warmup`` in the JSON) but not counted: the first boots of a run meet a host still
  settling (the plain disk's own figures used to rise round by round);
- every round then boots the three disks back to back, their order turned each round, so each
  blockprov sample has a plain neighbour minutes away;
- a job's ratio is per round (``restore`` or ``keep`` / the same round's ``plain``, IOPS), and the
  row's figure is the **median of those paired ratios**, with their minimum and maximum (the
  spread) and how many rounds reached the goal beside it; the ratio of the medians stays as a
  second figure;
- each boot runs each job three times (fio's ``ramp_time=1``, 4 s) and its figure is their median;
  every round's figures are printed as they come and kept in the JSON and the table.

``uptime`` is read at the start, between rounds and at the end.

Run: ``nice -n 5 .venv/bin/python bench/bench_fio.py [--size 1G] [--repeat 4] [--warmup 1]``.
Results: bench/out/fio.{json,md}, bench/results/fio.md (the table) and bench/results/fio.png.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_netboot import BP, EVERYDAY, RESULTS, disk_size, uptime
from common import OUT, WORK, drop_caches, write_results
from tests import bootvm
from tests.boot.netboot_helpers import NetBoot, assign, blank_disk, netboot
from tests.procs import start_server

MODE = "fio"
V1 = "lab:v1"
APPEND = f"console=ttyS0 quiet panic=-1 no_timer_check bp.mode={MODE}"
MAC = {"restore": "52:54:00:12:34:f1", "keep": "52:54:00:12:34:f2"}
DISKS = ("plain", "restore", "keep")
JOBS = {"rr1": "4 KiB random read, QD1", "rr16": "4 KiB random read, QD16", "sr": "1 MiB sequential read, QD4",
        "sw": "1 MiB sequential write, QD4"}
GOAL = 0.95
FIO_LINE = re.compile(r"BP-FIO job=(\w+) run=(\d+) iops=(\d+) kbs=(\d+)")
RESIDENT_LINE = re.compile(r"the resident agent starts at uptime ([\d.]+) s")


def cli(data: Path, *args: str) -> str:
    return subprocess.run([BP, "--data", str(data), *args], check=True, capture_output=True, text=True,
                          timeout=600).stdout


def figures(b: NetBoot) -> dict[str, dict[str, Any]]:
    """Each job's runs on the console, and their medians."""
    runs: dict[str, list[tuple[int, int]]] = {}
    for job, _run, iops, kbs in FIO_LINE.findall(b.console):
        runs.setdefault(job, []).append((int(iops), int(kbs)))
    if set(runs) != set(JOBS) or any(len(v) < 3 for v in runs.values()):
        raise RuntimeError(f"fio: not every job ran three times ({sorted(runs)})\n{b.tail(20)}")
    return {j: {"iops": statistics.median(i for i, _k in v), "kbs": statistics.median(k for _i, k in v),
                "runs": v} for j, v in runs.items()}


class Bench:
    def __init__(self, tmp: Path, image: bootvm.bootimage.Built, url: str, timeout: float, name: str) -> None:
        self.tmp, self.image, self.url, self.timeout, self.name = tmp, image, url, timeout, name

    def disk(self, which: str) -> Path:
        return self.tmp / f"{which}.raw"

    def prepare(self) -> None:
        bootvm.bootable_disk(self.image, self.disk("plain"), APPEND)
        for policy in ("restore", "keep"):  # provisioned once, then a session: each sample is the next day's boot
            disk = blank_disk(self.disk(policy), disk_size(self.image))
            assign(self.url, MODE, policy, ref=V1, hydrate="before-boot", readahead=None, mac=MAC[policy])
            b = netboot(disk, self.url, self.tmp / f"{policy}-prep.log", timeout=self.timeout, count=False,
                        disk_second=True, mac=MAC[policy])
            if b.done.get("mode") != MODE or "native data path" not in b.console:
                raise RuntimeError(f"{policy}: the provisioning boot did not end native\n{b.tail(20)}")
            print(f"  {policy}: provisioning boot: {b.seconds:.1f} s", flush=True)

    def sample(self, which: str, i: int, warmup: bool = False) -> dict[str, Any]:
        """One boot of ``which`` and its fio figures. ``warmup``: the boot after provisioning need
        not be an every-day boot yet (its figures are not counted)."""
        log = self.tmp / f"{which}-{i}.log"
        try:
            return self._sample(which, i, warmup, log)
        finally:  # every console, a failed boot's too, for a look afterwards
            if log.exists():
                shutil.copyfile(log, OUT / f"{self.name}-{which}-{'w' if warmup else ''}{i}.log")

    def _sample(self, which: str, i: int, warmup: bool, log: Path) -> dict[str, Any]:
        if which == "plain":
            b = netboot(self.disk(which), self.url, log, timeout=self.timeout, count=False, disk_second=True,
                        unreachable=True)
        else:
            b = netboot(self.disk(which), self.url, log, timeout=self.timeout, count=False, disk_second=True,
                        mac=MAC[which])
            if not warmup and (EVERYDAY not in b.console or "native data path" not in b.console):
                raise RuntimeError(f"{which}: not an every-day boot on the native path\n{b.tail(20)}")
        if b.done.get("mode") != MODE or b.done.get("fio") != "done":
            raise RuntimeError(f"{which}: no fio marker (the boot ended after {b.seconds:.0f} s)\n{b.tail(20)}")
        # when the resident agent started (it waits for a quiet machine: netboot/everyday.py), if before the end
        m = RESIDENT_LINE.search(b.console)
        return {"round": i, "seconds": round(b.seconds, 1), "jobs": figures(b),
                "resident_at": float(m.group(1)) if m else None, "done_at": b.done.get("uptime")}


def rows_of(samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    med = statistics.median
    rows = []
    for job, label in JOBS.items():
        got = {w: [s["jobs"][job] for s in samples[w]] for w in DISKS}
        if not all(got.values()):
            continue
        iops = {w: med(x["iops"] for x in got[w]) for w in DISKS}
        mibs = {w: med(x["kbs"] for x in got[w]) / 1024 for w in DISKS}
        row: dict[str, Any] = {"job": label, "plain IOPS": iops["plain"], "plain MiB/s": mibs["plain"]}
        for w in ("restore", "keep"):
            q = paired(samples, w, job)
            row[f"{w} IOPS"] = iops[w]
            row[f"{w} / plain"] = round(med(q), 3) if q else "-"  # the median of the rounds' paired ratios
            row[f"{w} spread"] = f"{min(q):.2f}–{max(q):.2f}" if q else "-"
            row[f"{w} rounds ≥ {GOAL}"] = f"{sum(x >= GOAL for x in q)}/{len(q)}"
            row[f"{w} ratio of medians"] = round(iops[w] / iops["plain"], 3) if iops["plain"] else "-"
        row["samples (IOPS) plain ; restore ; keep"] = " ; ".join(
            "/".join(f"{x['iops']:.0f}" for x in got[w]) for w in DISKS)
        row["round by round restore ; keep / plain"] = " ; ".join(
            "/".join(f"{q:.2f}" for q in paired(samples, w, job)) for w in ("restore", "keep"))
        rows.append(row)
    return rows


def paired(samples: dict[str, list[dict[str, Any]]], which: str, job: str) -> list[float]:
    """``which`` / plain, IOPS, in each round that has both (neighbours in time: the host's load
    drifts less between them than across the run)."""
    plain = {s["round"]: s["jobs"][job]["iops"] for s in samples["plain"]}
    return [s["jobs"][job]["iops"] / plain[s["round"]] for s in samples[which] if plain.get(s["round"])]


def goals(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        for w in ("restore", "keep"):
            q = r[f"{w} / plain"]
            if isinstance(q, float):
                out.append(f"{r['job']}, {w}: median of the rounds' ratios {q:.3f} (spread {r[f'{w} spread']}, "
                           f"{r[f'{w} rounds ≥ {GOAL}']} rounds ≥ {GOAL}) — {'met' if q >= GOAL else 'NOT met'}")
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.27
    for n, w in enumerate(DISKS):
        vals = [1.0 if w == "plain" else float(r[f"{w} / plain"]) for r in rows]
        xs = [j + (n - 1) * width for j in range(len(rows))]
        spread = [(0.0, 0.0) if w == "plain" else tuple(float(x) for x in r[f"{w} spread"].split("–")) for r in rows]
        err = [[max(0.0, v - lo) for v, (lo, _hi) in zip(vals, spread, strict=True)],  # (the spread is rounded)
               [max(0.0, hi - v) for v, (_lo, hi) in zip(vals, spread, strict=True)]]
        bars = ax.bar(xs, vals, width, yerr=err, capsize=3,
                      label="plain disk" if w == "plain" else f"blockprov every-day, {w}")
        for bar, r, v in zip(bars, rows, vals, strict=True):
            ax.annotate(f"{r[f'{w} IOPS']:.0f} IOPS\n{v:.2f}×", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(GOAL, color="red", linestyle="--", linewidth=1, label=f"goal ≥ {GOAL}× plain")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["job"] for r in rows], fontsize=8)
    ax.set_ylabel("IOPS / the same round's plain disk (median; bars: min–max)")
    top = max(float(r[f"{w} spread"].split("–")[1]) for r in rows for w in ("restore", "keep"))
    ax.set_ylim(0, max(1.3, 1.1 * top))
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="virtual size of the test image (default 1G)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files in the image (default 300)")
    ap.add_argument("--repeat", type=int, default=4, help="rounds counted (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted (default 1)")
    ap.add_argument("--timeout", type=float, default=900, help="longest one boot may take (s)")
    ap.add_argument("--name", default="fio", help="the results' name (default fio)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the finally's clean-up still runs
    load: dict[str, str] = {"start": uptime()}
    print(f"load at start: {load['start']}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="fio-"))
    image = bootvm.build_image(size=a.size, fill_mb=a.fill_mb, fio=True)
    data = tmp / "repo" / "data"
    data.parent.mkdir(parents=True)
    cli(data, "import", str(image.disk), V1)
    cli(data, "boot-files", "build", V1, "--output", str(tmp / "initrd.img"))
    server, url = start_server(data)
    samples: dict[str, list[dict[str, Any]]] = {w: [] for w in DISKS}
    warm: dict[str, list[dict[str, Any]]] = {w: [] for w in DISKS}
    failures: dict[str, list[str]] = {w: [] for w in DISKS}
    meta: dict[str, Any] = {
        "image": f"tools/bootimage.py fio=True, {a.size}, {a.fill_mb} MB of files from /usr; bp.mode=fio",
        "qemu": "qemu-system-x86_64 -machine accel=tcg -m 1024, 1 vCPU, SeaBIOS, virtio-net (iPXE ROM) first, "
                "virtio-blk disk second (cache=writeback, raw file)",
        "fio": "in the guest: /fio.dat 256 MiB laid out with 1 MiB writes, then each job 3× (--direct=1 "
               "--ioengine=libaio --ramp_time=1 --runtime=4 --time_based); a boot's figure = median of its runs",
        "rounds": f"{a.warmup} warm-up (not counted), then {a.repeat} counted; each round the three disks "
                  "back to back, their order turned; a job's ratio = the median of the rounds' paired ratios",
        "command": f"nice -n 5 .venv/bin/python bench/bench_fio.py --size {a.size} --repeat {a.repeat} "
                   f"--warmup {a.warmup}"
                   + (f" --name {a.name}" if a.name != "fio" else ""),
    }
    try:
        bench = Bench(tmp, image, url, a.timeout, a.name)
        bench.prepare()
        for i in range(-a.warmup, a.repeat):  # negative: a warm-up round
            tag = f"warm-up {-i}" if i < 0 else f"round {i}"
            order = DISKS[i % 3:] + DISKS[:i % 3]
            for w in order:
                drop_caches()
                try:
                    s = bench.sample(w, abs(i) if i < 0 else i, warmup=i < 0)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    failures[w].append(f"{tag}: " + (str(e).splitlines()[0] if str(e) else type(e).__name__))
                    print(f"  {tag} {w:8} FAILED: {str(e)[-1500:]}", flush=True)
                    continue
                (warm if i < 0 else samples)[w].append(s)
                each = (f"{j} {x['iops']:.0f} IOPS {x['kbs'] / 1024:.1f} MiB/s" for j, x in s["jobs"].items())
                print(f"  {tag} {w:8} {s['seconds']:6.1f} s  " + "  ".join(each)
                      + f"  (resident agent started at uptime {s['resident_at']}, fio done at {s['done_at']})",
                      flush=True)
            load[f"after {tag}"] = uptime()
            print(f"  load: {load[f'after {tag}']}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load["end"] = uptime()
    rows = rows_of(samples)
    g = goals(rows)
    meta |= {"load": load, "failures": {w: f for w, f in failures.items() if f}, "goals": "; ".join(g)}
    md = write_results(a.name, rows, meta)
    (OUT / f"{a.name}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "samples": samples, "warmup": warm, "goals": g}, indent=2, default=str))
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(md, RESULTS / f"{a.name}.md")
    if rows:
        plot(rows, RESULTS / f"{a.name}.png",
             f"fio in the guest, every-day blockprov PC (native path) vs the plain disk; median of {a.repeat} "
             f"interleaved rounds' paired ratios, after {a.warmup} warm-up (TCG)")
    print("\n".join(g), flush=True)


if __name__ == "__main__":
    main()
