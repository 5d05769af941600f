"""Build the blockprov initramfs (``blockprov boot-files build``): the boot program of a PC.

What goes in, and why each piece:

* ``busybox`` (busybox-static: it needs no libc): the shell of ``/init``, ``insmod`` (no
  modprobe needed: the build resolves ``modules.dep`` and writes the load order), ``udhcpc``,
  ``ip``, ``mount`` (``--move`` for the switch to the real root), ``reboot``;
* the kernel modules the agent needs — NICs, disks, ``nbd`` (Debian builds it as a module) and
  ``ext4`` with their dependencies, flat under ``/usr/lib/blockprov-modules``;
* Debian's ``/usr/bin/python3`` (its libpython is linked in) and **only the modules the agent
  imports**: the build runs a probe under that very interpreter which imports the in-machine code
  (netboot/machine.py, netboot/inagent.py) and exercises what is imported lazily (an HTTP client,
  an event loop), then lists ``sys.modules``. Those modules go in as ``.pyc`` only (compiled by
  the probe, so the bytecode matches the interpreter; a TCG guest would spend seconds compiling
  sources), stdlib ones at their usual place, blockprov and its dependencies (blake3, zstandard,
  httpx, …) from the build's ``sys.path`` under ``/usr/lib/blockprov``. Extension modules and
  the executables get the shared libraries ``ldd`` lists, at the paths it lists; extension modules
  from wheels are stripped (binutils' ``strip``, when installed);
* ``mke2fs`` (e2fsprogs, with its libraries and ``/etc/mke2fs.conf``): the disk's metadata file
  system is a journaled ext4 (netboot/disk.py says why);
* the disk's own boot loader (netboot/loader.py, which lays out its FAT volume itself: fat.py):
  ``syslinux`` and ``mtools`` (as ``mcopy`` and ``mattrib``, which ``syslinux --install`` runs;
  with glibc's iconv module for codepage 850, which mtools needs for short names) and syslinux's
  ``mbr.bin`` and ``gptmbr.bin`` (syslinux-common: a disk over 2 TiB is a GPT), so a machine can
  write the loader that boots it offline (the UEFI loader's files come from the repository);
* the native data path (netboot/native.py): the device-mapper modules (``dm_mod``,
  ``dm_snapshot``, ``dm_era``) and ``loop``, ``dmsetup`` and thin-provisioning-tools' ``pdata_tools``
  as ``era_invalidate`` (with the libraries ``ldd`` lists: libdevmapper, libstdc++, libaio, …);
* ``/init`` (netboot/everyday.py): busybox sh that mounts /proc, /sys, /dev and execs python3 on
  netboot/machine.py, which does the rest — or, booted by the disk's own loader with only the
  first part, tries the every-day boot.

The archive is two gzip members: the **fast part** (busybox, the kernel modules, dmsetup with its
libraries, ``/init`` and the DHCP hook: a few MiB) and the **rest** (everything else). The kernel
unpacks both from a network boot's one file; the disk's own loader (netboot/loader.py) keeps them
apart and boots the fast part alone every day (netboot/everyday.py).

The archive is a newc cpio (written here, with fixed owners and times, so the build needs no root
and is reproducible for the same inputs), gzip'd: the Debian kernel unpacks gzip natively.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from blockprov.boot import INITRAMFS_MARK
from blockprov.errors import NetbootError, SourceError, UsageError
from blockprov.netboot import everyday

PYTHON = Path("/usr/bin/python3")
BUSYBOX = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
MKE2FS = Path("/usr/sbin/mke2fs")
MKE2FS_CONF = Path("/etc/mke2fs.conf")
Tool = tuple[tuple[str, ...], str, str]  # (where the tool may be, where it goes, its Debian package)
# the disk's boot loader
LOADER_TOOLS: tuple[Tool, ...] = (
    (("/usr/bin/syslinux",), "usr/bin/syslinux", "syslinux"),
    (("/usr/bin/mtools",), "usr/bin/mtools", "mtools"),
    (("/usr/lib/syslinux/mbr/mbr.bin",), "usr/lib/syslinux/mbr/mbr.bin", "syslinux-common"),
    (("/usr/lib/syslinux/mbr/gptmbr.bin",), "usr/lib/syslinux/mbr/gptmbr.bin", "syslinux-common"))
MTOOLS_LINKS = ("mcopy", "mattrib")
# mtools converts short names through iconv's codepage 850: glibc's converter and its module lists
GCONV = Path("/usr/lib/x86_64-linux-gnu/gconv")
GCONV_FILES = ("IBM850.so", "gconv-modules", "gconv-modules.cache")
# (the native data path, netboot/native.py: the tool, where it goes, its Debian package); pdata_tools
# is thin-provisioning-tools' one binary, which runs as the tool its name says (NATIVE_LINKS)
NATIVE_TOOLS: tuple[Tool, ...] = (
    (("/usr/sbin/dmsetup", "/sbin/dmsetup"), "usr/sbin/dmsetup", "dmsetup"),
    (("/usr/sbin/pdata_tools",), "usr/sbin/pdata_tools", "thin-provisioning-tools"))
NATIVE_LINKS = ("era_invalidate",)
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "sd_mod", "ahci", "nvme", "e1000", "e1000e",
           "nbd", "crc32c_generic", "ext4",
           "dm_mod", "dm_snapshot", "dm_era", "loop",
           "vfat", "nls_cp437", "nls_ascii", "nls_utf8")  # plus their dependencies; missing ones are skipped (built in)
NEEDED_MODULES = ("nbd", "ext4", "dm_mod", "dm_snapshot", "dm_era")  # the build fails without these
LIB_DIR = "usr/lib/blockprov"  # blockprov and its dependencies
MOD_DIR = "usr/lib/blockprov-modules"
FIXED_TIME = 1_700_000_000
DEFAULT_CMDLINE = "console=tty0 console=ttyS0"
EXTRA_STDLIB = ("encodings",)  # whole packages shipped besides the probe's modules (codecs are looked up by name)

UDHCPC = """#!/usr/bin/busybox sh
# udhcpc's hook: configure the address, the default route and DNS it got.
case "$1" in
deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    if [ -n "$router" ]; then
        while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
        for r in $router; do route add default gw "$r" dev "$interface"; break; done
    fi
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
esac
exit 0
"""

# Run under the target interpreter: import what the machine runs, trigger lazy imports, list
# sys.modules and compile each source module to a .pyc in OUT. Prints JSON.
PROBE = r"""
import importlib.util, json, os, py_compile, sys
out = sys.argv[1]
import runpy, asyncio, concurrent.futures.thread, encodings.idna, encodings.ascii, encodings.latin_1
import importlib.readers, importlib.resources.readers, importlib.metadata, traceback, linecache
import blockprov.netboot.machine, blockprov.netboot.inagent, blockprov.netboot.supervisor
from blockprov.repo.remote import RemoteRepository
RemoteRepository("http://127.0.0.1:9").close()
asyncio.new_event_loop().close()
try:
    import uvloop  # the agent's event loop when installed (blockprov.agent.run_async)
    uvloop.new_event_loop().close()
except ImportError:
    pass
for pkg in sys.argv[2:]:
    __import__(pkg)
    for root in __import__(pkg).__path__:
        for dp, dns, fns in os.walk(root):
            for f in fns:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dp, f), os.path.dirname(root))[:-3].replace(os.sep, ".")
                    rel = rel.removesuffix(".__init__")
                    try:
                        __import__(rel)
                    except Exception:
                        pass
mods = []
for i, (name, m) in enumerate(sorted(sys.modules.items())):
    f = getattr(m, "__file__", None)
    if not f or not os.path.isabs(f):
        continue
    pyc = None
    if f.endswith(".py"):
        pyc = os.path.join(out, f"{i}.pyc")
        py_compile.compile(f, cfile=pyc, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    mods.append({"name": name, "file": f, "pyc": pyc})
print(json.dumps({"modules": mods, "path": [p for p in sys.path if p],
                  "magic": importlib.util.MAGIC_NUMBER.hex(), "version": sys.version}))
"""


@dataclass
class Built:
    """The initramfs and what the build measured."""

    data: bytes
    kernel: Path
    release: str
    files: int = 0
    unpacked: int = 0
    modules: list[str] = field(default_factory=list)
    python_modules: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # unpacked bytes per part
    fast_bytes: int = 0  # the first gzip member: what the disk's own loader boots every day

    def summary(self) -> dict[str, object]:
        return {"kernel": str(self.kernel), "release": self.release, "initrd_bytes": len(self.data),
                "fast_bytes": self.fast_bytes, "unpacked_bytes": self.unpacked, "files": self.files,
                "kernel_modules": self.modules, "python_modules": self.python_modules, "parts": self.parts}


# -- the kernel and its modules ----------------------------------------------------------------------
HEADER_BYTES = 0x10200  # the boot header and the release string it points to (an offset below 64 KiB + 0x200)


def bzimage_release(head: bytes) -> str:
    """The release of a Linux kernel from its first HEADER_BYTES (the x86 boot protocol's setup
    header: boot flag 0xAA55 at 0x1FE, "HdrS" at 0x202, protocol version at 0x206, loadflags at 0x211,
    the offset of the version string at 0x20E); ValueError saying why ``head`` is no bzImage that
    iPXE can boot. Pure: no I/O."""
    if len(head) < 0x214 or head[0x1FE:0x200] != b"\x55\xaa" or head[0x202:0x206] != b"HdrS":
        raise ValueError("not a Linux kernel (no x86 boot header: 0xAA55 at 0x1FE and 'HdrS' at 0x202)")
    version = int.from_bytes(head[0x206:0x208], "little")
    if version < 0x0200 or not head[0x211] & 0x01:
        raise ValueError(f"an old zImage (boot protocol {version >> 8}.{version & 0xFF:02d}, not loaded high): "
                         "iPXE boots a bzImage")
    at = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[at:at + 256].split(b"\0", 1)[0].decode("ascii", "replace").split()
    return text[0] if at > 0x200 and text else ""


def find_kernel(kernel: Path | None = None) -> tuple[Path, str]:
    """The kernel to boot and its release: ``kernel`` (its release from its boot header, else from
    its name vmlinuz-RELEASE), checked to be a bzImage before anything is built (a disk image given
    by mistake made an initramfs the PC then refused with "Exec format error"); else the newest
    /boot/vmlinuz-* whose modules are installed (Debian's linux-image-amd64)."""
    if kernel is not None:
        try:
            with open(kernel, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise SourceError(path=str(kernel), why=e.strerror or str(e)) from None
        try:
            release = bzimage_release(head)
        except ValueError as e:
            raise SourceError(path=str(kernel), why=str(e)) from None
        m = re.match(r"vmlinuz-(.+)$", kernel.name)
        return kernel, release or (m.group(1) if m else "")
    found = []
    for p in Path("/boot").glob("vmlinuz-*"):
        release = p.name[len("vmlinuz-"):]
        if (Path("/lib/modules") / release / "modules.dep").exists():
            found.append((tuple(int(x) for x in re.findall(r"\d+", release)), p, release))
    if not found:
        raise NetbootError("no kernel in /boot with modules in /lib/modules: apt-get install linux-image-amd64, "
                           "or give --kernel FILE --modules DIR")
    _k, path, release = max(found)
    return path, release


def check_modules_match(mods: list[Path], release: str) -> None:
    """The modules were built for ``release`` (their vermagic): the kernel refuses others at insmod,
    at the PC's boot, so say so now. Compressed modules (.ko.xz, .ko.zst) are not looked into."""
    for m in mods:
        if m.suffix != ".ko":
            continue
        data = _read(m, "kernel module")
        at = data.find(b"vermagic=")
        if at < 0 or not release:
            continue
        magic = data[at + 9:data.find(b"\0", at)].decode("ascii", "replace").split()
        if magic and magic[0] != release:
            raise UsageError(f"the kernel modules in {m.parent} are for {magic[0]}, the kernel is {release}: "
                             "give the kernel's own module tree with --modules DIR")


def module_order(modules_dir: Path, names: tuple[str, ...] = MODULES,
                 needed: tuple[str, ...] = NEEDED_MODULES) -> list[Path]:
    """The .ko files of ``names`` and their dependencies, in an order insmod can load them.
    A name the kernel does not have as a module is skipped (built in), unless it is ``needed``
    and not listed in modules.builtin either."""
    try:
        dep_text = (modules_dir / "modules.dep").read_text()
    except OSError as e:
        raise SourceError(path=str(modules_dir / "modules.dep"), why=e.strerror or str(e)) from None
    try:
        builtin = {_mod_name(ln) for ln in (modules_dir / "modules.builtin").read_text().split()}
    except OSError:
        builtin = set()
    order, missing = dependency_order(dep_text, names)
    for n in missing:
        if n in needed and n not in builtin:
            raise NetbootError(f"the kernel's modules in {modules_dir} have no {n}: blockprov needs it")
    return [modules_dir / m for m in order]


def dependency_order(dep_text: str, names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The modules.dep paths of ``names`` and their dependencies, each after what it needs (the order
    insmod can load them in), and the names modules.dep does not list (built in, or absent). Pure: the
    initramfs builder and the test image's builder (tools/bootimage.py) both read modules.dep this way."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in dep_text.splitlines():
        if ":" in line:
            mod, rest = line.split(":", 1)
            deps[mod] = rest.split()
            by_name[_mod_name(mod)] = mod
    order: list[str] = []
    missing: list[str] = []

    def visit(mod: str, depth: int = 0) -> None:
        if mod in order or depth > 50:
            return
        for d in deps.get(mod, []):
            visit(d, depth + 1)
        order.append(mod)

    for n in names:
        found = by_name.get(n.replace("-", "_"))
        if found is None:
            missing.append(n)
        else:
            visit(found)
    return order, missing


def _mod_name(path: str) -> str:
    name = os.path.basename(path)
    for suf in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        name = name.removesuffix(suf)
    return name.replace("-", "_")


# -- python and libraries ------------------------------------------------------------------------------
def probe(python: Path, tmp: Path, whole: tuple[str, ...] = EXTRA_STDLIB) -> dict[str, object]:
    """Run PROBE under ``python`` with this process's import path (blockprov and its venv)."""
    import sys

    # this process's import path, less its own interpreter's stdlib (the target brings its own)
    own = os.path.join(sys.base_prefix, "lib")
    path = [p for p in sys.path if p and os.path.isdir(p) and not (p.startswith(own) and "-packages" not in p)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONHOME", None)
    try:
        p = subprocess.run([str(python), "-S", "-c", PROBE, str(tmp), *whole], capture_output=True, env=env,
                           timeout=300)
    except OSError as e:
        raise NetbootError(f"cannot run {python}: {e.strerror} (apt-get install python3)") from None
    if p.returncode:
        raise NetbootError(f"the import probe under {python} failed: "
                           f"{p.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
    result: dict[str, object] = json.loads(p.stdout)
    return result


def shared_libraries(binaries: list[str]) -> list[str]:
    """Every library ``ldd`` lists for the binaries, as the path it lists (soname links resolved
    by the loader at those very paths), plus the dynamic loader."""
    libs: set[str] = set()
    for i in range(0, len(binaries), 64):
        p = subprocess.run(["ldd", *binaries[i:i + 64]], capture_output=True, text=True, timeout=120)
        for line in p.stdout.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                libs.add(m.group(1))
    return sorted(libs)


def in_usr(path: str) -> str:
    """Archive name of a host path on a merged-/usr system (/lib/x → usr/lib/x)."""
    p = path.lstrip("/")
    for top in ("lib64", "lib", "bin", "sbin"):
        if p.startswith(top + "/"):
            return "usr/" + p
    return p


def archive_name(module_file: str, search: list[str]) -> str:
    """Where a module's file goes: the target interpreter's stdlib where it is on the host (the
    interpreter finds it there), blockprov and its dependencies under LIB_DIR (relative to the
    ``sys.path`` entry they came from)."""
    if re.match(r"^/usr/lib/python3\.\d+/", module_file) and "-packages/" not in module_file:
        return in_usr(module_file)
    roots = [r.rstrip("/") + "/" for r in search if module_file.startswith(r.rstrip("/") + "/")]
    if not roots:
        return in_usr(module_file)
    best = max(roots, key=len)
    return f"{LIB_DIR}/{module_file[len(best):]}"


# -- the archive -------------------------------------------------------------------------------------
class Archive:
    """newc cpio entries, parents made as needed, each path once."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
        self.by_part: dict[str, int] = {}

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = (stat.S_IFDIR | 0o755, b"", (0, 0))

    def file(self, name: str, data: bytes, mode: int = 0o644, part: str = "other") -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self.entries[name] = (stat.S_IFREG | mode, data, (0, 0))
        self.by_part[part] = self.by_part.get(part, 0) + len(data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name))
        self.entries.setdefault(name, (stat.S_IFLNK | 0o777, target.encode(), (0, 0)))

    def node(self, name: str, mode: int, rdev: tuple[int, int]) -> None:
        self.dir(os.path.dirname(name))
        self.entries[name] = (mode, b"", rdev)

    def cpio(self) -> bytes:
        out = io.BytesIO()

        def put(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
            nb = name.encode() + b"\0"
            hdr = "070701" + "".join(f"{v:08x}" for v in (
                ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, FIXED_TIME, len(data), 0, 0, rdev[0], rdev[1],
                len(nb), 0))
            out.write(hdr.encode() + nb + b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4))

        # directories before what they hold; symlinked tops (lib → usr/lib) before anything under usr
        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data, rdev = self.entries[name]
            put(name, mode, data, rdev, ino)
        put("TRAILER!!!", 0, b"", (0, 0), 0)
        return out.getvalue()


def stripped(path: str, tmp: Path) -> bytes:
    """An extension module without its symbol and debug sections (``strip --strip-unneeded``, when
    binutils is there): wheels ship them unstripped (zstandard's is 11.6 MB, 1 MB stripped)."""
    tool = shutil.which("strip")
    if tool is not None and not path.startswith("/usr/lib/"):  # Debian's are stripped already
        out = tmp / "stripped.so"
        if subprocess.run([tool, "--strip-unneeded", "-o", str(out), path], capture_output=True,
                          timeout=120).returncode == 0:
            return out.read_bytes()
    return _read(path, "extension module")


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SourceError(path=str(path), why=f"{e.strerror or e} ({what})") from None


def build(kernel: Path | None = None, modules_dir: Path | None = None, *, python: Path = PYTHON,
          progress: Callable[[str], None] = lambda step: None) -> Built:
    """The initramfs for ``kernel`` (default: the newest installed Debian kernel). Everything that
    can be checked cheaply (the kernel's format, its modules, the tools) is checked before the long
    part (the python probe, the libraries, compression), which tells ``progress`` each step."""
    kpath, release = find_kernel(kernel)
    if modules_dir is None:
        if not release:
            raise NetbootError(f"cannot tell the release of {kpath} from its name: give --modules DIR")
        modules_dir = Path("/lib/modules") / release
    mods = module_order(modules_dir)
    check_modules_match(mods, release)
    busybox = next((b for b in BUSYBOX if b.exists()), None)
    if busybox is None:
        raise NetbootError("no busybox: apt-get install busybox-static")
    if not MKE2FS.exists():
        raise NetbootError(f"no {MKE2FS}: apt-get install e2fsprogs")
    # Two archives, one gzip member each (netboot/everyday.py): ``a``, the fast part the disk's own
    # loader boots every day (busybox, modules, dmsetup and its libraries, /init); ``r``, the rest
    # (python and blockprov, the provisioning tools). A network boot loads both.
    a, r = Archive(), Archive()
    for top in ("bin", "sbin", "lib", "lib64"):
        a.symlink(top, f"usr/{top}")
    for d in ("dev", "proc", "sys", "run", "tmp", "newroot", "etc/blockprov", "usr/lib64"):
        a.dir(d)
    a.node("dev/console", stat.S_IFCHR | 0o600, (5, 1))
    a.node("dev/null", stat.S_IFCHR | 0o666, (1, 3))
    a.file("init", everyday.INIT.encode(), 0o755, "init")
    a.file(INITRAMFS_MARK, UDHCPC.encode(), 0o755, "init")  # also what marks the archive as ours
    a.file("usr/bin/busybox", _read(busybox, "busybox"), 0o755, "busybox")
    r.file("usr/sbin/mke2fs", _read(MKE2FS, "mke2fs"), 0o755, "mke2fs")
    if MKE2FS_CONF.exists():
        r.file("etc/mke2fs.conf", MKE2FS_CONF.read_bytes(), 0o644, "mke2fs")
    rest_bins = []
    for candidates, name, package in LOADER_TOOLS:
        tool = next((Path(c) for c in candidates if Path(c).exists()), None)
        if tool is None:
            raise NetbootError(f"no {candidates[0]}: apt-get install {package} (the disk's own boot loader)")
        binary = not name.endswith(".bin")
        r.file(name, _read(tool, package), 0o755 if binary else 0o644, "boot loader")
        if binary:
            rest_bins.append(str(tool))
    for link in MTOOLS_LINKS:
        r.symlink(f"usr/bin/{link}", "mtools")
    fast_bins: list[str] = []
    for k, (tools, name, package) in enumerate(NATIVE_TOOLS):  # dmsetup (the first) boots every day
        tool = next((Path(c) for c in tools if Path(c).exists()), None)
        if tool is None:
            raise NetbootError(f"no {tools[0]}: apt-get install {package} (the native data path)")
        (a if k == 0 else r).file(name, _read(tool, package), 0o755, "native data path")
        (fast_bins if k == 0 else rest_bins).append(str(tool))
    for link in NATIVE_LINKS:
        r.symlink(f"usr/sbin/{link}", "pdata_tools")
    for conv in [*(GCONV / n for n in GCONV_FILES), *sorted((GCONV / "gconv-modules.d").glob("*.conf"))]:
        if conv.exists():
            r.file(in_usr(str(conv)), _read(conv, "glibc's iconv module"), 0o644, "boot loader")
    progress(f"kernel modules ({len(mods)})")
    for m in mods:
        a.file(f"{MOD_DIR}/{m.name}", _read(m, "kernel module"), 0o644, "kernel modules")
    a.file("etc/blockprov/modules", "".join(f"/{MOD_DIR}/{m.name}\n" for m in mods).encode(), 0o644, "init")
    r.file("usr/bin/python3", _read(python.resolve(), "the python interpreter"), 0o755, "python")
    with tempfile.TemporaryDirectory(prefix="bp-initramfs-") as tmp:
        progress("python modules (the probe imports the in-machine agent)")
        found = probe(python, Path(tmp))
        search = [str(p) for p in found["path"]]  # type: ignore[attr-defined]
        sos = []
        n_py = 0
        for mod in found["modules"]:  # type: ignore[attr-defined]
            f, pyc = str(mod["file"]), mod.get("pyc")
            name = archive_name(f, search)
            part = "blockprov+deps" if name.startswith(LIB_DIR) else "python stdlib"
            if pyc:
                r.file(name[:-3] + ".pyc", _read(pyc, "compiled module"), 0o644, part)
            else:
                r.file(name, stripped(f, Path(tmp)) if f.endswith(".so") else _read(f, "module"), 0o755, part)
                if f.endswith(".so"):
                    sos.append(f)
            n_py += 1
            if mod["name"] == "certifi.core":  # httpx reads the CA bundle when it makes a client
                ca = Path(f).parent / "cacert.pem"
                r.file(os.path.dirname(name) + "/cacert.pem", _read(ca, "CA bundle"), 0o644, part)
    progress("shared libraries")
    fast_libs = shared_libraries(fast_bins)
    for lib in fast_libs:
        a.file(in_usr(lib), _read(os.path.realpath(lib), "shared library"), 0o755, "shared libraries")
    for lib in shared_libraries([str(python.resolve()), str(MKE2FS), *rest_bins, *sos]):
        if lib not in fast_libs:
            r.file(in_usr(lib), _read(os.path.realpath(lib), "shared library"), 0o755, "shared libraries")
    progress("archive and compression")
    fast, rest = a.cpio(), r.cpio()
    raw_len = len(fast) + len(rest)
    first = gzip.compress(fast, compresslevel=9, mtime=0)
    data = first + bytes(-len(first) % 4) + gzip.compress(rest, compresslevel=9, mtime=0)
    files = sum(1 for arc in (a, r) for e in arc.entries.values() if stat.S_ISREG(e[0]))
    parts = {k: a.by_part.get(k, 0) + r.by_part.get(k, 0) for k in sorted({*a.by_part, *r.by_part})}
    return Built(data=data, kernel=kpath, release=release, files=files, unpacked=raw_len,
                 modules=[m.name for m in mods], python_modules=n_py, parts=parts, fast_bytes=len(first))
