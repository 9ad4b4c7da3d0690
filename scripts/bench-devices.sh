#!/usr/bin/env bash
# Daemon memory with many devices: N qcow2 images (64 MiB, 64 KiB clusters,
# each 8 MiB written by qemu-io), all opened by one blkfs and, in the same
# run, by one qemu-storage-daemon with one FUSE export each. VmRSS is read
# when the daemons are ready, after 1 MiB was read from every device, and
# after 4k random writes to every device; blkfs runs once per --transport.
#
#   scripts/bench-devices.sh [--devices N] [--transports "uring dev"]
set -euo pipefail
cd "$(dirname "$0")/.."

devices=100
transports="uring dev"
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) devices=$2; shift 2 ;;
        --transports) transports=$2; shift 2 ;;
        *) echo "usage: $0 [--devices N] [--transports \"uring dev\"]" >&2; exit 2 ;;
    esac
done

cargo build --release -q -p blkfs
work=$(mktemp -d "${TMPDIR:-/var/tmp}/blkfs-devs.XXXXXX")
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    for m in "$work"/mnt "$work"/qsd/*; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

for i in $(seq "$devices"); do
    qemu-img create -q -f qcow2 -o cluster_size=64k "$work/d$i.qcow2" 64M
    qemu-io -f qcow2 -c "write -P $((i % 250 + 1)) 0 8M" "$work/d$i.qcow2" >/dev/null
done

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_sock() { for _ in $(seq 300); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }

# touch FILE...: 1 MiB read from each, then 64 random 4k writes to each.
read_all() { for f in "$@"; do dd if="$f" of=/dev/null bs=1M count=1 iflag=direct status=none; done; }
write_all() {
    for f in "$@"; do
        fio --name=w --filename="$f" --rw=randwrite --bs=4k --number_ios=64 --size=8M \
            --ioengine=psync --direct=1 --output=/dev/null >/dev/null 2>&1
    done
}

measure() { # name pid files...
    local name=$1 p=$2; shift 2
    sleep 1
    local ready; ready=$(rss "$p")
    read_all "$@"
    local after_read; after_read=$(rss "$p")
    write_all "$@"
    local after_write; after_write=$(rss "$p")
    printf '%-14s %10s %12s %13s\n' "$name" "$ready" "$after_read" "$after_write"
}

echo "# $(date +%F) $(nproc) cores, $(uname -r); $devices qcow2 devices (64 MiB, 8 MiB written), VmRSS in KiB"
printf '%-14s %10s %12s %13s\n' daemon ready after-read after-write

for t in $transports; do
    args=()
    for i in $(seq "$devices"); do
        args+=(--blockdev "driver=qcow2,id=d$i,file.driver=file,file.filename=$work/d$i.qcow2")
    done
    target/release/blkfs --mount "$work/mnt" --qmp "$work/blkfs.sock" --transport "$t" "${args[@]}" &
    pid=$!
    wait_sock "$work/blkfs.sock"
    files=()
    for i in $(seq "$devices"); do files+=("$work/mnt/d$i"); done
    measure "blkfs-$t" "$pid" "${files[@]}"
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    rm -f "$work/blkfs.sock"
done

mkdir -p "$work/qsd"
args=()
files=()
for i in $(seq "$devices"); do
    touch "$work/qsd/e$i"
    args+=(--blockdev "driver=file,node-name=f$i,filename=$work/d$i.qcow2"
           --blockdev "driver=qcow2,node-name=q$i,file=f$i"
           --export "type=fuse,id=e$i,node-name=q$i,mountpoint=$work/qsd/e$i,writable=on")
    files+=("$work/qsd/e$i")
done
qemu-storage-daemon "${args[@]}" \
    --chardev "socket,path=$work/qsd.sock,server=on,wait=off,id=m0" --monitor chardev=m0 &
pid=$!
wait_sock "$work/qsd.sock"
measure qsd "$pid" "${files[@]}"
