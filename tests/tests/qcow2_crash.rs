//! Crash safety: the daemon is killed with SIGKILL in the middle of
//! allocating writes, again and again. `qemu-img check` may find leaked
//! clusters but never corruption, and every write acknowledged by an fsync
//! that returned is in the image.

use blkfs_tests::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn kill_9_during_writes_never_corrupts() {
    let dir = TestDir::new("q2-crash");
    let img = dir.file("c.qcow2");
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "64M"]);
    qemu_io("raw", base.as_ref(), &["write -P 0x7e 0 64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &base,
        "-F",
        "raw",
        &img,
        "64M",
    ]);
    let spec = json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": img}})
        .to_string();
    // Each round writes its own 8 MiB region, block after block, so every
    // block is written once; (round, blocks acknowledged by fsync).
    const REGION: u64 = 8 << 20;
    let mut durable: Vec<(u64, u64)> = Vec::new();
    for round in 0..8u64 {
        // 6000-byte blocks: every write is a partial-cluster copy-on-write
        // whose cluster is shared with its neighbours.
        let after = Duration::from_millis(100 + round * 23);
        let n = write_until_killed(&dir, &spec, round, REGION, after);
        assert_no_corruption(&img);
        durable.push((round, n));
    }
    let raw = dir.file("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &raw]);
    assert_durable(&raw, REGION, &durable, "qcow2");
}
