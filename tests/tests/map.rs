//! `blkctl map` against `qemu-img map --output=json` on the same images.

use blkfs_tests::*;
use serde_json::Value;

fn assert_same_map(img: &str) {
    let theirs: Value = serde_json::from_str(&qemu_img(&["map", "--output=json", img])).unwrap();
    let out = std::process::Command::new(bin("blkctl"))
        .args(["--json", "map", img])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "blkctl map {img}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ours, theirs, "map of {img} differs");
}

#[test]
fn maps_match_qemu_img_for_chains_zero_and_compressed_clusters() {
    let dir = TestDir::new("map");
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "8M"]);
    qemu_io(
        "raw",
        base.as_ref(),
        &["write -P 1 0 1M", "write -P 2 5M 512k"],
    );
    assert_same_map(&base);
    let mid = dir.file("mid.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid, "8M",
    ]);
    qemu_io(
        "qcow2",
        mid.as_ref(),
        &[
            "write -P 3 512k 64k",
            "write -z 2M 128k",
            "write -c -P 4 3M 64k",
        ],
    );
    assert_same_map(&mid);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
        "12M",
    ]);
    qemu_io(
        "qcow2",
        top.as_ref(),
        &["write -P 5 100k 12k", "write -P 6 10M 4k"],
    );
    assert_same_map(&top);
    let solo = qcow2_image(&dir, "solo.qcow2", "compat=0.10", "3M");
    assert_same_map(&solo);
}

#[test]
fn map_of_a_missing_or_corrupt_image_fails_cleanly() {
    let dir = TestDir::new("map-bad");
    let out = std::process::Command::new(bin("blkctl"))
        .args(["map", &dir.file("nope.qcow2")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.qcow2"));
    let bad = qcow2_image(&dir, "bad.qcow2", "", "1M");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .map(|f| f.set_len(100))
        .unwrap()
        .unwrap();
    let out = std::process::Command::new(bin("blkctl"))
        .args(["map", "-f", "qcow2", &bad])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("qcow2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
