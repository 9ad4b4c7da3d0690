#!/usr/bin/env bash
# Throttle accuracy: fio through the mount against limits set with
# block_set_io_throttle, and qemu-storage-daemon with the same limits
# (a throttle-group filter) as the reference, in one run.
#
#   scripts/bench-throttle.sh [--runtime SECONDS]
#
# Steady workloads report measured/limit (the goal is 1.00 +- 0.05 over
# 10 s). The burst workload sets bps_max and runs 3 s from a full bucket:
# the expected bytes are max + avg * 3 s.
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        *) echo "usage: $0 [--runtime S]" >&2; exit 2 ;;
    esac
done
for tool in fio qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 1; }
done
cargo build --release -q -p blkfs -p blkctl

work=$(mktemp -d "$PWD/target/bench.XXXXXX")
img="$work/disk.raw"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    umount -l "$work/qsd.export" 2>/dev/null || true
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "bench: $1 never appeared" >&2; exit 1; }

fio --name=fill --filename="$img" --size=1G --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --refill_buffers >/dev/null

target/release/blkfs --mount "$work/mnt" --qmp "$work/blkfs.sock" \
    --blockdev "driver=raw,id=d0,file.driver=file,file.filename=$img,file.aio=native,file.locking=off,cache.direct=on" &
pids+=($!)
wait_for "$work/blkfs.sock"

# qsd: a throttle filter over the image whose group limits are changed with qom-set.
# Both daemons have the image open at once: image locks off on both.
touch "$work/qsd.export"
qemu-storage-daemon \
    --object throttle-group,id=tg0 \
    --blockdev "driver=file,node-name=f0,filename=$img,cache.direct=on,aio=io_uring,locking=off" \
    --blockdev "driver=raw,node-name=r0,file=f0" \
    --blockdev "driver=throttle,node-name=t0,throttle-group=tg0,file=r0" \
    --export "type=fuse,id=e0,node-name=t0,mountpoint=$work/qsd.export,writable=on" \
    --chardev "socket,path=$work/qsd.sock,server=on,wait=off,id=m0" --monitor chardev=m0 &
pids+=($!)
wait_for "$work/qsd.sock"
sleep 0.5

ctl() { target/release/blkctl --socket "$work/blkfs.sock" "$@" >/dev/null; }
qsd_limits() { # JSON object of throttle-group limits
    python3 - "$work/qsd.sock" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
def cmd(c):
    f.write(json.dumps(c) + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "return" in m or "error" in m:
            return m
f.readline(); cmd({"execute": "qmp_capabilities"})
zero = {k: 0 for k in ["bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write",
                       "bps-total-max", "bps-read-max", "bps-write-max", "iops-total-max"]}
r = cmd({"execute": "qom-set", "arguments": {"path": "tg0", "property": "limits", "value": {**zero, **json.loads(sys.argv[2])}}})
assert "return" in r, r
PY
}
throttle() { # QMP block_set_io_throttle member=value ...
    local args='"device": "d0", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0'
    for kv in "$@"; do args="$args, \"${kv%%=*}\": ${kv#*=}"; done
    ctl qmp block_set_io_throttle "{$args}"
}
run_fio() { # file rw bs depth seconds -> "iops bytes/s"
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
        --size=1G --runtime="$5" --time_based --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print("%.1f %.0f" % (d["iops"], d["io_bytes"]/(d["runtime"]/1000.0)))'
}

echo "# $(date -u +%F) $(nproc) cores, $(uname -r); ${runtime}s per steady run"
printf '%-34s %12s %12s %12s %9s %9s\n' workload limit blkfs qsd blkfs/lim qsd/lim
report() { # name limit blkfs qsd
    python3 -c 'import sys; n,l,b,q=sys.argv[1],float(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4]); print(f"{n:<34} {l:>12.0f} {b:>12.0f} {q:>12.0f} {b/l:>9.3f} {q/l:>9.3f}")' "$@"
}
steady() { # name rw bs depth blkfs-member qsd-member limit field(1=iops,2=bytes/s)
    throttle "$5=$7"
    qsd_limits "{\"$6\": $7}"
    sleep 1 # let the buckets of the previous run drain
    local b q
    b=$(run_fio "$work/mnt/d0" "$2" "$3" "$4" "$runtime" | cut -d' ' -f"$8")
    q=$(run_fio "$work/qsd.export" "$2" "$3" "$4" "$runtime" | cut -d' ' -f"$8")
    report "$1" "$7" "$b" "$q"
}
steady "randread 4k qd8, iops=2000"    randread 4k 8 iops iops-total 2000 1
steady "randwrite 4k qd8, iops_wr=1000" randwrite 4k 8 iops_wr iops-write 1000 1
steady "read 64k qd8, bps=50 MiB/s"    read 64k 8 bps bps-total 52428800 2
steady "write 1M qd4, bps_wr=20 MiB/s" write 1M 4 bps_wr bps-write 20971520 2

# Burst: bps=10 MiB/s with bps_max=40 MiB, 3 s from a full (empty) bucket.
avg=10485760 max=41943040 secs=3
throttle "bps=$avg" "bps_max=$max"
qsd_limits "{\"bps-total\": $avg, \"bps-total-max\": $max}"
sleep 5
b=$(run_fio "$work/mnt/d0" read 64k 8 "$secs" | cut -d' ' -f2)
sleep 5
q=$(run_fio "$work/qsd.export" read 64k 8 "$secs" | cut -d' ' -f2)
report "burst read 64k, bps=10M max=40M, 3s" $(( (max + avg * secs) / secs )) "$b" "$q"
