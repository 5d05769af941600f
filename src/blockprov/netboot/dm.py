"""device-mapper for the native data path: tables, ``dmsetup``, and the kernel's write record.

Tables are built and parsed here (pure); ``dmsetup`` (Debian's, shipped in the initramfs with
its libraries) creates, reloads and removes devices; ``era_invalidate`` (thin-provisioning-tools)
reads dm-era's record. There is no udev in the initramfs, so every created device gets its
node with ``dmsetup mknodes``. Sizes are in 512-byte sectors, as dm tables count them.

Tables name devices by number (``MAJOR:MINOR``), never by path: the kernel resolves a path in
the caller's file system, and after the switch to the real root the agent's root (the
initramfs) has no /dev of its own — it uses a devtmpfs mounted elsewhere (``dev_dir``, passed to
dmsetup as ``DM_DEV_DIR``), whose paths mean nothing in a table.

The targets used (netboot/native.py says why each):

* ``linear``: a range of a partition;
* ``snapshot ORIGIN COW P CHUNK``: reads of chunks not yet written come from ORIGIN, the first
  write of a chunk copies it into COW (a whole-chunk write skips the copy) and later ones go
  there, the exception table is committed in COW before the write completes (persistent: it
  survives a power cut); ``N`` keeps the table in memory;
* ``snapshot-origin ORIGIN``: ORIGIN's writes first save the old content into every snapshot of it;
* ``era META ORIGIN BLOCK``: remaps to ORIGIN and records, per block of BLOCK sectors, the era it
  was last written in; the first write of a block in an era commits the record (META) before the
  write goes down. The current era's record becomes readable by the tools only once the target
  has archived it: ``take_metadata_snap`` (a rollover and a commit) while it runs.

Moving a live era device onto another origin (``era_onto``) loads a second era target over the
same metadata device while the first is suspended. That keeps the record whole (Linux 6.1's
dm-era-target.c): the old target's postsuspend archives the current era and commits with its
worker stopped, leaving no dirty metadata block; the new target's constructor only reads the
committed superblock; its preresume (a resize to the same size, then a new era) commits before
the resume destroys the old target, whose destructor writes nothing. It is what every boot does
when it makes era afresh over the record the last boot left. While suspended, era answers no
``status`` or ``message`` (they wait for its stopped worker): none is sent in between.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from blockprov.errors import DeviceMapperError

SECTOR = 512
DMSETUP = "dmsetup"
ERA_INVALIDATE = "era_invalidate"
TIMEOUT = 60


# -- tables (pure) ---------------------------------------------------------------------------------
def linear(start: int, length: int, dev: str, offset: int) -> str:
    return f"{start} {length} linear {dev} {offset}"


def concat(pieces: Sequence[tuple[str, int, int]]) -> str:
    """A table joining ``(device, offset, length)`` pieces end to end (linear targets). Pure."""
    lines, at = [], 0
    for dev, off, n in pieces:
        if n > 0:
            lines.append(linear(at, n, dev, off))
            at += n
    return "\n".join(lines)


def snapshot(length: int, origin: str, cow: str, chunk: int, *, persistent: bool = True) -> str:
    return f"0 {length} snapshot {origin} {cow} {'P' if persistent else 'N'} {chunk}"


def snapshot_origin(length: int, origin: str) -> str:
    return f"0 {length} snapshot-origin {origin}"


def snapshot_merge(length: int, origin: str, cow: str, chunk: int) -> str:
    return f"0 {length} snapshot-merge {origin} {cow} P {chunk}"


def era(length: int, meta: str, origin: str, block: int) -> str:
    return f"0 {length} era {meta} {origin} {block}"


@dataclass(frozen=True)
class EraTable:
    length: int
    meta: str
    origin: str
    block: int


def parse_era_table(line: str) -> EraTable:
    """``0 LEN era META ORIGIN BLOCK`` (as ``dmsetup table`` prints it). Pure."""
    words = line.split()
    if len(words) != 6 or words[0] != "0" or words[2] != "era":
        raise DeviceMapperError(msg=f"not an era target's table: {line!r}")
    return EraTable(int(words[1]), words[3], words[4], int(words[5]))


@dataclass(frozen=True)
class Step:
    """One ``dmsetup`` step: ``create`` (NAME with TABLE), ``suspend``, ``reload`` (TABLE as
    NAME's next), ``resume`` or ``remove``. A table may name a device made by an earlier step
    of the same sequence as ``ref(NAME)``: ``Mapper.apply`` puts its number there."""

    op: str
    name: str
    table: str = ""


def ref(name: str) -> str:
    return f"<{name}>"


def resolve(table: str, devnos: Mapping[str, str]) -> str:
    """``table`` with each ``ref(NAME)`` replaced by NAME's ``MAJOR:MINOR``. Pure."""
    return re.sub(r"<([\w.-]+)>", lambda m: devnos[m.group(1)], table)


def era_onto(root: str, line: str, origin: str, make: Sequence[tuple[str, str]] = ()) -> list[Step]:
    """The steps that move live era device ``root`` (its table ``line``) onto ``origin`` (a
    device number, or the ``ref`` of a device in ``make``): with ``root`` suspended (its file
    system frozen, nothing in flight, its record committed), the ``make`` devices are created
    in order, era's table is loaded with the same metadata device, length and block over the
    new origin, and ``root`` resumes in a new era (the module docstring says why the record
    stays whole). Pure."""
    t = parse_era_table(line)
    return [Step("suspend", root), *(Step("create", n, tb) for n, tb in make),
            Step("reload", root, era(t.length, t.meta, origin, t.block)), Step("resume", root)]


def table_length(table: str) -> int:
    """Sectors a table covers (its last line's start + length). Pure."""
    start, n = table.strip().splitlines()[-1].split()[:2]
    return int(start) + int(n)


# -- status lines (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SnapshotStatus:
    """A snapshot's (or snapshot-merge's) status: ``valid`` False once it overflowed (its COW was
    full: the kernel drops it) or failed; ``used`` and ``size`` are the COW's sectors, ``meta``
    those of its exception table (all that is left of a finished merge)."""

    valid: bool
    used: int = 0
    size: int = 0
    meta: int = 0
    why: str = ""

    @property
    def merged(self) -> bool:
        """A snapshot-merge has copied every chunk back to its origin."""
        return self.valid and self.used == self.meta


def parse_snapshot_status(line: str) -> SnapshotStatus:
    """``0 LEN snapshot USED/SIZE META`` or ``… snapshot Invalid`` (also ``Overflow``, ``Merge
    failed``). Pure."""
    words = line.split()
    if len(words) < 4 or words[2] not in ("snapshot", "snapshot-merge"):
        raise DeviceMapperError(msg=f"not a snapshot's status: {line!r}")
    m = re.fullmatch(r"(\d+)/(\d+)", words[3])
    if m is None:
        return SnapshotStatus(valid=False, why=" ".join(words[3:]))
    meta = int(words[4]) if len(words) > 4 and words[4].isdigit() else 0
    return SnapshotStatus(valid=True, used=int(m.group(1)), size=int(m.group(2)), meta=meta)


@dataclass(frozen=True)
class EraStatus:
    era: int  # the current era
    held: int | None  # the root of the metadata snapshot taken for the tools, if any


def parse_era_status(line: str) -> EraStatus:
    """``0 LEN era MDBLOCK USED/TOTAL ERA HELD|-`` (Linux 6.1's format). Pure."""
    words = line.split()
    if len(words) < 7 or words[2] != "era":
        raise DeviceMapperError(msg=f"not an era target's status: {line!r}")
    return EraStatus(era=int(words[5]), held=None if words[6] == "-" else int(words[6]))


def parse_era_blocks(xml: str) -> list[tuple[int, int]]:
    """The blocks ``era_invalidate`` lists (``<block block="N"/>`` and ``<range begin="A" end =
    "B"/>``, end exclusive) as sorted half-open runs. Pure."""
    runs = [(int(b), int(b) + 1) for b in re.findall(r'<block\s+block\s*=\s*"(\d+)"', xml)]
    runs += [(int(a), int(b)) for a, b in re.findall(r'<range\s+begin\s*=\s*"(\d+)"\s+end\s*=\s*"(\d+)"', xml)]
    if not runs and "<blocks>" not in xml:
        raise DeviceMapperError(msg=f"era_invalidate said nothing readable: {xml[:200]!r}")
    return sorted(runs)


def chunks_of_blocks(runs: Iterable[tuple[int, int]], per_block: int, count: int) -> list[int]:
    """The chunks (``per_block`` of them in an era block) that runs of era blocks cover, below
    ``count``. Pure."""
    out: set[int] = set()
    for a, b in runs:
        out.update(range(a * per_block, min(b * per_block, count)))
    return sorted(out)


# -- dmsetup ---------------------------------------------------------------------------------------
class Mapper:
    """``dmsetup`` with its device nodes in ``dev_dir`` (see the module docstring)."""

    def __init__(self, dev_dir: str = "/dev") -> None:
        self.dev_dir = dev_dir
        self._env = {**os.environ, "DM_DEV_DIR": dev_dir}

    def run(self, *args: str, stdin: str | None = None) -> str:
        return _run([DMSETUP, *args], stdin=stdin, env=self._env)

    def create(self, name: str, table: str) -> str:
        """A new device ``name`` with ``table``; returns its node."""
        self.run("create", name, stdin=table + "\n")
        self.run("mknodes", name)
        return self.node(name)

    def reload(self, name: str, table: str) -> None:
        """Load ``table`` as ``name``'s next one (active at the next ``resume``)."""
        self.run("reload", name, stdin=table + "\n")

    def suspend(self, name: str) -> None:
        """Hold ``name``'s new I/O and wait for what is in flight; a file system on it is frozen first."""
        self.run("suspend", name)

    def resume(self, name: str) -> None:
        self.run("resume", name)

    def remove(self, name: str) -> None:
        self.run("remove", name)

    def message(self, name: str, text: str) -> None:
        self.run("message", name, "0", text)

    def status(self, name: str) -> str:
        return self.run("status", name).strip()

    def table(self, name: str) -> str:
        return self.run("table", name).strip()

    def apply(self, steps: Sequence[Step]) -> None:
        """Run ``steps`` in order. If one fails: a table loaded but not yet live is cleared, every
        device these steps suspended is resumed (no file system stays frozen), the devices they
        created are removed (those still in use stay), and the error is raised."""
        made: dict[str, str] = {}
        suspended: list[str] = []
        loaded: set[str] = set()
        try:
            for s in steps:
                table = resolve(s.table, made)
                if s.op == "create":
                    self.create(s.name, table)
                    made[s.name] = self.devno(s.name)
                elif s.op == "suspend":
                    self.suspend(s.name)
                    suspended.append(s.name)
                elif s.op == "reload":
                    self.reload(s.name, table)
                    loaded.add(s.name)
                elif s.op == "resume":
                    self.resume(s.name)
                    loaded.discard(s.name)
                    suspended.remove(s.name)
                elif s.op == "remove":
                    self.remove(s.name)
                else:
                    raise DeviceMapperError(msg=f"no such step: {s.op!r}")
        except DeviceMapperError:
            for name in reversed(suspended):
                with contextlib.suppress(DeviceMapperError):
                    if name in loaded:
                        self.run("clear", name)
                    self.resume(name)
            for name in reversed(made):
                with contextlib.suppress(DeviceMapperError):
                    self.remove(name)
            raise

    def exists(self, name: str) -> bool:
        try:
            self.run("info", name)
        except DeviceMapperError:
            return False
        return True

    def devno(self, name: str) -> str:
        """``MAJOR:MINOR`` of device ``name`` (what a table names it by)."""
        return self.run("info", "-c", "--noheadings", "-o", "major,minor", "--separator", ":", name).strip()

    def node(self, name: str) -> str:
        return f"{self.dev_dir}/mapper/{name}"


def _run(cmd: Sequence[str], stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    try:
        p = subprocess.run(list(cmd), input=stdin.encode() if stdin is not None else None, capture_output=True,
                           timeout=TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeviceMapperError(msg=f"{cmd[0]}: {e}") from None
    if p.returncode:
        err = [ln for ln in p.stderr.decode(errors="replace").strip().splitlines() if ln != "Command failed."]
        raise DeviceMapperError(msg=f"{' '.join(cmd[:3])}: {err[-1] if err else f'exit status {p.returncode}'}")
    return p.stdout.decode(errors="replace")


def era_written_since(meta: str, since: int, *, snapshot: bool) -> list[tuple[int, int]]:
    """Runs of era blocks written in era ``since`` or later, from the record on ``meta``;
    ``snapshot``: read the metadata snapshot of a running era target (take it first)."""
    cmd = [ERA_INVALIDATE, "--written-since", str(since), *(["--metadata-snapshot"] if snapshot else []), meta]
    return parse_era_blocks(_run(cmd))
