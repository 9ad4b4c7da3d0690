#!/usr/bin/env bash
# The FUSE transports side by side: one 1 GiB raw image (random data,
# cache.direct=on, aio=native), blkfs restarted with each --transport in
# turn every round (or each binary given with --bin, to A/B two builds).
# fio libaio direct=1: 4k randread and randwrite QD32 (IOPS), 4k randread
# QD1 (p50 and p99 latency in us), 1M sequential read and write QD8 (MiB/s); the
# median of each over the rounds.
#
#   scripts/bench-transport.sh [--rounds N] [--runtime SECONDS]
#                              [--transports "uring dev"] [--bin PATH]...
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
runtime=4
transports="uring dev"
bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --transports) transports=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--runtime S] [--transports \"uring dev\"] [--bin PATH]..." >&2; exit 2 ;;
    esac
done
. scripts/bench-lib.sh
bench_bins

bench_workdir "$PWD/target/bench-transport.XXXXXX"
dd if=/dev/urandom of="$work/disk.raw" bs=1M count=1024 status=none

fio_json() { # rw depth [bs]
    fio --name=b --filename="$work/mnt/d0" --rw="$1" --bs="${3:-4k}" --iodepth="$2" --ioengine=libaio \
        --direct=1 --size=1G --runtime="$runtime" --ramp_time=1 --time_based --norandommap \
        --randrepeat=0 --output-format=json 2>/dev/null
}

declare -A results
for _ in $(seq "$rounds"); do
    for bin in "${bins[@]}"; do
        for t in $transports; do
            "$bin" --mount "$work/mnt" --qmp "$work/q.sock" --transport "$t" \
                --blockdev "driver=raw,id=d0,cache.direct=on,file.driver=file,file.filename=$work/disk.raw,file.aio=native,file.locking=off" &
            pid=$!
            for _ in $(seq 100); do [ -S "$work/q.sock" ] && break; sleep 0.1; done
            sleep 0.3
            key="$bin $t"
            rr=$(fio_json randread 32 | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
            rw=$(fio_json randwrite 32 | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
            lat=$(fio_json randread 1 | python3 -c 'import json,sys; p=json.load(sys.stdin)["jobs"][0]["read"]["clat_ns"]["percentile"]; print("%.1f %.1f" % (p["50.000000"]/1000, p["99.000000"]/1000))')
            rd=$(fio_json read 8 1M | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["bw"] / 1024))')
            wr=$(fio_json write 8 1M | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["write"]["bw"] / 1024))')
            results[$key]+="$rr $rw $lat $rd $wr;"
            kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
            rm -f "$work/q.sock"
        done
    done
done

echo "# $(date +%F) $(nproc) cores, $(uname -r); runtime ${runtime}s x $rounds rounds (median), raw, cache.direct=on, aio=native"
printf '%-40s %10s %10s %8s %8s %10s %10s\n' "binary transport" randread randwrite p50-us p99-us read1M-MiB/s write1M-MiB/s
for key in "${!results[@]}"; do
    python3 - "$key" "${results[$key]}" <<'EOF'
import statistics, sys
rows = [r.split() for r in sys.argv[2].split(";") if r.strip()]
med = [statistics.median(float(r[i]) for r in rows) for i in range(6)]
print("%-40s %10d %10d %8.1f %8.1f %10d %10d" % (sys.argv[1][-40:], *med))
EOF
done
