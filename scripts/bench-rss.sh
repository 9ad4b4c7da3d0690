#!/usr/bin/env bash
# Daemon memory over a long fio run: one qcow2 device (1 GiB, 64 KiB
# clusters, allocated as it goes), fio 4k randrw QD32 plus 1M sequential
# writes through the mount; blkfs's VmRSS sampled every --every seconds.
# Prints the samples, then min / median / max and the growth over the
# second half of the run (flat means the caches and buffer pools are bounded).
#
#   scripts/bench-rss.sh [--minutes N] [--every SECONDS] [--size SIZE]
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=10
every=10
size=1G
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes=$2; shift 2 ;;
        --every) every=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        *) echo "usage: $0 [--minutes N] [--every SECONDS] [--size SIZE]" >&2; exit 2 ;;
    esac
done

cargo build --release -q -p blkfs
. scripts/bench-lib.sh
bench_workdir "${TMPDIR:-/var/tmp}/blkfs-rss.XXXXXX"

qemu-img create -q -f qcow2 -o cluster_size=65536 "$work/a.qcow2" "$size"
mkdir -p "$work/mnt"
target/release/blkfs --mount "$work/mnt" --qmp "$work/qmp.sock" \
    --blockdev "driver=qcow2,id=d0,discard=unmap,cache.direct=on,aio=native,file.driver=file,file.filename=$work/a.qcow2" \
    2>"$work/blkfs.log" &
pid=$!
for _ in $(seq 100); do [ -S "$work/qmp.sock" ] && break; sleep 0.1; done

runtime=$((minutes * 60))
fio --name=rand --filename="$work/mnt/d0" --rw=randrw --bs=4k --iodepth=32 \
    --ioengine=libaio --direct=1 --time_based --runtime="$runtime" --size="$size" \
    --name=seq --filename="$work/mnt/d0" --rw=write --bs=1M --iodepth=8 \
    --ioengine=libaio --direct=1 --time_based --runtime="$runtime" --size="$size" \
    --output-format=terse >"$work/fio.out" 2>&1 &
fio_pid=$!

samples=()
while kill -0 "$fio_pid" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    samples+=("$rss")
    echo "t=$(( (${#samples[@]} - 1) * every ))s rss=${rss} KiB"
    sleep "$every"
done
wait "$fio_pid" || { echo "fio failed:"; cat "$work/fio.out"; exit 1; }

printf '%s\n' "${samples[@]}" | sort -n | awk -v n="${#samples[@]}" '
    { v[NR] = $1 }
    END { printf "rss KiB: min %d, median %d, max %d (%d samples)\n", v[1], v[int((n + 1) / 2)], v[n], n }'
half=$(( ${#samples[@]} / 2 ))
echo "second half: from ${samples[$half]} KiB to ${samples[-1]} KiB"
