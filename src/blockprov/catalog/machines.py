"""The catalog's second half: what the repository knows about machines.

Tables (in the catalog's database, next to images, versions and tags):

* ``boot_files``: per version, the kernel and initrd descriptors (boot.py), the command line, and
  the UEFI loader's descriptors (``efi``: JSON, boot.EFI_FILES; NULL: none).
* ``hosts``: the host record. Host (MAC or host id) → ``NAME:TAG`` (follows the tag) or
  ``NAME@ID``, plus extra kernel arguments, the host's settings (one column each, boot.SETTINGS:
  ``policy``, ``hydrate``; NULL = the machine's default), and the host's last boot: when the
  repository last answered its boot script (``GET /v1/boot/HOST``) and the version that script
  named, and the firmware it booted with (``firmware``: bios or uefi, when its request told).
  An assignment changes only what it names: replacing the arguments keeps the policy.
* ``profiles``: per version, the order in which a boot first read chunks, as zstd(u32 LE array).
  A version without a row inherits its donor's, translated (catalog/inherit.py), computed when
  asked for; nothing is stored until it records its own (then merged with the inherited one).
* ``agents``: agent instances attached to this repository, with what they reported and when.
* ``agent_requests``: repository-initiated requests to agents (claims 10, 34) and their outcome.

Why requests live in the catalog: agents sit behind NAT, so they poll; the poll may reach any
worker or any server process over the same catalog (on any host, with PostgreSQL), so the queue
must be shared state, not memory. A server's long polls share one ``ready_instances`` query per
``POLL`` seconds (service/longpoll.py), so a thousand waiting agents cost what one does.

Migration: every table is ``CREATE TABLE IF NOT EXISTS``, run on open, so a ``catalog.sqlite``
made before these tables existed simply gains them; a column added later (``hosts.last_boot``,
``hosts.last_boot_version``, the settings) is added on open to a table that lacks it
(``SQLDatabase.add_column``). Settings that an older catalog kept as words of a host's arguments
(``blockprov.policy=restore``) move into their columns on open (``_move_settings``: one
transaction, safe to repeat, a no-op once done).
``boot_files`` and ``profiles`` rows go with their version (``ON DELETE CASCADE``); a host whose
tag or version was removed keeps its row and its boot script says so (Conflict) until it is
re-assigned.

Crash rules: each change is one ``BEGIN IMMEDIATE`` transaction (WAL, synchronous=FULL), so it
happened entirely or not at all. A request handed to an agent is ``running`` under a lease of
``lease`` seconds; an agent that crashes never completes it, and once the lease ends the request
is handed out again (at-least-once: operations must be safe to repeat, as a snapshot is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import zstandard

from blockprov import jsonvalue
from blockprov.boot import EFI_FILES, SETTINGS, BootFile, DiskState, host_setting, split_settings
from blockprov.catalog import inherit, sites
from blockprov.catalog.db import Tx
from blockprov.catalog.images import Catalog
from blockprov.catalog.records import BootFilesInfo, HostInfo
from blockprov.errors import (
    AgentNotFound,
    BlockprovError,
    Conflict,
    HostNotFound,
    ImageNotFound,
    RequestNotFound,
    SiteNotFound,
    TooLarge,
    UsageError,
)
from blockprov.manifest import Manifest
from blockprov.names import Ref, host_id, image_name, instance_id, kernel_args, op_name, request_id, version_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS boot_files (
    image   TEXT NOT NULL,
    version TEXT NOT NULL,
    kernel_size   INTEGER NOT NULL,
    kernel_pieces BLOB NOT NULL,
    initrd_size   INTEGER NOT NULL,
    initrd_pieces BLOB NOT NULL,
    cmdline TEXT NOT NULL,
    updated REAL NOT NULL,
    efi     TEXT,
    PRIMARY KEY (image, version),
    FOREIGN KEY (image, version) REFERENCES versions(image, id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS hosts (
    host    TEXT PRIMARY KEY,
    image   TEXT NOT NULL,
    tag     TEXT,
    version TEXT,
    args    TEXT NOT NULL,
    updated REAL NOT NULL,
    last_boot REAL,
    last_boot_version TEXT,
    policy  TEXT,
    hydrate TEXT,
    last_refused REAL,
    refused_why  TEXT,
    site    TEXT,
    firmware TEXT
);
CREATE TABLE IF NOT EXISTS profiles (
    image   TEXT NOT NULL,
    version TEXT NOT NULL,
    count   INTEGER NOT NULL,
    chunks  BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (image, version),
    FOREIGN KEY (image, version) REFERENCES versions(image, id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS agents (
    instance   TEXT PRIMARY KEY,
    info       TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_requests (
    id       TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    op       TEXT NOT NULL,
    args     TEXT NOT NULL,
    state    TEXT NOT NULL,
    created  REAL NOT NULL,
    started  REAL,
    finished REAL,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result   TEXT,
    error    TEXT
);
CREATE INDEX IF NOT EXISTS agent_requests_queue ON agent_requests (instance, state, created);
CREATE INDEX IF NOT EXISTS agent_requests_state ON agent_requests (state, lease_until);
"""

LEASE_SECONDS = 600.0  # a running request not completed within this goes back to pending
SEEN_EVERY = 5.0  # seconds: how often an idle poll records the agent's last_seen
ONLINE_SECONDS = 6 * SEEN_EVERY  # an agent seen within this is online (its long poll refreshes last_seen)
FORGET_AGENT = 7 * 86400.0  # an agent not seen for this long leaves the list (it registers again when it starts)
KEEP_FINISHED = 7 * 86400.0  # finished requests are kept this long for get_request
MAX_PENDING = 1000  # per instance: a queue that long means the agent is not polling
MAX_INFO = 64 << 10  # bytes of JSON in an agent's info, a request's args
MAX_RESULT = 1 << 20  # bytes of JSON in a request's result
MAX_ERROR = 4096
MAX_PROFILE = 1 << 24  # chunk indices in one profile (a 1 TiB image at 64 KiB chunks)
U32 = struct.Struct("<I")
STATES = ("pending", "running", "done", "failed")
HOST_COLUMNS = "host, image, tag, version, args, updated, last_boot, last_boot_version, last_refused, refused_why"
# Columns added to a table after its first release (added on open to an older catalog, where they
# sit last; `catalog copy` copies by column name). One per host setting (boot.SETTINGS).
ADDED_COLUMNS = (("hosts", "last_boot", "REAL"), ("hosts", "last_boot_version", "TEXT"),
                 ("hosts", "policy", "TEXT"), ("hosts", "hydrate", "TEXT"),
                 ("hosts", "last_refused", "REAL"), ("hosts", "refused_why", "TEXT"), ("hosts", "site", "TEXT"),
                 ("boot_files", "efi", "TEXT"), ("hosts", "firmware", "TEXT"),
                 ("hosts", "disk", "TEXT"),  # the PC's disk as it last said (boot.DiskState, JSON)
                 ("hosts", "reprovision", "TEXT"))  # the operator's last re-provision request (a token)
MAX_REFUSED_WHY = 500  # characters of a refused boot request's reason kept on the host
FIRMWARE = ("bios", "uefi")  # what a host's boot requests say it booted with (hosts.firmware)


def _json_object(d: object, what: str, limit: int) -> str:
    if not isinstance(d, dict):
        raise UsageError(f"{what} must be a JSON object")
    text = jsonvalue.dumps(d, what)  # what is stored must read back (issue 27): no NaN, no lone surrogate
    if len(text) > limit:
        raise TooLarge(f"{what} is {len(text)} bytes of JSON; at most {limit}")
    return text


def _efi_files(text: str | None) -> dict[str, BootFile]:
    return {k: BootFile.from_dict(v) for k, v in json.loads(text).items()} if text else {}


def pack_profile(order: Sequence[int]) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(b"".join(U32.pack(i) for i in order))


def unpack_profile(blob: bytes, count: int) -> list[int]:
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=4 * count)
    return [v for (v,) in U32.iter_unpack(raw)]


class Registry:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.db = catalog.db
        self.db.script(SCHEMA)
        self.db.script(sites.SCHEMA)  # a host's site must name one (assign_host)
        for table, column, decl in ADDED_COLUMNS:
            self.db.add_column(table, column, decl)
        self._move_settings()
        self.lease = LEASE_SECONDS

    def _move_settings(self) -> None:
        """Hosts whose arguments still carry settings as words (an older catalog): the words move
        into their columns, unless the column already holds a value (then the word is dropped)."""
        likes = " OR ".join("args LIKE ?" for _ in SETTINGS)
        pattern = [f"%blockprov.{k}=%" for k in SETTINGS]
        if not self.db.one(f"SELECT 1 FROM hosts WHERE {likes} LIMIT 1", tuple(pattern)):
            return
        cols = ", ".join(SETTINGS)
        with self.db.tx() as db:
            for row in db.execute(f"SELECT host, args, {cols} FROM hosts WHERE {likes}", tuple(pattern)).fetchall():
                try:
                    rest, found = split_settings(row[1])
                except BlockprovError:  # a malformed word stays where it is, for the operator to see
                    continue
                have = dict(zip(SETTINGS, row[2:], strict=True))
                merged = {k: have[k] if have[k] is not None else found.get(k) for k in SETTINGS}
                db.execute(f"UPDATE hosts SET args=?, {', '.join(f'{k}=?' for k in SETTINGS)} WHERE host=?",
                           (rest, *merged.values(), row[0]))

    def _version_of(self, ref: Ref) -> str:
        return self.catalog.resolve_id(ref)

    # -- boot files -----------------------------------------------------------------------------
    def set_boot_files(self, image: str, vid: str, kernel: BootFile, initrd: BootFile, cmdline: str,
                       efi: Mapping[str, BootFile] | None = None) -> BootFilesInfo:
        """Record (replace) a version's boot files (``efi``: its UEFI loader, boot.EFI_FILES, kept
        as JSON descriptors in one column); the caller made their pieces durable first."""
        cmdline = kernel_args(cmdline)
        efi = dict(efi or {})
        if not set(efi) <= set(EFI_FILES):
            raise UsageError(f"the EFI loader files are {', '.join(EFI_FILES)}, not {', '.join(sorted(efi))}")
        efi_json = json.dumps({k: f.to_dict() for k, f in sorted(efi.items())}) if efi else None
        now = time.time()
        with self.db.tx() as db:
            if not db.execute("SELECT 1 FROM versions WHERE image=? AND id=?", (image, vid)).fetchone():
                raise ImageNotFound(ref=f"{image}@{vid}")
            db.execute("INSERT INTO boot_files (image, version, kernel_size, kernel_pieces, initrd_size, "
                       "initrd_pieces, cmdline, updated, efi) VALUES (?,?,?,?,?,?,?,?,?) "
                       "ON CONFLICT (image, version) DO UPDATE SET "
                       "kernel_size=excluded.kernel_size, kernel_pieces=excluded.kernel_pieces, "
                       "initrd_size=excluded.initrd_size, initrd_pieces=excluded.initrd_pieces, "
                       "cmdline=excluded.cmdline, updated=excluded.updated, efi=excluded.efi",
                       (image, vid, kernel.size, kernel.pieces, initrd.size, initrd.pieces, cmdline, now, efi_json))
        return BootFilesInfo(image=image, version=vid, kernel=kernel, initrd=initrd, cmdline=cmdline, updated=now,
                             efi=efi)

    def boot_files(self, image: str, vid: str) -> BootFilesInfo | None:
        row = self.db.one(
            "SELECT kernel_size, kernel_pieces, initrd_size, initrd_pieces, cmdline, updated, efi FROM boot_files "
            "WHERE image=? AND version=?", (image, vid))
        if row is None:
            if not self.catalog.version_exists(image, vid):
                raise ImageNotFound(ref=f"{image}@{vid}")
            return None
        return BootFilesInfo(image=image, version=vid, kernel=BootFile(row[0], bytes(row[1])),
                             initrd=BootFile(row[2], bytes(row[3])), cmdline=row[4], updated=row[5],
                             efi=_efi_files(row[6]))

    def boot_piece_ids(self) -> set[bytes]:
        """Every chunk id a boot file names, the EFI loader's too (gc keeps them)."""
        out: set[bytes] = set()
        for kp, ip, efi in self.db.all("SELECT kernel_pieces, initrd_pieces, efi FROM boot_files"):
            for blob in (bytes(kp), bytes(ip), *(f.pieces for f in _efi_files(efi).values())):
                out.update(blob[i:i + 32] for i in range(0, len(blob), 32))
        return out

    # -- hosts ----------------------------------------------------------------------------------
    def assign_host(self, host: str, ref: Ref, args: str | None = None,
                    settings: Mapping[str, str | None] | None = None) -> HostInfo:
        """Boot ``host`` from ``ref``, changing only what is named: ``args`` None keeps the host's
        arguments ("" clears them), a setting left out of ``settings`` keeps its value ("" or None
        in it clears it to the machine's default). Setting words in ``args``
        (``blockprov.policy=restore``) are taken as those settings."""
        host = host_id(host)
        named: dict[str, str | None] = {}
        for k, v in (settings or {}).items():
            named[k] = host_setting(k, v)
        if args is not None:
            args, in_args = split_settings(args)
            for k, v in in_args.items():
                if named.get(k, v) != v:
                    raise UsageError(f"the host's {k} is given twice: {named[k]} and, in its arguments, {v}")
                named[k] = v
        now = time.time()
        with self.db.tx() as db:
            self.catalog.resolve_id(ref, db)  # the reference must name something now
            if named.get("site") and not db.execute("SELECT 1 FROM sites WHERE name=?", (named["site"],)).fetchone():
                raise SiteNotFound(site=named["site"])
            if db.execute("SELECT 1 FROM hosts WHERE host=?", (host,)).fetchone() is None:
                db.execute("INSERT INTO hosts (host, image, tag, version, args, updated) VALUES (?,?,?,?,?,?)",
                           (host, ref.name, ref.tag, ref.version, args or "", now))
            else:
                db.execute("UPDATE hosts SET image=?, tag=?, version=?, updated=? WHERE host=?",
                           (ref.name, ref.tag, ref.version, now, host))
                if args is not None:
                    db.execute("UPDATE hosts SET args=? WHERE host=?", (args, host))
            for k, v in named.items():  # k is a key of SETTINGS (host_setting checked it): a column name
                db.execute(f"UPDATE hosts SET {k}=? WHERE host=?", (v, host))
        return self.host(host)

    def _host_info(self, row: tuple[Any, ...]) -> HostInfo:
        host, image, tag, version, args, updated, last_boot, last_boot_version, last_refused, refused_why = row[:10]
        ref = Ref(image, tag=tag, version=version)
        try:
            vid: str | None = self._version_of(ref)
        except ImageNotFound:
            vid = None
        settings = dict(zip(SETTINGS, row[10:10 + len(SETTINGS)], strict=True))
        return HostInfo(host=host, ref=str(ref), args=args, version=vid, updated=updated, last_boot=last_boot,
                        last_boot_version=last_boot_version, last_refused=last_refused, refused_why=refused_why,
                        firmware=row[10 + len(SETTINGS)], **settings)

    def host(self, host: str) -> HostInfo:
        host = host_id(host)
        row = self.db.one(f"SELECT {HOST_COLUMNS}, {', '.join(SETTINGS)}, firmware FROM hosts WHERE host=?", (host,))
        if row is None:
            raise HostNotFound(host=host)
        return self._host_info(tuple(row))

    def hosts(self) -> list[HostInfo]:
        return [self._host_info(tuple(r)) for r in
                self.db.all(f"SELECT {HOST_COLUMNS}, {', '.join(SETTINGS)}, firmware FROM hosts ORDER BY host")]

    def record_boot(self, host: str, version: str) -> None:
        """``host`` booted ``version``: the repository sent it the whole initrd its boot script
        names (service/routes/boot.py). One write, no check first: a host whose assignment was
        removed meanwhile simply records nothing."""
        self.db.write("UPDATE hosts SET last_boot=?, last_boot_version=? WHERE host=?",
                      (time.time(), version_id(version), host_id(host)))

    def record_firmware(self, host: str, firmware: str) -> None:
        """``host``'s boot request said which firmware it runs (FIRMWARE): kept as the host's.
        Written only when it changed (a boot request is not worth a write otherwise)."""
        if firmware not in FIRMWARE:
            raise UsageError(f"a host's firmware is {' or '.join(FIRMWARE)}, not {firmware!r}")
        self.db.write("UPDATE hosts SET firmware=? WHERE host=? AND (firmware IS NULL OR firmware <> ?)",
                      (firmware, host_id(host), firmware))

    def record_refused(self, host: str, why: str) -> None:
        """The repository refused ``host``'s boot request (its access rules): when, and why."""
        self.db.write("UPDATE hosts SET last_refused=?, refused_why=? WHERE host=?",
                      (time.time(), str(why)[:MAX_REFUSED_WHY], host_id(host)))

    # -- the every-day boot (boot.disk_verdict) -------------------------------------------------
    def disk_state(self, host: str) -> DiskState | None:
        """What the host's PC last said of its disk (None: nothing, or an unknown host)."""
        row = self.db.one("SELECT disk FROM hosts WHERE host=?", (host_id(host),))
        if row is None or row[0] is None:
            return None
        try:
            return DiskState.from_dict(json.loads(row[0]))
        except ValueError:
            return None

    def record_disk(self, host: str, version: str, fingerprint: str) -> None:
        """The host's PC (its agent) says its disk holds ``version`` whole and its loader boots
        ``fingerprint``; when it was told to boot it and when the disk last came up are kept. One
        transaction: a concurrent ``record_told`` is not lost."""
        version_ref = _disk_claim(version, fingerprint)
        host = host_id(host)
        with self.db.tx() as db:
            old = _disk_in(db, host)
            now = time.time()
            state = DiskState(version_ref, fingerprint, said=now, told=old.told if old else 0.0,
                              seen=old.seen if old else 0.0)
            db.execute("UPDATE hosts SET disk=? WHERE host=?", (json.dumps(state.to_dict()), host))

    def record_seen(self, host: str, version: str, fingerprint: str) -> bool:
        """The disk's own initramfs came up and says it holds ``version`` with ``fingerprint``:
        True, and ``seen`` set, when that is what the PC's agent last said (``record_disk``).
        Nothing else is written: a request anyone may send under ``--anonymous-boot`` never
        changes what the repository knows a disk holds."""
        version = _disk_claim(version, fingerprint)
        host = host_id(host)
        with self.db.tx() as db:
            old = _disk_in(db, host)
            if old is None or (old.version, old.fingerprint) != (version, fingerprint):
                return False
            new = dataclasses.replace(old, seen=time.time())
            db.execute("UPDATE hosts SET disk=? WHERE host=?", (json.dumps(new.to_dict()), host))
            return True

    def record_told(self, host: str) -> None:
        """The repository told the host's iPXE to boot its disk (now)."""
        host = host_id(host)
        with self.db.tx() as db:
            row = db.execute("SELECT disk FROM hosts WHERE host=?", (host,)).fetchone()
            old = DiskState.from_dict(json.loads(row[0])) if row is not None and row[0] else None
            if old is not None:
                db.execute("UPDATE hosts SET disk=? WHERE host=?",
                           (json.dumps(dataclasses.replace(old, told=time.time()).to_dict()), host))

    def reprovision(self, host: str) -> str:
        """The operator asks the host's PC to set its disk up again from scratch at its next boot:
        a new token, which its boot script carries (``blockprov.reprovision=``; the agent
        initializes a disk whose label has another: netboot/inagent.py), and nothing known of its
        disk any more (so the every-day boot is not taken). Returns the token."""
        token = secrets.token_hex(4)
        host = host_id(host)
        with self.db.tx() as db:
            if db.execute("UPDATE hosts SET reprovision=?, disk=NULL WHERE host=?", (token, host)).rowcount == 0:
                raise HostNotFound(host=host)
        return token

    def reprovision_token(self, host: str) -> str | None:
        row = self.db.one("SELECT reprovision FROM hosts WHERE host=?", (host_id(host),))
        return None if row is None else row[0]

    def remove_host(self, host: str) -> None:
        host = host_id(host)
        with self.db.tx() as db:
            if db.execute("DELETE FROM hosts WHERE host=?", (host,)).rowcount == 0:
                raise HostNotFound(host=host)

    # -- profiles -------------------------------------------------------------------------------
    def put_profile(self, image: str, vid: str, order: Sequence[int]) -> None:
        """Record a version's boot order. The first one a version records replaces what it
        inherited, merged with it (its own order first, catalog/inherit.py)."""
        image, vid = image_name(image), version_id(vid)
        m = self.catalog.manifest(image, vid)  # ImageNotFound
        if order and self._own_profile(image, vid) is None:
            inherited = self._inherited_profile(m)
            if inherited:
                order = inherit.merge(order, inherited)
        if len(order) > min(m.count, MAX_PROFILE):
            raise UsageError(f"a profile of {len(order)} chunks for a version of {m.count} chunks")
        seen: set[int] = set()
        for i in order:
            if type(i) is not int or not 0 <= i < m.count:
                raise UsageError(f"chunk index {i!r} is out of range (the version has {m.count} chunks)")
            if i in seen:
                raise UsageError(f"chunk index {i} appears twice in the profile")
            seen.add(i)
        blob = pack_profile(order)
        with self.db.tx() as db:
            if not db.execute("SELECT 1 FROM versions WHERE image=? AND id=?", (image, vid)).fetchone():
                raise ImageNotFound(ref=f"{image}@{vid}")
            db.execute("INSERT INTO profiles VALUES (?,?,?,?,?) ON CONFLICT (image, version) DO UPDATE SET "
                       "count=excluded.count, chunks=excluded.chunks, updated=excluded.updated",
                       (image, vid, len(order), blob, time.time()))

    def get_profile(self, image: str, vid: str, *, inherit: bool = True) -> list[int] | None:
        """The version's recorded boot order, else (unless ``inherit`` is false) the one it
        inherits from its donor, translated (catalog/inherit.py); None when it has neither."""
        image, vid = image_name(image), version_id(vid)
        own = self._own_profile(image, vid)
        if own is not None:
            return own
        if not inherit:
            if not self.catalog.version_exists(image, vid):
                raise ImageNotFound(ref=f"{image}@{vid}")
            return None
        return self._inherited_profile(self.catalog.manifest(image, vid)) or None  # ImageNotFound

    def _own_profile(self, image: str, vid: str) -> list[int] | None:
        row = self.db.one("SELECT count, chunks FROM profiles WHERE image=? AND version=?", (image, vid))
        return None if row is None else unpack_profile(bytes(row[1]), int(row[0]))

    def _inherited_profile(self, child: Manifest) -> list[int]:
        """Walk donors (most direct first, then their donors) to the first with a profile of its
        own that the child shares enough of; translate it. Empty when there is none."""
        queue = [(ref, 1) for ref in inherit.donors(child)]
        visited: set[tuple[str, str]] = set()
        while queue:
            (image, vid), depth = queue.pop(0)
            if (image, vid) in visited or depth > inherit.MAX_DEPTH:
                continue
            visited.add((image, vid))
            try:
                donor = self.catalog.manifest(image, vid)
            except ImageNotFound:  # a donor removed since: look further back no more through it
                continue
            order = self._own_profile(image, vid)
            if order:
                translated = inherit.translate(order, donor, child)
                if translated:
                    return translated
            queue += [(ref, depth + 1) for ref in inherit.donors(donor)]
        return []

    # -- agents ---------------------------------------------------------------------------------
    def register_agent(self, instance: str, info: dict[str, Any]) -> bool:
        """Insert or refresh an agent; True when it was new."""
        instance = instance_id(instance)
        text = _json_object(info, "agent info", MAX_INFO)
        now = time.time()
        with self.db.tx() as db:
            cur = db.execute("UPDATE agents SET info=?, last_seen=? WHERE instance=?", (text, now, instance))
            if cur.rowcount:
                return False
            db.execute("INSERT INTO agents VALUES (?,?,?,?)", (instance, text, now, now))
            return True

    def agents(self) -> list[dict[str, Any]]:
        """Registered agents with ``online`` (seen within ONLINE_SECONDS) and their queues. One not
        seen for FORGET_AGENT is forgotten here (its open requests fail, saying why): a stopped
        agent keeps its last report, shown offline, but not for ever."""
        now = time.time()
        stale = [r[0] for r in self.db.all("SELECT instance FROM agents WHERE last_seen < ?", (now - FORGET_AGENT,))]
        for inst in stale:
            with contextlib.suppress(AgentNotFound):
                self.unregister_agent(inst, why=f"agent instance {inst} was not seen for {FORGET_AGENT / 86400:g} days "
                                                 "and was forgotten")
        counts: dict[tuple[str, str], int] = {}
        for inst, state, n in self.db.all("SELECT instance, state, COUNT(*) FROM agent_requests "
                                          "WHERE state IN ('pending','running') GROUP BY instance, state"):
            counts[(inst, state)] = n
        out = []
        for inst, info, registered, last_seen in self.db.all("SELECT * FROM agents ORDER BY instance"):
            out.append({"instance": inst, "info": json.loads(info), "registered": registered, "last_seen": last_seen,
                        "seen_ago": round(max(0.0, now - last_seen), 3), "online": now - last_seen < ONLINE_SECONDS,
                        "pending": counts.get((inst, "pending"), 0), "running": counts.get((inst, "running"), 0)})
        return out

    def unregister_agent(self, instance: str, why: str | None = None) -> None:
        instance = instance_id(instance)
        now = time.time()
        why = why or f"agent instance {instance} unregistered before completing the request"
        with self.db.tx() as db:
            if db.execute("DELETE FROM agents WHERE instance=?", (instance,)).rowcount == 0:
                raise AgentNotFound(instance=instance)
            db.execute("UPDATE agent_requests SET state='failed', finished=?, lease_until=NULL, error=? "
                       "WHERE instance=? AND state IN ('pending','running')", (now, why, instance))

    def post_request(self, instance: str, op: str, args: dict[str, Any] | None) -> str:
        instance, op = instance_id(instance), op_name(op)
        text = _json_object({} if args is None else args, "request args", MAX_INFO)
        rid = secrets.token_hex(8)
        now = time.time()
        with self.db.tx() as db:
            if not db.execute("SELECT 1 FROM agents WHERE instance=?", (instance,)).fetchone():
                raise AgentNotFound(instance=instance)
            (pending,) = db.execute("SELECT COUNT(*) FROM agent_requests WHERE instance=? AND state='pending'",
                                    (instance,)).fetchone()
            if pending >= MAX_PENDING:
                raise Conflict(f"agent instance {instance} already has {pending} pending requests; is it polling?")
            db.execute("DELETE FROM agent_requests WHERE state IN ('done','failed') AND finished < ?",
                       (now - KEEP_FINISHED,))
            db.execute("INSERT INTO agent_requests (id, instance, op, args, state, created) VALUES (?,?,?,?,?,?)",
                       (rid, instance, op, text, "pending", now))
        return rid

    def try_next_request(self, instance: str) -> dict[str, Any] | None:
        """Hand out the oldest pending request (or one whose lease ran out) without waiting.

        A poll is a sign of life, so it also refreshes the agent's ``last_seen`` (at most every
        ``SEEN_EVERY`` s: a waiting long poll checks that often, and a write is an fsync)."""
        instance = instance_id(instance)
        now = time.time()
        seen = self.db.one("SELECT last_seen FROM agents WHERE instance=?", (instance,))
        if seen is None:
            raise AgentNotFound(instance=instance)
        ready = self.db.one("SELECT 1 FROM agent_requests WHERE instance=? AND "
                            "(state='pending' OR (state='running' AND lease_until < ?)) LIMIT 1", (instance, now))
        if ready is None:  # the common case: read-only
            if now - seen[0] >= SEEN_EVERY:  # a heartbeat checks nothing first: no writers' lock
                self.db.write("UPDATE agents SET last_seen=? WHERE instance=?", (now, instance))
            return None
        with self.db.tx() as db:
            if db.execute("UPDATE agents SET last_seen=? WHERE instance=?", (now, instance)).rowcount == 0:
                raise AgentNotFound(instance=instance)
            row = db.execute(
                "SELECT id FROM agent_requests WHERE instance=? AND "
                "(state='pending' OR (state='running' AND lease_until < ?)) ORDER BY created LIMIT 1",
                (instance, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE agent_requests SET state='running', started=?, lease_until=?, attempts=attempts+1 "
                       "WHERE id=?", (now, now + self.lease, row[0]))
        return self.get_request(instance, row[0])

    def ready_instances(self) -> set[str]:
        """Instances with a request to hand out now (one query for all of a server's long polls)."""
        rows = self.db.all("SELECT DISTINCT instance FROM agent_requests WHERE "
                           "state='pending' OR (state='running' AND lease_until < ?)", (time.time(),))
        return {r[0] for r in rows}

    def complete_request(self, instance: str, rid: str, ok: bool, result: dict[str, Any] | None,
                         error: str | None) -> dict[str, Any]:
        instance, rid = instance_id(instance), request_id(rid)
        res = None if result is None else _json_object(result, "request result", MAX_RESULT)
        if error is not None and (not isinstance(error, str) or "\x00" in error or jsonvalue.text_problem(error)):
            raise UsageError("a request's error must be text without NUL characters")
        err = None if error is None else error[:MAX_ERROR]
        if not ok and not err:
            err = "the agent reported a failure without a message"
        with self.db.tx() as db:
            row = db.execute("SELECT state FROM agent_requests WHERE id=? AND instance=?", (rid, instance)).fetchone()
            if row is None:
                raise RequestNotFound(instance=instance, rid=rid)
            if row[0] in ("done", "failed"):
                raise Conflict(f"request {rid} of agent instance {instance} is already {row[0]}")
            db.execute("UPDATE agent_requests SET state=?, finished=?, lease_until=NULL, result=?, error=? WHERE id=?",
                       ("done" if ok else "failed", time.time(), res, None if ok else err, rid))
        return self.get_request(instance, rid)

    def recent_requests(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest requests to any agent, newest first (the console follows them to completion)."""
        rows = self.db.all(f"SELECT id, instance FROM agent_requests ORDER BY created DESC LIMIT {int(limit)}")
        out = []
        for rid, inst in rows:
            try:
                out.append(self.get_request(inst, rid))
            except RequestNotFound:  # pruned meanwhile
                continue
        return out

    def last_failures(self) -> dict[str, tuple[str, float]]:
        """Per agent instance, the error of its most recent failed request and when it failed."""
        rows = self.db.all("SELECT instance, error, finished FROM agent_requests WHERE state='failed' "
                           "ORDER BY finished")
        return {inst: (str(err or ""), float(fin or 0.0)) for inst, err, fin in rows}

    def get_request(self, instance: str, rid: str) -> dict[str, Any]:
        """A request as the API shows it; a ``running`` one whose lease ran out reads ``pending``."""
        instance, rid = instance_id(instance), request_id(rid)
        row = self.db.one(
            "SELECT id, instance, op, args, state, created, started, finished, lease_until, attempts, result, error "
            "FROM agent_requests WHERE id=? AND instance=?", (rid, instance))
        if row is None:
            raise RequestNotFound(instance=instance, rid=rid)
        rid, inst, op, args, state, created, started, finished, lease_until, attempts, result, error = row
        if state == "running" and lease_until is not None and lease_until < time.time():
            state = "pending"
        return {"id": rid, "instance": inst, "op": op, "args": json.loads(args), "state": state, "created": created,
                "started": started, "finished": finished, "lease_until": lease_until, "attempts": attempts,
                "result": None if result is None else json.loads(result), "error": error}


def _disk_claim(version: str, fingerprint: str) -> str:
    """``version`` as the catalog keeps it (``NAME@ID``, checked), once ``fingerprint`` is 32 hex digits."""
    if len(fingerprint) != 32 or not all(c in "0123456789abcdef" for c in fingerprint):
        raise UsageError(f"a disk's fingerprint is 32 hex digits, not {fingerprint[:40]!r}")
    return f"{image_name(version.split('@')[0])}@{version_id(version.split('@', 1)[-1])}"


def _disk_in(db: Tx, host: str) -> DiskState | None:
    """What the catalog knows of ``host``'s disk, read inside the caller's transaction (None:
    nothing yet). HostNotFound for an unknown host."""
    row = db.execute("SELECT disk FROM hosts WHERE host=?", (host,)).fetchone()
    if row is None:
        raise HostNotFound(host=host)
    return DiskState.from_dict(json.loads(row[0])) if row[0] else None
