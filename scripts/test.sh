#!/usr/bin/env bash
# Runs every test: unit tests of each crate and the integration tests in
# tests/ against the release binaries (real daemon, real FUSE mount, qemu-img).
# The integration tests run twice, once per FUSE transport: io_uring (the
# default where the kernel offers it) and /dev/fuse, so neither rots.
set -euo pipefail
cd "$(dirname "$0")/.."
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then
    echo "test: enabling FUSE over io_uring ($uring)"
    echo 1 > "$uring"
fi
cargo build --release --workspace --bins
export BLKFS_BIN_DIR="$PWD/target/release"
status=0
BLKFS_TRANSPORT=auto cargo test --release --workspace --no-fail-fast "$@" || status=$?
echo "test: the integration tests again, on the /dev/fuse transport"
BLKFS_TRANSPORT=dev cargo test --release -p blkfs-tests --no-fail-fast "$@" || status=$?
exit $status
