"""A site cache (``blockprov serve --upstream``) in front of a repository, with real processes and
clients we did not write (qemu-io, nbdcopy, curl): it fetches once, serves many, keeps serving what it
holds while the upstream is stopped, fails clearly for what it lacks, and passes writes on."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockprov.agent import control
from blockprov.repo.remote import RemoteRepository
from tests.conftest import require_tool
from tests.interop.test_site_peers import random_image
from tests.procs import VENV_BIN, Proc, start_agent, start_server

pytestmark = pytest.mark.interop
BP = str(VENV_BIN / "blockprov")
MIB = 1 << 20


@pytest.fixture
def short() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="bpsc", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _curl(url: str, *args: str, check: bool = True) -> tuple[int, bytes]:
    r = subprocess.run([require_tool("curl"), "-s", "-o", "-", "-w", "\n%{http_code}", *args, url],
                       capture_output=True, timeout=60, check=check)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def _qemu_io_read(sock: Path, offset: int, length: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("qemu-io"), "-f", "raw", "-r", f"nbd+unix:///lab?socket={sock}",
                           "-c", f"read {offset} {length}"], capture_output=True, text=True, timeout=300)


def test_site_cache_serves_many_and_survives_its_upstream(tmp_path: Path, short: Path) -> None:
    image = random_image(tmp_path / "img.raw", 8 * MIB, seed=7)
    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image), "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    upstream, up_url = start_server(data)
    cache: Proc | None = None
    agents: list[Proc] = []
    try:
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url, "--cache-size", "6M")
        health = json.loads(_curl(f"{url}/v1/health")[1])
        assert health["role"] == "site-cache" and health["upstream"] == up_url
        # two agents read the first 4 MiB through the site cache: the upstream sends it once
        for k in range(2):
            a, _banner = start_agent(tmp_path / f"c{k}", "lab:v1", short / f"a{k}", "--no-profile", repo_url=url)
            agents.append(a)
            r = _qemu_io_read(short / f"a{k}", 0, 4 * MIB)
            assert r.returncode == 0 and "read 4194304/4194304" in r.stdout, r.stdout + r.stderr
        metrics = _curl(f"{url}/metrics")[1].decode()
        assert "blockprov_sitecache_chunks_upstream_total 64" in metrics, metrics
        assert "blockprov_sitecache_chunks_hit_total 64" in metrics, metrics
        st = control.call(tmp_path / "c1", "status", timeout=30.0)
        by = next(iter(st["sources"]["by_version"].values()))
        assert by["site_cache"]["chunks"] == 64 and by["repository"]["chunks"] == 0, by  # counted as the site cache's
        # writes pass through: a tag and a host assignment made through the site cache land upstream
        subprocess.run([BP, "--repo", url, "tag", "lab:v1", "lab:prod"], check=True, stdout=subprocess.DEVNULL)
        assert "prod" in {t for i in RemoteRepository(up_url).images() for t in i.tags}
        m = RemoteRepository(up_url).resolve("lab:v1")
        held, lacking = m.digest_at(0), m.digest_at(100)

        upstream.stop()  # the site's uplink is down
        code, body = _curl(f"{url}/v1/chunks/{held.hex()}")
        assert code == 200 and len(body) > 60000  # what it holds, it serves
        code, body = _curl(f"{url}/v1/chunks/{lacking.hex()}")
        err = json.loads(body)
        assert code == 503 and err["error"] == "RepositoryUnavailable", body
        assert "not held by this site cache" in err["message"] and up_url in err["message"], err
        # a new PC of the site attaches by tag (the kept manifest answers) and reads what the cache holds
        a, _banner = start_agent(tmp_path / "c2", "lab:v1", short / "a2", "--no-profile", "--fetch-timeout", "3",
                                 repo_url=url)
        agents.append(a)
        r = _qemu_io_read(short / "a2", 0, 4 * MIB)
        assert r.returncode == 0 and "read 4194304/4194304" in r.stdout, r.stdout + r.stderr
        r = _qemu_io_read(short / "a2", 6 * MIB, 64 << 10)
        assert r.returncode != 0 and "Input/output error" in (r.stdout + r.stderr), r.stdout + r.stderr
        # the cache stays within its budget
        health = json.loads(_curl(f"{url}/v1/health")[1])
        assert health["bytes"] <= 6 * MIB and health["upstream_error"], health
        for a in agents:
            a.stop()
        cache.stop()
        # the agents' registrations and heartbeats it passed on are not each a log line (httpx's own
        # INFO lines filled a stderr nobody drained and stopped it, in bench_storm)
        err = cache.proc.stderr.read() if cache.proc.stderr else ""
        assert "HTTP Request:" not in err, err[-2000:]
    finally:
        for a in agents:
            a.stop()
        if cache is not None:
            cache.stop()
        upstream.stop()


def _upstream(tmp_path: Path, size: int, seed: int) -> tuple[Proc, str]:
    """A repository holding a random image as lab:v1, served on 127.0.0.1: (its process, its URL)."""
    image = random_image(tmp_path / "img.raw", size, seed=seed)
    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image), "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    return start_server(data)


def test_a_held_only_fetch_never_pulls_from_the_upstream(tmp_path: Path) -> None:
    """An agent's speculation behind a site cache (``x-blockprov-held-only: 1``, issue 26): a chunk the
    site cache lacks is answered absent and not fetched from the upstream; a demand fetch of the same
    chunk is pulled once; after it, the held-only fetch gets it. Asked with curl (the wire protocol)
    and with the agent's client (``get_held_views``)."""
    from blockprov.errors import NotHeld

    upstream, up_url = _upstream(tmp_path, 4 * MIB, seed=11)
    cache: Proc | None = None
    try:
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url, "--cache-size", "16M")
        m = RemoteRepository(up_url).resolve("lab:v1")
        a, b = m.digest_at(1), m.digest_at(2)
        body = tmp_path / "ids"
        body.write_bytes(a + b)
        held_only = ("-X", "POST", "--data-binary", f"@{body}", "-H", "x-blockprov-held-only: 1",
                     "-H", "content-type: application/octet-stream")
        code, got = _curl(f"{url}/v1/chunks/fetch", *held_only)
        assert code == 200 and got == b"\xff\xff\xff\xff" * 2, got[:100]  # both absent
        client = RemoteRepository(url)
        views = client.get_held_views([a, b])
        assert all(isinstance(v, NotHeld) for v in views), views

        def upstream_chunks() -> int:
            metrics = _curl(f"{url}/metrics")[1].decode()
            line = next(ln for ln in metrics.splitlines() if ln.startswith("blockprov_sitecache_chunks_upstream_total"))
            return int(line.split()[1])

        assert upstream_chunks() == 0, "a held-only fetch pulled from the upstream"
        assert client.get_blobs([a]) == RemoteRepository(up_url).get_blobs([a])  # a demand fetch: pulled
        assert upstream_chunks() == 1
        views = client.get_held_views([a, b])
        assert bytes(views[0]) == RemoteRepository(up_url).get_blobs([a])[0] and isinstance(views[1], NotHeld)
        code, got = _curl(f"{url}/v1/chunks/fetch", *held_only)
        assert code == 200 and got.endswith(b"\xff\xff\xff\xff") and len(got) > 8
        assert upstream_chunks() == 1  # still only the demand fetch's chunk
        # a repository (no site cache) holds everything and ignores the header
        assert bytes(RemoteRepository(up_url).get_held_views([b])[0]) == RemoteRepository(up_url).get_blobs([b])[0]
        client.close()
    finally:
        if cache is not None:
            cache.stop()
        upstream.stop()


def test_site_cache_checks_tokens_and_keeps_boot_files(tmp_path: Path, short: Path) -> None:
    """Tokens enforced upstream: the site cache lets in what the upstream would, also once the
    upstream is down; boot files cross the uplink once (revalidated by ETag)."""
    image = random_image(tmp_path / "img.raw", 2 * MIB, seed=8)
    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image), "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(b"K" * 300_000)
    initrd.write_bytes(b"I" * 700_000)
    subprocess.run([BP, "--data", str(data), "boot-files", "set", "lab:v1", "--kernel", str(kernel), "--initrd",
                    str(initrd)], check=True, stdout=subprocess.DEVNULL)

    def token(scope: str) -> str:
        return subprocess.run([BP, "--data", str(data), "token", "create", "--scope", scope], check=True,
                              capture_output=True, text=True).stdout.strip()

    reader, writer = token("read"), token("write")
    upstream, up_url = start_server(data)
    cache: Proc | None = None
    try:
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url, "--upstream-token", reader)
        cid = RemoteRepository(up_url, token=reader).resolve("lab:v1").digest_at(0).hex()
        assert _curl(f"{url}/v1/chunks/{cid}")[0] == 401
        assert _curl(f"{url}/v1/chunks/{cid}", "-H", "authorization: Bearer bpt_wrong")[0] == 401
        assert _curl(f"{url}/v1/chunks/{cid}", "-H", f"authorization: Bearer {reader}")[0] == 200
        vid = RemoteRepository(up_url, token=reader).resolve("lab:v1").id
        path = f"/v1/images/lab/versions/{vid}/boot/initrd"
        for _ in range(3):
            code, body = _curl(f"{url}{path}", "-H", f"authorization: Bearer {reader}")
            assert code == 200 and body == initrd.read_bytes()
        # a read token may not write, through the site cache as directly
        code, _b = _curl(f"{url}/v1/images/lab/tags/x", "-X", "PUT", "-H", f"authorization: Bearer {reader}",
                         "-H", "content-type: application/json", "--data", json.dumps({"version": vid}))
        assert code == 403
        upstream.stop()
        # upstream down: the last answers about these tokens still hold; the kept initrd is served
        assert _curl(f"{url}/v1/chunks/{cid}", "-H", f"authorization: Bearer {reader}")[0] == 200
        assert _curl(f"{url}/v1/chunks/{cid}")[0] == 401
        code, body = _curl(f"{url}{path}", "-H", f"authorization: Bearer {reader}", "-D", "/dev/stderr")
        assert code == 200 and body == initrd.read_bytes()
        # a token it never saw cannot be checked: refused as unavailable, not let in
        code, body = _curl(f"{url}/v1/chunks/{cid}", "-H", f"authorization: Bearer {writer}")
        assert code == 503 and b"cannot check the token" in body
    finally:
        if cache is not None:
            cache.stop()
        upstream.stop()


def test_site_cache_shares_one_upstream_get_among_identical_requests(tmp_path: Path) -> None:
    """Ten PCs asking a new version's manifest at the same moment cost the uplink one GET; a caller
    with another token gets its own (never an answer given on somebody else's authority)."""
    import asyncio

    from blockprov.manifest import Manifest
    from blockprov.service.sitecache import SiteCache

    image = random_image(tmp_path / "img.raw", 4 * MIB, seed=9)
    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image), "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    one, other = (subprocess.run([BP, "--data", str(data), "token", "create", "--scope", "read"], check=True,
                                 capture_output=True, text=True).stdout.strip() for _ in range(2))
    upstream, up_url = start_server(data)
    target = "/v1/images/lab/manifest?ref=v1"

    async def ask() -> tuple[list[Any], Any, Any, dict[str, int]]:
        sc = SiteCache(tmp_path / "sc", up_url, 64 * MIB)
        try:
            same = await asyncio.gather(*(sc.keep(target, {"authorization": f"Bearer {one}"}) for _ in range(10)))
            theirs = await sc.keep(target, {"authorization": f"Bearer {other}"})
            nobody = await sc.keep(target, {})
            return same, theirs, nobody, dict(sc.counters)
        finally:
            await sc.close()

    try:
        same, theirs, nobody, counters = asyncio.run(ask())
        vid = RemoteRepository(up_url, token=one).resolve("lab:v1").id
    finally:
        upstream.stop()
    for r, kept in same:
        assert r is not None and r.status_code == 200 and kept is not None
        assert Manifest.from_json(r.content).id == vid
    assert counters["kept_upstream"] == 3 and counters["kept_joined"] == 9, counters
    # the other token's own GET, revalidating the kept answer
    assert theirs[0] is not None and theirs[0].status_code == 304
    assert theirs[1] is not None and same[0][1] is not None and theirs[1][1] == same[0][1][1]
    assert nobody[0] is not None and nobody[0].status_code == 401  # the upstream refused the anonymous GET


def test_prewarm_fills_the_site_cache_before_opening_time(tmp_path: Path, short: Path) -> None:
    """``host prewarm SITE NAME:TAG``: the boot profile's chunks, in profile order, reach the site
    cache; later, with the uplink down, a PC reads them; a job for later survives a restart."""
    image = random_image(tmp_path / "img.raw", 4 * MIB, seed=9)
    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(image), "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    upstream, up_url = start_server(data)
    cache: Proc | None = None
    agent: Proc | None = None
    try:
        up = RemoteRepository(up_url)
        m = up.resolve("lab:v1")
        profile = [5, 1, 2, 40, 41, 42, 7]
        up.put_profile("lab", m.id, profile)
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url)
        subprocess.run([BP, "--repo", up_url, "site", "add", "cafe", "--cache", url], check=True,
                       stdout=subprocess.DEVNULL)
        later = subprocess.run([BP, "--repo", up_url, "host", "prewarm", "cafe", "lab:v1", "--at", "+2h", "--json"],
                               check=True, capture_output=True, text=True)
        assert json.loads(later.stdout)["state"] == "scheduled"
        done = json.loads(subprocess.run([BP, "--repo", up_url, "host", "prewarm", "cafe", "lab:v1", "--wait",
                                          "--json"], check=True, capture_output=True, text=True, timeout=300).stdout)
        assert done["state"] == "done" and done["total"] == len(profile) == done["profile_chunks"], done
        metrics = _curl(f"{url}/metrics")[1].decode()
        assert f"blockprov_sitecache_chunks_upstream_total {len(profile)}" in metrics, metrics
        bad = subprocess.run([BP, "--repo", up_url, "host", "prewarm", "nowhere", "lab:v1"], capture_output=True,
                             text=True)
        assert bad.returncode == 3 and "no site nowhere" in bad.stderr, bad.stderr
        upstream.stop()
        agent, _b = start_agent(tmp_path / "pc", "lab:v1", short / "pc", "--no-profile", "--fetch-timeout", "3",
                                repo_url=url)
        for i in profile:  # pre-warmed: readable with the uplink down
            r = _qemu_io_read(short / "pc", i * (64 << 10), 64 << 10)
            assert r.returncode == 0, r.stdout + r.stderr
        agent.stop()
        agent = None
        cache.stop()
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url)  # the job for later is still there
        jobs = json.loads(subprocess.run([BP, "host", "prewarm", url, "--json"], check=True, capture_output=True,
                                         text=True).stdout)
        assert [j["state"] for j in jobs] == ["scheduled", "done"], jobs
    finally:
        if agent is not None:
            agent.stop()
        if cache is not None:
            cache.stop()
        upstream.stop()


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_site_cache_bounds_what_it_passes_on(tmp_path: Path) -> None:
    """Issue 27 item 9, in the site cache: a body passed on was read whole into memory (one 300 MiB
    PUT raised its peak by 1.1 GiB), with no body limit, no body timeout, and an upstream's refusal
    of a big body said "unreachable". Now ``--max-body``, ``--max-in-flight`` and
    ``--request-timeout`` bound it as they bound the repository, the body streams through, and a
    body the upstream cuts off is named as such. Bound stated: the peak grows by less than 64 MiB
    while 300 MiB are offered (declared and chunked)."""
    upstream, up_url = _upstream(tmp_path, 1 * MIB, seed=9)
    image = tmp_path / "img.raw"
    cache: Proc | None = None
    try:
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url, "--max-body", "8M",
                                  "--request-timeout", "10")  # not 2: a body sent on a loaded machine is no slow body
        host = f"{url}/v1/hosts/52:54:00:12:34:01"
        big = tmp_path / "big.bin"
        with open(big, "wb") as f:
            f.truncate(300 * MIB)
        before = _peak_rss(cache.proc.pid)
        json_put = ("-X", "PUT", "-H", "content-type: application/json")
        code, body = _curl(host, *json_put, "--data-binary", f"@{big}")  # declared: refused before it is read
        assert code == 413 and b"exceeds the limit of 8388608 bytes" in body, body
        # chunked, to a route the upstream takes 256 MiB on: cut off past 8 MiB (curl may see the reset first)
        code, body = _curl(f"{url}/v1/images/lab/versions", "-X", "POST", "-H", "content-type: application/json",
                           "-H", "transfer-encoding: chunked", "--data-binary", f"@{big}", check=False)
        assert (code, b"exceeds the limit of 8388608 bytes" in body) in ((413, True), (0, False)), body
        grown = _peak_rss(cache.proc.pid) - before
        assert grown < 64 * MIB, f"the site cache's peak grew by {grown >> 20} MiB"
        code, body = _curl(f"{url}/v1/chunks/fetch", "-X", "POST", "--data-binary", f"@{image}")  # 1 MiB of ids
        assert code == 413 and b"exceeds the limit of 524288 bytes" in body, body
        # within --max-body, over the upstream's own limit for the route (64 KiB, read from its /openapi.json):
        # the upstream's 413, said by the site cache before a byte is passed on
        over = tmp_path / "over.bin"
        over.write_bytes(b" " * (200 << 10))
        code, body = _curl(host, *json_put, "--data-binary", f"@{over}")
        assert code == 413 and b"exceeds the limit of 65536 bytes for PUT /v1/hosts/{host} (the upstream's)" in body, \
            body
        # chunked (no length to check first): the upstream's 413 passed on, or, when it closed before it took
        # the body, that, never "unreachable"
        code, body = _curl(host, *json_put, "-H", "transfer-encoding: chunked", "--data-binary", f"@{over}")
        assert (code, b"exceeds the limit of 65536 bytes" in body) == (413, True) or \
            (code, b"UpstreamCutBody" in body and b"over its limit for the route" in body) == (502, True), body
        # a body that does not come: 408 after --request-timeout, the connection closed
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as s:
            s.sendall(b"PUT /v1/hosts/52:54:00:12:34:01 HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: 100\r\n\r\n{")
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer, answer
        # and what is within every limit passes on and lands upstream
        code, body = _curl(host, *json_put, "-d", '{"ref": "lab:v1"}')
        assert code == 200, body
        assert json.loads(_curl(f"{up_url}/v1/hosts/52:54:00:12:34:01")[1])["ref"] == "lab:v1"
        print(f"site cache bounds: peak memory +{grown / MIB:.1f} MiB while 2 x 300 MiB bodies were offered")
    finally:
        if cache is not None:
            cache.stop()
        upstream.stop()
    err = cache.proc.stderr.read() if cache is not None and cache.proc.stderr else ""
    assert "internal error" not in err and "Traceback" not in err, err[-3000:]


def test_the_uefi_boot_image_through_the_site_cache(tmp_path: Path) -> None:
    """A UEFI PC's own HTTP boot through a site cache: ``GET /v1/boot/MAC/boot.img`` used to be passed
    upstream as it came, so the image's grub.cfg named the upstream as the PC's repository (the PC
    bypassed the site cache), and the site cache read the whole image into memory before it sent a
    byte. Now the image names the site cache, with its port though the firmware's Host header has
    none (edk2's), and streams through with its length, Range, ETag and HEAD. Bound stated: the
    site cache's peak memory grows by less than half the image's size while it passes."""
    from blockprov import boot
    from blockprov.repo.local import LocalRepository

    data = tmp_path / "repo"
    subprocess.run([BP, "--data", str(data), "import", str(random_image(tmp_path / "img.raw", 1 * MIB, seed=10)),
                    "lab:v1"], check=True, stdout=subprocess.DEVNULL)
    mac = "52:54:00:ab:cd:26"
    repo = LocalRepository(data)
    try:
        efi = {boot.SHIM: b"MZ shim " * 5000, boot.GRUB: b"MZ grub " * 9000, boot.MOK_MANAGER: b"MZ mm " * 300}
        initrd = random_image(tmp_path / "initrd", 96 * MIB, seed=11).read_bytes()
        repo.set_boot_files("lab:v1", b"MZ kernel " * 100_000, initrd, "console=ttyS0", efi, prepare=False)
        repo.assign_host(mac, "lab:v1")
    finally:
        repo.close()
    upstream, up_url = start_server(data)
    cache: Proc | None = None
    try:
        cache, url = start_server(tmp_path / "sc", "--upstream", up_url)
        img, port = f"{url}/v1/boot/{mac}/boot.img", url.rsplit(":", 1)[1]
        edk2 = ("-H", "host: 127.0.0.1")  # the firmware's Host header, without the port
        head = subprocess.run([require_tool("curl"), "-sI", *edk2, img], capture_output=True, text=True, timeout=60,
                              check=True).stdout.lower()
        assert head.startswith("http/1.1 200") and "content-type: application/vnd.efi-img" in head, head
        size = int(head.split("content-length: ", 1)[1].split()[0])
        etag = head.split("etag: ", 1)[1].splitlines()[0].strip()
        code, part = _curl(img, *edk2, "-r", "0-699")
        assert code == 206 and len(part) == 700, code
        before = _peak_rss(cache.proc.pid)
        code, content = _curl(img, *edk2)
        grown = _peak_rss(cache.proc.pid) - before
        assert code == 200 and len(content) == size > len(initrd)
        assert f"blockprov.repo=http://127.0.0.1:{port} ".encode() in content  # the site cache, its port kept
        assert up_url.encode() not in content
        assert content[:700] == part
        code, mid = _curl(img, *edk2, "-r", f"{size // 2}-{size // 2 + 99999}")
        assert code == 206 and mid == content[size // 2:size // 2 + 100000]
        code, body = _curl(img, *edk2, "-H", f"if-none-match: {etag}")
        assert code == 304, (etag, body[:300])
        # the upstream built it for the site cache, and recorded the PC's boot (the whole image was sent)
        host = json.loads(_curl(f"{up_url}/v1/hosts/{mac}")[1])
        assert host["firmware"] == "uefi" and host["last_boot"], host
        assert grown < size // 2, f"the site cache's peak grew by {grown >> 20} MiB for a {size >> 20} MiB image"
        print(f"boot.img through the site cache: {size >> 20} MiB, peak memory +{grown / MIB:.1f} MiB")
    finally:
        if cache is not None:
            cache.stop()
        upstream.stop()
