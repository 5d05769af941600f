"""Fixtures for real boots: the test image (built once per session, cached across runs) and an
embedded repository holding it.

Why session scope and a cache outside tmp: building the image takes seconds (copying /usr, mkfs),
and the build is deterministic and keyed by its parameters (tools/bootimage.py reuses a complete
build), so every boot test of every run shares one image under ``.cache/bootimage`` (gitignored).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import bootvm
from tests.boot.netboot_helpers import IPXE_ROM
from tests.conftest import run_cli
from tests.procs import Proc, start_agent, start_server

IMAGE_REF = "bootlab:v1"


@pytest.fixture(scope="session")
def boot_image() -> bootvm.bootimage.Built:
    """The 1 GiB test image: disk.raw, vmlinuz, initrd.img, info."""
    return bootvm.build_image(size="1G", fill_mb=300)


@pytest.fixture(scope="session")
def boot_repo(tmp_path_factory: pytest.TempPathFactory, boot_image: bootvm.bootimage.Built) -> Path:
    """An embedded repository holding the test image as ``bootlab:v1``."""
    data = tmp_path_factory.mktemp("bootrepo") / "repo"
    run_cli("--data", str(data), "import", str(boot_image.disk), IMAGE_REF)
    return data


@contextmanager
def attached(cache: Path, sock: Path, data: Path, ref: str | None = IMAGE_REF) -> Iterator[tuple[Proc, str]]:
    """``blockprov attach`` of the image on a unix socket; yields the agent and the export's NBD URI."""
    proc, banner = start_agent(cache, ref, sock, data=data)
    try:
        addresses = [str(a) for a in banner["addresses"]]  # type: ignore[attr-defined]
        yield proc, next(a for a in addresses if a.startswith("nbd+unix://"))
    finally:
        proc.stop()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="bpboot", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class NetRepo:
    url: str
    initrd: Path
    built: dict[str, Any]
    nonzero: int  # non-zero chunks of the image
    unique: int  # distinct ones: what a full copy of the image sends at least
    data: Path | None = None  # the server's data directory (a profile preparation runs on it)


@pytest.fixture(scope="module")
def netrepo(boot_image: bootvm.bootimage.Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetRepo]:
    """``blockprov serve`` holding the test image as bootlab:v1 with the blockprov initramfs."""
    assert Path(IPXE_ROM).exists(), f"{IPXE_ROM} missing: install ipxe-qemu (scripts/setup.sh)"
    tmp = tmp_path_factory.mktemp("netboot")
    server, url = start_server(tmp / "repo")
    try:
        run_cli("--repo", url, "import", str(boot_image.disk), "bootlab:v1")
        initrd = tmp / "initrd.img"
        built = json.loads(run_cli("--repo", url, "boot-files", "build", "bootlab:v1", "--output", str(initrd),
                                   "--json").stdout)
        m = json.loads(run_cli("--repo", url, "show", "bootlab:v1", "--json").stdout)
        nonzero = m["chunks"] - m["zero_chunks"]
        print(f"initramfs {built['build']['initrd_bytes']} bytes ({built['build']['unpacked_bytes']} unpacked, "
              f"{built['build']['files']} files); image: {nonzero} non-zero chunks")
        assert built["build"]["initrd_bytes"] < 40 << 20
        yield NetRepo(url, initrd, built, nonzero, m["unique_chunks"], tmp / "repo")
    finally:
        server.stop()
