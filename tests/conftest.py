"""Shared fixtures: a fresh embedded repository, image makers, the CLI runner, and the external tools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from blockprov.repo.local import LocalRepository
from tests import leftovers
from tests.pgfixture import pg_url, postgres  # noqa: F401  (fixtures: a real PostgreSQL server)
from tests.s3fixture import s3_env, seaweed  # noqa: F401  (fixtures: a real S3 server)

VENV_BIN = Path(sys.executable).parent
# No test prepares boot profiles in the background (a headless qemu boot per version that gets boot
# files: vm/prepare.py) unless it says so for its own processes (BLOCKPROV_PREPARE=1).
os.environ["BLOCKPROV_PREPARE"] = "0"

# The programs the tests run, and the Debian package (Debian 12) that installs each; scripts/setup.sh
# installs them all (tests/unit/test_setup.py checks that it names every package here).
TOOL_PACKAGES = {
    "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin", "nbdfuse": "libnbd-bin", "nbdsh": "python3-libnbd",
    "python3": "python3-libnbd",  # /usr/bin/python3, Debian's, which has the libnbd bindings (tests/procs.py)
    "nbdkit": "nbdkit", "fio": "fio", "curl": "curl", "nginx": "nginx-light",
    "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs", "e2fsck": "e2fsprogs",
    "busybox": "busybox-static", "initdb": "postgresql", "postgres": "postgresql",
    "chromium": "chromium", "chromedriver": "chromium-driver",  # the console's browser test (selenium)
    "systemd-analyze": "systemd", "systemd-socket-activate": "systemd",  # contrib/systemd, socket activation
    "syslinux": "syslinux", "mcopy": "mtools", "mkfs.fat": "dosfstools",  # tools/bootdisk.py (a disk's own boot loader)
    "mdir": "mtools", "fsck.fat": "dosfstools",  # read the FAT volumes fat.py lays out
    "sfdisk": "fdisk", "sgdisk": "gdisk",  # a tool we did not write reads the GPT netboot/disk.py writes
    "dmsetup": "dmsetup", "era_invalidate": "thin-provisioning-tools",  # the initramfs's native data path
    # the DHCP examples of docs/operations.md, run as written in network namespaces (test_dhcp_examples.py)
    "ip": "iproute2", "dnsmasq": "dnsmasq-base", "kea-dhcp4": "kea-dhcp4-server",
}


# Files (not programs) the tests use, and their Debian packages: the UEFI firmware and Debian's signed
# UEFI loader (tests/boot/test_uefi.py, `boot-files build`'s default --efi debian).
FILE_PACKAGES = {
    "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf", "/usr/share/OVMF/OVMF_VARS_4M.fd": "ovmf",
    "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd": "ovmf", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd": "ovmf",
    "/usr/lib/shim/shimx64.efi.signed": "shim-signed", "/usr/lib/shim/mmx64.efi.signed": "shim-helpers-amd64-signed",
    "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed": "grub-efi-amd64-signed",
    "/usr/lib/ipxe/qemu/efi-virtio.rom": "ipxe-qemu",
}


def missing_tool(tool: str) -> str:
    return f"{tool} is not installed: install the Debian package {TOOL_PACKAGES[tool]} (scripts/setup.sh does)"


def require_file(path: str) -> str:
    """``path`` (one of FILE_PACKAGES); when it is missing the test fails (it never skips) naming the package."""
    if not Path(path).is_file():
        pytest.fail(f"{path} is missing: install the Debian package {FILE_PACKAGES[path]} (scripts/setup.sh does)",
                    pytrace=False)
    return path


def require_tool(tool: str) -> str:
    """The path of ``tool``. When it is missing the test fails (it never skips) naming the package."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(missing_tool(tool), pytrace=False)
    return path


def _named_package(e: FileNotFoundError) -> str | None:
    """The message for a tool that subprocess could not find, if it is one of ours."""
    tool = Path(str(e.filename or "")).name
    return missing_tool(tool) if tool in TOOL_PACKAGES else None


def _naming_the_package() -> Generator[None, None, None]:
    """A fixture or test that runs a missing tool fails with the package to install, not a bare ENOENT."""
    try:
        return (yield)
    except FileNotFoundError as e:
        if (why := _named_package(e)) is None:
            raise
        pytest.fail(f"{why}\n({e})", pytrace=False)


def pytest_configure(config: pytest.Config) -> None:
    """Mark every process the session starts (tests/leftovers.py); xdist's workers inherit the mark."""
    os.environ.setdefault(leftovers.MARK, uuid.uuid4().hex)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session on any agent, server, VM or mount the suite started and left running
    (issue 27), naming the test that started each; they are killed either way. Checked once, by
    the process that ends the session (xdist's controller, after every worker has finished)."""
    if hasattr(session.config, "workerinput") or os.environ.get("BLOCKPROV_LEFTOVERS") == "ignore":
        return
    left = leftovers.settle(os.environ[leftovers.MARK])
    if left:
        lines = "\n".join(f"  {p}" for p in left)
        print(f"\n{len(left)} process(es) the tests started were still running at the end (killed now):\n{lines}",
              file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _naming_the_package())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _naming_the_package())


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[LocalRepository]:
    r = LocalRepository(tmp_path / "repo")
    yield r
    r.close()


def make_image(path: Path, size: int, *, seed: int = 1, data_fraction: float = 0.5,
               pattern_every: int = 1 << 20) -> Path:
    """A sparse raw image: random blocks, repeated blocks, text-like blocks and holes."""
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        repeated = rnd.randbytes(65536)
        for off in range(0, size, pattern_every):
            r = rnd.random()
            if r > data_fraction:
                continue  # hole
            n = min(pattern_every, size - off)
            kind = rnd.randrange(3)
            if kind == 0:
                block = rnd.randbytes(n)
            elif kind == 1:
                block = (repeated * (n // 65536 + 1))[:n]
            else:
                words = b"lorem ipsum dolor sit amet block provisioning golden image "
                block = (words * (n // len(words) + 1))[:n]
            f.seek(off)
            f.write(block)
    return path


def corrupt_chunk(repo: LocalRepository, cid: bytes) -> None:
    """Flip the last byte of a stored chunk where the store keeps it (bit rot, a bad disk)."""
    from blockprov.store.pack import PackChunkStore

    store = repo.store
    assert isinstance(store, PackChunkStore)
    store.sync()
    loc = store._locate(cid)
    assert loc is not None, "chunk not stored"
    pack, offset, length = loc
    with open(store._pack_path(pack), "r+b") as f:
        f.seek(offset + length - 1)
        last = f.read(1)
        f.seek(offset + length - 1)
        f.write(bytes([last[0] ^ 0xFF]))


def run_cli(*args: str, data: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ)
    e.pop("BLOCKPROV_REPO", None)
    if data is not None:
        e["BLOCKPROV_DATA"] = str(data)
    if env:
        e.update(env)
    p = subprocess.run([str(VENV_BIN / "blockprov"), *args], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"blockprov {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p
