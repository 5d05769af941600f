#!/usr/bin/env bash
# Install everything blockprov and its tests need on a fresh Debian machine with Python 3.11:
# the real peers we test against (qemu, libnbd tools, nbdkit, fio, curl, nginx, PostgreSQL) from Debian,
# and blockprov itself into .venv. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# What each package is for (Debian 12). tests/conftest.py maps every program the tests run to its
# package (TOOL_PACKAGES) and a test checks that each of those packages is listed here.
APT_PKGS=(
    python3-venv                       # `python3 -m venv` below, with Debian's python3
    qemu-utils                         # qemu-img, qemu-io, qemu-nbd
    qemu-block-extra                   # qemu's curl driver (http:// drives: the raw view, remote boot)
    qemu-system-x86                    # qemu-system-x86_64: tests/boot, remote boot
    ipxe-qemu                          # the NICs' iPXE ROMs, BIOS and EFI (efi-virtio.rom: tests/boot/test_uefi.py)
    libnbd-bin                         # nbdinfo, nbdcopy, nbdfuse (clone --customize builtin:identity)
    python3-libnbd                     # nbdsh and `import nbd` for /usr/bin/python3 (NBD clients in tests)
    nbdkit                             # a second NBD server to compare with
    fio                                # NBD load in interop tests and benchmarks
    curl                               # Range requests against the raw view
    nginx-light                        # a caching HTTP proxy in front of the service
    e2fsprogs                          # mkfs.ext4, debugfs, e2fsck: file systems in test images
    linux-image-amd64 busybox-static   # the bootable test image (tools/bootimage.py)
    syslinux syslinux-common mtools dosfstools  # the test image booting from its own boot loader (tools/bootdisk.py)
    fdisk gdisk                        # sfdisk, sgdisk: check the GPT a PC's disk over 2 TiB gets (netboot/disk.py)
    ovmf                               # UEFI firmware for qemu (with Secure Boot and Microsoft's keys): tests/boot/test_uefi.py
    shim-signed grub-efi-amd64-signed  # Debian's signed UEFI loader (shim, GRUB, MOK manager): boot-files build --efi debian
    iproute2 dnsmasq-base kea-dhcp4-server  # docs/operations.md's DHCP examples for PXE and UEFI HTTP boot, run as written
    dmsetup thin-provisioning-tools    # a PC's native data path: dmsetup, era_invalidate in the initramfs (netboot/native.py)
    postgresql                         # initdb, postgres: the shared catalog's tests
    chromium chromium-driver           # a real browser for the console's test (selenium uses this chromedriver)
    systemd                            # systemd-analyze verify (contrib/systemd's units), systemd-socket-activate
)
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v -E '^(WARNING: Location|  )' || true
.venv/bin/blockprov --version >/dev/null
echo "setup: ready (.venv/bin/blockprov)"
