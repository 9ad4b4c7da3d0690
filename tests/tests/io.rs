//! Data path through the mount: qemu-io writes patterns that are read back
//! through the mount and the other way round, for both aio modes, buffered
//! and O_DIRECT, aligned and not.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

fn roundtrip(aio: &str, direct: bool) {
    let dir = TestDir::new(&format!("io-{aio}-{direct}"));
    let img = raw_image(&dir, "a.img", "64M");
    qemu_io(
        "raw",
        img.as_ref(),
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 32M 64k",
            "write -P 0x11 63M 1M",
        ],
    );
    let spec = json!({"driver": "raw", "id": "d0", "cache": {"direct": direct},
                      "file": {"driver": "file", "filename": img, "aio": aio}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let dev = d.dev("d0");
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 64 << 20);
    // What qemu-io wrote is what the mount shows.
    qemu_io(
        "raw",
        &dev,
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x5a 32M 64k",
            "read -P 0 33M 1M",
            "read -P 0x11 63M 1M",
        ],
    );

    // Unaligned writes and reads through the mount, with and without O_DIRECT on the client side.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
        .unwrap();
    let data = pattern(1, 10_000);
    f.write_all_at(&data, 12_345).unwrap();
    let mut back = vec![0u8; 10_000];
    f.read_exact_at(&mut back, 12_345).unwrap();
    assert_eq!(back, data);
    let fd = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&dev)
        .unwrap();
    let big = pattern(2, 3 << 20);
    fd.write_all_at(&big, 40 << 20).unwrap();
    fd.sync_all().unwrap();
    drop((f, fd));

    // The image itself, checked by the oracle against an expected copy.
    let expected = dir.file("expected.img");
    qemu_img(&["convert", "-U", "-f", "raw", "-O", "raw", &img, &expected]);
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    e.write_all_at(&data, 12_345).unwrap();
    e.write_all_at(&big, 40 << 20).unwrap();
    drop(e);
    assert!(
        images_identical(&dev, "raw", expected.as_ref(), "raw"),
        "mount differs from expected"
    );
    let status = d.terminate();
    assert!(status.success(), "daemon exit: {status}");
    assert!(
        images_identical(img.as_ref(), "raw", expected.as_ref(), "raw"),
        "image differs after shutdown"
    );
}

#[test]
fn roundtrip_threads_buffered() {
    roundtrip("threads", false);
}

#[test]
fn roundtrip_native_buffered() {
    roundtrip("native", false);
}

#[test]
fn roundtrip_threads_direct_unaligned() {
    roundtrip("threads", true);
}

#[test]
fn roundtrip_native_direct_unaligned() {
    roundtrip("native", true);
}

#[test]
fn reads_past_end_are_short_and_writes_past_end_fail() {
    let dir = TestDir::new("io-eof");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(f.read_at(&mut buf, (1 << 20) - 100).unwrap(), 100);
    assert_eq!(f.read_at(&mut buf, 1 << 20).unwrap(), 0);
    let e = f.write_at(&buf, (1 << 20) - 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        1 << 20,
        "image must not grow"
    );
}
