"""The repository's side of a UEFI PC's boot (issue 25 item 1): a version's UEFI loader stored with its
boot files and served like them, the per-host UEFI HTTP boot image, and the host's firmware recorded.
The image is read by tools we did not write (fsck.fat, mtools); OVMF boots it in tests/boot."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockprov import boot, fat
from blockprov.errors import EfiLoaderMissing
from blockprov.imaging.importer import import_image
from blockprov.netboot import loader
from blockprov.repo.local import LocalRepository
from blockprov.service.app import create_app
from tests.conftest import corrupt_chunk, make_image, require_tool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MAC = "52:54:00:ab:cd:25"
KERNEL = os.urandom(boot.PIECE * 2 + 777)
INITRD = os.urandom(boot.PIECE + 5)
EFI = {boot.SHIM: b"MZ shim " * 5000, boot.GRUB: os.urandom(boot.PIECE + 99), boot.MOK_MANAGER: b"MZ mm " * 300}
ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo = LocalRepository(tmp / "repo")
        self.vid, _ = import_image(self.repo, make_image(tmp / "src.img", 1 << 20, seed=25), "lab:v1")
        # a server on port 8420, as the firmware reaches it
        self.c = TestClient(create_app(self.repo), base_url="http://testserver:8420")
        self.files = f"/v1/images/lab/versions/{self.vid}/boot"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.c.close()
    e.repo.close()


def mcopy(img: Path, path: str) -> bytes:
    return subprocess.run([require_tool("mcopy"), "-n", "-i", str(img), f"::{path}", "-"], capture_output=True,
                          env=ENV, timeout=60, check=True).stdout


def test_the_uefi_loader_is_stored_served_and_kept_by_gc(env: Env) -> None:
    info = env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "quiet", EFI)
    assert set(info.efi) == set(EFI)
    got = env.c.get(env.files).json()["boot"]
    assert {k: v["size"] for k, v in got["efi"].items()} == {k: len(v) for k, v in EFI.items()}
    url = f"{env.files}/{boot.GRUB}"
    r = env.c.get(url, headers={"range": f"bytes={boot.PIECE - 3}-{boot.PIECE + 3}"})
    assert r.status_code == 206 and r.content == EFI[boot.GRUB][boot.PIECE - 3:boot.PIECE + 4]
    assert r.headers["etag"] == f'"{info.efi[boot.GRUB].id}"'
    r = env.c.get(url, headers={"range": "bytes=0-9,100-199"})  # several ranges: the whole body, as RFC 9110
    assert r.status_code == 200 and r.content == EFI[boot.GRUB] and "content-range" not in r.headers  # allows
    h = env.c.head(f"{env.files}/{boot.SHIM}")
    assert h.status_code == 200 and h.headers["content-length"] == str(len(EFI[boot.SHIM]))
    env.repo.gc(grace=0)  # the loader's pieces are referenced: nothing of it goes
    assert env.c.get(url).content == EFI[boot.GRUB]
    assert env.repo.boot_file("lab:v1", boot.MOK_MANAGER) == EFI[boot.MOK_MANAGER]
    # without a loader: a clear 409 naming what is missing, for the route and the repository
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "quiet")
    r = env.c.get(f"{env.files}/{boot.SHIM}", headers={"accept": "application/json"})
    assert r.status_code == 409 and r.json()["error"] == "EfiLoaderMissing" and "shimx64.efi" in r.json()["message"]
    with pytest.raises(EfiLoaderMissing):
        env.repo.boot_file("lab:v1", boot.SHIM)
    # a loader without GRUB, or a file of another name, is refused
    k = info.kernel.to_dict()
    for efi in ({boot.SHIM: info.efi[boot.SHIM].to_dict()}, {"bootx64.efi": k}, ["x"]):
        r = env.c.put(env.files, json={"kernel": k, "initrd": info.initrd.to_dict(), "efi": efi})
        assert r.status_code == 400, efi
    r = env.c.put(env.files, json={"kernel": k, "initrd": info.initrd.to_dict(),
                                   "efi": {n: f.to_dict() for n, f in info.efi.items()}})
    assert r.status_code == 200 and set(r.json()["efi"]) == set(EFI)


def test_the_uefi_boot_image(env: Env) -> None:
    img = f"/v1/boot/{MAC}/boot.img"
    r = env.c.get(img)
    assert r.status_code == 404 and r.text.startswith("blockprov: no boot assignment")
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1", "args": "bp.mode=check", "policy": "restore"}
                     ).status_code == 200
    assert env.c.get(img).status_code == 409  # no boot files
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0")
    r = env.c.get(img)
    assert r.status_code == 409 and "has no UEFI loader" in r.text
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0", EFI)
    # the firmware asks the size first (HEAD), then fetches it; its Host header has no port (edk2's)
    h = env.c.head(img, headers={"host": "10.0.2.2"})
    size = int(h.headers["content-length"])
    assert h.status_code == 200 and h.headers["content-type"] == boot.EFI_IMAGE_TYPE and h.content == b""
    assert env.c.get(f"/v1/hosts/{MAC}").json()["firmware"] is None  # asking the size is no boot
    r = env.c.get(img, headers={"host": "10.0.2.2"})
    assert r.status_code == 200 and len(r.content) == size and r.headers["etag"] == h.headers["etag"]
    path = env.tmp / "boot.img"
    path.write_bytes(r.content)
    subprocess.run([require_tool("fsck.fat"), "-n", str(path)], check=True, capture_output=True, timeout=60)
    assert mcopy(path, "EFI/BOOT/BOOTX64.EFI") == EFI[boot.SHIM]
    assert mcopy(path, "EFI/BOOT/grubx64.efi") == EFI[boot.GRUB]
    assert mcopy(path, "vmlinuz") == KERNEL and mcopy(path, "initrd.img") == INITRD
    cfg = mcopy(path, boot.GRUB_CFG).decode()
    words = cfg.split("linux /vmlinuz ", 1)[1].splitlines()[0].split()
    assert words[0] == "console=ttyS0" and "bp.mode=check" in words and "blockprov.policy=restore" in words
    assert "blockprov.repo=http://10.0.2.2:8420" in words and f"blockprov.host={MAC}" in words
    assert f"blockprov.image=lab@{env.vid}" in words and "initrd /initrd.img\nboot\n" in cfg
    h = env.c.get(f"/v1/hosts/{MAC}").json()
    assert h["firmware"] == "uefi" and h["last_boot_version"] == env.vid and h["last_boot"] <= time.time()
    # ranges across the metadata and the files equal the whole; the ETag holds; ?base= wins
    for lo, hi in ((0, 700), (size // 2 - 5000, size // 2 + 5000), (size - 10, size - 1)):
        r = env.c.get(img, headers={"host": "10.0.2.2", "range": f"bytes={lo}-{hi}"})
        assert r.status_code == 206 and r.content == path.read_bytes()[lo:hi + 1], (lo, hi)
    assert env.c.get(img, headers={"host": "10.0.2.2", "if-none-match": h_etag(env, img)}).status_code == 304
    other = env.c.get(img, params={"base": "https://repo.example/bp"})
    assert other.headers["etag"] != r.headers["etag"] and b"blockprov.repo=https://repo.example/bp " in other.content


def h_etag(env: Env, img: str) -> str:
    return str(env.c.head(img, headers={"host": "10.0.2.2"}).headers["etag"])


def test_a_corrupt_piece_of_the_image_is_never_sent(env: Env) -> None:
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1"}).status_code == 200
    info = env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "", EFI)
    image, name, vid = env.repo.uefi_image(MAC, "http://10.0.2.2:8420")
    assert (name, vid) == ("lab", env.vid)
    corrupt_chunk(env.repo, info.kernel.piece_id(1))
    at = next(off for off, _n, what in image.volume.extents() if what == boot.VOLUME_PATHS["kernel"])
    r = env.c.get(f"/v1/boot/{MAC}/boot.img", headers={"range": f"bytes={at + boot.PIECE}-{at + boot.PIECE + 9}",
                                                        "accept": "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "ChunkCorrupt"
    assert isinstance(image.content[boot.VOLUME_PATHS["kernel"]], boot.BootFile) and fat.is_fat16(image.volume.boot)


def test_ipxe_platform_records_the_hosts_firmware(env: Env) -> None:
    """The boot script's initrd URL carries iPXE's ${platform}: once the whole initrd was sent, the
    host's firmware is recorded with its boot."""
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD)
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1"}).status_code == 200
    # behind a reverse proxy (Host without a port: the proxy's default port) the script names the
    # proxy; only the firmware's HTTP boot image adds this server's port (edk2 drops it)
    r = env.c.get(f"/v1/boot/{MAC}", headers={"host": "10.0.2.2"})
    assert boot.parse_script(r.text)["params"]["blockprov.repo"] == "http://10.0.2.2"
    r = env.c.get(f"/v1/boot/{MAC}", headers={"host": "10.0.2.2:8420"})  # iPXE names the port it uses
    s = boot.parse_script(r.text)
    assert s["params"]["blockprov.repo"] == "http://10.0.2.2:8420"
    assert s["initrd"] == f"http://10.0.2.2:8420{env.files}/initrd?host={MAC}&platform=${{platform}}"
    assert env.c.get(f"/v1/hosts/{MAC}").json()["firmware"] is None  # the script alone is no boot
    initrd = f"{env.files}/initrd"
    assert env.c.get(initrd, params={"host": MAC, "platform": "efi"}, headers={"range": "bytes=0-9"}).status_code == 206
    assert env.c.get(f"/v1/hosts/{MAC}").json()["firmware"] is None  # a part of it is no boot either
    assert env.c.get(initrd, params={"host": MAC, "platform": "pcbios"}).content == INITRD
    assert env.c.get(f"/v1/hosts/{MAC}").json()["firmware"] == "bios"
    assert env.c.get(initrd, params={"host": MAC, "platform": "efi"}).status_code == 200
    assert env.c.get(f"/v1/hosts/{MAC}").json()["firmware"] == "uefi"
    assert env.c.get(initrd, params={"host": MAC, "platform": "arm64-efi"}).status_code == 200  # not ours to say
    h = env.c.get("/v1/hosts").json()["hosts"][0]
    assert h["firmware"] == "uefi" and h["last_boot_version"] == env.vid


def test_a_pc_whose_disk_is_current_is_sent_to_it(env: Env) -> None:
    """The short every-day boot through the firmware's HTTP boot: once the PC's agent said its disk
    holds the version whole with a loader booting this command line, the firmware is answered a
    404 (it boots its next option, the disk: tests/boot/test_uefi.py); its GET records that it was
    told, and a disk that then does not come up gets the image again; a re-provision too."""
    env.repo.set_boot_files("lab:v1", KERNEL, INITRD, "console=ttyS0", EFI)
    assert env.c.put(f"/v1/hosts/{MAC}", json={"ref": "lab:v1", "policy": "restore"}).status_code == 200
    img, fw = f"/v1/boot/{MAC}/boot.img", {"host": "10.0.2.2", "user-agent": "UefiHttpBoot/1.0"}
    r = env.c.get(img, headers=fw)
    assert r.status_code == 200
    (env.tmp / "boot.img").write_bytes(r.content)
    line = mcopy(env.tmp / "boot.img", boot.GRUB_CFG).decode().split("linux /vmlinuz ", 1)[1].splitlines()[0]
    info = env.repo.get_boot_files("lab:v1")
    assert info is not None
    fingerprint = loader.wanted(info.kernel.id, info.initrd.id, line)["fingerprint"]
    disk = {"version": f"lab@{env.vid}", "fingerprint": fingerprint}
    assert env.c.put(f"/v1/boot/{MAC}/disk", json=disk).status_code == 200  # the PC's agent

    def told() -> float:
        state = env.repo.registry.disk_state(MAC)
        assert state is not None
        return state.told

    h = env.c.head(img, headers=fw)
    assert h.status_code == 404 and h.headers["x-blockprov-disk"] == "current" and told() == 0  # the size: no boot
    r = env.c.get(img, headers=fw)
    assert r.status_code == 404 and r.headers["cache-control"] == "no-store"
    assert r.text == f"{boot.disk_note(MAC, disk['version'])}\n" and told() > 0
    # told, and the disk's initramfs never asked: it did not come up, and the next boot gets the image
    assert env.c.head(img, headers=fw).status_code == 200 and env.c.get(img, headers=fw).status_code == 200
    ask = env.c.post(f"/v1/boot/{MAC}/disk", params={"base": "http://10.0.2.2:8420"}, json=disk)
    assert ask.text == "disk\n"  # the disk came up: current, the same fingerprint as the image's line
    # iPXE's script follows the same rule (an operator looking: nothing recorded)
    assert env.c.get(f"/v1/boot/{MAC}", headers={"host": "10.0.2.2:8420"}).text.endswith("exit\n")
    when = told()
    assert env.c.get(img, headers=fw, params={"record": "false"}).status_code == 404 and told() == when
    assert env.c.get(img, headers=fw).status_code == 404 and told() > when
    # the operator forces a re-provision: the image, whatever the disk said
    assert env.c.post(f"/v1/hosts/{MAC}/reprovision").status_code == 200
    r = env.c.get(img, headers=fw)
    assert r.status_code == 200 and r.headers["content-type"] == boot.EFI_IMAGE_TYPE
