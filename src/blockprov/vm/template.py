"""The template manifest: what a VM template is made of, and the checks a clone makes against it.

A template (``vm template NAME --from VM``) is a directory ``ROOT/templates/NAME/`` holding:

    memory          the template VM's RAM at the instant it was paused (the file its memory
                    backend was, ``share=on``); read-only from then on
    state           its device state (a migration stream with ``x-ignore-shared``: RAM not in it)
    vmlinuz, initrd the boot files of a direct kernel boot (the clones' command line names them)
    template.json   this manifest: the machine (qemu version, machine type, memory, CPUs, the
                    user's qemu arguments, the kernel command line), the disk version committed
                    from the VM's overlay, and the size and BLAKE3 of ``memory`` and ``state``

Why a checksum of the whole memory file: a clone resumes the guest from it; a truncated or altered
file resumes a corrupt kernel, which fails later and far from the cause. BLAKE3 reads a 512 MiB file
in a fraction of a second, once per ``vm clone`` command however many clones it starts.

Crash rules: template.json is written last, with ``durable.atomic_write``, after ``memory`` and
``state`` were fsynced and made read-only (``memory`` to all but its owner: see MEMORY_MODE); a
directory without it is an unfinished template, never cloned (``vm template`` of the same name
clears it). A template never changes once written.

The checks are pure (the manifest and a requested machine in, a refusal with its reason out), so
they are unit-tested without qemu.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from blockprov.errors import CannotWrite, NotEnoughMemory, TemplateDamaged, TemplateMismatch
from blockprov.humanize import size as hsize
from blockprov.vm.qemu import Machine

FORMAT = 1
MANIFEST = "template.json"
MEMORY = "memory"
STATE = "state"
CLONE_OVERHEAD = 64 << 20  # qemu's own memory per clone, beyond the guest RAM it writes


@dataclass(frozen=True)
class FileSum:
    size: int
    blake3: str


@dataclass(frozen=True)
class Template:
    name: str
    machine: Machine
    image: str  # the disk: a version committed from the template VM's overlay
    version: str
    memory_file: FileSum
    state_file: FileSum
    from_vm: str
    created: float
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["machine"]["extra_args"] = list(self.machine.extra_args)
        return json.dumps(d, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, name: str, data: bytes) -> Template:
        try:
            d = json.loads(data)
            if d.get("format") != FORMAT:
                raise TemplateDamaged(name=name, why=f"unknown template format {d.get('format')!r}")
            m = d["machine"]
            machine = Machine(qemu_version=str(m["qemu_version"]), machine=str(m["machine"]), memory=int(m["memory"]),
                              cpus=int(m["cpus"]), extra_args=tuple(str(a) for a in m["extra_args"]),
                              kernel=bool(m["kernel"]), append=str(m["append"]))
            return cls(name=str(d["name"]), machine=machine, image=str(d["image"]), version=str(d["version"]),
                       memory_file=FileSum(**d["memory_file"]), state_file=FileSum(**d["state_file"]),
                       from_vm=str(d["from_vm"]), created=float(d["created"]), extra=dict(d.get("extra", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TemplateDamaged(name=name, why=f"{MANIFEST} is unreadable: {e}") from None


LAZY_MOUNT = "mnt"  # a lazy template's memory: the repository's version shown as a file (vm/lazy.py)


def memory_path(t: Template, d: Path) -> Path:
    """Where a template's RAM is: its own file, or, for a lazy template, the FUSE file whose pages
    are fetched from the repository on first touch."""
    return d / LAZY_MOUNT / MEMORY if t.extra.get("lazy") else d / MEMORY


def file_sum(path: Path) -> FileSum:
    """Size and BLAKE3 of a file (multithreaded, memory-mapped: cheap next to resuming a VM)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update_mmap(str(path))
    return FileSum(size=path.stat().st_size, blake3=h.hexdigest())


def load(d: Path) -> Template:
    try:
        data = (d / MANIFEST).read_bytes()
    except FileNotFoundError:
        from blockprov.errors import NotFound

        raise NotFound(msg=f"no template {d.name} (no {d / MANIFEST})") from None
    return Template.from_json(d.name, data)


def verify_files(t: Template, d: Path) -> None:
    """The memory and state files are those the template recorded; else TemplateDamaged (no clone
    may start from them). A lazy template's memory is not read here (that would fetch all of it):
    each of its chunks is verified by its id when it is fetched."""
    files = [(STATE, t.state_file)] if t.extra.get("lazy") else [(MEMORY, t.memory_file), (STATE, t.state_file)]
    for fname, want in files:
        p = d / fname
        if not p.is_file():
            raise TemplateDamaged(name=t.name, why=f"its {fname} file {p} is missing")
        if p.stat().st_size != want.size:
            raise TemplateDamaged(name=t.name, why=f"its {fname} file is {p.stat().st_size} bytes, "
                                                   f"{want.size} were recorded")
        got = file_sum(p)
        if got.blake3 != want.blake3:
            raise TemplateDamaged(name=t.name, why=f"its {fname} file's BLAKE3 is {got.blake3[:16]}…, "
                                                   f"{want.blake3[:16]}… was recorded")


def check_machine(t: Template, *, qemu_version: str, machine_types: dict[str, str], memory: int | None = None,
                  cpus: int | None = None, extra_args: tuple[str, ...] | None = None) -> None:
    """Refuse (TemplateMismatch, with the reason) a clone whose machine is not the template's: the
    options asked for (None: not asked) and what this host's qemu offers."""
    m = t.machine
    if qemu_version != m.qemu_version:
        raise TemplateMismatch(name=t.name, why=f"it was made by qemu {m.qemu_version}, this host has {qemu_version}")
    if machine_types.get(m.machine) != m.machine:
        raise TemplateMismatch(name=t.name, why=f"this host's qemu has no machine type {m.machine}")
    if memory is not None and memory != m.memory:
        raise TemplateMismatch(name=t.name, why=f"its memory is {hsize(m.memory)}, not {hsize(memory)}")
    if cpus is not None and cpus != m.cpus:
        raise TemplateMismatch(name=t.name, why=f"it has {m.cpus} CPU(s), not {cpus}")
    if extra_args is not None and tuple(extra_args) != m.extra_args:
        raise TemplateMismatch(name=t.name, why=f"its qemu arguments are {list(m.extra_args)}, "
                                               f"not {list(extra_args)}")


def check_host_memory(t: Template, count: int, available: int) -> None:
    """Refuse ``count`` clones when the host could not hold them should every clone write all its RAM:
    a clone that runs out of memory later is killed far from the cause."""
    needed = count * (t.machine.memory + CLONE_OVERHEAD)
    if needed > available:
        raise NotEnoughMemory(what=f"{count} clone(s) of {t.name}", needed=hsize(needed), available=hsize(available))


def seal(path: Path, mode: int = 0o444) -> FileSum:
    """fsync a template file, make it read-only (``mode``), and return its sum."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    path.chmod(mode)
    return file_sum(path)


# The memory file keeps its owner's write bit: qemu 7.2 opens a memory-backend-file's mem-path
# O_RDWR even with share=off (a private mapping it never writes through; qemu 8.2's ``rom=on`` ends
# that), so a 0444 file cannot be mapped by an unprivileged owner (root ignores the mode, which is
# why it once seemed to need root). No hugepages, /dev/shm or special location is involved: the file
# is an ordinary one in the template directory. What keeps it unchanged is that nothing of
# blockprov opens it for writing and that every ``vm clone`` checks its BLAKE3 first.
MEMORY_MODE = 0o644


def memory_refusal(path: Path, st_mode: int, st_uid: int, st_gid: int, uid: int, gids: set[int]) -> str | None:
    """Why the user ``uid`` (groups ``gids``) cannot start clones on the memory file ``path`` (None:
    it can). Pure: the caller passes the file's stat and the process's ids (root may do anything)."""
    if uid == 0:
        return None
    if st_uid == uid:
        bits = (st_mode >> 6) & 0o7
    elif st_gid in gids:
        bits = (st_mode >> 3) & 0o7
    else:
        bits = st_mode & 0o7
    if bits & 0o6 == 0o6:
        return None
    return (f"qemu opens a template's memory file read and write even to map it privately (qemu 7.2), and "
            f"uid {uid} may not (mode {st_mode & 0o777:o}, owner uid {st_uid}): clone as its owner or root, "
            f"or give the file mode {MEMORY_MODE:o}")


def check_memory_access(path: Path) -> None:
    """Refuse (CannotWrite) before any clone starts when qemu could not open the memory file."""
    st = path.stat()
    why = memory_refusal(path, st.st_mode, st.st_uid, st.st_gid, os.geteuid(), {os.getegid(), *os.getgroups()})
    if why is not None:
        raise CannotWrite(path=str(path), why=why)
