//! Crash safety of the block-mapped formats: the daemon is killed with
//! SIGKILL in the middle of allocating writes, again and again. qemu-img
//! finds no corruption (leaks at most), and every write acknowledged by an
//! fsync that returned reads back, through qemu-img.

use blkfs_tests::*;
use serde_json::json;
use std::time::Duration;

// Blocks of CRASH_BLOCK (6000) bytes, a divisor of no block size: writes
// straddle blocks and fill them piece by piece (copy-on-write of the
// block's old content).
const REGION: u64 = 8 << 20;
const ROUNDS: u64 = 4;

/// VDI: no two map entries on one block, and the header's count at least
/// the blocks mapped. A count ahead of the map (a block allocated, its
/// entry not written yet) is what qemu-img check calls an "allocated
/// blocks mismatch" after QEMU crashes at the same point: a leak.
fn vdi_consistent(img: &str) {
    let b = std::fs::read(img).unwrap();
    let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let (bmap, blocks, count) = (le32(0x154) as usize, le32(0x180) as usize, le32(0x184));
    let mut seen = std::collections::HashSet::new();
    for i in 0..blocks {
        let e = le32(bmap + 4 * i);
        if e < 0xffff_fffe {
            assert!(seen.insert(e), "VDI block {e} mapped twice");
            assert!(e < count, "VDI map entry {e} past the count {count}");
        }
    }
    let v = qemu_img_check(img);
    assert_eq!(v["check-errors"], 0, "{v}");
    let corruptions = v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0);
    if corruptions > 0 {
        assert_eq!(corruptions, 1, "{v}");
        assert!(
            count as usize > seen.len(),
            "a corruption other than a leaked block: {v}"
        );
    }
}

/// VHDX: a kill between a log entry and its application leaves a log to
/// replay, as after QEMU crashes at the same point, and qemu-img refuses to
/// check such an image read-only. QEMU replays it (`check -r all`) on a
/// copy; the result must hold no corruption. The next round's read-write
/// open replays the original itself.
fn vhdx_consistent(dir: &TestDir, img: &str) {
    let copy = dir.file("replayed.vhdx");
    std::fs::copy(img, &copy).unwrap();
    // Exits non-zero when it repaired something; the check below decides.
    let _ = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-r", "all", &copy])
        .output()
        .unwrap();
    assert_no_corruption(&copy);
}

fn crash_rounds(format: &str, options: &str) {
    let dir = TestDir::new(&format!("crash-{format}"));
    let img = dir.file(&format!("c.{format}"));
    let mut args = vec!["create", "-q", "-f", format];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([img.as_str(), "40M"]);
    qemu_img(&args);
    let spec = json!({"driver": format, "id": "d0", "file": {"driver": "file", "filename": img}})
        .to_string();
    let mut durable: Vec<(u64, u64)> = Vec::new();
    for round in 0..ROUNDS {
        let after = Duration::from_millis(120 + round * 37);
        let n = write_until_killed(&dir, &spec, round, REGION, after);
        match format {
            "parallels" | "vpc" => {}
            "vdi" => vdi_consistent(&img),
            "vhdx" => vhdx_consistent(&dir, &img),
            _ => assert_no_corruption(&img),
        }
        durable.push((round, n));
    }
    if format == "parallels" || format == "vhdx" {
        // A clean open and close takes parallels' in-use mark off and
        // replays a vhdx log the last kill left.
        Daemon::start(&dir, std::slice::from_ref(&spec)).quit();
        assert_no_corruption(&img);
    }
    let raw = dir.file("out.raw");
    qemu_img(&["convert", "-f", format, "-O", "raw", &img, &raw]);
    assert_durable(&raw, REGION, &durable, format);
}

#[test]
fn vdi_survives_kill_9() {
    crash_rounds("vdi", "");
}

#[test]
fn qed_survives_kill_9() {
    crash_rounds("qed", "cluster_size=4K");
}

#[test]
fn vhdx_survives_kill_9() {
    crash_rounds("vhdx", "block_size=1M");
}

#[test]
fn vmdk_survives_kill_9() {
    crash_rounds("vmdk", "");
}

#[test]
fn parallels_survives_kill_9() {
    crash_rounds("parallels", "cluster_size=64K");
}

#[test]
fn vpc_survives_kill_9() {
    crash_rounds("vpc", "");
}
