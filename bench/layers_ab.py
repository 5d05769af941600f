"""The hot paths before and after issue 23 (the cache as layers built outside it), interleaved A/B.

Two checkouts of blockprov, each with its own ``.venv`` (``--base DIR``: main before the change;
``--head DIR``: after it), serve the same image from the same embedded repository, fully local:

- an agent (``attach``) on a hydrated cache: sequential read of the whole disk in 1 MiB requests
  (``nbdcopy`` to null, GiB/s), 4 KiB random reads at queue depth 16 and at queue depth 1
  (``fio --ioengine=nbd``, IOPS) — bench_agent.py's hot rows;
- an overlay (``clone`` + ``clones serve``) over a hydrated base cache: the same three reads of
  an instance that wrote nothing, so every read goes through the overlay to its base's data file
  (the read-through route issue 23 rewrote) — bench_clones.py's overlay reads;
- qemu-nbd exporting the raw image, the peer, once a round.

Each read also gives the serving process's CPU time per request (per MiB for the sequential read),
from its /proc stat around the run: unlike throughput, what a request costs the server hardly
moves when other work shares the machine.

Rounds alternate the order (base, head, then head, base, …); each figure is the median over the
rounds, and the head/base ratio is what issue 23 bounds (within 5%). The load average is recorded
before and after: this machine is shared.

Run: ``.venv/bin/python bench/layers_ab.py --base ../wt-layers-base --head . [--size 1G] [--rounds 3]``.
Results: bench/out/layers-ab.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_agent import fio_iops, nbdcopy_seconds, qemu_nbd
from common import WORK, realistic_image, write_results
from tests.procs import Proc, first_line

from blockprov.humanize import parse_size

Measure = dict[str, float]


def started(cmd: list[str], what: str) -> tuple[Proc, dict[str, object]]:
    env = dict(os.environ)
    env.pop("BLOCKPROV_REPO", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = first_line(proc, 120)
    try:
        return Proc(proc, line), json.loads(line)
    except ValueError:
        proc.kill()
        raise SystemExit(f"{what} did not start: {line!r} {proc.communicate()[1]}") from None


def cpu_seconds(pid: int) -> float:
    """CPU time the process's live threads have run, in nanoseconds' resolution (the first field of
    each thread's /proc schedstat). /proc stat counts clock ticks (10 ms): a 1 GiB hot read costs
    the server a few ticks, which made its per-MiB figure jump by 10 µs steps. The server's
    threads live as long as it does, so none is missed."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def reads(u: str, size: int, runtime: int, pid: int) -> Measure:
    """Throughput, and the server's CPU per request (µs): what a loaded machine blurs least."""
    gib = size / (1 << 30)
    c0 = cpu_seconds(pid)
    secs = nbdcopy_seconds(u)
    c1 = cpu_seconds(pid)
    qd16 = fio_iops(u, size, runtime)
    c2 = cpu_seconds(pid)
    qd1 = fio_iops(u, size, runtime, iodepth=1)
    c3 = cpu_seconds(pid)
    return {"seq GiB/s": gib / secs, "4K QD16 IOPS": qd16, "4K QD1 IOPS": qd1,
            "seq CPU µs/MiB": (c1 - c0) / (size / (1 << 20)) * 1e6,
            "4K QD16 CPU µs/req": (c2 - c1) / max(1.0, qd16 * runtime) * 1e6,
            "4K QD1 CPU µs/req": (c3 - c2) / max(1.0, qd1 * runtime) * 1e6}


class Tree:
    """One checkout: its CLI, its hydrated cache and its clones directory."""

    def __init__(self, name: str, root: Path, work: Path, data: Path) -> None:
        self.name, self.bp, self.work, self.data = name, str(root / ".venv" / "bin" / "blockprov"), work, data
        work.mkdir(parents=True, exist_ok=True)

    def cli(self, *args: str) -> None:
        subprocess.run([self.bp, "--data", str(self.data), *args], check=True, capture_output=True, timeout=3600)

    def agent(self) -> Proc:
        sock = self.work / "a.sock"
        proc, _ = started([self.bp, "--data", str(self.data), "attach", "bench:v1", "--cache", str(self.work / "cache"),
                           "--socket", str(sock), "--json", "--no-register"], f"{self.name}'s agent")
        return proc

    def clones(self) -> Proc:
        proc, _ = started([self.bp, "--data", str(self.data), "clones", "serve", "--dir", str(self.work / "clones"),
                           "--socket", str(self.work / "c.sock"), "--json", "--no-register"],
                          f"{self.name}'s clones agent")
        return proc

    def prepare(self) -> None:
        """Hydrate the cache and the clones' base (every chunk local), then stop."""
        a = self.agent()
        try:
            subprocess.run(["nbdcopy", f"nbd+unix:///?socket={self.work / 'a.sock'}", "null:"], check=True)
        finally:
            a.stop()
        self.cli("clone", "bench:v1", "--dir", str(self.work / "clones"), "--count", "1", "--prefix", "o")
        c = self.clones()
        try:
            subprocess.run(["nbdcopy", f"nbd+unix:///o1?socket={self.work / 'c.sock'}", "null:"], check=True)
            subprocess.run(["nbdcopy", f"nbd+unix:///o1?socket={self.work / 'c.sock'}", "null:"], check=True)
        finally:
            c.stop()

    def round(self, size: int, runtime: int) -> tuple[Measure, Measure]:
        a = self.agent()
        try:
            hot = reads(f"nbd+unix:///?socket={self.work / 'a.sock'}", size, runtime, a.proc.pid)
        finally:
            a.stop()
        c = self.clones()
        try:
            overlay = reads(f"nbd+unix:///o1?socket={self.work / 'c.sock'}", size, runtime, c.proc.pid)
        finally:
            c.stop()
        return hot, overlay


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--head", type=Path, required=True)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8, help="seconds of each fio run")
    a = ap.parse_args()
    size = parse_size(a.size)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="layers-ab-"))
    load_before = load()
    try:
        image = realistic_image(WORK / f"agent-{a.size}.img", size, ["/usr/lib", "/usr/share"], int(size * 0.6))
        data = tmp / "repo"
        trees = [Tree("base", a.base.resolve(), tmp / "base", data), Tree("head", a.head.resolve(), tmp / "head", data)]
        trees[0].cli("import", str(image), "bench:v1", "--chunk-size", "64K")
        for t in trees:
            t.prepare()
        got: dict[str, list[Measure]] = {f"{t.name} {k}": [] for t in trees for k in ("agent", "overlay")}
        peer: list[Measure] = []
        for r in range(a.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for t in order:
                hot, overlay = t.round(size, a.runtime)
                got[f"{t.name} agent"].append(hot)
                got[f"{t.name} overlay"].append(overlay)
                print(f"round {r + 1} {t.name}: agent {hot} overlay {overlay} (load {load()})", flush=True)
            qsock = tmp / "q.sock"
            with qemu_nbd(image, qsock) as qpid:
                peer.append(reads(f"nbd+unix:///?socket={qsock}", size, a.runtime, qpid))

        def med(rows: list[Measure], k: str) -> float:
            return statistics.median(row[k] for row in rows)

        out: list[dict[str, object]] = []
        for what in ("agent", "overlay"):
            for k in ("seq GiB/s", "4K QD16 IOPS", "4K QD1 IOPS", "seq CPU µs/MiB", "4K QD16 CPU µs/req",
                      "4K QD1 CPU µs/req"):
                b, h = med(got[f"base {what}"], k), med(got[f"head {what}"], k)
                row: dict[str, object] = {"benchmark": f"hot {what} {k}", "base": round(b, 3), "head": round(h, 3),
                                          "head/base": round(h / b, 3),
                                          "rounds base": [round(x[k], 3) for x in got[f"base {what}"]],
                                          "rounds head": [round(x[k], 3) for x in got[f"head {what}"]]}
                p = med(peer, k)
                row |= ({"qemu-nbd": round(p, 3), "head/qemu-nbd": round(h / p, 3)} if what == "agent"
                        else {"qemu-nbd": "", "head/qemu-nbd": ""})
                out.append(row)
        meta = {"command": " ".join(["python", "bench/layers_ab.py", *sys.argv[1:]]), "image": f"{a.size} ext4, "
                "~60% full of files from /usr, 64 KiB chunks", "rounds": a.rounds, "cpus": os.cpu_count(),
                "load average before": load_before, "load average after": load(),
                "when": time.strftime("%Y-%m-%d %H:%M")}
        write_results("layers-ab", out, meta)
        for row in out:
            print(row, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
