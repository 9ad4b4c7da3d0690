# Set-up shared by the bench scripts; sourced, not run.

# bench_workdir TEMPLATE: a new work dir ($work) made from the mktemp
# TEMPLATE, removed on exit after the daemon ($pid, if set) is killed and
# its mount ($work/mnt) is unmounted.
bench_workdir() {
    work=$(mktemp -d "$1")
    pid=
    trap bench_cleanup EXIT
}

bench_cleanup() {
    if [ -n "$pid" ]; then
        { kill "$pid" && wait "$pid"; } 2>/dev/null || true
    fi
    umount -l "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}

# bench_bins: the binaries given with --bin ($bins), else the workspace's
# own blkfs, built first.
bench_bins() {
    if [ ${#bins[@]} -eq 0 ]; then
        cargo build --release -q -p blkfs
        bins=(target/release/blkfs)
    fi
}
