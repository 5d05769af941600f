"""Network-boot benchmark (issue 13, "Benchmark"): a PC (qemu TCG, the NIC's own iPXE ROM, a blank
virtio disk) boots the test image (tools/bootimage.py, ``bp.mode=plain`` unless said) from the
repository, on loopback and over a 20 ms link. We measure the time from qemu's start to the guest's
``BLOCKPROV-BOOT-DONE`` marker (the machine is usable) and what the repository sent.

Scenarios, each on a fresh blank disk per repeat:

- ``bp-first``: blockprov network boot onto the blank disk, ``hydrate=background`` (the default):
  the machine runs at once, the rest is copied while it works;
- ``bp-before-boot``: blockprov's own ``hydrate=before-boot`` (everything on the disk first);
- ``fog``: the FOG/Clonezilla model, measured with a peer tool: ``qemu-img convert`` of the
  repository's raw HTTP view, through the same link, onto the blank disk image, then a boot of
  that disk (direct kernel boot of the image's kernel: the imaging tool's own network boot is not
  counted, which favours the FOG model);
- ``bp-restore``: on the machine that ``bp-before-boot`` provisioned, a session under ``keep``
  writes 32 MiB (bootimage's ``hog`` mode: ~1.5 % of a 2 GiB image), then the host's policy is
  ``restore`` and the machine reboots: only the chunks the session modified are reset, and
  fetched again when read (or by the background copy);
- ``bp-update``: the host moved to v2 (the administrator's change, tests/boot/netboot_helpers.py
  ``admin_version``): the next boot updates the disk by diff.

"Re-imaging" is the ``fog`` row. What the repository sent is counted twice: all bytes through the
link (bench/wanproxy.py, both links; it includes the iPXE script, the kernel and the initramfs the
firmware fetches) and chunks (the repository's ``blockprov_chunks_served_total``). ``--big-size``
repeats first, before-boot, fog and restore on a larger image (loopback) for the "flat in image size" goal.

Run: ``.venv/bin/python bench/bench_netboot.py [--size 2G] [--big-size 4G] [--repeat 2] [--skip wan,big]``.
Results: bench/out/netboot.{json,md}, bench/results/netboot.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import OUT, ROOT, VENV_BIN, WORK, drop_caches, write_results
from tests import bootvm
from tests.boot.netboot_helpers import admin_version, assign, blank_disk, chunks_served, netboot
from tests.procs import start_server
from wanproxy import ProxyThread, parse_duration, parse_rate

BP = str(VENV_BIN / "blockprov")
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20
V1, V2 = "lab:v1", "lab:v2"


@dataclass
class Sample:
    seconds: float  # what the user waits: preparation (a copy) plus boot
    prep_seconds: float = 0.0
    down_bytes: int = 0  # repository → PC through the link
    chunks: int = 0  # chunks the repository sent
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Repo:
    """One repository behind one link, holding v1 and v2 with the blockprov boot files."""

    link: str
    proxy: ProxyThread
    server_url: str  # direct: for the CLI and the metrics, not counted by the link
    raw_url: str  # v1's raw view through the link
    image: bootvm.bootimage.Built
    changed: int  # chunks that differ between v1 and v2
    chunk_size: int
    tmp: Path
    timeout: float

    @property
    def url(self) -> str:
        return self.proxy.url

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int, int]:
        """Run ``fn`` from a zeroed link counter: (its result, bytes the repository sent, chunks)."""
        self.proxy.reset()
        c0 = chunks_served(self.server_url)
        r = fn()
        return r, self.proxy.stats()["down_bytes"], chunks_served(self.server_url) - c0

    def boot(self, disk: Path, name: str, mode: str, policy: str, hydrate: str, ref: str = V1) -> Any:
        assign(self.server_url, mode, policy, ref=ref, hydrate=hydrate, readahead=None)
        b = netboot(disk, self.url, self.tmp / f"{name}.log", timeout=self.timeout)
        if not b.done or b.done.get("mode") != mode:
            raise RuntimeError(f"{name}: no boot marker\n{b.tail(30)}")
        return b


def s_first(r: Repo, i: int) -> Sample:
    disk = blank_disk(r.tmp / f"first-{i}.raw", disk_size(r.image))
    try:
        b, down, chunks = r.measure(lambda: r.boot(disk, "first", "plain", "restore", "background"))
        return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))
    finally:
        disk.unlink(missing_ok=True)


def s_before_boot(r: Repo, i: int) -> Sample:
    """Provisions ``machine-i.raw`` (kept for restore and update)."""
    disk = blank_disk(r.tmp / f"machine-{i}.raw", disk_size(r.image))
    b, down, chunks = r.measure(lambda: r.boot(disk, "before", "plain", "keep", "before-boot"))
    return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b))


def s_fog(r: Repo, i: int) -> Sample:
    disk = r.tmp / f"fog-{i}.raw"
    disk.unlink(missing_ok=True)

    def image_then_boot() -> tuple[float, bootvm.BootResult]:
        t = time.perf_counter()
        # -m 1: with more coroutines qemu 7.2's curl driver hangs in some runs (bench_boot.py)
        subprocess.run(["qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "raw", r.raw_url, str(disk)],
                       check=True, timeout=r.timeout)
        prep = time.perf_counter() - t
        return prep, bootvm.boot(r.image.kernel, r.image.initrd, disk, mode="plain", timeout=r.timeout,
                                 stats=False)

    try:
        (prep, b), down, chunks = r.measure(image_then_boot)
        if not b.ok or b.seconds is None:
            raise RuntimeError(f"fog: the imaged disk did not boot\n{b.tail(20)}")
        return Sample(prep + b.seconds, prep_seconds=prep, down_bytes=down, chunks=chunks)
    finally:
        disk.unlink(missing_ok=True)


def s_restore(r: Repo, i: int) -> Sample:
    disk = r.tmp / f"machine-{i}.raw"
    r.boot(disk, "session", "hog", "keep", "background")  # the session: 32 MiB written to the root
    b, down, chunks = r.measure(lambda: r.boot(disk, "restore", "plain", "restore", "background"))
    return Sample(b.seconds, down_bytes=down, chunks=chunks,
                  extra=milestones(b) | {"reset": b.number(r"reset on start: (\d+) chunk")})


def s_update(r: Repo, i: int) -> Sample:
    disk = r.tmp / f"machine-{i}.raw"
    try:
        b, down, chunks = r.measure(lambda: r.boot(disk, "update", "plain", "restore", "background", ref=V2))
        if "by diff" not in b.console:
            raise RuntimeError(f"update: no update by diff\n{b.tail(20)}")
        return Sample(b.seconds, down_bytes=down, chunks=chunks, extra=milestones(b) | {"changed": r.changed})
    finally:
        disk.unlink(missing_ok=True)


def milestones(b: Any) -> dict[str, Any]:
    """When the firmware had fetched the boot files (the initramfs starts), the agent served the
    root and the image's own init ran: seconds from qemu's start."""
    names = {"blockprov: initramfs started": "t_initramfs", "blockprov: /dev/nbd0 serving": "t_serving",
             "BLOCKPROV-INIT": "t_init"}
    return {names[k]: round(v, 1) for k, v in b.seen.items() if k in names}


SCENARIOS: list[tuple[str, str, Callable[[Repo, int], Sample]]] = [
    ("first", "blockprov first boot, blank disk (background hydration)", s_first),
    ("before", "blockprov hydrate=before-boot, blank disk", s_before_boot),
    ("fog", "FOG model: qemu-img convert of the raw view, then boot", s_fog),
    ("restore", "blockprov restore reboot after a 32 MiB session", s_restore),
    ("update", "blockprov update v1→v2 at boot", s_update),
]


def disk_size(image: bootvm.bootimage.Built) -> int:
    """The PC's blank disk: the image plus blockprov's metadata partition, rounded up to 1 GiB."""
    need = image.disk.stat().st_size + (128 << 20)
    return -(-need // (1 << 30)) * (1 << 30)


def cli(*args: str, timeout: float = 600) -> str:
    return subprocess.run([BP, *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def make_repo(data: Path, image: bootvm.bootimage.Built, v2: Path, initrd: Path | None) -> tuple[dict[str, Any], Path]:
    """Import v1 and v2 into ``data`` (embedded) and give both the blockprov boot files; the
    initramfs is built once (``boot-files build``) and set on later repositories."""
    cli("--data", str(data), "import", str(image.disk), V1)
    cli("--data", str(data), "import", str(v2), V2)
    if initrd is None:
        out = data.parent / "initrd.img"
        built = json.loads(cli("--data", str(data), "boot-files", "build", V1, "--output", str(out), "--json"))
        (data.parent / "built.json").write_text(json.dumps(built))
    else:
        out = initrd
        built = json.loads((initrd.parent / "built.json").read_text())
        cli("--data", str(data), "boot-files", "set", V1, "--kernel", built["build"]["kernel"], "--initrd", str(out),
            "--cmdline", built["cmdline"])
    cli("--data", str(data), "boot-files", "set", V2, "--kernel", built["build"]["kernel"], "--initrd", str(out),
        "--cmdline", built["cmdline"])
    return built, out


def run_link(link: str, rtt: float, rate: float | None, image: bootvm.bootimage.Built, v2: Path, tmp: Path,
             keys: list[str], repeat: int, timeout: float, retries: int, initrd: Path | None,
             size: str) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    data = tmp / f"repo-{link}-{size}" / "data"
    data.parent.mkdir(parents=True, exist_ok=True)
    _built, initrd = make_repo(data, image, v2, initrd)
    changed = len(json.loads(cli("--data", str(data), "diff", V1, V2, "--json"))["changed"])
    show = json.loads(cli("--data", str(data), "show", V1, "--json"))
    server, url = start_server(data)
    rows, raw = [], {}
    try:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        with ProxyThread((host, int(port)), rtt=rtt, rate=rate) as proxy:
            raw_url = json.loads(cli("--repo", proxy.url, "show", V1, "--json"))["raw_url"]
            r = Repo(link, proxy, url, raw_url, image, changed, int(show["chunk_size"]), tmp, timeout)
            samples: dict[str, list[Sample]] = {k: [] for k in keys}
            failures: dict[str, list[str]] = {k: [] for k in keys}
            for i in range(repeat + retries):
                if all(len(samples[k]) >= repeat for k in keys):
                    break
                for key, label, fn in SCENARIOS:
                    if key not in keys or len(samples[key]) >= repeat:
                        continue
                    if key in ("restore", "update") and not (tmp / f"machine-{i}.raw").exists():
                        continue  # needs the machine ``before`` provisioned in this round
                    drop_caches()
                    try:
                        s = fn(r, i)
                    except (RuntimeError, AssertionError, subprocess.SubprocessError, OSError) as e:
                        failures[key].append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                        print(f"  {link:8} {size:4} {label:58} FAILED: {str(e)[-1500:]}", flush=True)
                        continue
                    samples[key].append(s)
                    print(f"  {link:8} {size:4} {label:58} {s.seconds:7.1f} s, sent {s.down_bytes / MIB:8.1f} MiB, "
                          f"{s.chunks} chunks {s.extra or ''}", flush=True)
                for f in tmp.glob(f"machine-{i}.raw"):
                    f.unlink()
            for key, label, _fn in SCENARIOS:
                if key in keys:
                    rows.append(row(link, size, label, samples[key], failures[key]))
                    raw[f"{link}/{size}/{key}"] = [s.__dict__ for s in samples[key]]
            fair = fog_with_netboot(samples.get("fog", []), samples.get("first", []), link, size)
            if fair:
                rows.append(fair)
    finally:
        server.stop()
        shutil.rmtree(data.parent / "data", ignore_errors=True)
    raw[f"{link}/{size}/image"] = {"chunks": show["chunks"], "zero_chunks": show["zero_chunks"],
                                   "chunk_size": show["chunk_size"], "changed_v1_v2": changed}
    return rows, raw, initrd


FOG_FAIR = "FOG model + the PC's network boot into its imaging system"


def fog_with_netboot(fog: list[Sample], first: list[Sample], link: str, size: str) -> dict[str, Any] | None:
    """The FOG model as a PC lives it: it first network-boots its imaging system (firmware, iPXE,
    a kernel and an initramfs: timed here as blockprov's own first boot until its initramfs
    starts, same link), then copies, then boots the disk. A composed row: medians added."""
    t = [s.extra["t_initramfs"] for s in first if "t_initramfs" in s.extra]
    if not fog or not t:
        return None
    med = statistics.median
    return {"link": link, "image": size, "scenario": FOG_FAIR, "seconds": med(s.seconds for s in fog) + med(t),
            "repo sent MiB": med(s.down_bytes for s in fog) / MIB, "chunks sent": 0,
            "note": f"composed: FOG row + {med(t):.1f} s to the initramfs (boot files' bytes not added)"}


def row(link: str, size: str, label: str, samples: list[Sample], failures: list[str]) -> dict[str, Any]:
    med = statistics.median
    note = [f"{len(failures)} failed: {failures[0][:100]}"] if failures else []
    if not samples:
        return {"link": link, "image": size, "scenario": label, "seconds": "-", "repo sent MiB": "-",
                "chunks sent": "-", "note": "; ".join(note) or "not run"}
    if any(s.prep_seconds for s in samples):
        note.append(f"copy {med(s.prep_seconds for s in samples):.1f} s")
    for k in ("reset", "changed"):
        if any(k in s.extra for s in samples):
            note.append(f"{k} {med(s.extra[k] for s in samples):.0f} chunks")
    for k, what in (("t_initramfs", "initramfs"), ("t_serving", "root served"), ("t_init", "image's init")):
        if all(k in s.extra for s in samples):
            note.append(f"{what} at {med(s.extra[k] for s in samples):.1f} s")
    if len(samples) > 1:
        note.append("samples " + "/".join(f"{s.seconds:.1f}" for s in samples))
    return {"link": link, "image": size, "scenario": label, "seconds": med(s.seconds for s in samples),
            "repo sent MiB": med(s.down_bytes for s in samples) / MIB,
            "chunks sent": med(s.chunks for s in samples), "note": "; ".join(note)}


def goals(rows: list[dict[str, Any]], boot_file_mib: float, changed: dict[str, int], chunk_mib: float,
          size: str, big: str) -> list[str]:
    def get(link: str, sz: str, key: str, col: str) -> float | None:
        label = next(lab for k, lab, _ in SCENARIOS if k == key)
        r = next((r for r in rows if r["link"] == link and r["image"] == sz and r["scenario"] == label), None)
        return float(r[col]) if r and isinstance(r[col], (int, float)) else None

    out = []

    def check(text: str, a: float | None, b: float | None, limit: float) -> None:
        if a is None or not b:
            out.append(f"{text}: not measured")
        else:
            out.append(f"{text}: {a / b:.3f} — {'met' if a / b <= limit else 'NOT met'}")

    def fair(link: str, sz: str) -> float | None:
        r = next((r for r in rows if r["link"] == link and r["image"] == sz and r["scenario"] == FOG_FAIR), None)
        return float(r["seconds"]) if r else None

    for link in ("wan", "loopback"):
        for sz in (size, big):
            what = "goal" if link == "wan" else "not a goal"
            check(f"first usable boot ≤ 0.3× the FOG model ({link}, {sz}, {what}; seconds)",
                  get(link, sz, "first", "seconds"), get(link, sz, "fog", "seconds"), 0.3)
            check(f"first usable boot ≤ 0.3× the FOG model with its network boot ({link}, {sz}, {what}; seconds)",
                  get(link, sz, "first", "seconds"), fair(link, sz), 0.3)
    for link in ("loopback", "wan"):
        for sz in (size, big):
            check(f"restore at boot ≤ 0.02× re-imaging, bytes sent ({link}, {sz})",
                  get(link, sz, "restore", "repo sent MiB"), get(link, sz, "fog", "repo sent MiB"), 0.02)
            check(f"restore at boot vs re-imaging, seconds ({link}, {sz}; a boot under TCG is most of both)",
                  get(link, sz, "restore", "seconds"), get(link, sz, "fog", "seconds"), 0.02)
    a, b = get("loopback", size, "restore", "repo sent MiB"), get("loopback", big, "restore", "repo sent MiB")
    if a is not None and b is not None:
        out.append(f"restore bytes flat in image size: {size} {a:.1f} MiB, {big} {b:.1f} MiB "
                   f"({b / a if a else 0:.2f}×) — {'met' if b <= 1.25 * a + 1 else 'NOT met'}")
    for link in ("loopback", "wan"):
        ch = changed.get(link)
        sent = get(link, size, "update", "chunks sent")
        check(f"update chunks sent ≤ 1.1× the changed chunks ({link})", sent, ch, 1.1)
        mib = get(link, size, "update", "repo sent MiB")
        if mib is not None and ch:
            out.append(f"update bytes sent ({link}): {mib:.1f} MiB in all, {mib - boot_file_mib:.2f} MiB besides the "
                       f"kernel and initramfs ({boot_file_mib:.1f} MiB, fetched by the firmware at every boot); "
                       f"changed chunks {ch} × {chunk_mib:g} MiB = {ch * chunk_mib:.2f} MiB")
    return out


SHORT = {label: short for (_k, label, _f), short in zip(SCENARIOS, ("bp first", "bp before-boot", "FOG (peer copy)",
                                                                     "bp restore", "bp update"), strict=True)}
SHORT[FOG_FAIR] = "FOG + its netboot"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["image"], r["scenario"]) for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / max(1, len(links))
    for ax, col, ylabel in ((axes[0], "seconds", "seconds from qemu start to the boot marker"),
                            (axes[1], "repo sent MiB", "MiB the repository sent (log)")):
        for i, link in enumerate(links):
            vals = []
            for g in groups:
                r = next((r for r in rows if r["link"] == link and (r["image"], r["scenario"]) == g), None)
                vals.append(float(r[col]) if r and isinstance(r[col], (int, float)) else 0.0)
            xs = [j + (i - (len(links) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, vals, width, label=link)
            for bar, v in zip(bars, vals, strict=True):
                if v:
                    ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([textwrap.fill(f"{SHORT.get(g[1], g[1])} {g[0]}", 12) for g in groups], fontsize=7)
        ax.set_ylabel(ylabel)
        if col != "seconds":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="virtual size of the test image (default 2G)")
    ap.add_argument("--big-size", default="4G",
                    help="a larger image for the flatness check (first, before, fog, restore; loopback; default 4G)")
    ap.add_argument("--fill-mb", type=int, default=300, help="MB of files in the image (default 300)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of scenarios (first,before,fog,restore,update) "
                                               "and/or links (loopback,wan) and/or big")
    ap.add_argument("--rtt", default="20ms", help="round-trip time of the link (default 20ms)")
    ap.add_argument("--rate", default="1gbit", help="bandwidth of the link (default 1gbit)")
    ap.add_argument("--timeout", type=float, default=900, help="longest a boot or a copy may take (s)")
    ap.add_argument("--retries", type=int, default=1, help="extra rounds when runs failed")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from bench/out/netboot.json")
    a = ap.parse_args()
    if a.plot_only:
        saved = json.loads((OUT / "netboot.json").read_text())
        plot(saved["rows"], RESULTS / "netboot.png", f"PC network boot under TCG ({a.size} image, median of "
                                                     f"{saved['meta']['repeats']}): time to usable and bytes sent")
        return
    skip = set(filter(None, a.skip.split(",")))
    keys = [k for k, _l, _f in SCENARIOS if k not in skip]
    load_start = uptime()
    print(f"load at start: {load_start}", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="netboot-"))
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    initrd: Path | None = None
    plan = [(a.size, link, rtt, rate) for link, rtt, rate in
            (("loopback", 0.0, None), ("wan", parse_duration(a.rtt), parse_rate(a.rate))) if link not in skip]
    if "big" not in skip and "loopback" not in skip:
        plan.append((a.big_size, "loopback", 0.0, None))
    images: dict[str, tuple[bootvm.bootimage.Built, Path]] = {}
    boot_file_mib = 0.0
    try:
        for size, link, rtt, rate in plan:
            if size not in images:
                image = bootvm.bootimage.build(WORK / f"bootimage-{size}-{a.fill_mb}", size=size, fill_mb=a.fill_mb)
                vdir = tmp / f"v2-{size}"
                vdir.mkdir()
                images[size] = (image, admin_version(image.disk, vdir))
                print(f"image {size}: {image.info['files']} files, {int(image.info['file_bytes']) / 1e6:.0f} MB",
                      flush=True)
            image, v2 = images[size]
            ks = keys if size == a.size else [k for k in keys if k in ("first", "before", "fog", "restore")]
            r, rw, initrd = run_link(link, rtt, rate, image, v2, tmp, ks, a.repeat, a.timeout, a.retries, initrd,
                                     size)
            rows += r
            raw |= rw
            if initrd is not None:
                built = json.loads((initrd.parent / "built.json").read_text())
                boot_file_mib = (Path(built["build"]["kernel"]).stat().st_size + initrd.stat().st_size) / MIB
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_end = uptime()
    changed = {k.split("/")[0]: int(v["changed_v1_v2"]) for k, v in raw.items()
               if k.endswith("/image") and f"/{a.size}/" in k}
    chunk_mib = next((int(v["chunk_size"]) / MIB for k, v in raw.items() if k.endswith("/image")), 1.0)
    g = goals(rows, boot_file_mib, changed, chunk_mib, a.size, a.big_size)
    meta: dict[str, Any] = {
        "image": f"tools/bootimage.py, {a.size} (and {a.big_size} for flatness), {a.fill_mb} MB of files from /usr",
        "links": f"loopback (counting proxy, no delay) and {a.rtt} RTT, {a.rate} via bench/wanproxy.py",
        "qemu": "qemu-system-x86_64 -machine accel=tcg -m 1024, virtio-net with its iPXE ROM "
                "(-netdev user,bootfile=…/v1/boot/MAC), blank virtio disk; the FOG row boots its disk by "
                "direct kernel boot (-m 512)",
        "repeats": a.repeat, "cpus": os.cpu_count(), "load at start": load_start, "load at end": load_end,
        "boot files per network boot": f"{boot_file_mib:.1f} MiB (kernel + initramfs)",
        "command": f"python bench/bench_netboot.py --size {a.size} --big-size {a.big_size} --repeat {a.repeat}"
                   + (f" --skip {a.skip}" if a.skip else ""),
    }
    write_results("netboot", rows, meta | {"goals": "; ".join(g)})
    (OUT / "netboot.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": g, "samples": raw},
                                                 indent=2, default=str))
    print("\n".join(g))
    plot(rows, RESULTS / "netboot.png", f"PC network boot under TCG ({a.size} image, median of {a.repeat}): "
                                        "time to usable and bytes sent")
    print(f"wrote {OUT / 'netboot.json'}, {OUT / 'netboot.md'}, {RESULTS / 'netboot.png'}")


if __name__ == "__main__":
    main()
