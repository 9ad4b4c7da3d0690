//! Devices opened with cache.direct over images whose size is a multiple of
//! 512 but not of 4096: the last, partial block must read and write like
//! any other part of the device, and the device keeps its size.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

const SIZE: u64 = (1 << 20) + 1536;

fn direct_device(name: &str, aio: &str) -> (TestDir, Daemon, String) {
    let dir = TestDir::new(name);
    let img = raw_image(&dir, "a.img", &SIZE.to_string());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), SIZE);
    qemu_io("raw", img.as_ref(), &["write -P 0x2a 1044480 5632"]);
    let spec = json!({"driver": "raw", "id": "d0", "cache": {"direct": true},
                      "file": {"driver": "file", "filename": img, "aio": aio}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    (dir, d, img)
}

fn tail_reads(aio: &str) {
    let (_dir, d, _img) = direct_device(&format!("dt-read-{aio}"), aio);
    assert_eq!(std::fs::metadata(d.dev("d0")).unwrap().len(), SIZE);
    let f = OpenOptions::new().read(true).open(d.dev("d0")).unwrap();
    let mut buf = vec![0u8; 8192];
    // The whole tail, from an aligned and from an unaligned offset.
    assert_eq!(f.read_at(&mut buf, 1 << 20).unwrap(), 1536);
    assert!(buf[..1536].iter().all(|&b| b == 0x2a));
    assert_eq!(f.read_at(&mut buf, SIZE - 100).unwrap(), 100);
    assert!(buf[..100].iter().all(|&b| b == 0x2a));
    // Across the last full block into the tail.
    assert_eq!(f.read_at(&mut buf, SIZE - 3000).unwrap(), 3000);
    assert!(buf[..3000].iter().all(|&b| b == 0x2a));
    qemu_io_ro(
        "raw",
        &d.dev("d0"),
        &["read -P 0x2a 1044480 5632", "read -P 0 0 1044480"],
    );
}

fn tail_writes(aio: &str) {
    let (dir, d, img) = direct_device(&format!("dt-write-{aio}"), aio);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    let a = pattern(1, 100);
    f.write_all_at(&a, SIZE - 100)
        .expect("write of the last 100 bytes");
    let b = pattern(2, 5000);
    f.write_all_at(&b, SIZE - 5000)
        .expect("write across the last full block into the tail");
    let c = pattern(3, 512);
    f.write_all_at(&c, 1 << 20)
        .expect("aligned write into the tail");
    let mut back = vec![0u8; 5000];
    f.read_exact_at(&mut back, SIZE - 5000).unwrap();
    let mut want = b.clone();
    want[5000 - 1536..5000 - 1024].copy_from_slice(&c);
    assert_eq!(back, want);
    drop(f);
    assert_eq!(
        std::fs::metadata(d.dev("d0")).unwrap().len(),
        SIZE,
        "device size unchanged"
    );
    let status = d.terminate();
    assert!(status.success());
    // The oracle: the image holds what was written.
    let exp = dir.file("exp.img");
    qemu_img(&["create", "-q", "-f", "raw", &exp, &SIZE.to_string()]);
    let e = OpenOptions::new().write(true).open(&exp).unwrap();
    e.write_all_at(&vec![0x2a; 5632], 1044480).unwrap();
    e.write_all_at(&a, SIZE - 100).unwrap();
    e.write_all_at(&b, SIZE - 5000).unwrap();
    e.write_all_at(&c, 1 << 20).unwrap();
    drop(e);
    let got = std::fs::read(&img).unwrap();
    let want = std::fs::read(&exp).unwrap();
    assert_eq!(got.len() as u64, SIZE, "the image keeps its size");
    assert!(got == want, "image content differs from expected");
}

#[test]
fn direct_device_tail_reads_threads() {
    tail_reads("threads");
}

#[test]
fn direct_device_tail_reads_native() {
    tail_reads("native");
}

#[test]
fn direct_device_tail_writes_threads() {
    tail_writes("threads");
}

#[test]
fn direct_device_tail_writes_native() {
    tail_writes("native");
}
