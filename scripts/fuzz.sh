#!/usr/bin/env bash
# Runs the cargo-fuzz targets (qcow2 header/entry/snapshot parsing, qcow
# header, QMP framing/sessions/blockdev options, blkdebug config, FUSE
# io_uring requests, the headers and tables of vdi, vpc, parallels, qed, vmdk, vhdx,
# bochs, cloop, cow and dmg, the NBD server's handshake and requests) for SECONDS each (default 60).
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable
# toolchain of this machine build them. A crash is left in
# fuzz/artifacts/TARGET/ and must become a regression test.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
secs=${1:-60}
for t in qcow2_header qcow_header qmp_session blkdebug_config fuse_ring_request \
    vdi_header vpc_header parallels_header qed_header bochs_header cloop_header cow_header dmg_tables \
    vmdk_descriptor vhdx_structures nbd_handshake; do
    RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" -- -max_total_time="$secs"
done
