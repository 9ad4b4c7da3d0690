#!/usr/bin/env bash
# qcow2 metadata on the data path, A/B of blkfs builds: each round runs
# every workload on every binary in turn, on a fresh image each time
# (cache.direct=off, aio=native, discard=unmap), and checks the image after.
#   chain  4k random writes QD32 into an empty overlay of a 1 GiB raw base
#          (each write allocates, with copy-on-write from the base), IOPS
#   fill   1M sequential writes QD8 of a new 1 GiB qcow2, MiB/s
#   trim   one 512 MiB discard (fallocate --punch-hole) of written
#          clusters, seconds
#
#   scripts/bench-alloc.sh [--rounds N] [--runtime S] [--only chain|fill|trim] [--bin PATH]...
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3 runtime=5 only="chain fill trim" bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--runtime S] [--only chain|fill|trim] [--bin PATH]..." >&2; exit 2 ;;
    esac
done
. scripts/bench-lib.sh
bench_bins

bench_workdir "$PWD/target/bench-alloc.XXXXXX"

fio --name=fill --filename="$work/base.raw" --size=1G --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --refill_buffers >/dev/null

run() { # bin workload -> result
    local img=$work/top.qcow2 r
    rm -f "$img" "$work/q.sock"
    case $2 in
        chain) qemu-img create -q -f qcow2 -b "$work/base.raw" -F raw "$img" 1G ;;
        fill) qemu-img create -q -f qcow2 "$img" 1G ;;
        trim) qemu-img create -q -f qcow2 "$img" 1G
              qemu-io -f qcow2 -c "write -P 1 0 512M" "$img" >/dev/null ;;
    esac
    # Dirty pages of the previous run would be written back during this one.
    sync
    "$1" --mount "$work/mnt" --qmp "$work/q.sock" \
        --blockdev "driver=qcow2,id=d0,cache.direct=off,discard=unmap,file.driver=file,file.filename=$img,file.aio=native" 2>/dev/null &
    pid=$!
    for _ in $(seq 100); do [ -S "$work/q.sock" ] && break; sleep 0.05; done
    sleep 0.3
    case $2 in
        chain) r=$(fio --name=b --filename="$work/mnt/d0" --rw=randwrite --bs=4k --iodepth=32 \
                   --runtime="$runtime" --time_based --ioengine=libaio --direct=1 --norandommap \
                   --randrepeat=0 --output-format=json 2>/dev/null |
                   python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))') ;;
        fill) r=$(fio --name=b --filename="$work/mnt/d0" --rw=write --bs=1M --iodepth=8 --size=1G \
                  --ioengine=libaio --direct=1 --output-format=json 2>/dev/null |
                  python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["bw"] / 1024))') ;;
        trim) local t0 t1
              t0=$(date +%s.%N)
              fallocate --punch-hole --offset 0 --length 512M "$work/mnt/d0"
              t1=$(date +%s.%N)
              r=$(python3 -c "print(round($t1 - $t0, 3))") ;;
    esac
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    qemu-img check -q "$img" || { echo "bench-alloc: $1 $2 left a corrupt image" >&2; exit 1; }
    echo "$r"
}

declare -A results
for _ in $(seq "$rounds"); do
    for w in $only; do
        for b in "${bins[@]}"; do
            results["$w $b"]+="$(run "$b" "$w") "
        done
    done
done

echo "# $(date +%F) $(nproc) cores, $(uname -r); ${rounds} rounds (median), qcow2, cache.direct=off"
printf '%-6s %-40s %10s  %s\n' workload binary median "rounds (chain IOPS, fill MiB/s, trim s)"
for w in $only; do
    for b in "${bins[@]}"; do
        python3 - "$w" "$b" ${results["$w $b"]} <<'EOF'
import statistics, sys
w, b, vals = sys.argv[1], sys.argv[2], [float(v) for v in sys.argv[3:]]
print("%-6s %-40s %10g  %s" % (w, b[-40:], statistics.median(vals), " ".join("%g" % v for v in vals)))
EOF
    done
done
