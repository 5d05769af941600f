#!/usr/bin/env bash
# The main job, on the embedded repository (no server to configure):
#  1. a Linux guest boots from a streamed image before it is copied, gets dirtied by a "user" and a
#     "virus", is reset (only the changed chunks), and boots pristine again — the guest checks;
#  2. versions: a changed image stores only the changed chunks; diff; export byte for byte;
#  3. the agent with ordinary NBD clients (qemu-io, nbdcopy).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
BP=.venv/bin/blockprov
work=$(mktemp -d /tmp/blockprov-demo.XXXXXX)
agent=""
trap '[ -n "$agent" ] && kill -TERM "$agent" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "== part 1: a Linux guest boots from a streamed image, then reboot-to-restore"
echo "   building the test image (Debian kernel, busybox initramfs, 1 GiB ext4 root with 300 MB from /usr;"
echo "   cached in .cache/bootimage after the first run)"
.venv/bin/python tools/bootimage.py --out .cache/bootimage/1G-300 --size 1G --fill-mb 300 >/dev/null
img=.cache/bootimage/1G-300
step $BP import "$img/disk.raw" demo-os:v1
osock="$work/os.sock"
$BP attach demo-os:v1 --cache "$work/pc1" --socket "$osock" --no-register > "$work/os-agent.log" 2>&1 &
agent=$!
for _ in $(seq 100); do [ -S "$osock" ] && break; sleep 0.1; done
cat "$work/os-agent.log"
# One boot: qemu (TCG), direct kernel boot, root disk = the agent's NBD export. The guest's init reads
# a few thousand files, acts on bp.mode, prints its result lines and powers off.
boot() {
    printf '\n\033[1m$ qemu-system-x86_64 -machine accel=tcg -kernel vmlinuz -initrd initrd.img -append "... bp.mode=%s" \\\n    -drive file=nbd+unix:///demo-os?socket=%s,format=raw,if=virtio\033[0m\n' "$1" "$osock"
    local t0=$SECONDS
    timeout 300 qemu-system-x86_64 -machine accel=tcg -m 512 -nographic -no-reboot -nic none \
        -kernel "$img/vmlinuz" -initrd "$img/initrd.img" -append "console=ttyS0 quiet panic=-1 bp.mode=$1" \
        -drive "file=nbd+unix:///demo-os?socket=$osock,format=raw,if=virtio,cache=writeback" </dev/null \
        | tr -d '\r' | grep -E '^(BP-|BLOCKPROV-BOOT)' > "$work/boot.out" || true
    sed 's/^/   guest: /' "$work/boot.out"
    grep -q BLOCKPROV-BOOT-DONE "$work/boot.out" || { echo "demo: the guest did not finish its boot" >&2; exit 1; }
    echo "   (booted and powered off in $((SECONDS - t0)) s)"
}
echo; echo "== session 1: a customer's boot, straight from the repository (cold cache); the customer saves"
echo "   files and a virus replaces a system program"
boot dirty
step $BP status --cache "$work/pc1"
echo; echo "== between sessions: reset to the golden image (only the modified chunks are dropped)"
step $BP reset --cache "$work/pc1"
echo; echo "== session 2: the guest checks every golden file's checksum and looks for foreign files"
boot check
grep -q "BP-CHECK OK" "$work/boot.out" || { echo "demo: the guest found the disk not pristine" >&2; exit 1; }
step $BP status --cache "$work/pc1"
kill -TERM "$agent"; wait "$agent" || true; agent=""

echo; echo "== part 2: versions. A golden disk: 512 MiB ext4 holding real files from /usr"
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
echo; echo "demo done: repository at ${BLOCKPROV_DATA:-$(.venv/bin/python -c 'from blockprov.cli._common import default_data_dir; print(default_data_dir())')}"
