//! The qcow (version 1) driver through the mount, qemu-img/qemu-io as the
//! oracle: images made by qemu tools (plain, over backing files, with
//! compressed clusters) read as qemu sees them, and writes through the
//! mount are what qemu reads after the daemon quits.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn spec(id: &str, file: &str) -> String {
    json!({"driver": "qcow", "id": id, "file": {"driver": "file", "filename": file}}).to_string()
}

fn qcow_image(dir: &TestDir, name: &str, backing: Option<(&str, &str)>, size: &str) -> String {
    let f = dir.file(name);
    let mut args = vec!["create", "-q", "-f", "qcow"];
    if let Some((b, fmt)) = backing {
        args.extend(["-b", b, "-F", fmt]);
    }
    args.extend([f.as_str(), size]);
    qemu_img(&args);
    f
}

/// Writes through the mount (and into `expected`), then quits the daemon and
/// checks that qemu reads the image as `expected`.
fn write_and_compare(dir: &TestDir, img: &str, expected: &str) {
    let d = Daemon::start(dir, &[spec("d0", img)]);
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    let e = OpenOptions::new().write(true).open(expected).unwrap();
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (7, pattern(1, 1000)),                 // unaligned, allocating, partial cluster
        (4096 - 100, pattern(2, 300)),         // across a cluster boundary
        (5 << 12, pattern(3, 3 << 12)),        // whole clusters
        ((1 << 20) + 1000, pattern(4, 5000)),  // over qemu-io's data
        ((3 << 20) + 513, pattern(5, 70_000)), // fresh area, new L2 table
        (9, pattern(6, 100)),                  // in place
    ];
    for (off, data) in &writes {
        f.write_all_at(data, *off).unwrap();
        e.write_all_at(data, *off).unwrap();
    }
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, (2 << 20) + 100, 100_000).unwrap();
    e.write_all_at(&vec![0u8; 100_000], (2 << 20) + 100)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(expected),
        "raw"
    ));
    d.quit();
    assert!(
        images_identical(Path::new(img), "qcow", Path::new(expected), "raw"),
        "qemu reads other data than was written"
    );
}

#[test]
fn reads_qemu_image_and_writes_back() {
    let dir = TestDir::new("qcow-plain");
    let img = qcow_image(&dir, "a.qcow", None, "4M");
    qemu_io(
        "qcow",
        img.as_ref(),
        &[
            "write -P 0xa1 1M 64k",
            "write -P 0xb2 9000 20000",
            "write -P 0xc3 4190000 4304",
        ],
    );
    let d = Daemon::start(&dir, &[spec("d0", &img)]);
    let mut q = d.qmp();
    let devs = q.ok("query-block", json!({}));
    assert_eq!(devs[0]["inserted"]["drv"], "qcow");
    assert_eq!(devs[0]["inserted"]["encrypted"], false);
    assert_eq!(devs[0]["inserted"]["image"]["virtual-size"], 4 << 20);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(&img),
        "qcow"
    ));
    // SEEK_DATA from block_status: the first data is qemu-io's at 9000, rounded to its cluster.
    let f = std::fs::File::open(d.dev("d0")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(8192));
    d.quit();
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-O", "raw", &img, &expected]);
    write_and_compare(&dir, &img, &expected);
}

#[test]
fn backing_chain_with_probing() {
    let dir = TestDir::new("qcow-chain");
    // base.raw <- mid.qcow (format named) <- top.qcow (qcow names no format: probed).
    let base = raw_image(&dir, "base.raw", "4M");
    let bf = OpenOptions::new().write(true).open(&base).unwrap();
    bf.write_all_at(&pattern(9, 4 << 20), 0).unwrap();
    drop(bf);
    let mid = qcow_image(&dir, "mid.qcow", Some(("base.raw", "raw")), "4M");
    qemu_io("qcow", mid.as_ref(), &["write -P 0x11 64k 64k"]);
    let top = dir.file("top.qcow");
    // qcow headers record no backing format: write the name with qemu-img, then open probing.
    qemu_img(&[
        "create", "-q", "-f", "qcow", "-b", "mid.qcow", "-F", "qcow", &top, "4M",
    ]);
    qemu_io("qcow", top.as_ref(), &["write -P 0x22 100k 8k"]);
    let d = Daemon::start(&dir, &[spec("d0", &top)]);
    let mut q = d.qmp();
    let devs = q.ok("query-block", json!({}));
    let i = &devs[0]["inserted"];
    assert_eq!(i["backing_file_depth"], 2, "{i}");
    assert_eq!(i["image"]["backing-image"]["format"], "qcow", "{i}");
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(&top),
        "qcow"
    ));
    d.quit();
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-O", "raw", &top, &expected]);
    // Partial-cluster writes must copy the rest of the cluster from the chain.
    write_and_compare(&dir, &top, &expected);
    // The backing files are untouched.
    qemu_io("qcow", mid.as_ref(), &["read -P 0x11 64k 64k"]);
}

#[test]
fn compressed_clusters() {
    let dir = TestDir::new("qcow-compressed");
    let img = qcow_image(&dir, "c.qcow", None, "4M");
    // qemu-img convert -c -O qcow fails in QEMU 10, so compress with qemu-io
    // (one cluster per write): 16 clusters at 0, one at 3M, plain data at 1M.
    let mut cmds: Vec<String> = (0..16)
        .map(|c| format!("write -c -P {:#x} {} 4k", 0x40 + c, c * 4096))
        .collect();
    cmds.push("write -c -P 0x33 3M 4k".into());
    cmds.push("write -P 0x44 1M 12345".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow", img.as_ref(), &refs);
    // Compressed indeed: uncompressed, the data clusters alone would take 84 KiB.
    assert!(std::fs::metadata(&img).unwrap().len() < 60_000);
    let d = Daemon::start(&dir, &[spec("d0", &img)]);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(&img),
        "qcow"
    ));
    d.quit();
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-O", "raw", &img, &expected]);
    // Writes into compressed clusters re-allocate them with the inflated content.
    write_and_compare(&dir, &img, &expected);
}

#[test]
fn bad_header_refused() {
    let dir = TestDir::new("qcow-bad");
    let img = qcow_image(&dir, "a.qcow", None, "1M");
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[17], 32).unwrap(); // cluster_bits 17
    drop(f);
    let e = Daemon::start_with(&dir, &[spec("d0", &img)], &[])
        .err()
        .expect("a bad header was accepted");
    assert!(e.contains("cluster_bits 17"), "{e}");
}
