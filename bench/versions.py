"""Making a v2 the way an administrator makes one (shared by bench_inherit.py and bench_boot.py).

An instance of the base version boots in ``admin`` mode (the guest writes a sanctioned change to
/etc and its golden list), random data lands in about ``changed`` of the chunks (the base's free,
all-zero chunks, so no file the boot reads changes), and ``blockprov snapshot`` commits it. The v2
then has the base as its parent and inherits the base's boot profile (issue 15 item 1): its first
boot is what the benchmarks time.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

from common import VENV_BIN
from tests import bootvm
from tests.procs import start_agent

from blockprov.repo.local import LocalRepository

BP = str(VENV_BIN / "blockprov")


def make_v2(data: Path, base: str, new: str, tmp: Path, img: bootvm.bootimage.Built, changed: float, *,
            repo_url: str | None = None, seed: int = 15) -> dict[str, Any]:
    """Commit ``new`` from an instance of ``base`` (see the module docstring); returns how many of
    the chunks differ. ``data`` is the repository's data directory (read here for the base's zero
    chunks and the diff); ``repo_url``: reach it through its server instead (the agent and the
    snapshot then go over HTTP, as a remote administrator's would)."""
    repo = LocalRepository(data)
    try:
        v1 = repo.resolve(base)
    finally:
        repo.close()
    free = [i for i in range(v1.count) if v1.is_zero(i)]
    rng = random.Random(seed)
    rng.shuffle(free)
    cache = tmp / "cache-v2"
    shutil.rmtree(cache, ignore_errors=True)
    sock = tmp / "v2.sock"
    where = ["--repo", repo_url] if repo_url else ["--data", str(data)]
    agent, _ = start_agent(cache, base, sock, "--no-profile", **({"repo_url": repo_url} if repo_url else
                                                                  {"data": data}))
    try:
        r = bootvm.boot(img.kernel, img.initrd, f"nbd+unix:///?socket={sock}", mode="admin", timeout=600)
        if not r.ok:
            raise RuntimeError(f"admin boot failed:\n{r.tail()}")
        cmds: list[str] = []
        for i in free[:max(1, int(v1.count * changed))]:
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {i * v1.chunk_size} {v1.chunk_size}"]
        subprocess.run(["qemu-io", "-f", "raw", *cmds, f"nbd+unix:///?socket={sock}"], check=True,
                       capture_output=True, timeout=300)
        subprocess.run([BP, *where, "snapshot", "--cache", str(cache), "--to", new], check=True,
                       capture_output=True, text=True, timeout=900)
    finally:
        agent.stop()
    shutil.rmtree(cache, ignore_errors=True)
    repo = LocalRepository(data)
    try:
        diff = repo.diff(base, new)
    finally:
        repo.close()
    return {"chunks": v1.count, "changed_chunks": len(diff), "changed_percent": round(100 * len(diff) / v1.count, 2)}
