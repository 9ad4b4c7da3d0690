#!/usr/bin/env bash
# NBD export benchmark: blkfs's NBD server, qemu-nbd and qemu-storage-daemon's
# NBD export, each serving its own copy of the same raw image, in one run,
# over a UNIX socket and over TCP on loopback.
#
#   scripts/bench-nbd.sh [--runtime S] [--rounds N] [--size SIZE]
#                        [--cache direct|cached] [--only 4k|1M] [--no-build]
#
# Client: fio's nbd engine (libnbd, one connection): 4k randread/randwrite
# QD32, 1M sequential read/write QD8. The image (default 1G) is filled with
# random data first. --cache direct (default): the three servers open their
# image with O_DIRECT and io_uring (blkfs cache.direct=on,aio=native; qsd
# the same; qemu-nbd --cache=none --aio=io_uring); cached: the host page
# cache and each server's default aio. Rounds interleave the servers
# (blkfs, qemu-nbd, qsd, blkfs, ...); medians of IOPS (4k) or MiB/s (1M) are
# printed with ratios blkfs/qemu-nbd and blkfs/qsd (>1: blkfs is faster).
set -euo pipefail
cd "$(dirname "$0")/.."

runtime=5
rounds=3
size=1G
cache=direct
only=
build=1
usage() {
    echo "usage: $0 [--runtime S] [--rounds N] [--size SIZE] [--cache direct|cached] [--only 4k|1M] [--no-build]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --runtime) runtime=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --size) size=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) usage ;;
    esac
done
case "$cache" in
    direct) b_opts=cache.direct=on,file.aio=native; q_opts=(--cache=none --aio=io_uring)
            s_opts=cache.direct=on,aio=io_uring ;;
    cached) b_opts=; q_opts=(); s_opts= ;;
    *) usage ;;
esac
for tool in fio qemu-img qemu-nbd qemu-storage-daemon python3; do
    command -v "$tool" >/dev/null || { echo "bench-nbd: $tool is required" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-nbd: this fio lacks the nbd engine" >&2; exit 1; }
if [ "$build" = 1 ]; then
    cargo build --release -q --workspace --bins
fi
blkfs=$PWD/target/release/blkfs

work=$(mktemp -d "$PWD/target/bench-nbd.XXXXXX")
pids=()
stop_all() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    umount -l "$work/mnt" 2>/dev/null || true
}
trap 'stop_all; rm -rf "$work"' EXIT
wait_for() { for _ in $(seq 400); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "bench-nbd: $1 never appeared" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

qemu-img create -q -f raw "$work/img.raw" "$size"
fio --name=fill --filename="$work/img.raw" --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --refill_buffers >/dev/null
for s in blkfs qemu-nbd qsd; do cp "$work/img.raw" "$work/$s.raw"; done

qmp() {
    python3 - "$work/qmp.sock" "$@" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw"); f.readline()
for c in ["{\"execute\":\"qmp_capabilities\"}"] + sys.argv[2:]:
    f.write(c + "\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            break
    if "error" in m:
        sys.exit(f"bench-nbd: {c}: {m['error']}")
PY
}

# start TRANSPORT: the three servers; sets url_blkfs, url_qemu_nbd, url_qsd.
start() {
    local t=$1 addr p
    mkdir -p "$work/mnt"
    "$blkfs" --mount "$work/mnt" --qmp "$work/qmp.sock" \
        --blockdev "driver=raw,id=d0${b_opts:+,$b_opts},file.driver=file,file.filename=$work/blkfs.raw" &
    pids+=($!)
    wait_for "$work/qmp.sock"
    if [ "$t" = unix ]; then
        addr="{\"type\":\"unix\",\"path\":\"$work/blkfs.nbd\"}"
        url_blkfs="nbd+unix:///d0?socket=$work/blkfs.nbd"
    else
        p=$(free_port)
        addr="{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$p\"}"
        url_blkfs="nbd://127.0.0.1:$p/d0"
    fi
    qmp "{\"execute\":\"nbd-server-start\",\"arguments\":{\"addr\":$addr}}" \
        '{"execute":"nbd-server-add","arguments":{"device":"d0","writable":true}}'
    if [ "$t" = unix ]; then
        qemu-nbd -t -f raw "${q_opts[@]}" --shared=0 -x d0 -k "$work/qemu-nbd.nbd" "$work/qemu-nbd.raw" &
        url_qemu_nbd="nbd+unix:///d0?socket=$work/qemu-nbd.nbd"
        addr="addr.type=unix,addr.path=$work/qsd.nbd"
        url_qsd="nbd+unix:///d0?socket=$work/qsd.nbd"
    else
        p=$(free_port)
        qemu-nbd -t -f raw "${q_opts[@]}" --shared=0 -x d0 -b 127.0.0.1 -p "$p" "$work/qemu-nbd.raw" &
        url_qemu_nbd="nbd://127.0.0.1:$p/d0"
        p=$(free_port)
        addr="addr.type=inet,addr.host=127.0.0.1,addr.port=$p"
        url_qsd="nbd://127.0.0.1:$p/d0"
    fi
    pids+=($!)
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f0,filename=$work/qsd.raw${s_opts:+,$s_opts}" \
        --blockdev driver=raw,node-name=r0,file=f0 \
        --nbd-server "$addr" \
        --export type=nbd,id=e0,node-name=r0,name=d0,writable=on &
    pids+=($!)
    # Ready once each answers a connection.
    for u in "$url_blkfs" "$url_qemu_nbd" "$url_qsd"; do
        for _ in $(seq 200); do qemu-img info "$u" >/dev/null 2>&1 && break; sleep 0.05; done
    done
}

# run_fio URL RW BS QD: IOPS (4k) or MiB/s (1M).
run_fio() {
    fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --runtime="$runtime" --time_based --output-format=json |
        python3 -c '
import json, sys
text = sys.stdin.read()  # the nbd engine prints a line before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
side = j["read"] if j["read"]["io_bytes"] else j["write"]
print(round(side["iops"]) if sys.argv[1] == "4k" else round(side["bw_bytes"] / 2**20))' "$3"
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$1" "$2"; }

echo "# $(date -u +%F) $(nproc) cores, $(uname -r); fio nbd engine, runtime ${runtime}s x $rounds rounds (median), image $size raw, cache=$cache"
printf '%-9s %-22s %10s %10s %10s %12s %9s\n' transport workload blkfs qemu-nbd qsd blkfs/qnbd blkfs/qsd
for t in unix tcp; do
    start "$t"
    workloads=()
    [ "$only" != 1M ] && workloads+=("randread 4k 32" "randwrite 4k 32")
    [ "$only" != 4k ] && workloads+=("read 1M 8" "write 1M 8")
    for w in "${workloads[@]}"; do
        set -- $w
        b=() q=() s=()
        for _ in $(seq "$rounds"); do
            b+=("$(run_fio "$url_blkfs" "$1" "$2" "$3")")
            q+=("$(run_fio "$url_qemu_nbd" "$1" "$2" "$3")")
            s+=("$(run_fio "$url_qsd" "$1" "$2" "$3")")
        done
        mb=$(median "${b[@]}") mq=$(median "${q[@]}") ms=$(median "${s[@]}")
        unit=$([ "$2" = 4k ] && echo IOPS || echo MiB/s)
        printf '%-9s %-22s %10s %10s %10s %12s %9s\n' "$t" "$1 $2 QD$3 ($unit)" "$mb" "$mq" "$ms" \
            "$(ratio "$mb" "$mq")" "$(ratio "$mb" "$ms")"
    done
    stop_all
    rm -f "$work/qmp.sock"
done
