//! `blkctl check` against `qemu-img check` on the same images, repairs,
//! and the repair of dirty images on a read-write open.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

fn qemu_check(img: &str) -> Value {
    qemu_img_check(img)
}

fn our_check(img: &str, extra: &[&str]) -> (i32, Value) {
    let out = std::process::Command::new(bin("blkctl"))
        .args(["--json", "check"])
        .args(extra)
        .arg(img)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("blkctl check: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

fn be(f: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).unwrap();
    u64::from_be_bytes(b)
}

/// Sets the 16-bit refcount of host cluster `c` (first refcount block only).
fn set_refcount(img: &str, c: u64, value: u16) {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let rt = be(&f, 48);
    let rb = be(&f, rt);
    f.write_all_at(&value.to_be_bytes(), rb + c * 2).unwrap();
}

fn image(dir: &TestDir, name: &str) -> String {
    let img = dir.file(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &img,
        "8M",
    ]);
    qemu_io(
        "qcow2",
        img.as_ref(),
        &[
            "write -P 1 0 200k",
            "write -c -P 2 1M 64k",
            "write -P 3 3M 4k",
            "write -z 5M 8k",
        ],
    );
    img
}

#[test]
fn check_matches_qemu_img_on_clean_leaky_and_corrupt_images() {
    let dir = TestDir::new("check");
    let clean = image(&dir, "clean.qcow2");
    qemu_img(&["snapshot", "-c", "s1", &clean]);
    qemu_io("qcow2", clean.as_ref(), &["write -P 4 8k 8k"]);
    let (code, ours) = our_check(&clean, &[]);
    assert_eq!(code, 0);
    assert_eq!(ours, qemu_check(&clean));

    // A leak: an extra cluster at the end with refcount 1 that nothing uses.
    let leaky = image(&dir, "leaky.qcow2");
    let len = std::fs::metadata(&leaky).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&leaky)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    set_refcount(&leaky, len / 4096, 1);
    let (code, ours) = our_check(&leaky, &[]);
    assert_eq!(code, 3, "{ours}");
    assert_eq!(ours["leaks"], 1);
    assert_eq!(ours, qemu_check(&leaky));
    let (code, fixed) = our_check(&leaky, &["--repair", "leaks"]);
    assert_eq!(code, 0, "{fixed}");
    assert_eq!(fixed["leaks-fixed"], 1);
    assert_eq!(qemu_check(&leaky).get("leaks"), None);

    // A corruption: a used data cluster with refcount 0.
    let corrupt = image(&dir, "corrupt.qcow2");
    let map: Vec<Value> =
        serde_json::from_str(&qemu_img(&["map", "--output=json", &corrupt])).unwrap();
    let data = map[0]["offset"].as_u64().unwrap();
    set_refcount(&corrupt, data / 4096, 0);
    let (code, ours) = our_check(&corrupt, &[]);
    assert_eq!(code, 2, "{ours}");
    assert_eq!(ours["corruptions"], qemu_check(&corrupt)["corruptions"]);
    let (code, fixed) = our_check(&corrupt, &["-r", "all"]);
    assert_eq!(code, 0, "{fixed}");
    let after = qemu_check(&corrupt);
    assert_eq!(after.get("corruptions"), None, "{after}");
    qemu_io(
        "qcow2",
        corrupt.as_ref(),
        &["read -P 1 0 200k", "read -P 2 1M 64k"],
    );
}

#[test]
fn a_dirty_image_is_repaired_when_opened_read_write() {
    let dir = TestDir::new("check-dirty");
    let img = image(&dir, "dirty.qcow2");
    // Lazy refcounts left stale: a leak, and the dirty bit set.
    let len = std::fs::metadata(&img).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    set_refcount(&img, len / 4096, 1);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let bits = be(&f, 72) | 1;
    f.write_all_at(&bits.to_be_bytes(), 72).unwrap();
    drop(f);
    let d = Daemon::start(
        &dir,
        &[
            json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": img}})
                .to_string(),
        ],
    );
    let info = d.qmp().ok("query-block", json!({}));
    assert_eq!(info[0]["inserted"]["image"]["dirty-flag"], false, "{info}");
    qemu_io_ro(
        "raw",
        &d.dev("d0"),
        &["read -P 1 0 200k", "read -P 2 1M 64k", "read -P 0 5M 8k"],
    );
    assert!(d.terminate().success());
    let after = qemu_check(&img);
    assert_eq!(after.get("leaks"), None, "{after}");
    assert_eq!(after.get("corruptions"), None, "{after}");
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", &img])).unwrap();
    assert_eq!(info["dirty-flag"], false, "dirty bit still set: {info}");
}

fn dirty_flag(img: &str) -> Value {
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", img])).unwrap();
    info["dirty-flag"].clone()
}

#[test]
fn lazy_refcounts_mark_dirty_and_are_rebuilt_on_close_or_reopen() {
    let dir = TestDir::new("check-lazy");
    let img = qcow2_image(
        &dir,
        "lazy.qcow2",
        "lazy_refcounts=on,cluster_size=4096",
        "16M",
    );
    let expected = raw_image(&dir, "expected.raw", "16M");
    let spec = json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": img}})
        .to_string();
    let write = |d: &Daemon, seed: u64| {
        let data = pattern(seed, 300_000);
        let off = seed * 1_000_003 % (15 << 20);
        let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
        f.write_all_at(&data, off).unwrap();
        f.sync_all().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&expected)
            .unwrap()
            .write_all_at(&data, off)
            .unwrap();
    };
    // Clean close: dirty while running, consistent afterwards.
    let d = Daemon::start(&dir, std::slice::from_ref(&spec));
    write(&d, 1);
    assert_eq!(
        dirty_flag(&img),
        true,
        "no dirty bit while lazy refcounts are in use"
    );
    assert!(d.terminate().success());
    assert_eq!(dirty_flag(&img), false);
    assert_eq!(qemu_check(&img).get("leaks"), None);
    assert_eq!(qemu_check(&img).get("corruptions"), None);
    // Crash: the next read-write open rebuilds the refcounts.
    let d = Daemon::start(&dir, std::slice::from_ref(&spec));
    write(&d, 2);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(d);
    assert_eq!(dirty_flag(&img), true);
    let d = Daemon::start(&dir, std::slice::from_ref(&spec));
    assert!(d.terminate().success());
    assert_eq!(dirty_flag(&img), false);
    let after = qemu_check(&img);
    assert_eq!(after.get("leaks"), None, "{after}");
    assert_eq!(after.get("corruptions"), None, "{after}");
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}
