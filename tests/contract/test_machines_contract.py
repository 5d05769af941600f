"""Boot files, hosts, boot profiles, agents and requests: the same behaviour and the same errors
from LocalRepository and from RemoteRepository (over the real app, in-process)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import boot
from blockprov.errors import (
    AgentNotFound,
    BootFilesMissing,
    Conflict,
    HostNotFound,
    ImageNotFound,
    InvalidName,
    RequestNotFound,
    SourceError,
    UsageError,
)
from blockprov.imaging.importer import import_image
from blockprov.results import to_dict
from tests.conftest import make_image
from tests.contract.test_repository_contract import Backend

SIZE = 1 << 20
BASE = "http://10.0.2.2:8420"
MAC = "52:54:00:12:34:56"


@pytest.fixture(params=["local", "remote"])
def be(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    b.close()


@pytest.fixture
def versions(be: Backend, tmp_path: Path) -> tuple[str, str]:
    """Two versions of image ``lab``: v1 and v2 (tags of the same names)."""
    src = make_image(tmp_path / "a.img", SIZE, seed=3)
    v1, _ = import_image(be.repo, src, "lab:v1")
    with open(src, "r+b") as f:
        f.write(b"second version")
    v2, _ = import_image(be.repo, src, "lab:v2")
    return v1, v2


def test_boot_files_roundtrip_replace_and_gc(be: Backend, versions: tuple[str, str], tmp_path: Path) -> None:
    v1, _v2 = versions
    kernel = os.urandom(2 * boot.PIECE + 12345)  # three pieces, the last one short
    initrd_path = tmp_path / "initrd.img"
    initrd_path.write_bytes(b"initrd " * 1000)
    assert be.repo.get_boot_files("lab:v1") is None
    info = be.repo.set_boot_files("lab:v1", kernel, initrd_path, "console=ttyS0,115200  quiet")
    assert (info.image, info.version, info.cmdline) == ("lab", v1, "console=ttyS0,115200 quiet")
    assert info.kernel.size == len(kernel) and info.kernel.count == 3
    got = be.repo.get_boot_files(f"lab@{v1}")
    assert got is not None and got.kernel == info.kernel and got.initrd == info.initrd
    assert be.repo.boot_file("lab:v1", "kernel") == kernel
    assert be.repo.boot_file("lab:v1", "initrd") == initrd_path.read_bytes()
    # the same kernel for v2 is stored once (pieces are chunks); a new initrd replaces the old one
    be.repo.set_boot_files("lab:v2", kernel, b"first", "")
    be.repo.set_boot_files("lab:v2", kernel, b"second", "")
    assert be.repo.boot_file("lab:v2", "initrd") == b"second"
    be.gc_now()  # pieces named by boot files survive gc
    assert be.repo.boot_file(f"lab@{v1}", "kernel") == kernel
    assert be.repo.boot_file("lab:v2", "initrd") == b"second"
    # removing a version removes its boot files; gc then reclaims what nobody names
    be.repo.remove(f"lab@{v1}")
    with pytest.raises(ImageNotFound):
        be.repo.get_boot_files(f"lab@{v1}")
    be.gc_now()
    assert be.repo.boot_file("lab:v2", "kernel") == kernel
    assert be.local.store.missing(info.initrd.piece_ids()) == info.initrd.piece_ids()


def test_boot_files_errors(be: Backend, versions: tuple[str, str], tmp_path: Path) -> None:
    with pytest.raises(BootFilesMissing):
        be.repo.boot_file("lab:v1", "kernel")
    with pytest.raises(ImageNotFound):
        be.repo.set_boot_files("lab:nope", b"k", b"i")
    with pytest.raises(ImageNotFound):
        be.repo.get_boot_files("lab:nope")
    with pytest.raises(InvalidName):
        be.repo.set_boot_files("lab:v1", b"k", b"i", "quiet\nshell")
    with pytest.raises(InvalidName):
        be.repo.set_boot_files("lab:v1", b"k", b"i", "a=${evil}")
    with pytest.raises(UsageError):
        be.repo.set_boot_files("lab:v1", b"", b"i")
    with pytest.raises(SourceError):
        be.repo.set_boot_files("lab:v1", tmp_path / "absent", b"i")
    be.repo.set_boot_files("lab:v1", b"k", b"i")
    with pytest.raises(UsageError):
        be.repo.boot_file("lab:v1", "bios")
    assert be.repo.get_boot_files("lab:v2") is None


def test_hosts_and_boot_script(be: Backend, versions: tuple[str, str]) -> None:
    v1, v2 = versions
    be.repo.set_boot_files("lab:v1", b"kernel one", b"initrd one", "console=ttyS0")
    be.repo.set_boot_files("lab:v2", b"kernel two", b"initrd two", "console=ttyS1")
    h = be.repo.assign_host("52-54-00-12-34-56".upper(), "lab:v1", "ip=dhcp  rw")
    assert (h.host, h.ref, h.version, h.args) == (MAC, "lab:v1", v1, "ip=dhcp rw")
    be.repo.assign_host("kiosk-7", f"lab@{v2}")
    assert [(x.host, x.ref, x.version) for x in be.repo.hosts()] == [(MAC, "lab:v1", v1),
                                                                    ("kiosk-7", f"lab@{v2}", v2)]

    s = boot.parse_script(be.repo.boot_script("52:54:00:12:34:56", BASE))
    files = f"{BASE}/v1/images/lab/versions/{v1}/boot"
    assert s["kernel"] == f"{files}/kernel" and s["initrd"] == f"{files}/initrd?host={MAC}&platform=${{platform}}"
    assert s["args"][:3] == ["console=ttyS0", "ip=dhcp", "rw"]
    assert s["params"] == {"console": "ttyS0", "ip": "dhcp", "blockprov.repo": BASE,
                                "blockprov.image": f"lab@{v1}", "blockprov.host": MAC, "initrd": "initrd.img"}
    # the tag moves, the host follows; a pinned host does not
    be.repo.set_tag("lab", "v1", v2)
    s = boot.parse_script(be.repo.boot_script("52-54-00-12-34-56", BASE))
    assert s["params"]["blockprov.image"] == f"lab@{v2}" and s["params"]["console"] == "ttyS1"
    assert f"/versions/{v2}/boot/kernel" in s["kernel"]
    be.repo.set_tag("lab", "v2", v1)
    assert boot.parse_script(be.repo.boot_script("kiosk-7", BASE))["params"]["blockprov.image"] == f"lab@{v2}"
    # re-assigning replaces; removing forgets
    be.repo.assign_host(MAC, "lab:v2")
    assert boot.parse_script(be.repo.boot_script(MAC, BASE))["params"]["blockprov.image"] == f"lab@{v1}"
    be.repo.remove_host(MAC)
    with pytest.raises(HostNotFound):
        be.repo.boot_script(MAC, BASE)
    with pytest.raises(HostNotFound):
        be.repo.remove_host(MAC)
    assert [x.host for x in be.repo.hosts()] == ["kiosk-7"]


def test_host_errors(be: Backend, versions: tuple[str, str]) -> None:
    for bad in ("52:54:00:12:34", "52:54-00:12:34:56", "Kiosk", "-x", "a" * 64, "../x", "a b", ""):
        with pytest.raises(InvalidName):
            be.repo.assign_host(bad, "lab:v1")
    with pytest.raises(InvalidName):
        be.repo.boot_script("not a host", BASE)
    with pytest.raises(ImageNotFound):
        be.repo.assign_host("pc1", "lab:nope")
    with pytest.raises(InvalidName):
        be.repo.assign_host("pc1", "lab:v1", "x || shell")
    with pytest.raises(HostNotFound):
        be.repo.boot_script("pc1", BASE)
    be.repo.assign_host("pc1", "lab:v1")
    with pytest.raises(BootFilesMissing):  # the version has no kernel yet
        be.repo.boot_script("pc1", BASE)
    be.repo.set_boot_files("lab:v1", b"k", b"i")
    assert be.repo.boot_script("pc1", BASE).startswith("#!ipxe\n")
    with pytest.raises(InvalidName):
        be.repo.boot_script("pc1", "http://x/\nshell")
    be.repo.remove("lab:v1")  # the tag goes: the host's assignment is broken, and says so
    assert [h.version for h in be.repo.hosts()] == [None]
    with pytest.raises(Conflict, match="no longer exists"):
        be.repo.boot_script("pc1", BASE)


def test_profiles(be: Backend, versions: tuple[str, str]) -> None:
    v1, v2 = versions
    n = be.repo.resolve("lab:v1").count
    assert be.repo.get_profile("lab", v1) is None
    order = [5, 0, n - 1, 3]
    be.repo.put_profile("lab", v1, order)
    assert be.repo.get_profile("lab", v1) == order
    be.repo.put_profile("lab", v1, list(range(n))[::-1])
    assert be.repo.get_profile("lab", v1) == list(range(n))[::-1]
    m2 = be.repo.resolve(f"lab@{v2}")  # imported over v1 (its parent): inherits v1's profile, translated
    assert be.repo.get_profile("lab", v2) == [i for i in range(n)[::-1] if not m2.is_zero(i)]
    assert be.repo.get_profile("lab", v2, inherit=False) is None
    be.repo.put_profile("lab", v2, [])
    assert be.repo.get_profile("lab", v2) == []  # its own, even empty, wins
    for bad in ([n], [1, 1], [-1], [*range(n), 0]):
        with pytest.raises(UsageError):
            be.repo.put_profile("lab", v1, bad)
    assert be.repo.get_profile("lab", v1) == list(range(n))[::-1]  # unchanged by refused puts
    with pytest.raises(ImageNotFound):
        be.repo.put_profile("lab", "0123456789abcdef", [0])
    with pytest.raises(ImageNotFound):
        be.repo.get_profile("lab", "0123456789abcdef")
    with pytest.raises(InvalidName):
        be.repo.get_profile("lab", "v1")
    be.repo.remove(f"lab@{v1}")
    with pytest.raises(ImageNotFound):
        be.repo.get_profile("lab", v1)


def test_agents_requests_lifecycle(be: Backend) -> None:
    info = {"image": "lab", "version": "0123456789abcdef", "host": "pc1", "pid": 42, "addresses": ["unix:/x"]}
    assert be.repo.agents() == []
    with pytest.raises(AgentNotFound):
        be.repo.post_request("pc1-a", "snapshot", {})
    with pytest.raises(AgentNotFound):
        be.repo.next_request("pc1-a")
    be.repo.register_agent("pc1-a", info)
    first_seen = be.repo.agents()[0]["last_seen"]
    time.sleep(0.01)
    be.repo.register_agent("pc1-a", info | {"pid": 43})  # heartbeat
    [a] = be.repo.agents()
    assert a["instance"] == "pc1-a" and a["info"]["pid"] == 43 and a["last_seen"] > first_seen
    assert a["pending"] == 0 and a["running"] == 0

    assert be.repo.next_request("pc1-a", 0) is None
    rid = be.repo.post_request("pc1-a", "snapshot", {"to": "lab:snap", "target": "repo"})
    r2 = be.repo.post_request("pc1-a", "status")
    assert be.repo.get_request("pc1-a", rid)["state"] == "pending"
    assert be.repo.agents()[0]["pending"] == 2
    got = be.repo.next_request("pc1-a", 0)
    assert got is not None and got["id"] == rid and got["state"] == "running" and got["op"] == "snapshot"
    assert got["args"] == {"to": "lab:snap", "target": "repo"} and got["attempts"] == 1
    got2 = be.repo.next_request("pc1-a", 0)
    assert got2 is not None and got2["id"] == r2 and got2["args"] == {}
    assert be.repo.next_request("pc1-a", 0) is None
    done = be.repo.complete_request("pc1-a", rid, True, {"version": "fedcba9876543210"})
    assert done["state"] == "done" and done["result"] == {"version": "fedcba9876543210"} and done["error"] is None
    assert be.repo.get_request("pc1-a", rid, 5.0)["state"] == "done"
    with pytest.raises(Conflict):
        be.repo.complete_request("pc1-a", rid, True, {})
    failed = be.repo.complete_request("pc1-a", r2, False, None, "disk full")
    assert failed["state"] == "failed" and failed["error"] == "disk full"
    with pytest.raises(RequestNotFound):
        be.repo.get_request("pc1-a", "0123456789abcdef")
    with pytest.raises(RequestNotFound):
        be.repo.get_request("other", rid)
    with pytest.raises(InvalidName):
        be.repo.register_agent("bad/id", {})
    with pytest.raises(InvalidName):
        be.repo.post_request("pc1-a", "Bad Op")
    with pytest.raises(InvalidName):
        be.repo.get_request("pc1-a", "xyz")


def test_bad_bodies_are_usage_errors(be: Backend) -> None:
    with pytest.raises(UsageError):
        be.repo.register_agent("pc1", [1, 2])  # type: ignore[arg-type]
    be.repo.register_agent("pc1", {})
    with pytest.raises(UsageError):
        be.repo.post_request("pc1", "x", {"bad": float("nan")})
    with pytest.raises(UsageError):
        be.repo.next_request("pc1", -1)
    rid = be.repo.post_request("pc1", "snapshot", {"to": "lab:x\u0000"})  # JSON text keeps it escaped
    be.repo.next_request("pc1")
    with pytest.raises(UsageError):  # PostgreSQL refuses NUL in text: the same answer on every catalog
        be.repo.complete_request("pc1", rid, False, None, "bad\x00thing")
    assert be.repo.complete_request("pc1", rid, False, None, "bad thing")["state"] == "failed"


def test_lease_expiry_unregister_and_long_poll(be: Backend) -> None:
    be.local.registry.lease = 0.3
    be.repo.register_agent("pc2", {})
    rid = be.repo.post_request("pc2", "snapshot", {})
    assert be.repo.next_request("pc2", 0)["id"] == rid  # type: ignore[index]
    assert be.repo.next_request("pc2", 0) is None  # leased
    time.sleep(0.4)
    assert be.repo.get_request("pc2", rid)["state"] == "pending"  # the lease ran out: an agent crashed
    again = be.repo.next_request("pc2", 0)
    assert again is not None and again["id"] == rid and again["attempts"] == 2
    be.repo.complete_request("pc2", rid, True, {"late": True})
    be.local.registry.lease = 600.0

    # a long poll returns as soon as a request is posted (from another thread), well before its wait
    def post_later() -> None:
        time.sleep(0.5)
        be.repo.post_request("pc2", "status")

    t = threading.Thread(target=post_later)
    t.start()
    t0 = time.monotonic()
    got = be.repo.next_request("pc2", 10.0)
    t.join()
    assert got is not None and got["op"] == "status" and 0.4 < time.monotonic() - t0 < 5.0
    # get_request waits for completion, and a bounded wait returns the state as it is
    t0 = time.monotonic()
    assert be.repo.get_request("pc2", got["id"], 0.5)["state"] == "running"
    assert 0.45 < time.monotonic() - t0 < 3.0
    threading.Timer(0.3, lambda: be.repo.complete_request("pc2", got["id"], True, {})).start()
    assert be.repo.get_request("pc2", got["id"], 10.0)["state"] == "done"
    # unregistering fails what is unfinished and forgets the agent
    r3 = be.repo.post_request("pc2", "snapshot")
    be.repo.unregister_agent("pc2")
    gone = be.repo.get_request("pc2", r3)
    assert gone["state"] == "failed" and "unregistered" in gone["error"]
    assert be.repo.agents() == []
    with pytest.raises(AgentNotFound):
        be.repo.unregister_agent("pc2")
    with pytest.raises(AgentNotFound):
        be.repo.post_request("pc2", "snapshot")


def test_last_boot_recorded(be: Backend, versions: tuple[str, str]) -> None:
    """A host's last boot (time and version booted) is kept across re-assignment and shown by every
    backend; a boot script answered records none (the initrd's download does)."""
    v1, v2 = versions
    be.repo.set_boot_files("lab:v1", b"k1", b"i1")
    h = be.repo.assign_host(MAC, "lab:v1")
    assert (h.last_boot, h.last_boot_version) == (None, None)
    be.repo.boot_script(MAC, BASE)  # `host script`: an operator looking, not a boot
    assert be.repo.hosts()[0].last_boot is None
    before = time.time()
    be.local.registry.record_boot(MAC, v1)  # what the whole initrd's download does (service/routes/boot.py)
    (h,) = be.repo.hosts()
    assert h.last_boot is not None and before <= h.last_boot <= time.time() and h.last_boot_version == v1
    assert to_dict(h)["last_boot_version"] == v1
    h2 = be.repo.assign_host(MAC, f"lab@{v2}")  # re-assigning keeps the record of the last boot
    assert (h2.last_boot, h2.last_boot_version) == (h.last_boot, v1) and h2.version == v2
    be.local.registry.record_boot("pc-unknown", v1)  # a host removed meanwhile: nothing recorded, no error
    assert [x.host for x in be.repo.hosts()] == [MAC]


def test_schema_migrates_an_existing_catalog(tmp_path: Path) -> None:
    """A catalog.sqlite made before these tables existed gains them on open, keeping its data."""
    import sqlite3

    from blockprov.catalog.images import SCHEMA
    from blockprov.repo.local import LocalRepository

    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "catalog.sqlite")
    db.executescript(SCHEMA)
    db.close()
    src = make_image(tmp_path / "x.img", SIZE, seed=9)
    r = LocalRepository(data)
    try:
        vid, _ = import_image(r, src, "old:v1")
        r.set_boot_files("old:v1", b"k", b"i")
        r.assign_host("pc9", "old:v1")
        r.put_profile("old", vid, [0])
        r.register_agent("a", {})
    finally:
        r.close()
    r = LocalRepository(data)  # and opening again changes nothing
    try:
        assert r.hosts()[0].version == vid and r.get_profile("old", vid) == [0] and r.agents()[0]["instance"] == "a"
    finally:
        r.close()


OLD_HOSTS = """CREATE TABLE hosts (host TEXT PRIMARY KEY, image TEXT NOT NULL, tag TEXT, version TEXT,
    args TEXT NOT NULL, updated REAL NOT NULL)"""


def test_old_hosts_table_gains_last_boot(tmp_path: Path) -> None:
    """A catalog.sqlite whose hosts table predates the last boot gains its columns on open, keeping
    its hosts; two processes opening it at once add them once."""
    import sqlite3

    from blockprov.catalog.images import SCHEMA
    from blockprov.repo.local import LocalRepository

    data = tmp_path / "old"
    data.mkdir()
    src = make_image(tmp_path / "x.img", SIZE, seed=9)
    r = LocalRepository(tmp_path / "scratch")
    vid, _ = import_image(r, src, "old:v1")
    r.close()
    db = sqlite3.connect(data / "catalog.sqlite")
    db.executescript(SCHEMA + ";" + OLD_HOSTS)
    db.execute("INSERT INTO hosts VALUES ('pc9', 'old', 'v1', NULL, '', 1.0)")
    db.commit()
    db.close()
    opened: list[LocalRepository] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(LocalRepository(data))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(opened) == 2
        r = opened[0]
        (h,) = r.hosts()
        assert (h.host, h.ref, h.last_boot, h.last_boot_version) == ("pc9", "old:v1", None, None)
        r.registry.record_boot("pc9", vid)
        assert opened[1].hosts()[0].last_boot_version == vid
    finally:
        for x in opened:
            x.close()


def test_profiles_are_inherited_by_versions_made_from_others(be: Backend, tmp_path: Path) -> None:
    """Issue 15 item 1: a version imported over another, a new image's import that shares most
    chunks with a profiled version, a chain of them: each starts with its donor's profile
    (translated: zero chunks dropped) until it records its own, which is merged with it."""
    src = make_image(tmp_path / "a.img", SIZE, seed=3, data_fraction=0.9)
    v1, _ = import_image(be.repo, src, "lab:v1")
    n = be.repo.resolve("lab:v1").count
    order = [7, 3, 12, 0, 5]
    be.repo.put_profile("lab", v1, order)
    with open(src, "r+b") as f:
        f.seek(3 * 65536)
        f.write(os.urandom(65536))  # chunk 3 changes: still prefetched, at the same position
        f.seek(12 * 65536)
        f.write(bytes(65536))  # chunk 12 becomes zero: nothing to fetch
    v2, _ = import_image(be.repo, src, "lab:v2")
    assert be.repo.resolve("lab:v2").parent == v1
    m2 = be.repo.resolve("lab:v2")
    assert m2.is_zero(12) and not any(m2.is_zero(i) for i in (7, 3, 0, 5))
    assert be.repo.get_profile("lab", v2) == [7, 3, 0, 5]
    v3, _ = import_image(be.repo, src, "lab:v3")  # v3 → v2 (no profile of its own) → v1
    assert be.repo.get_profile("lab", v3) == [7, 3, 0, 5]
    other, _ = import_image(be.repo, src, "other:v1")  # a new image with v1's chunks: a donor is found
    assert be.repo.resolve("other:v1").labels.get("profile-from", "").startswith("lab@")
    assert be.repo.get_profile("other", other) == [7, 3, 0, 5]
    unrelated = make_image(tmp_path / "u.img", SIZE, seed=99, data_fraction=0.9)
    v4, _ = import_image(be.repo, unrelated, "lab:v4")  # unrelated content under the same image
    assert be.repo.get_profile("lab", v4) is None
    be.repo.put_profile("lab", v2, [1, 5])  # its own: first, then what it inherited and did not read
    assert be.repo.get_profile("lab", v2) == [1, 5, 7, 3, 0]
    assert be.repo.get_profile("lab", v2, inherit=False) == [1, 5, 7, 3, 0]
    be.repo.put_profile("lab", v2, [2])  # later puts replace (nothing inherited any more)
    assert be.repo.get_profile("lab", v2) == [2]
    assert be.repo.get_profile("lab", v3) == [2]  # the nearest donor with a profile of its own
    assert n == be.repo.resolve("lab:v3").count


def test_reassigning_keeps_what_is_not_named(be: Backend, versions: tuple[str, str]) -> None:
    """Issue 27 item 1: the policy and hydration are fields of the host record. Re-assigning with
    new arguments keeps the policy (the PC must stay ``restore``); arguments not given stay; ``""``
    clears them on purpose; setting words typed into the arguments become the fields."""
    _v1, v2 = versions
    be.repo.set_boot_files("lab:v1", b"k1", b"i1")
    be.repo.set_boot_files("lab:v2", b"k2", b"i2")
    h = be.repo.assign_host(MAC, "lab:v1", "A=1", {"policy": "restore", "hydrate": "before-boot"})
    assert (h.policy, h.hydrate, h.args) == ("restore", "before-boot", "A=1")
    h = be.repo.assign_host(MAC, "lab:v1", "B=2")  # the case: new args, no policy named
    assert (h.policy, h.hydrate, h.args) == ("restore", "before-boot", "B=2")
    params = boot.parse_script(be.repo.boot_script(MAC, BASE))["params"]
    assert params["blockprov.policy"] == "restore" and params["blockprov.hydrate"] == "before-boot"
    assert params["B"] == "2" and "A" not in params
    h = be.repo.assign_host(MAC, f"lab@{v2}")  # nothing but the version named: everything stays
    assert (h.ref, h.policy, h.hydrate, h.args) == (f"lab@{v2}", "restore", "before-boot", "B=2")
    h = be.repo.assign_host(MAC, "lab:v1", "", {"hydrate": ""})  # cleared on purpose
    assert (h.policy, h.hydrate, h.args) == ("restore", None, "")
    params = boot.parse_script(be.repo.boot_script(MAC, BASE))["params"]
    assert params["blockprov.policy"] == "restore" and "blockprov.hydrate" not in params
    # words in the arguments are the fields (as `--args "blockprov.policy=keep"` always meant)
    h = be.repo.assign_host(MAC, "lab:v1", "quiet blockprov.policy=keep")
    assert (h.policy, h.args) == ("keep", "quiet")
    assert to_dict(be.repo.hosts()[0])["policy"] == "keep"
    with pytest.raises(UsageError, match="given twice"):
        be.repo.assign_host(MAC, "lab:v1", "blockprov.policy=keep", {"policy": "restore"})
    with pytest.raises(UsageError, match="given twice"):
        be.repo.assign_host(MAC, "lab:v1", "blockprov.policy=keep blockprov.policy=restore")
    for bad in ({"policy": "wipe"}, {"hydrate": "later"}, {"colour": "red"}, {"policy": 3}):
        with pytest.raises(UsageError):
            be.repo.assign_host(MAC, "lab:v1", None, bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        be.repo.assign_host(MAC, "lab:v1", "blockprov.policy=")
    h = be.repo.hosts()[0]  # nothing refused changed anything
    assert (h.policy, h.hydrate, h.args) == ("keep", None, "quiet")


def test_settings_in_old_arguments_move_into_the_record(tmp_path: Path) -> None:
    """An older catalog kept the policy and hydration as words of the host's arguments; opening
    it moves them into their columns (once: opening again changes nothing), so a later
    ``--args`` can no longer drop them."""
    import sqlite3

    from blockprov.catalog.images import SCHEMA
    from blockprov.repo.local import LocalRepository

    data = tmp_path / "old"
    data.mkdir()
    src = make_image(tmp_path / "x.img", SIZE, seed=9)
    r = LocalRepository(tmp_path / "scratch")
    import_image(r, src, "old:v1")
    r.close()
    db = sqlite3.connect(data / "catalog.sqlite")
    db.executescript(SCHEMA + ";" + OLD_HOSTS)
    db.execute("INSERT INTO hosts VALUES ('pc9', 'old', 'v1', NULL, 'quiet blockprov.policy=restore "
               "blockprov.hydrate=off x=1', 1.0)")
    db.execute("INSERT INTO hosts VALUES ('pc8', 'old', 'v1', NULL, 'blockprov.policy=wipe', 1.0)")
    db.commit()
    db.close()
    for _ in range(2):
        r = LocalRepository(data)
        try:
            bad, h = r.hosts()
            assert (h.host, h.policy, h.hydrate, h.args) == ("pc9", "restore", "off", "quiet x=1")
            assert (bad.policy, bad.args) == (None, "blockprov.policy=wipe")  # left for the operator to see
        finally:
            r.close()


def test_agents_say_online_and_stale_ones_leave(be: Backend, versions: tuple[str, str]) -> None:
    """Issue 27 item 5: `agents` showed no online/offline and a stopped agent stayed for ever. An
    agent seen within 30 s is online; one not seen for 7 days is forgotten, its open requests
    failed with why."""
    from blockprov.catalog.machines import FORGET_AGENT, ONLINE_SECONDS

    be.repo.register_agent("pc1", {"image": "lab"})
    be.repo.register_agent("pc2", {"image": "lab"})
    rid = be.repo.post_request("pc2", "snapshot", {"to": "lab:s"})
    assert [(a["instance"], a["online"]) for a in be.repo.agents()] == [("pc1", True), ("pc2", True)]
    db = be.local.catalog.db
    db.write("UPDATE agents SET last_seen=? WHERE instance='pc1'", (time.time() - ONLINE_SECONDS - 1,))
    db.write("UPDATE agents SET last_seen=? WHERE instance='pc2'", (time.time() - FORGET_AGENT - 1,))
    assert [(a["instance"], a["online"]) for a in be.repo.agents()] == [("pc1", False)]
    gone = be.repo.get_request("pc2", rid)
    assert gone["state"] == "failed" and "not seen for 7 days" in gone["error"]
    be.repo.register_agent("pc2", {"image": "lab"})  # it starts again: it is back
    assert [a["instance"] for a in be.repo.agents()] == ["pc1", "pc2"]
