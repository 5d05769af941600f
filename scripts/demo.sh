#!/usr/bin/env bash
# The main job, on the embedded repository (no server to configure): build a small golden disk
# with a real ext4 file system, import it, change a few files and import the new version (only the
# changed chunks are stored), show the difference, and export it again byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
BP=.venv/bin/blockprov
work=$(mktemp -d /tmp/blockprov-demo.XXXXXX)
agent=""
trap '[ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "== building a golden disk: 512 MiB ext4 holding real files from /usr"
mkdir -p "$work/root"
cp -r /usr/share/doc "$work/root/doc" 2>/dev/null || true
cp -r /usr/lib/python3 "$work/root/python3" 2>/dev/null || true
truncate -s 512M "$work/golden.img"
mkfs.ext4 -q -F -d "$work/root" -L golden "$work/golden.img"
du -sh --apparent-size "$work/root" | awk '{print "   files: " $1}'

step $BP import "$work/golden.img" demo-lab:v1
step $BP show demo-lab:v1

echo; echo "== an administrator adds a file and changes one: a new version"
cp "$work/golden.img" "$work/golden2.img"
printf 'welcome to the lab, %s\n' "$(date +%F)" > "$work/motd"
debugfs -w -R "write $work/motd motd" "$work/golden2.img" >/dev/null 2>&1
debugfs -w -R "rm doc/README" "$work/golden2.img" >/dev/null 2>&1 || true
step $BP import "$work/golden2.img" demo-lab:v2
step $BP diff demo-lab:v1 demo-lab:v2

echo; echo "== export round trip (raw and qcow2), checked by qemu-img"
step $BP export demo-lab:v2 "$work/out.qcow2" --format qcow2
step qemu-img compare "$work/golden2.img" "$work/out.qcow2"
step $BP images

echo; echo "== the agent: serve demo-lab:v2 over NBD from an empty cache; chunks arrive on first read"
sock="$work/nbd.sock"
$BP attach demo-lab:v2 --cache "$work/cache" --socket "$sock" > "$work/agent.log" 2>&1 &
agent=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
cat "$work/agent.log"
step nbdinfo "nbd+unix:///?socket=$sock"
step $BP status --cache "$work/cache"
echo; echo "== a client reads the first 8 MiB (the file system's metadata), then writes a block"
step qemu-io -f raw -c "read 0 8M" -c "write -P 0x42 1M 64k" -c "flush" "nbd+unix:///?socket=$sock"
step $BP status --cache "$work/cache"
echo; echo "== a full read through the agent equals the golden image except the block just written"
step nbdcopy "nbd+unix:///?socket=$sock" "$work/read.raw"
{ cmp -l "$work/golden2.img" "$work/read.raw" || true; } | awk 'NR==1 {first=$1} {last=$1; n++}
    END {printf "   %d bytes differ, at offsets %d..%d: the block written above\n", n, first-1, last-1}'
step $BP status --cache "$work/cache"
kill -TERM "$agent"; wait "$agent" || true; agent=""
step $BP status --cache "$work/cache"
echo; echo "demo done: repository at ${BLOCKPROV_DATA:-$(.venv/bin/python -c 'import blockprov.cli as c; print(c.default_data_dir())')}"
