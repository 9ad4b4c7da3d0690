#!/usr/bin/env bash
# Runs every test: unit tests of each crate and the integration tests in
# tests/ against the release binaries (real daemon, real FUSE mount, qemu-img).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
export BLKFS_BIN_DIR="$PWD/target/release"
cargo test --release --workspace --no-fail-fast "$@"
