#!/usr/bin/env bash
# Side-by-side fio benchmark: the native image file, qemu-storage-daemon's
# FUSE export and blkfs, on the same 1 GiB raw image, in one run.
#
#   scripts/bench.sh [--runtime SECONDS] [--rounds N] [--cache direct|cached]
#                    [--aio native|threads] [--threads N] [--only 4k|1M|lat]
#                    [--format raw|qcow2|chain1|chain10|vmdk|vhdx|vdi|qed|vpc|parallels]
#                    [--blkfs-opts K=V,...]
#                    [--transport auto|uring|dev]
#
# --blkfs-opts: extra options on blkfs's device (e.g. werror=report, or
# x-passthrough=on for kernel passthrough of a raw file).
# --transport: how FUSE requests reach blkfs (io_uring queues or /dev/fuse
# reads; auto takes io_uring where the kernel offers it).
# --format qcow2: the image converted to qcow2 (every cluster allocated);
# chainN: the raw image below N empty qcow2 overlays (reads go N deep);
# vmdk, vhdx, vdi, qed, vpc, parallels: the image converted (all allocated).
#
# Each workload runs on the three targets in turn, --rounds times; the
# median of each is printed with the ratios blkfs/qsd and blkfs/native
# (the machine is noisy: only ratios from one run mean anything).
# fio: libaio, direct=1, 4k randread/randwrite QD32, 1M read/write QD8,
# and 4k randread QD1 (`lat`: completion latency p50 and p99 in us, lower
# is better, so its ratios are the other's latency / blkfs's).
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=10
rounds=3
only=
format=raw
cache=direct
aio=native
threads=2
extra=
transport=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --aio) aio=$2; shift 2 ;;
        --threads) threads=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --format) format=$2; shift 2 ;;
        --blkfs-opts) extra=",$2"; shift 2 ;;
        --transport) transport=$2; shift 2 ;;
        *) echo "usage: $0 [--runtime S] [--rounds N] [--cache direct|cached] [--aio native|threads] [--threads N] [--only 4k|1M|lat] [--format raw|qcow2|chain1|chain10|vmdk|vhdx|vdi|qed|vpc|parallels] [--blkfs-opts K=V,...] [--transport auto|uring|dev]" >&2; exit 2 ;;
    esac
done
direct=$([ "$cache" = direct ] && echo on || echo off)
qsd_aio=$([ "$aio" = native ] && echo io_uring || echo threads)

for tool in fio qemu-img qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 1; }
done
cargo build --release -q -p blkfs

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

# A fully allocated image, so reads measure data, not holes.
fio --name=fill --filename="$img" --size=1G --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --refill_buffers >/dev/null

# The image the daemons open, and its format.
top=$img
drv=raw
case "$format" in
    raw) ;;
    qcow2)
        qemu-img convert -f raw -O qcow2 "$img" "$work/disk.qcow2"
        top=$work/disk.qcow2 drv=qcow2 ;;
    chain*)
        depth=${format#chain}
        prev=$img prevfmt=raw
        for i in $(seq "$depth"); do
            qemu-img create -q -f qcow2 -b "$prev" -F "$prevfmt" "$work/layer$i.qcow2" 1G
            prev=$work/layer$i.qcow2 prevfmt=qcow2
        done
        top=$prev drv=qcow2 ;;
    vmdk | vhdx | vdi | qed | vpc | parallels)
        qemu-img convert -f raw -O "$format" "$img" "$work/disk.$format"
        top=$work/disk.$format drv=$format ;;
    *) echo "bench: unknown format $format" >&2; exit 2 ;;
esac

wait_for() { for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "bench: $1 never appeared" >&2; exit 1; }

# qemu-storage-daemon exporting a copy of the top image through its FUSE
# export: two daemons writing one qcow2 would corrupt each other's
# metadata, and the second one's writes would no longer allocate. A chain's
# lower layers (and the raw file the native runs use) are shared, read-only
# to both daemons, so both turn their image locks off.
qsd_top=$work/qsd.top
cp "$top" "$qsd_top"
touch "$work/qsd.export"
qemu-storage-daemon \
    --blockdev "driver=file,node-name=f0,filename=$qsd_top,cache.direct=$direct,aio=$qsd_aio,locking=off" \
    --blockdev "driver=$drv,node-name=r0,file=f0" \
    --export "type=fuse,id=e0,node-name=r0,mountpoint=$work/qsd.export,writable=on" \
    --chardev "socket,path=$work/qsd.sock,server=on,wait=off,id=m0" --monitor chardev=m0 &
pids+=($!)
wait_for "$work/qsd.sock"

target/release/blkfs --mount "$work/mnt" --qmp "$work/blkfs.sock" --threads "$threads" --transport "$transport" \
    --blockdev "driver=$drv,id=d0,cache.direct=$direct,file.driver=file,file.filename=$top,file.aio=$aio,file.locking=off$extra" &
pids+=($!)
wait_for "$work/blkfs.sock"
sleep 0.5

run_fio() { # file rw bs depth -> "iops mibps"
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=libaio --direct=1 \
        --size=1G --runtime="$runtime" --time_based --ramp_time=1 --norandommap --randrepeat=0 \
        --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; p=d["clat_ns"]["percentile"]; print("%.0f %.1f %.1f %.1f" % (d["iops"], d["bw"]/1024, p["50.000000"]/1000, p["99.000000"]/1000))'
}

echo "# $(date -u +%F) $(nproc) cores, $(uname -r); runtime ${runtime}s x $rounds rounds (median), cache=$cache, aio=$aio, format=$format, blkfs threads=$threads${extra:+, blkfs opts ${extra#,}}"
printf '%-18s %10s %10s %10s %10s %10s\n' workload native qsd blkfs blkfs/qsd blkfs/nat
for w in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8" "randread 4k 1"; do
    set -- $w
    kind=$2
    [ "$3" = 1 ] && kind=lat
    [ -z "$only" ] || [ "$only" = "$kind" ] || continue
    results=()
    for _ in $(seq "$rounds"); do
        results+=("$(run_fio "$img" "$1" "$2" "$3")|$(run_fio "$work/qsd.export" "$1" "$2" "$3")|$(run_fio "$work/mnt/d0" "$1" "$2" "$3")")
    done
    python3 - "$1-$2-qd$3" "$kind" "${results[@]}" <<'PY'
import statistics, sys
name, kind, rounds = sys.argv[1], sys.argv[2], sys.argv[3:]
def med(i):
    cols = list(zip(*[[float(t.split()[i]) for t in r.split("|")] for r in rounds]))
    return [statistics.median(c) for c in cols]
if kind == "lat":
    for i, pct in ((2, "p50"), (3, "p99")):
        n, q, b = med(i)
        print(f"{name + ' ' + pct:<18} {n:>10.1f} {q:>10.1f} {b:>10.1f} {q/b:>10.2f} {n/b:>10.2f}  us")
else:
    i, unit = (0, "iops") if kind == "4k" else (1, "MiB/s")
    n, q, b = med(i)
    print(f"{name:<18} {n:>10.0f} {q:>10.0f} {b:>10.0f} {b/q:>10.2f} {b/n:>10.2f}  {unit}")
PY
done
