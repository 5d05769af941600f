#!/usr/bin/env bash
# Install everything blockprov and its tests need on a fresh Debian machine with Python 3.11:
# the real peers we test against (qemu, libnbd tools, nbdkit, fio, curl, nginx) from Debian,
# and blockprov itself into .venv. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(qemu-utils qemu-block-extra qemu-system-x86 libnbd-bin python3-libnbd nbdkit fio curl nginx-light e2fsprogs linux-image-amd64 busybox-static postgresql)
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
