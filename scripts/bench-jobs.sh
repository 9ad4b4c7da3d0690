#!/usr/bin/env bash
# Block job benchmark: blkfs and qemu-storage-daemon run the same job on
# fresh copies of the same images, in one run, speed unlimited.
#
#   scripts/bench-jobs.sh [--size SIZE] [--rounds N] [--only JOB[,JOB...]]
#                         [--cache cached|direct] [--seed N] [--no-build]
#
# SIZE (default 1G): the virtual size; about half of it is random data in
# scattered 1..4 MiB extents (the rest is holes), written into a raw file
# and converted to qcow2 with qemu-img.
# JOB: stream        top (empty) over a base holding the data, streamed whole
#      commit        base (empty) <- mid (data) <- top: mid committed into base
#      active-commit base (empty) <- top (data): READY, then complete
#      mirror-qcow2  drive-mirror sync=full of the qcow2 to a new qcow2
#      mirror-raw    drive-mirror sync=full of the raw file to a new raw file;
#                    also `cp --sparse=always` + fsync of the same file
#      backup        drive-backup sync=full of the qcow2 to a new qcow2
# --cache direct: cache.direct=on on both daemons' devices (default: both
# daemons' defaults, the host page cache).
#
# Each round runs blkfs, then qsd (then cp) in turn, each on fresh copies
# with the page cache dropped first (when /proc/sys/vm/drop_caches is
# writable). A job is timed from its command to BLOCK_JOB_COMPLETED (for
# mirror and active commit: through READY and block-job-complete), by a
# small stdlib-only python QMP client, which then fsyncs the result image
# (the "durable" times: to the data on disk) before the daemon quits. The
# durable time is the fair one where a daemon leaves the job's writes in
# the page cache: blkfs flushes a commit's base before it rewrites the
# overlay's backing file (power-loss safety); qsd does not. Every result
# is checked with `qemu-img compare` against the expected image, and the
# script fails on a mismatch. Medians are printed with speed ratios:
# blkfs/qsd = qsd time / blkfs time (>1: blkfs is faster), likewise blkfs/cp
# (cp's time includes its fsync, so it compares with the durable ratio).
# A job whose command blkfs answers CommandNotFound or "not implemented" is
# skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."

size=1G
rounds=3
only=
cache=cached
seed=1
build=1
usage() {
    echo "usage: $0 [--size SIZE] [--rounds N] [--only JOB[,JOB...]] [--cache cached|direct] [--seed N] [--no-build]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        *) usage ;;
    esac
done
case "$cache" in
    cached) cache_opt= ;;
    direct) cache_opt=,cache.direct=on ;;
    *) usage ;;
esac
all_jobs="stream commit active-commit mirror-qcow2 mirror-raw backup"
for j in ${only//,/ }; do
    case " $all_jobs " in *" $j "*) ;; *) echo "bench-jobs: unknown job $j (jobs: $all_jobs)" >&2; exit 2 ;; esac
done

for tool in qemu-img qemu-storage-daemon python3 cp; do
    command -v "$tool" >/dev/null || { echo "bench-jobs: $tool is required" >&2; exit 1; }
done
if [ "$build" = 1 ]; then
    cargo build --release -q --workspace --bins
fi
blkfs=$PWD/target/release/blkfs

work=$(mktemp -d "$PWD/target/bench-jobs.XXXXXX")
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then kill "$daemon_pid" 2>/dev/null || true; sleep 0.3; fi
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
wait_for() { for _ in $(seq 400); do [ -e "$1" ] && return 0; sleep 0.05; done; echo "bench-jobs: $1 never appeared" >&2; exit 1; }

# The QMP client: starts one job, completes it on READY, prints the seconds
# from the command to BLOCK_JOB_COMPLETED, then quits the daemon. Exit 3:
# the command does not exist or is not implemented (its error on stderr).
cat >"$work/qmpjob.py" <<'PY'
import json, socket, sys, time

import os

sock_path, cmd, args, result = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX)
s.settimeout(3600)
s.connect(sock_path)
f = s.makefile("rw")
pending = []


def msg():
    line = f.readline()
    if not line:
        sys.exit("qmpjob: the daemon closed the connection")
    return json.loads(line)


def execute(name, arguments=None):
    f.write(json.dumps({"execute": name, "arguments": arguments or {}}) + "\n")
    f.flush()
    while True:
        m = msg()
        if "event" in m:
            pending.append(m)
        else:
            return m


msg()  # greeting
execute("qmp_capabilities")
job = args.get("job-id", args["device"])
t0 = time.monotonic()
r = execute(cmd, args)
if "error" in r:
    e = r["error"]
    print(f"{e['class']}: {e['desc']}", file=sys.stderr)
    missing = e["class"] == "CommandNotFound" or "not implemented" in e["desc"]
    execute("quit")
    sys.exit(3 if missing else 1)
while True:
    ev = pending.pop(0) if pending else msg()
    name, data = ev.get("event"), ev.get("data", {})
    if not name or data.get("device") != job:
        continue
    if name == "BLOCK_JOB_READY":
        r = execute("block-job-complete", {"device": job})
        if "error" in r:
            sys.exit(f"qmpjob: block-job-complete: {r['error']}")
    elif name == "BLOCK_JOB_COMPLETED":
        if "error" in data:
            sys.exit(f"qmpjob: {cmd} failed: {data['error']}")
        break
    elif name in ("BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"):
        sys.exit(f"qmpjob: {cmd}: {name} {data}")
elapsed = time.monotonic() - t0
fd = os.open(result, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
durable = time.monotonic() - t0
execute("quit")
print(f"{elapsed:.3f} {durable:.3f}")
PY

# The data: random bytes in 1..4 MiB extents separated by 1..4 MiB holes
# (about half the image), seeded; prints the bytes of data written.
data_bytes=$(python3 - "$work/data.raw" "$size" "$seed" <<'PY'
import random, sys
path, size, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
n = int(size[:-1]) * units[size[-1].upper()] if size[-1].upper() in units else int(size)
rng = random.Random(seed)
M = 1 << 20
off = rng.randint(0, 3) * M
total = 0
with open(path, "wb") as f:
    f.truncate(n)
    while off < n:
        length = min(rng.randint(1, 4) * M, n - off)
        f.seek(off)
        f.write(rng.randbytes(length))
        total += length
        off += length + rng.randint(1, 4) * M
print(total)
PY
)
vsize=$(stat -c %s "$work/data.raw")
qemu-img convert -f raw -O qcow2 "$work/data.raw" "$work/data.qcow2"
qemu-img create -q -f qcow2 "$work/empty.qcow2" "$vsize"

drop_caches() {
    sync
    if [ -w /proc/sys/vm/drop_caches ]; then
        echo 3 >/proc/sys/vm/drop_caches
    elif [ -z "${warned_cache:-}" ]; then
        warned_cache=1
        echo "bench-jobs: cannot drop the page cache (not root?): runs see warm caches" >&2
    fi
}

# setup JOB DIR: fresh images for JOB in DIR.
setup() {
    local d=$2
    rm -rf "$d"
    mkdir -p "$d"
    case "$1" in
        stream)
            cp --sparse=always "$work/data.qcow2" "$d/base.qcow2"
            qemu-img create -q -f qcow2 -b "$d/base.qcow2" -F qcow2 "$d/top.qcow2" ;;
        commit)
            cp --sparse=always "$work/empty.qcow2" "$d/base.qcow2"
            cp --sparse=always "$work/data.qcow2" "$d/mid.qcow2"
            qemu-img rebase -u -b "$d/base.qcow2" -F qcow2 "$d/mid.qcow2"
            qemu-img create -q -f qcow2 -b "$d/mid.qcow2" -F qcow2 "$d/top.qcow2" ;;
        active-commit)
            cp --sparse=always "$work/empty.qcow2" "$d/base.qcow2"
            cp --sparse=always "$work/data.qcow2" "$d/top.qcow2"
            qemu-img rebase -u -b "$d/base.qcow2" -F qcow2 "$d/top.qcow2" ;;
        mirror-qcow2 | backup)
            cp --sparse=always "$work/data.qcow2" "$d/top.qcow2" ;;
        mirror-raw)
            cp --sparse=always "$work/data.raw" "$d/top.raw" ;;
    esac
}

# The job's command and arguments for blkfs (device d0 over top.*) and for
# qsd (job-id j on node top; backing nodes named base and mid).
job_cmd() {
    case "$1" in
        stream) echo block-stream ;;
        commit | active-commit) echo block-commit ;;
        mirror-*) echo drive-mirror ;;
        backup) echo drive-backup ;;
    esac
}
# job_args JOB DIR blkfs|qsd
job_args() {
    local d=$2 dev='"device": "d0"'
    [ "$3" = qsd ] && dev='"job-id": "j", "device": "top"'
    case "$1" in
        stream) echo "{$dev}" ;;
        commit)
            if [ "$3" = qsd ]; then
                echo "{$dev, \"top-node\": \"mid\", \"base-node\": \"base\"}"
            else
                echo "{$dev, \"top\": \"$d/mid.qcow2\", \"base\": \"$d/base.qcow2\"}"
            fi ;;
        active-commit)
            if [ "$3" = qsd ]; then
                echo "{$dev, \"base-node\": \"base\"}"
            else
                echo "{$dev, \"base\": \"$d/base.qcow2\"}"
            fi ;;
        mirror-qcow2 | backup)
            echo "{$dev, \"target\": \"$d/target.qcow2\", \"format\": \"qcow2\", \"sync\": \"full\", \"mode\": \"absolute-paths\"}" ;;
        mirror-raw)
            echo "{$dev, \"target\": \"$d/target.raw\", \"format\": \"raw\", \"sync\": \"full\", \"mode\": \"absolute-paths\"}" ;;
    esac
}

# The qsd --blockdev arguments of JOB's images in DIR (one per line).
qsd_blockdevs() {
    local d=$2 f="file.driver=file,file.filename"
    case "$1" in
        stream)
            echo "driver=qcow2,node-name=base,$f=$d/base.qcow2$cache_opt"
            echo "driver=qcow2,node-name=top,$f=$d/top.qcow2,backing=base$cache_opt" ;;
        commit)
            echo "driver=qcow2,node-name=base,$f=$d/base.qcow2$cache_opt"
            echo "driver=qcow2,node-name=mid,$f=$d/mid.qcow2,backing=base$cache_opt"
            echo "driver=qcow2,node-name=top,$f=$d/top.qcow2,backing=mid$cache_opt" ;;
        active-commit)
            echo "driver=qcow2,node-name=base,$f=$d/base.qcow2$cache_opt"
            echo "driver=qcow2,node-name=top,$f=$d/top.qcow2,backing=base$cache_opt" ;;
        mirror-qcow2 | backup)
            echo "driver=qcow2,node-name=top,$f=$d/top.qcow2$cache_opt" ;;
        mirror-raw)
            echo "driver=raw,node-name=top,$f=$d/top.raw$cache_opt" ;;
    esac
}

# result_image JOB DIR: the image the job fills.
result_image() {
    case "$1" in
        stream) echo "$2/top.qcow2" ;;
        commit | active-commit) echo "$2/base.qcow2" ;;
        mirror-qcow2 | backup) echo "$2/target.qcow2" ;;
        mirror-raw) echo "$2/target.raw" ;;
    esac
}

# verify WHO JOB DIR: the job's result must read as the data.
verify() {
    local who=$1 job=$2 d=$3 img fmt=qcow2
    img=$(result_image "$job" "$d")
    [ "$job" = mirror-raw ] && fmt=raw
    if ! qemu-img compare -q -f "$fmt" -F raw "$img" "$work/data.raw"; then
        echo "bench-jobs: MISMATCH: after $who's $job, $(basename "$img") differs from the data" >&2
        exit 1
    fi
    if [ "$job" = stream ] && qemu-img info --output=json "$img" | grep -q '"backing-filename"'; then
        echo "bench-jobs: MISMATCH: after $who's stream, the top still has a backing file" >&2
        exit 1
    fi
}

# run_daemon WHO JOB: sets result to the job's seconds and its durable
# seconds (space-separated), or to "" when the
# command is missing (its message in $work/skip).
run_daemon() {
    local who=$1 job=$2 d=$work/run sock=$work/$1.sock rc=0 t
    result=
    local -a cmd
    setup "$job" "$d"
    drop_caches
    rm -f "$sock"
    if [ "$who" = blkfs ]; then
        local fmt=qcow2 img=$d/top.qcow2
        [ "$job" = mirror-raw ] && fmt=raw img=$d/top.raw
        cmd=("$blkfs" --mount "$work/mnt" --qmp "$sock"
            --blockdev "driver=$fmt,id=d0,file.driver=file,file.filename=$img$cache_opt")
    else
        cmd=(qemu-storage-daemon)
        while read -r b; do cmd+=(--blockdev "$b"); done < <(qsd_blockdevs "$job" "$d")
        cmd+=(--chardev "socket,path=$sock,server=on,wait=off,id=c" --monitor chardev=c)
    fi
    "${cmd[@]}" >>"$work/$who.log" 2>&1 &
    daemon_pid=$!
    wait_for "$sock"
    t=$(python3 "$work/qmpjob.py" "$sock" "$(job_cmd "$job")" "$(job_args "$job" "$d" "$who")" \
        "$(result_image "$job" "$d")" 2>"$work/skip") || rc=$?
    if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then
        echo "bench-jobs: $who $job failed:" >&2
        cat "$work/skip" >&2
        tail -n 20 "$work/$who.log" >&2
        exit 1 # the trap kills the daemon
    fi
    if ! wait "$daemon_pid"; then
        echo "bench-jobs: $who exited with a failure after $job:" >&2
        tail -n 20 "$work/$who.log" >&2
        daemon_pid=
        exit 1
    fi
    daemon_pid=
    [ "$rc" = 3 ] && return 0
    verify "$who" "$job" "$d"
    result=$t
}

# run_cp: sets result to the seconds of cp --sparse=always of the raw
# source + fsync of the copy.
run_cp() {
    local d=$work/run t0 t1
    setup mirror-raw "$d"
    drop_caches
    t0=$(date +%s%N)
    cp --sparse=always "$d/top.raw" "$d/copy.raw"
    sync "$d/copy.raw"
    t1=$(date +%s%N)
    if ! cmp -s "$d/copy.raw" "$work/data.raw"; then
        echo "bench-jobs: MISMATCH: cp's copy differs from the data" >&2
        exit 1
    fi
    result=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
}

echo "# $(date -u +%F) $(nproc) cores, $(uname -r); $(qemu-storage-daemon --version | head -n 1)"
echo "# size $size ($((data_bytes >> 20)) MiB of data), $rounds rounds (median), cache=$cache, seed $seed"
echo "# blkfs/qsd and blkfs/cp are speed ratios: the other's time / blkfs's time (>1: blkfs is faster)"
echo "# *_dur: to the result fsynced; MiB/s and blkfs/cp use blkfs's durable time"
printf '%-14s %8s %8s %9s %10s %9s %9s %11s %8s %8s\n' job blkfs_s qsd_s blkfs/qsd blkfs_dur qsd_dur blkfs/qsd blkfs_MiB/s cp_s blkfs/cp
for job in $all_jobs; do
    [ -z "$only" ] || [[ ",$only," == *",$job,"* ]] || continue
    tb=() tq=() db=() dq=() tc=()
    skipped=
    for _ in $(seq "$rounds"); do
        run_daemon blkfs "$job"
        if [ -z "$result" ]; then
            skipped=$(cat "$work/skip")
            break
        fi
        read -r t dur <<<"$result"
        tb+=("$t") db+=("$dur")
        run_daemon qsd "$job"
        if [ -z "$result" ]; then
            echo "bench-jobs: qsd has no $(job_cmd "$job"): $(cat "$work/skip")" >&2
            exit 1
        fi
        read -r t dur <<<"$result"
        tq+=("$t") dq+=("$dur")
        if [ "$job" = mirror-raw ]; then
            run_cp
            tc+=("$result")
        fi
    done
    if [ -n "$skipped" ]; then
        printf '%-14s skipped: blkfs answers %s\n' "$job" "$skipped"
        continue
    fi
    python3 - "$job" "$data_bytes" "${tb[*]}" "${tq[*]}" "${db[*]}" "${dq[*]}" "${tc[*]:-}" <<'PY'
import statistics, sys
job, data = sys.argv[1], int(sys.argv[2])
b, q, bd, qd = (statistics.median(map(float, a.split())) for a in sys.argv[3:7])
c = statistics.median(map(float, sys.argv[7].split())) if sys.argv[7].strip() else None
cp = f"{c:>8.3f} {c / bd:>8.2f}" if c is not None else f"{'-':>8} {'-':>8}"
print(f"{job:<14} {b:>8.3f} {q:>8.3f} {q / b:>9.2f} {bd:>10.3f} {qd:>9.3f} {qd / bd:>9.2f}"
      f" {data / bd / 2**20:>11.0f} {cp}")
PY
done
