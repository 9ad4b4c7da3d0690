#!/usr/bin/env bash
# Long churn run of a qcow2 device (tests/tests/churn.rs): random writes,
# punch holes and zero ranges through the mount of a 256 MiB image with
# discard=unmap, checked against an in-memory model, then `qemu-img check`
# and the size bounds (image file <= 1.25x the guest's allocated clusters,
# file length <= the disk size). Prints the test's summary line.
#
#   scripts/churn.sh [SECONDS] [SEED]     (default: 1200 s, the test's seed)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-1200}"
cargo build --release --workspace --bins
export BLKFS_BIN_DIR="$PWD/target/release"
export BLKFS_CHURN_SECS="$secs"
if [ -n "${2:-}" ]; then
    export BLKFS_CHURN_SEED="$2"
fi
cargo test --release -p blkfs-tests --test churn churn_keeps -- --nocapture 2>&1 |
    grep -E '^churn:|^test |panicked|assert|test result'
