//! Legacy AES encryption (qcow2 `encrypt.format=aes`, qcow v1) through the
//! mount: the key flow over QMP (`block_passwd`, `encrypted` /
//! `encryption_key_missing`), EACCES while the key is missing, and data
//! written by qemu-io read back (and the other way round), qemu-io being
//! the oracle for the cipher.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const PW: &str = "PASSWORD";
const SECRET: &str = "secret,id=sec0,data=PASSWORD";

/// `--image-opts` string of an encrypted image (key from the secret sec0).
fn image_opts(fmt: &str, file: &str) -> String {
    format!("driver={fmt},file.filename={file},encrypt.key-secret=sec0")
}

/// An encrypted image of `size` made by qemu-img (`extra` is more `-o`).
fn encrypted_image(dir: &TestDir, fmt: &str, name: &str, extra: &str, size: &str) -> String {
    let f = dir.file(name);
    let mut opts = "encrypt.format=aes,encrypt.key-secret=sec0".to_string();
    if !extra.is_empty() {
        opts = format!("{opts},{extra}");
    }
    qemu_img(&[
        "create", "-q", "-f", fmt, "--object", SECRET, "-o", &opts, &f, size,
    ]);
    f
}

/// qemu-io with the secret; fails the test on any I/O or pattern error.
fn qio(fmt: &str, file: &str, cmds: &[&str]) -> String {
    let opts = image_opts(fmt, file);
    let mut args = vec!["--object", SECRET, "--image-opts", opts.as_str()];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {cmds:?} on {file}: {out}"
    );
    out
}

/// qemu-img compare of the decrypted image with a raw file.
fn same_as_raw(fmt: &str, img: &str, raw: &str) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "--object", SECRET, "--image-opts"])
        .arg(image_opts(fmt, img))
        .arg(format!("driver=raw,file.filename={raw}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn spec(fmt: &str, id: &str, node: &str, file: &str) -> String {
    json!({"driver": fmt, "id": id, "node-name": node,
           "file": {"driver": "file", "filename": file}})
    .to_string()
}

fn inserted(q: &mut Qmp, id: &str) -> Value {
    let devs = q.ok("query-block", json!({}));
    devs.as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no device {id}: {devs}"))["inserted"]
        .clone()
}

fn read_dev(dev: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    File::open(dev)?.read_exact_at(&mut b, off)?;
    Ok(b)
}

/// The key flow: locked until block_passwd (by device or node name), then
/// qemu-io's data reads back; a wrong password reads garbage; the errors.
fn key_flow(fmt: &str) {
    let dir = TestDir::new(&format!("enc-key-{fmt}"));
    let a = encrypted_image(&dir, fmt, "a.img", "", "4M");
    let b = encrypted_image(&dir, fmt, "b.img", "", "4M");
    let plain = raw_image(&dir, "p.raw", "1M");
    qio(fmt, &a, &["write -P 0x5a 0 64k", "write -P 0xa5 1M 4k"]);
    qio(fmt, &b, &["write -P 0x3c 512 1k"]);
    let before = std::fs::read(&a).unwrap();
    let d = Daemon::start(
        &dir,
        &[
            spec(fmt, "d0", "n0", &a),
            spec(fmt, "d1", "n1", &b),
            raw_spec("d2", &plain, json!({})),
        ],
    );
    let mut q = d.qmp();
    for id in ["d0", "d1"] {
        let i = inserted(&mut q, id);
        assert_eq!(i["encrypted"], true, "{i}");
        assert_eq!(i["encryption_key_missing"], true, "{i}");
        assert_eq!(i["drv"], fmt);
        assert_eq!(i["image"]["encrypted"], true, "{i}");
    }
    let i = inserted(&mut q, "d2");
    assert_eq!(i["encrypted"], false);
    assert!(i["image"].get("encrypted").is_none(), "{i}");

    // Locked: reads and writes fail with EACCES and nothing reaches the image.
    let e = read_dev(&d.dev("d0"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    let e = f.write_all_at(&[1u8; 4096], 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 65536).unwrap_err();
    assert_eq!(e, libc::EACCES);
    drop(f);
    assert!(
        std::fs::read(&a).unwrap() == before,
        "a locked image changed"
    );

    // A wrong password: garbage, no crash; then the right one.
    q.ok("block_passwd", json!({"device": "d0", "password": "wrong"}));
    let got = read_dev(&d.dev("d0"), 0, 65536).unwrap();
    assert!(got.iter().any(|&x| x != 0x5a));
    q.ok("block_passwd", json!({"device": "d0", "password": PW}));
    assert_eq!(inserted(&mut q, "d0")["encryption_key_missing"], false);
    assert_eq!(read_dev(&d.dev("d0"), 0, 65536).unwrap(), vec![0x5a; 65536]);
    assert_eq!(
        read_dev(&d.dev("d0"), 1 << 20, 4096).unwrap(),
        vec![0xa5; 4096]
    );
    // Unaligned, across the end of the written data; unallocated reads as zeroes.
    let got = read_dev(&d.dev("d0"), 65536 - 100, 300).unwrap();
    assert_eq!(&got[..100], &[0x5a; 100][..]);
    assert_eq!(&got[100..], &[0u8; 200][..]);

    // By node name.
    assert!(read_dev(&d.dev("d1"), 0, 4096).is_err());
    q.ok("block_passwd", json!({"node-name": "n1", "password": PW}));
    let got = read_dev(&d.dev("d1"), 0, 4096).unwrap();
    assert_eq!(&got[..512], &[0u8; 512][..]);
    assert_eq!(&got[512..1536], &[0x3c; 1024][..]);
    assert_eq!(&got[1536..], &[0u8; 2560][..]);

    let (class, desc) = q.err("block_passwd", json!({"device": "d2", "password": PW}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("GenericError", "Device 'd2' is not encrypted")
    );
    let (class, _) = q.err("block_passwd", json!({"device": "nope", "password": PW}));
    assert_eq!(class, "DeviceNotFound");
    q.ok("quit", json!({}));
}

/// Writes through the mount (aligned, unaligned, allocating, partial
/// cluster, zeroes), then qemu-io with the same key sees exactly them.
fn writes_roundtrip(fmt: &str, backing: bool) {
    let dir = TestDir::new(&format!("enc-wr-{fmt}-{backing}"));
    let expected = dir.file("expected.raw");
    let img = if backing {
        let base = raw_image(&dir, "base.raw", "8M");
        let bf = OpenOptions::new().write(true).open(&base).unwrap();
        bf.write_all_at(&pattern(9, 8 << 20), 0).unwrap();
        drop(bf);
        std::fs::copy(&base, &expected).unwrap();
        encrypted_image(
            &dir,
            fmt,
            "top.img",
            &format!("backing_file={base},backing_fmt=raw"),
            "8M",
        )
    } else {
        raw_image(&dir, "expected.raw", "8M");
        let img = encrypted_image(&dir, fmt, "a.img", "", "8M");
        qio(fmt, &img, &["write -P 0x77 2M 128k"]);
        let e = OpenOptions::new().write(true).open(&expected).unwrap();
        e.write_all_at(&[0x77; 128 << 10], 2 << 20).unwrap();
        img
    };
    let d = Daemon::start(&dir, &[spec(fmt, "d0", "n0", &img)]);
    let mut q = d.qmp();
    q.ok("block_passwd", json!({"device": "d0", "password": PW}));
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (7, pattern(1, 1000)),                 // unaligned, allocating, partial cluster
        (65536 - 100, pattern(2, 300)),        // across a cluster boundary
        (5 << 16, pattern(3, 3 << 16)),        // whole clusters
        ((2 << 20) + 1000, pattern(4, 5000)),  // over existing data, unaligned
        ((2 << 20) + 65536, pattern(5, 8192)), // over existing data, aligned
        ((6 << 20) + 513, pattern(6, 70_000)), // fresh area, new tables
        (8, pattern(7, 100)),                  // again inside an allocated cluster
    ];
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    for (off, data) in &writes {
        f.write_all_at(data, *off).unwrap();
        e.write_all_at(data, *off).unwrap();
    }
    // Zeroes through fallocate, unaligned edges included.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, (3 << 20) + 100, 200_000).unwrap();
    e.write_all_at(&vec![0u8; 200_000], (3 << 20) + 100)
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    // The daemon's view first, then qemu's after quit.
    assert_eq!(
        std::fs::read(d.dev("d0")).unwrap(),
        std::fs::read(&expected).unwrap()
    );
    d.quit();
    assert!(same_as_raw(fmt, &img, &expected), "qemu reads other data");
    // Spot check with qemu-io's pattern reader too.
    qio(fmt, &img, &["read -P 0 3149824 64k"]); // inside the zeroed range
    if fmt == "qcow2" {
        let out = run(
            "qemu-img",
            &[
                "check",
                "--output=json",
                "--object",
                SECRET,
                "--image-opts",
                &image_opts(fmt, &img),
            ],
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["check-errors"], 0, "{v}");
        assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
        assert!(v.get("leaks").is_none_or(|c| c == 0), "{v}");
    }
}

#[test]
fn qcow2_key_flow() {
    key_flow("qcow2");
}

#[test]
fn qcow2_writes_roundtrip() {
    writes_roundtrip("qcow2", false);
}

#[test]
fn qcow2_writes_over_backing() {
    writes_roundtrip("qcow2", true);
}

#[test]
fn qcow2_luks_refused() {
    let dir = TestDir::new("enc-luks");
    let f = dir.file("l.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        SECRET,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &f,
        "1M",
    ]);
    let e = Daemon::start_with(&dir, &[spec("qcow2", "d0", "n0", &f)], &[])
        .err()
        .expect("a LUKS image opened");
    assert!(
        e.contains("LUKS-encrypted qcow2 images are not supported"),
        "{e}"
    );
}

#[test]
fn qcow_key_flow() {
    key_flow("qcow");
}

#[test]
fn qcow_writes_roundtrip() {
    writes_roundtrip("qcow", false);
}

#[test]
fn qcow_writes_over_backing() {
    writes_roundtrip("qcow", true);
}

/// Compressed clusters cannot be encrypted: an image claiming both is
/// refused where the compressed cluster is read, the rest stays readable.
fn compressed_in_encrypted(fmt: &str, crypt_method_at: u64) {
    let dir = TestDir::new(&format!("enc-compressed-{fmt}"));
    let img = dir.file("c.img");
    qemu_img(&["create", "-q", "-f", fmt, &img, "1M"]);
    let cs = if fmt == "qcow" { "4k" } else { "64k" };
    qemu_io(fmt, img.as_ref(), &[&format!("write -c -P 0x11 0 {cs}")]);
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&1u32.to_be_bytes(), crypt_method_at)
        .unwrap();
    drop(f);
    let d = Daemon::start(&dir, &[spec(fmt, "d0", "n0", &img)]);
    let mut q = d.qmp();
    q.ok("block_passwd", json!({"device": "d0", "password": PW}));
    let e = read_dev(&d.dev("d0"), 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        read_dev(&d.dev("d0"), 512 << 10, 4096).unwrap(),
        vec![0u8; 4096]
    );
    q.ok("quit", json!({}));
}

#[test]
fn compressed_in_encrypted_refused() {
    compressed_in_encrypted("qcow2", 32);
    compressed_in_encrypted("qcow", 36);
}

/// Unaligned writes from several threads at once, neighbours sharing
/// sectors and clusters (read-modify-write of encrypted sectors must not
/// lose a neighbour's bytes), then qemu reads exactly them.
fn concurrent_writes(fmt: &str) {
    let dir = TestDir::new(&format!("enc-conc-{fmt}"));
    let img = encrypted_image(&dir, fmt, "a.img", "", "4M");
    let expected = raw_image(&dir, "expected.raw", "4M");
    let d = Daemon::start(&dir, &[spec(fmt, "d0", "n0", &img)]);
    d.qmp()
        .ok("block_passwd", json!({"device": "d0", "password": PW}));
    let piece = |k: u64| (k * 5000 + 123, pattern(k, 4000 + (k as usize * 37) % 800));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = d.dev("d0");
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(dev).unwrap();
                for i in 0..40 {
                    let (off, data) = piece(i * 8 + t);
                    f.write_all_at(&data, off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    for k in 0..320 {
        let (off, data) = piece(k);
        e.write_all_at(&data, off).unwrap();
    }
    drop(e);
    assert_eq!(
        std::fs::read(d.dev("d0")).unwrap(),
        std::fs::read(&expected).unwrap()
    );
    d.quit();
    assert!(same_as_raw(fmt, &img, &expected));
}

#[test]
fn qcow2_concurrent_writes() {
    concurrent_writes("qcow2");
}

#[test]
fn qcow_concurrent_writes() {
    concurrent_writes("qcow");
}
