"""Chunks shared between the agents of a site (issue 26), with real processes and real clients.

Every agent is ``blockprov attach --site``; reads come from nbdcopy (libnbd), the repository sits
behind bench/wanproxy.py (a slow, counted link standing in for a site's uplink), and a peer's port
is hit with curl. No wall-clock assertion: what is checked is bytes, contents and who served what.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov.agent import control
from blockprov.cache.haves import HAVE_HEADER, decode_have
from blockprov.repo.remote import RemoteRepository
from tests.conftest import require_tool
from tests.procs import VENV_BIN, Proc, first_line, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from wanproxy import ProxyThread

pytestmark = pytest.mark.interop
BP = str(VENV_BIN / "blockprov")
MIB = 1 << 20


def random_image(path: Path, size: int, seed: int) -> Path:
    """Incompressible data: every chunk costs its full size on the link."""
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += hashlib.shake_256(block).digest(1 << 16)
    path.write_bytes(bytes(out[:size]))
    return path


class Site:
    """A repository (``blockprov serve``) behind a slow link, a site, and agents started on it."""

    def __init__(self, tmp: Path, short: Path, *, size: int = 8 * MIB, rate: float = 5e6, rtt: float = 0.002,
                 server_args: tuple[str, ...] = ()) -> None:
        self.tmp, self.short = tmp, short
        self.image = random_image(tmp / "img.raw", size, seed=26)
        self.data = tmp / "repo"
        subprocess.run([BP, "--data", str(self.data), "import", str(self.image), "lab:v1"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([BP, "--data", str(self.data), "site", "add", "cafe"], check=True, stdout=subprocess.DEVNULL)
        self.server, self.direct = start_server(self.data, *server_args)
        host, port = self.direct.split("//", 1)[1].rsplit(":", 1)
        self.link = ProxyThread((host, int(port)), rtt=rtt, rate=rate)
        self.link.start()
        self.agents: list[tuple[Proc, Path, Path]] = []

    @property
    def url(self) -> str:
        return self.link.url

    def start_agents(self, n: int, *extra: str, token: str | None = None, site: str = "cafe") -> list[int]:
        """Start ``n`` agents at once; returns their indices in ``self.agents``."""
        procs = []
        for _ in range(n):
            k = len(self.agents) + len(procs)
            cache, sock = self.tmp / f"cache{k}", self.short / f"a{k}"
            env = dict(os.environ, BLOCKPROV_TOKEN=token) if token else {k_: v for k_, v in os.environ.items()
                                                                          if k_ != "BLOCKPROV_TOKEN"}
            env.pop("BLOCKPROV_REPO", None)
            p = subprocess.Popen([BP, "--repo", self.url, "attach", "lab:v1", "--cache", str(cache), "--socket",
                                  str(sock), "--site", site, "--peer-listen", "127.0.0.1:0", "--no-profile",
                                  "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env)
            procs.append((p, cache, sock))
        first = len(self.agents)
        for p, cache, sock in procs:
            line = first_line(p, 120)
            if not line.startswith("{"):
                p.kill()
                raise AssertionError(f"agent did not start: {line!r} {p.communicate()[1]}")
            self.agents.append((Proc(p, line), cache, sock))
        return list(range(first, len(self.agents)))

    def status(self, k: int) -> dict[str, Any]:
        return dict(control.call(self.agents[k][1], "status", timeout=30.0))

    def wait_peers(self, indices: list[int], want: int) -> None:
        """Until each of these agents knows ``want`` peers (they join every 2 s at first; bounded)."""
        for _ in range(120):
            if all(self.status(k)["site"]["peers"] >= want for k in indices):
                return
            time.sleep(0.5)
        raise AssertionError(f"agents did not find {want} peers: {[self.status(k)['site'] for k in indices]}")

    def read_all(self, indices: list[int]) -> None:
        """nbdcopy every export at once and check each copy byte for byte."""
        nbdcopy = require_tool("nbdcopy")
        outs = [self.tmp / f"out{k}.raw" for k in indices]
        procs = [subprocess.Popen([nbdcopy, f"nbd+unix:///lab?socket={self.agents[k][2]}", str(out)],
                                  stderr=subprocess.PIPE, text=True) for k, out in zip(indices, outs, strict=True)]
        for p in procs:
            _o, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
        want = self.image.read_bytes()
        for out in outs:
            assert out.read_bytes() == want, f"{out} differs from the image"
            out.unlink()

    def sources(self, k: int) -> dict[str, dict[str, int]]:
        by = self.status(k)["sources"]["by_version"]
        assert len(by) == 1, by
        return dict(next(iter(by.values())))

    def close(self) -> None:
        for p, _c, _s in self.agents:
            p.stop()
        self.link.close()
        self.server.stop()


@pytest.fixture
def short() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bpsite", dir="/tmp"))  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def site(tmp_path: Path, short: Path) -> Iterator[Site]:
    s = Site(tmp_path, short)
    yield s
    s.close()


def test_ten_agents_over_a_slow_link_take_chunks_from_each_other(site: Site) -> None:
    """Ten agents read the whole version at once through a 40 Mbit/s uplink: the repository sends
    it about once, the LAN (loopback here) carries the rest, and every copy is exact."""
    agents = site.start_agents(10)
    site.wait_peers(agents, 9)
    site.link.reset()
    site.read_all(agents)
    down = site.link.stats()["down_bytes"]
    size = site.image.stat().st_size
    per = [site.sources(k) for k in agents]
    from_repo = sum(s["repository"]["bytes"] for s in per)
    from_peers = sum(s["peers"]["bytes"] for s in per)
    # alone, each agent would pull the whole image: 10x. Shared, about 1x (plus registrations and joins)
    assert down <= 1.5 * size, (down, size, per)
    assert from_repo <= 1.3 * size, per
    assert from_peers >= 6 * size, per
    assert all(s["peers"]["chunks"] > 0 for s in per), per


class LyingPeer:
    """A hostile agent of the site: registers like one, then answers every chunk with wrong bytes."""

    def __init__(self, repo_url: str, instance: str, version: str, site: str = "cafe",
                 manifest: bytes = b"") -> None:
        """``manifest``: what it answers when asked for any manifest (a real one of another version
        is the subtle lie)."""
        self.asked = 0
        self.manifests_asked = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                ids = self.rfile.read(n)
                if self.path.startswith("/peer/v1/manifest"):
                    outer.manifests_asked += 1
                    self.send_response(200)
                    self.send_header("content-length", str(len(manifest)))
                    self.end_headers()
                    self.wfile.write(manifest)
                    return
                outer.asked += 1
                frames = b""
                for _ in range(len(ids) // 32):  # a well-formed blob of the right size, of the wrong content
                    blob = struct.pack("<4sBBHI", b"BPCK", 1, 0, 0, 65536) + os.urandom(65536)
                    frames += struct.pack("<I", len(blob)) + blob
                self.send_response(200)
                self.send_header("content-length", str(len(frames)))
                self.end_headers()
                self.wfile.write(frames)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        port = self.httpd.server_address[1]
        self.repo = RemoteRepository(repo_url)
        info = {"site": site, "peer_url": f"http://127.0.0.1:{port}", "image": "lab", "version": version}
        self.repo.register_agent(instance, info)
        self._stop = threading.Event()

        def beat() -> None:  # seen like a live agent for as long as it runs (the tracker drops the silent)
            while not self._stop.wait(10.0):
                self.repo.register_agent(instance, info)

        self.beat = threading.Thread(target=beat, daemon=True)
        self.beat.start()

    def close(self) -> None:
        self._stop.set()
        self.beat.join(15)
        self.httpd.shutdown()
        self.httpd.server_close()
        self.repo.close()


def test_a_lying_peer_is_caught_and_avoided(site: Site) -> None:
    vid = RemoteRepository(site.direct).resolve("lab:v1").id
    liar = LyingPeer(site.direct, "pc-liar", vid)
    try:
        [k] = site.start_agents(1)
        site.wait_peers([k], 1)
        site.read_all([k])  # every byte right although the liar owned about half of the chunks
        st = site.status(k)["sources"]
        assert st["liars"] == ["pc-liar"] and st["peer_bad_chunks"] >= 1, st
        asked = liar.asked
        assert asked >= 1
        # the agent keeps nothing it was lied to about: a second agent reading through it (as a peer)
        # gets only good bytes, and the liar is not asked again
        [k2] = site.start_agents(1)
        site.wait_peers([k2], 2)
        site.read_all([k2])
        assert site.status(k)["sources"]["liars"] == ["pc-liar"]
        assert liar.asked - asked <= 8, "the second agent may try the liar once per batch before it learns"
        assert site.status(k2)["sources"]["liars"] in ([], ["pc-liar"])
        by = site.sources(k)
        assert by["repository"]["chunks"] == 128, by  # no peer but the liar: all from the repository
    finally:
        liar.close()


def test_a_peer_vanishing_mid_transfer_costs_no_read(site: Site) -> None:
    """Agent A holds everything and serves slowly; B reads; A is killed (-9) while B copies."""
    [a] = site.start_agents(1, "--peer-rate", "256K")
    site.read_all([a])  # A now holds every chunk
    [b] = site.start_agents(1)
    site.wait_peers([b], 1)
    nbdcopy = require_tool("nbdcopy")
    out = site.tmp / "b.raw"
    p = subprocess.Popen([nbdcopy, f"nbd+unix:///lab?socket={site.agents[b][2]}", str(out)],
                         stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until B has had chunks from A, and asked it for more (bounded)
        if p.poll() is not None or (site.status(b)["sources"]["by_version"] and site.sources(b)["peers"]["chunks"]
                                    and site.status(a)["site"]["serving"]["requests"] > 1):
            break
        time.sleep(0.05)
    assert p.poll() is None, "B finished before A could be killed: slow A down more"
    site.agents[a][0].kill9()
    _o, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert out.read_bytes() == site.image.read_bytes()
    by = site.sources(b)
    st = site.status(b)["sources"]
    assert by["peers"]["chunks"] > 0 and by["repository"]["chunks"] > 0, by
    assert st["peer_failures"] >= 1 and st["liars"] == [], st


def make_v2(site: Site, changed: list[int]) -> tuple[str, bytes]:
    """Import a v2 whose chunks ``changed`` (of 64 KiB) have new bytes; its id and its image."""
    img = bytearray(site.image.read_bytes())
    for i in changed:
        img[i * 65536:i * 65536 + 4096] = os.urandom(4096)
    v2 = site.tmp / "v2.raw"
    v2.write_bytes(bytes(img))
    subprocess.run([BP, "--repo", site.direct, "import", str(v2), "lab:v2"], check=True, stdout=subprocess.DEVNULL)
    return RemoteRepository(site.direct).resolve("lab:v2").id, bytes(img)


def update_all(site: Site, indices: list[int], to: str) -> None:
    procs = [subprocess.Popen([BP, "update", "--cache", str(site.agents[k][1]), "--to", to, "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in indices]
    for p in procs:
        _o, err = p.communicate(timeout=300)
        assert p.returncode == 0, err


def test_a_v2_rollout_takes_its_manifest_from_the_site_once(site: Site) -> None:
    """Four agents move to a v2 at once: the repository resolves the tag for each (an id, no
    manifest) and sends v2's manifest once, to its owner; the others take it from that peer, check
    it against the id, and read v2's bytes exactly."""
    agents = site.start_agents(4)
    site.wait_peers(agents, 3)
    site.read_all(agents)
    _vid, v2 = make_v2(site, [3, 40, 77])
    site.link.reset()
    update_all(site, agents, "lab:v2")
    got = [site.status(k)["sources"]["manifests"] for k in agents]
    assert sum(g["repository"]["count"] for g in got) == 1, got
    assert sum(g["peers"]["count"] for g in got) == 3, got
    size = max(g["repository"]["bytes"] for g in got)
    # the link carried one manifest (and the three changed chunks, tag lookups, joins), not four
    assert site.link.stats()["down_bytes"] < 2 * size + 3 * 70_000 + 200_000, (site.link.stats(), size)
    site.image.write_bytes(v2)
    site.read_all(agents)


def test_a_peer_lying_about_a_manifest_is_caught(site: Site) -> None:
    """The owner of v2's manifest answers with v1's (a real manifest, of another version): the agent
    refuses it, marks the peer a liar, and moves to v2 with the repository's."""
    from blockprov.cache.peers import _key, owner

    [a] = site.start_agents(1)
    site.read_all([a])
    vid, v2 = make_v2(site, [5])
    me = site.status(a)["agent"]["instance"]
    # A name that outranks this agent for v2's manifest. The agent's own score is random (its
    # instance id is), and with k names tried none wins with probability 1/(k+1): 64 failed one CI
    # run in ~65; the search stops at the first winner, so a large bound costs nothing on average.
    name = next(n for n in (f"pc-liar-{i}" for i in range(1_000_000))
                if owner(bytes.fromhex(vid), [(me, _key(me)), (n, _key(n))]) == n)
    v1 = RemoteRepository(site.direct).resolve("lab:v1")
    liar = LyingPeer(site.direct, name, v1.id, manifest=v1.to_json())
    try:
        site.wait_peers([a], 1)
        update_all(site, [a], "lab:v2")
        st = site.status(a)
        assert liar.manifests_asked == 1 and st["sources"]["liars"] == [name], st["sources"]
        assert st["sources"]["manifests"]["repository"]["count"] == 1
        site.image.write_bytes(v2)
        site.read_all([a])
    finally:
        liar.close()


def _curl_chunks(url: str, ids: bytes, auth: str | None) -> tuple[int, bytes]:
    curl = require_tool("curl")
    cmd = [curl, "-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST", "--data-binary", "@-",
           "-H", "content-type: application/octet-stream", f"{url}/peer/v1/chunks"]
    if auth is not None:
        cmd[1:1] = ["-H", f"authorization: {auth}"]
    r = subprocess.run(cmd, input=ids, capture_output=True, timeout=60, check=True)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def test_tokens_decide_who_gets_chunks_from_a_peer(tmp_path: Path, short: Path) -> None:
    """Tokens enforced: a site-bound agent token serves its site; no ticket, a bad or foreign one,
    and an agent whose token may not join get nothing from the peer."""
    s = Site(tmp_path, short, server_args=("--auth", "on"))
    try:
        def token(*args: str) -> str:
            r = subprocess.run([BP, "--data", str(s.data), "token", "create", *args], check=True,
                               capture_output=True, text=True)
            return r.stdout.strip()

        subprocess.run([BP, "--data", str(s.data), "site", "add", "school"], check=True, stdout=subprocess.DEVNULL)
        cafe_pc = token("--scope", "agent", "--site", "cafe")
        school_pc = token("--scope", "agent", "--site", "school")
        [a] = s.start_agents(1, token=cafe_pc)
        s.read_all([a])  # A holds every chunk
        url = s.status(a)["agent"]["peer_url"]
        m = RemoteRepository(s.direct, token=cafe_pc).resolve("lab:v1")
        ids = b"".join(m.digest_at(i) for i in range(4))
        assert _curl_chunks(url, ids, None)[0] == 401
        assert _curl_chunks(url, ids, "Ticket nonsense")[0] == 401
        assert _curl_chunks(url, ids, f"Bearer {cafe_pc}")[0] == 401  # a token is no ticket
        curl = require_tool("curl")
        r = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"lab@{m.id}",
                            f"{url}/peer/v1/manifest"], capture_output=True, text=True, timeout=60, check=True)
        assert r.stdout == "401"  # manifests are lent under the same rule
        school = RemoteRepository(s.direct, token=school_pc).join_site("school", "pc-s")
        code, body = _curl_chunks(url, ids, f"Ticket {school['ticket']}")
        assert code == 403 and b"school" in body
        with pytest.raises(Exception, match="cafe"):
            RemoteRepository(s.direct, token=school_pc).join_site("cafe", "pc-s")
        good = RemoteRepository(s.direct, token=cafe_pc).join_site("cafe", "pc-c")
        code, body = _curl_chunks(url, ids, f"Ticket {good['ticket']}")
        assert code == 200 and len(body) > 4 * 65536
        # with have=1 the answer carries what A holds (every chunk): its have-vector
        r = subprocess.run([curl, "-s", "-D", "-", "-o", "/dev/null", "-X", "POST", "--data-binary", "@-",
                            "-H", f"authorization: Ticket {good['ticket']}", f"{url}/peer/v1/chunks?have=1"],
                           input=ids, capture_output=True, timeout=60, check=True)
        head = dict(ln.split(": ", 1) for ln in r.stdout.decode().splitlines()[1:] if ": " in ln)
        vid, vector = decode_have(head[HAVE_HEADER], m.count)
        assert vid == m.id and vector == b"\x01" * m.count, (vid, vector[:64])
        # an agent of another site, attached to the same repository: its token may not join cafe, so
        # it has no ticket, finds no peers, and reads everything from the repository
        [c] = s.start_agents(1, token=school_pc)
        s.read_all([c])
        st = s.status(c)
        assert st["site"]["peers"] == 0 and "school" in (st["site"]["last_error"] or ""), st["site"]
        assert s.sources(c)["peers"]["chunks"] == 0
        served = s.status(a)["site"]["serving"]
        assert served["refused"] >= 4, served
    finally:
        s.close()


def test_agents_stopping_leave_the_site(site: Site) -> None:
    """A clean stop tells the repository at once: the site's other agents stop asking it."""
    a, b = site.start_agents(2)
    site.wait_peers([a, b], 1)
    site.agents[a][0].stop(signal.SIGTERM)
    for _ in range(120):
        if site.status(b)["site"]["peers"] == 0:
            break
        time.sleep(0.5)
    assert site.status(b)["site"]["peers"] == 0
    got = json.loads(subprocess.run([BP, "--repo", site.direct, "site", "list", "--json"], check=True,
                                    capture_output=True, text=True).stdout)
    assert got[0]["name"] == "cafe"
