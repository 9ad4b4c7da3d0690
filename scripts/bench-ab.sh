#!/usr/bin/env bash
# A/B of two blkfs option sets on one workload: two devices of one daemon
# over two copies of one fully allocated 1 GiB image (qcow2 by default),
# fio 4k QD32 runs interleaved (the order swapped every round), the median
# of each side and their ratio printed. Sharing the daemon and the time
# window makes the comparison far less noisy than two bench.sh runs.
#
#   scripts/bench-ab.sh [--rounds N] [--runtime SECONDS] [--format F]
#                       [--format-a F] [--format-b F] OPTS_A OPTS_B
#
# F: raw, qcow2, or chainN (the data in a raw base below N empty qcow2
# overlays: reads go N layers deep, writes allocate with copy-on-write).
# --format-a/--format-b give one side its own format (the same data), so
# e.g. `--format-a raw --format-b qcow2 "" ""` measures qcow2 against raw,
# and `--format-a qcow2 --format-b chain1 "" ""` a chain against a fully
# allocated image, through blkfs in one time window.
#
# OPTS_*: extra dotted options of the device (e.g. overlap-check=none), or
# "" for the defaults. fio: libaio, direct=1, randread and randwrite.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=6
runtime=5
format=qcow2
format_a=
format_b=
while [ $# -gt 2 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --format-a) format_a=$2; shift 2 ;;
        --format-b) format_b=$2; shift 2 ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || { echo "usage: $0 [--rounds N] [--runtime S] [--format raw|qcow2] [--format-a F] [--format-b F] OPTS_A OPTS_B" >&2; exit 2; }
opts_a=${1:+,$1}
opts_b=${2:+,$2}
format_a=${format_a:-$format}
format_b=${format_b:-$format}
for tool in fio qemu-img python3; do
    command -v "$tool" >/dev/null || { echo "bench-ab: $tool is required" >&2; exit 1; }
done
cargo build --release -q -p blkfs

work=$(mktemp -d "$PWD/target/bench-ab.XXXXXX")
pid=
cleanup() {
    [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
    sleep 0.3
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

fio --name=fill --filename="$work/d.raw" --size=1G --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --refill_buffers >/dev/null
image() { # format path: the data of d.raw in that format
    case $1 in
        chain*)
            local prev=$2.base.raw prevfmt=raw
            qemu-img convert -f raw -O raw "$work/d.raw" "$prev"
            for i in $(seq "${1#chain}"); do
                qemu-img create -q -f qcow2 -b "$prev" -F "$prevfmt" "$2.$i" 1G
                prev=$2.$i prevfmt=qcow2
            done
            mv "$prev" "$2" ;;
        *) qemu-img convert -f raw -O "$1" "$work/d.raw" "$2" ;;
    esac
}
image "$format_a" "$work/a.img"
image "$format_b" "$work/b.img"
rm -f "$work/d.raw"
dev() {
    local drv=$2
    case $drv in chain*) drv=qcow2 ;; esac
    echo "driver=$drv,id=$1,cache.direct=on,file.driver=file,file.filename=$work/$1.img,file.aio=native$3"
}
target/release/blkfs --mount "$work/mnt" --qmp "$work/blkfs.sock" --threads 2 \
    --blockdev "$(dev a "$format_a" "$opts_a")" --blockdev "$(dev b "$format_b" "$opts_b")" &
pid=$!
for _ in $(seq 200); do [ -S "$work/blkfs.sock" ] && break; sleep 0.05; done
[ -S "$work/blkfs.sock" ] || { echo "bench-ab: blkfs did not start" >&2; exit 1; }

run_fio() { # device rw -> iops
    fio --name=b --filename="$work/mnt/$1" --rw="$2" --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
        --size=1G --runtime="$runtime" --time_based --ramp_time=1 --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.0f" % d["iops"])'
}

echo "# $(date -u +%F) $(nproc) cores, $(uname -r); format A=$format_a B=$format_b, runtime ${runtime}s x $rounds rounds (median); A: ${1:-defaults}; B: ${2:-defaults}"
for rw in randread randwrite; do
    a=() b=()
    for r in $(seq "$rounds"); do
        if [ $((r % 2)) = 1 ]; then
            a+=("$(run_fio a $rw)"); b+=("$(run_fio b $rw)")
        else
            b+=("$(run_fio b $rw)"); a+=("$(run_fio a $rw)")
        fi
    done
    python3 - "$rw-4k-qd32" "${a[*]}" "${b[*]}" <<'PY'
import statistics, sys
name, a, b = sys.argv[1], [float(x) for x in sys.argv[2].split()], [float(x) for x in sys.argv[3].split()]
ma, mb = statistics.median(a), statistics.median(b)
print(f"{name:<18} A {ma:>8.0f}  B {mb:>8.0f}  B/A {mb/ma:.3f}  iops   (A: {' '.join('%.0f' % x for x in a)}; B: {' '.join('%.0f' % x for x in b)})")
PY
done
