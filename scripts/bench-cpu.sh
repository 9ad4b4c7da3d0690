#!/usr/bin/env bash
# CPU per request at a fixed rate: fio 4k randread and randwrite QD32
# (libaio, direct=1) held at --rate IOPS, so the disk is not the limit and
# the host's noise does not move the result. Reported per request, median
# over the rounds: the daemon's own CPU time (perf stat task-clock) and the
# whole machine's busy time (/proc/stat: user, nice, system, irq, softirq,
# steal), which also counts fio, interrupts and the kernel work blkfs causes
# in other tasks. The native file is measured alongside (machine time only).
# Each binary given with --bin is restarted for every run, in turn.
#
#   scripts/bench-cpu.sh [--rounds N] [--runtime SECONDS] [--rate IOPS] [--bin PATH]...
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
runtime=5
rate=40000
bins=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=$2; shift 2 ;;
        --runtime) runtime=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        *) echo "usage: $0 [--rounds N] [--runtime S] [--rate IOPS] [--bin PATH]..." >&2; exit 2 ;;
    esac
done
for tool in fio perf python3; do
    command -v "$tool" >/dev/null || { echo "bench-cpu: $tool is required" >&2; exit 1; }
done
. scripts/bench-lib.sh
bench_bins

bench_workdir "$PWD/target/bench-cpu.XXXXXX"
dd if=/dev/urandom of="$work/disk.raw" bs=1M count=1024 status=none

busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }

# file rw [pid] -> "machine-us-per-request daemon-us-per-request"
measure() {
    fio --name=b --filename="$1" --rw="$2" --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
        --size=1G --runtime=$((runtime + 2)) --time_based --norandommap --randrepeat=0 \
        --rate_iops="$rate" --output-format=json > "$work/fio.json" 2>/dev/null &
    local fio_pid=$! task=0
    sleep 1
    local b0
    b0=$(busy)
    if [ -n "${3:-}" ]; then
        task=$(perf stat -x, -e task-clock -p "$3" -- sleep "$runtime" 2>&1 >/dev/null | awk -F, '/task-clock/{print $1}')
    else
        sleep "$runtime"
    fi
    local b1
    b1=$(busy)
    wait "$fio_pid"
    python3 - "$work/fio.json" "$((b1 - b0))" "$task" "$runtime" "$(getconf CLK_TCK)" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] else j["write"]
jiffies, task_ms, secs, hz = int(sys.argv[2]), float(sys.argv[3] or 0), float(sys.argv[4]), int(sys.argv[5])
n = d["iops"] * secs
print("%.2f %.2f" % (jiffies / hz * 1e6 / n, task_ms * 1e3 / n))
PY
}

declare -A results
for _ in $(seq "$rounds"); do
    for rw in randread randwrite; do
        results["native $rw"]+="$(measure "$work/disk.raw" "$rw");"
    done
    for bin in "${bins[@]}"; do
        "$bin" --mount "$work/mnt" --qmp "$work/q.sock" \
            --blockdev "driver=raw,id=d0,cache.direct=on,file.driver=file,file.filename=$work/disk.raw,file.aio=native,file.locking=off" &
        pid=$!
        for _ in $(seq 100); do [ -S "$work/q.sock" ] && break; sleep 0.1; done
        sleep 0.3
        for rw in randread randwrite; do
            results["$bin $rw"]+="$(measure "$work/mnt/d0" "$rw" "$pid");"
        done
        kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
        rm -f "$work/q.sock"
    done
done

echo "# $(date +%F) $(nproc) cores, $(uname -r); fio 4k QD32 at $rate IOPS, ${runtime}s x $rounds rounds (median); raw, cache.direct=on, aio=native"
printf '%-50s %16s %16s\n' "target workload" "machine-us/req" "daemon-us/req"
for key in $(printf '%s\n' "${!results[@]}" | sort | tr ' ' '|'); do
    key=${key//|/ }
    python3 - "$key" "${results[$key]}" <<'PY'
import statistics, sys
rows = [r.split() for r in sys.argv[2].split(";") if r.strip()]
m, t = (statistics.median(float(r[i]) for r in rows) for i in (0, 1))
print("%-50s %16.2f %16s" % (sys.argv[1][-50:], m, "%.2f" % t if t else "-"))
PY
done
