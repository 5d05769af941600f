"""Agent benchmarks (issue 3), each against its peer in the same run, medians of repeats:

- hot sequential read, 1 MiB requests, fully cached: ``nbdcopy`` to null from blockprov vs
  ``qemu-nbd`` exporting the same raw file (goal ≥ 1.0×);
- hot 4 KiB random reads at queue depth 16 and at queue depth 1 (one request at a time: the
  latency of a read, which a booting guest's scattered reads pay): ``fio --ioengine=nbd`` vs
  ``qemu-nbd --shared=16`` (goal ≥ 0.6×);
- cold sequential read through lazy fetch from a repository on 127.0.0.1 vs qemu's http driver
  reading the raw view (``qemu-img convert -m 1``), from our server and from nginx serving the
  raw file (goal ≥ 0.7×), with bytes on the wire;
- chunk-size sweep (16 KiB – 1 MiB) of the cold case;
- agent RSS with a 100 GiB sparse image attached (goal ≤ 150 MB);
- ``latency``: a cache hit's price at queue depth 1, the pattern of a boot's reads (issue 26: 8,645
  reads, three in four of 4 KiB, one at a time): ``fio --ioengine=nbd`` random reads of 4–128 KiB,
  the mean completion latency and the server's CPU time per read (its ``/proc`` utime + stime
  over the run), blockprov against ``qemu-nbd`` on the same raw file, interleaved round by round.
  ``--baseline-src DIR`` adds a second agent running another tree's ``src`` (an A/B of a change in
  the same run).

Run: ``.venv/bin/python bench/bench_agent.py [--size 1G] [--repeat 3] [--skip sweep,rss]``;
the latency section alone: ``--skip hot,iops,cold,sweep,rss``.
Results: bench/out/agent*.{json,md}, bench/out/agent-chunk-sweep.png, bench/out/agent-latency.*.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import VENV_BIN, WORK, median_of, realistic_image, write_results
from tests.procs import free_port, start_agent, start_server

from blockprov.humanize import parse_size

BP = str(VENV_BIN / "blockprov")


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextmanager
def qemu_nbd(image: Path, sock: Path, shared: int = 16) -> Iterator[int]:
    """qemu-nbd serving ``image`` on ``sock`` while in the block; yields its pid."""
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), f"--shared={shared}", "-t", "--cache=writeback",
                          str(image)])
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    try:
        yield p.pid
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def nbdcopy_seconds(u: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", "--request-size=1048576", u, "null:"], check=True)
    return time.perf_counter() - t


def fio_iops(u: str, size: int, runtime: int = 8, iodepth: int = 16) -> float:
    # fio's nbd engine prints "fio: connected to NBD server" on stdout before the JSON: read the
    # report from its own file instead.
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(["fio", "--name=rr", "--ioengine=nbd", f"--uri={u}", "--rw=randread", "--bs=4k",
                        f"--iodepth={iodepth}", f"--size={size}", f"--runtime={runtime}", "--time_based",
                        "--output-format=json", f"--output={out.name}"], check=True, capture_output=True)
        return float(json.loads(Path(out.name).read_text())["jobs"][0]["read"]["iops"])


def fio_qd1(u: str, size: int, bs: str, runtime: int, pid: int) -> tuple[float, float]:
    """Random reads of ``bs`` one at a time for ``runtime`` s: (mean completion latency in µs, the
    server's CPU µs per read: its utime + stime over the run divided by the reads)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cpu = cpu_seconds(pid)
        subprocess.run(["fio", "--name=qd1", "--ioengine=nbd", f"--uri={u}", "--rw=randread", f"--bs={bs}",
                        "--iodepth=1", f"--size={size}", f"--runtime={runtime}", "--time_based",
                        "--output-format=json", f"--output={out.name}"], check=True, capture_output=True)
        cpu = cpu_seconds(pid) - cpu
        read = json.loads(Path(out.name).read_text())["jobs"][0]["read"]
    return float(read["clat_ns"]["mean"]) / 1000, cpu * 1e6 / max(1, int(read["total_ios"]))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LATENCY_SIZES = ("4k", "16k", "64k", "128k")


def latency(image: Path, data: Path, tmp: Path, size: int, repeat: int, runtime: int,
            baseline_src: str | None) -> list[dict[str, object]]:
    """The latency section (module docstring): every server serves throughout, each round runs
    every size against each of them in turn; medians over the rounds."""
    servers: dict[str, tuple[str, int]] = {}
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with ExitStack() as stack:
        for name, env in [("blockprov", None)] + ([("before", {"PYTHONPATH": baseline_src})] if baseline_src else []):
            sock = tmp / f"lat-{name}.sock"
            agent, _ = start_agent(tmp / f"lat-{name}-cache", "bench:v1", sock, data=data, env=env)
            stack.callback(agent.stop)
            subprocess.run(["nbdcopy", uri(sock), "null:"], check=True)  # every chunk present: reads are hits
            servers[name] = (uri(sock), agent.proc.pid)
        qsock = tmp / "lat-qemu.sock"
        servers["qemu-nbd"] = (uri(qsock), stack.enter_context(qemu_nbd(image, qsock, shared=1)))
        for u, pid in servers.values():  # a round not counted: the files' pages, the processes' first runs
            fio_qd1(u, size, "4k", 2, pid)
        for _ in range(repeat):
            for bs in LATENCY_SIZES:
                for name, (u, pid) in servers.items():
                    samples.setdefault((name, bs), []).append(fio_qd1(u, size, bs, runtime, pid))
    med = {k: (statistics.median(x for x, _ in v), statistics.median(c for _, c in v)) for k, v in samples.items()}
    rows: list[dict[str, object]] = []
    for bs in LATENCY_SIZES:
        ours, peer_ = med[("blockprov", bs)], med[("qemu-nbd", bs)]
        row: dict[str, object] = {"QD1 random read": bs, "blockprov latency µs": ours[0]}
        if baseline_src:
            row["before µs"] = med[("before", bs)][0]
        row |= {"qemu-nbd latency µs": peer_[0], "latency ratio": ours[0] / peer_[0],
                "blockprov CPU µs/read": ours[1]}
        if baseline_src:
            row["before CPU µs/read"] = med[("before", bs)][1]
        row |= {"qemu-nbd CPU µs/read": peer_[1],
                f"samples µs ({' / '.join(servers)})": " / ".join(
                    ", ".join(f"{x:.0f}" for x, _ in samples[(n, bs)]) for n in servers)}
        rows.append(row)
    return rows


@contextmanager
def nginx_serving(root: Path) -> Iterator[str]:
    port = free_port()
    conf = root / "nginx.conf"
    # As root, nginx's workers would run as "nobody" and could not read our 0700 temp directory.
    user = "user root root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
daemon off; {user} worker_processes 1; error_log {root}/error.log; pid {root}/nginx.pid;
events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
""")
    (root / "tmp").mkdir(exist_ok=True)
    p = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)])
    time.sleep(0.5)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        p.send_signal(signal.SIGQUIT)
        p.wait(10)


def convert_seconds(src: str, out: Path) -> float:
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-m", "1", "-f", "raw", "-O", "raw", src, str(out)], check=True)
    d = time.perf_counter() - t
    out.unlink()
    return d


def import_into(data: Path, image: Path, ref: str, chunk: str = "64K") -> None:
    subprocess.run([BP, "--data", str(data), "import", str(image), ref, "--chunk-size", chunk], check=True,
                   stdout=subprocess.DEVNULL)


def cold_read(data: Path, url: str, ref: str, tmp: Path, repeat: int, *agent_args: str) -> tuple[float, int]:
    """Median seconds of a cold full read through a fresh cache, and the wire bytes of the last run."""
    wire = 0

    def once() -> float:
        nonlocal wire
        cache = tmp / "cold-cache"
        shutil.rmtree(cache, ignore_errors=True)
        sock = tmp / "cold.sock"
        agent, _ = start_agent(cache, ref, sock, "--no-profile", *agent_args, repo_url=url)  # truly cold
        try:
            d = convert_seconds(uri(sock), tmp / "cold-out.raw")
            st = json.loads(subprocess.run([BP, "status", "--cache", str(cache), "--json"], check=True,
                                           capture_output=True, text=True).stdout)
            wire = int(st.get("wire_bytes", 0))
        finally:
            agent.stop()
        return d

    med, _ = median_of(repeat, once)
    return med, wire


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of: hot,iops,cold,sweep,rss,latency")
    ap.add_argument("--latency-runtime", type=int, default=5, help="seconds of each fio run of the latency section")
    ap.add_argument("--baseline-src", help="the latency section adds an agent running this src directory")
    ap.add_argument("--sweep-readahead", default="32M",
                    help="attach --readahead for the chunk-size sweep (default: the CLI's default)")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    size = parse_size(a.size)
    gib = size / (1 << 30)
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK, prefix="agent-"))
    image = realistic_image(WORK / f"agent-{a.size}.img", size, ["/usr/lib", "/usr/share"], int(size * 0.6))
    data = tmp / "repo"
    import_into(data, image, "bench:v1")
    rows = []
    meta: dict[str, object] = {"image": f"{a.size} ext4, ~60% full of files from /usr", "repeats": a.repeat,
                               "cpus": os.cpu_count(),
                               "command": " ".join(["python bench/bench_agent.py", *sys.argv[1:]])}
    try:
        # -- hot: fully cached agent vs qemu-nbd over the same raw data -----------------------------------
        if not {"hot", "iops"} <= skip:
            sock = tmp / "hot.sock"
            agent, _ = start_agent(tmp / "hot-cache", "bench:v1", sock, data=data)
            try:
                subprocess.run(["nbdcopy", uri(sock), "null:"], check=True)  # hydrate
                if "hot" not in skip:
                    ours, _ = median_of(a.repeat, lambda: nbdcopy_seconds(uri(sock)))
                if "iops" not in skip:
                    ours_iops, _ = median_of(a.repeat, lambda: fio_iops(uri(sock), size))
                    ours_qd1, _ = median_of(a.repeat, lambda: fio_iops(uri(sock), size, iodepth=1))
            finally:
                agent.stop()
            qsock = tmp / "qemu.sock"
            with qemu_nbd(image, qsock):
                if "hot" not in skip:
                    peer, _ = median_of(a.repeat, lambda: nbdcopy_seconds(uri(qsock)))
                    rows.append({"benchmark": "hot sequential read, 1 MiB, nbdcopy (GiB/s)", "blockprov": gib / ours,
                                 "peer": gib / peer, "peer name": "qemu-nbd", "ratio": peer / ours, "goal": "≥ 1.0"})
                if "iops" not in skip:
                    peer_iops, _ = median_of(a.repeat, lambda: fio_iops(uri(qsock), size))
                    rows.append({"benchmark": "hot 4 KiB random read QD16, fio (IOPS)", "blockprov": ours_iops,
                                 "peer": peer_iops, "peer name": "qemu-nbd --shared=16",
                                 "ratio": ours_iops / peer_iops, "goal": "≥ 0.6"})
                    peer_qd1, _ = median_of(a.repeat, lambda: fio_iops(uri(qsock), size, iodepth=1))
                    rows.append({"benchmark": "hot 4 KiB random read QD1, fio (IOPS)", "blockprov": ours_qd1,
                                 "peer": peer_qd1, "peer name": "qemu-nbd --shared=16",
                                 "ratio": ours_qd1 / peer_qd1, "goal": "≥ 0.6"})
        # -- cold: lazy fetch from a repository on loopback vs qemu's http driver ---------------------
        if "cold" not in skip:
            server, url = start_server(data)
            try:
                cold, wire = cold_read(data, url, "bench:v1", tmp, a.repeat)
                cold_ra, _ = cold_read(data, url, "bench:v1", tmp, a.repeat, "--readahead", "1M")
                raw_url = f"{url}/v1/images/bench/raw/v1"
                peer_ours, _ = median_of(a.repeat, lambda: convert_seconds(raw_url, tmp / "peer.raw"))
            finally:
                server.stop()
            www = tmp / "www"
            www.mkdir()
            shutil.copyfile(image, www / "image.raw")
            with nginx_serving(www) as nurl:
                peer_nginx, _ = median_of(a.repeat, lambda: convert_seconds(f"{nurl}/image.raw", tmp / "n.raw"))
            rows.append({"benchmark": "cold sequential read, qemu-img convert -m 1 (GiB/s)", "blockprov": gib / cold,
                         "peer": gib / peer_nginx, "peer name": "qemu http driver ← nginx raw file",
                         "ratio": peer_nginx / cold, "goal": "≥ 0.7"})
            rows.append({"benchmark": "cold sequential read, qemu-img convert -m 1 (GiB/s)", "blockprov": gib / cold,
                         "peer": gib / peer_ours, "peer name": "qemu http driver ← blockprov raw view",
                         "ratio": peer_ours / cold, "goal": "≥ 0.7"})
            rows.append({"benchmark": "cold sequential read, attach --readahead 1M (GiB/s)",
                         "blockprov": gib / cold_ra, "peer": gib / peer_nginx,
                         "peer name": "qemu http driver ← nginx raw file", "ratio": peer_nginx / cold_ra,
                         "goal": "≥ 0.7"})
            rows.append({"benchmark": "cold read: bytes on the wire (MiB)", "blockprov": wire / (1 << 20),
                         "peer": size / (1 << 20), "peer name": "qemu http driver",
                         "ratio": wire / size, "goal": "< 1"})
        if rows:
            write_results("agent", rows, meta)
        if "latency" not in skip:
            lat = latency(image, data, tmp, size, a.repeat, a.latency_runtime, a.baseline_src)
            write_results("agent-latency", lat, meta | {
                "fio": f"--ioengine=nbd --rw=randread --iodepth=1 --runtime={a.latency_runtime}, one job",
                "peer": "qemu-nbd -f raw --shared=1 -t --cache=writeback, same raw file",
                "before": a.baseline_src or "-"})
        # -- chunk size sweep ------------------------------------------------------------------------
        if "sweep" not in skip:
            sweep = []
            for chunk in ("16K", "32K", "64K", "128K", "256K", "512K", "1M"):
                d = tmp / f"repo-{chunk}"
                import_into(d, image, "sweep:v1", chunk)
                server, url = start_server(d)
                try:
                    secs, wire = cold_read(d, url, "sweep:v1", tmp, a.repeat, "--readahead", a.sweep_readahead)
                finally:
                    server.stop()
                sweep.append({"chunk size": chunk, "cold GiB/s": gib / secs, "wire MiB": wire / (1 << 20)})
                shutil.rmtree(d)
            write_results("agent-chunk-sweep", sweep, meta | {"attach --readahead": a.sweep_readahead})
            plot_sweep(sweep)
        # -- memory with a 100 GiB sparse image ------------------------------------------------------
        if "rss" not in skip:
            big = tmp / "big.img"
            with open(big, "wb") as f:
                f.truncate(100 << 30)
                for k in range(64):
                    f.seek(k * (1600 << 20))
                    f.write(os.urandom(1 << 20))
            d = tmp / "repo-big"
            import_into(d, big, "big:v1")
            big.unlink()
            sock = tmp / "big.sock"
            agent, _banner = start_agent(tmp / "big-cache", "big:v1", sock, data=d)
            try:
                # Read the whole disk (nbdcopy skips what block status reports as zero, as a real
                # copy would) and walk its map, then look at the agent's memory.
                subprocess.run(["nbdcopy", uri(sock), "null:"], check=True, capture_output=True)
                subprocess.run(["nbdinfo", "--map", uri(sock)], check=True, capture_output=True)
                status = Path(f"/proc/{agent.proc.pid}/status").read_text()
                rss, peak = (int(status.split(f"{k}:")[1].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
            finally:
                agent.stop()
            write_results("agent-rss", [
                {"benchmark": "agent RSS after reading a 100 GiB sparse image (MB)", "blockprov": rss / 1e6,
                 "goal": "≤ 150"},
                {"benchmark": "agent peak RSS (VmHWM) over the same run (MB)", "blockprov": peak / 1e6,
                 "goal": "≤ 150"}], meta | {"image": "100 GiB sparse, 64 × 1 MiB of random data, 64 KiB chunks",
                                            "repeats": 1})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plot_sweep(rows: list[dict[str, object]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [str(r["chunk size"]) for r in rows]
    ax.bar(xs, [float(r["cold GiB/s"]) for r in rows])  # type: ignore[arg-type]
    ax.set_xlabel("chunk size")
    ax.set_ylabel("cold sequential read, GiB/s")
    ax.set_title("blockprov cold read vs chunk size (repository on 127.0.0.1)")
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "out" / "agent-chunk-sweep.png", dpi=100)


if __name__ == "__main__":
    main()
