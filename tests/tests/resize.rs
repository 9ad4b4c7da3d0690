//! `block_resize` (raw and qcow2) and `change-backing-file` (qcow2) through
//! QMP, with the mount showing the new size at once and qemu-img/qemu-io as
//! the oracle for the images afterwards.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

const M: u64 = 1 << 20;

fn file_opts(file: &str) -> Value {
    json!({"driver": "file", "filename": file})
}

fn spec(driver: &str, id: &str, node: &str, file: &str) -> String {
    json!({"driver": driver, "id": id, "node-name": node, "file": file_opts(file)}).to_string()
}

fn dev_len(d: &Daemon, id: &str) -> u64 {
    std::fs::metadata(d.dev(id)).unwrap().len()
}

fn read_dev(d: &Daemon, id: &str, offset: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new().read(true).open(d.dev(id)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn write_dev(d: &Daemon, id: &str, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(d.dev(id)).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

fn resize(q: &mut Qmp, target: Value, size: u64) {
    let mut args = target;
    args["size"] = json!(size);
    q.ok("block_resize", args);
}

/// `qemu-img info --output=json` of an image, format probed.
fn info(img: &str) -> Value {
    let out = qemu_img(&["info", "--output=json", img]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info ({e}): {out}"))
}

/// `qemu-img check` must report no corruption and no leak.
fn assert_clean(img: &str) {
    let v = qemu_img_check(img);
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(
        v.get("corruptions").is_none_or(|c| c == 0),
        "corruptions: {v}"
    );
    assert!(v.get("leaks").is_none_or(|c| c == 0), "leaks: {v}");
}

/// A raw copy of `img` (any format) cut or extended to `size`.
fn expected_raw(dir: &TestDir, img: &str, name: &str, size: u64) -> String {
    let out = dir.file(name);
    qemu_img(&["convert", "-O", "raw", img, &out]);
    OpenOptions::new()
        .write(true)
        .open(&out)
        .unwrap()
        .set_len(size)
        .unwrap();
    out
}

#[test]
fn raw_grow_and_shrink() {
    let dir = TestDir::new("rs-raw");
    let img = raw_image(&dir, "a.raw", "1M");
    let data = pattern(1, M as usize);
    std::fs::write(&img, &data).unwrap();
    let d = Daemon::start(&dir, &[spec("raw", "d0", "n0", &img)]);
    let mut q = d.qmp();

    // Grow by device: the mount sees it at once, new space reads zero.
    resize(&mut q, json!({"device": "d0"}), 4 * M);
    assert_eq!(dev_len(&d, "d0"), 4 * M);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 * M);
    assert!(is_zero(&read_dev(&d, "d0", M, 3 * M as usize)));
    assert_eq!(read_dev(&d, "d0", 0, M as usize), data);
    let tail = pattern(2, 8192);
    write_dev(&d, "d0", 4 * M - 8192, &tail);
    assert_eq!(read_dev(&d, "d0", 4 * M - 8192, 8192), tail);
    let q_size = &q.ok("query-block", json!({}))[0]["inserted"]["image"]["virtual-size"];
    assert_eq!(q_size, 4 * M);

    // Shrink by node name: the data below the end stays.
    resize(&mut q, json!({"node-name": "n0"}), 512 * 1024);
    assert_eq!(dev_len(&d, "d0"), 512 * 1024);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 512 * 1024);
    assert_eq!(read_dev(&d, "d0", 0, 512 * 1024), data[..512 * 1024]);

    // Growing again shows zeroes where the cut data was.
    resize(&mut q, json!({"node-name": "n0"}), 2 * M);
    assert_eq!(dev_len(&d, "d0"), 2 * M);
    assert!(is_zero(&read_dev(&d, "d0", 512 * 1024, 1536 * 1024)));
    assert!(d.terminate().success());
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(on_disk.len() as u64, 2 * M);
    assert_eq!(on_disk[..512 * 1024], data[..512 * 1024]);
    assert!(is_zero(&on_disk[512 * 1024..]));
}

#[test]
fn resize_errors() {
    let dir = TestDir::new("rs-err");
    let a = raw_image(&dir, "a.raw", "1M");
    let b = raw_image(&dir, "b.raw", "1M");
    let snap = qcow2_image(&dir, "s.qcow2", "", "1M");
    qemu_img(&["snapshot", "-c", "s1", &snap]);
    let q2 = qcow2_image(&dir, "q.qcow2", "", "1M");
    let ro = json!({"driver": "raw", "id": "ro", "read-only": true, "file": file_opts(&b)});
    let d = Daemon::start(
        &dir,
        &[
            spec("raw", "d0", "n0", &a),
            ro.to_string(),
            spec("qcow2", "snap", "nsnap", &snap),
            spec("qcow2", "q", "nq", &q2),
        ],
    );
    let mut q = d.qmp();
    let generic = |(class, desc): (String, String), want: &str| {
        assert_eq!(class, "GenericError", "{desc}");
        assert!(desc.contains(want), "expected '{want}' in '{desc}'");
    };
    generic(
        q.err("block_resize", json!({"device": "d0", "size": -512})),
        "'size' expects a >0 size",
    );
    generic(
        q.err("block_resize", json!({"device": "ro", "size": 2 * M})),
        "Device 'ro' is read only",
    );
    generic(
        q.err(
            "block_resize",
            json!({"device": "d0", "node-name": "n0", "size": 2 * M}),
        ),
        "Only one of 'device' and 'node-name'",
    );
    generic(
        q.err("block_resize", json!({"size": 2 * M})),
        "Either 'device' or 'node-name' must be set",
    );
    let (class, _) = q.err("block_resize", json!({"device": "nope", "size": 2 * M}));
    assert_eq!(class, "DeviceNotFound");
    let (class, _) = q.err("block_resize", json!({"node-name": "nope", "size": 2 * M}));
    assert_eq!(class, "DeviceNotFound");
    generic(
        q.err("block_resize", json!({"device": "snap", "size": 2 * M})),
        "Can't resize an image which has snapshots",
    );
    generic(
        q.err("block_resize", json!({"device": "q", "size": 2 * M + 100})),
        "The new size must be a multiple of 512",
    );
    generic(
        q.err("block_resize", json!({"device": "q", "size": 1u64 << 60})),
        "Failed to grow the L1 table",
    );
    // Nothing changed.
    for (id, size) in [("d0", M), ("ro", M), ("snap", M), ("q", M)] {
        assert_eq!(dev_len(&d, id), size, "{id}");
    }
    assert!(d.terminate().success());
    assert_eq!(info(&snap)["virtual-size"], M);
    assert_clean(&snap);
    assert_clean(&q2);
}

/// 512 B clusters: 1 MiB needs 32 L1 entries, 1 GiB 32768, so the L1
/// table moves to a bigger place.
#[test]
fn qcow2_grow_needs_a_bigger_l1() {
    let dir = TestDir::new("rs-q2-grow");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=512", "1M");
    qemu_io(
        "qcow2",
        img.as_ref(),
        &["write -P 0xa1 0 64k", "write -P 0xb2 1020k 4k"],
    );
    let expected = expected_raw(&dir, &img, "expected.raw", 1 << 30);
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "n0", &img)]);
    let mut q = d.qmp();
    resize(&mut q, json!({"device": "d0"}), 1 << 30);
    assert_eq!(dev_len(&d, "d0"), 1 << 30);
    assert!(is_zero(&read_dev(&d, "d0", M, 64 * 1024)));
    assert!(is_zero(&read_dev(&d, "d0", (1 << 30) - 8192, 8192)));
    let writes = [
        ((1 << 30) - 4096, pattern(3, 4096)),
        (600 * M + 100, pattern(4, 70_000)),
        (M - 1000, pattern(5, 3000)),
    ];
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    for (off, data) in &writes {
        write_dev(&d, "d0", *off, data);
        e.write_all_at(data, *off).unwrap();
        assert_eq!(&read_dev(&d, "d0", *off, data.len()), data);
    }
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    assert!(d.terminate().success());
    assert_clean(&img);
    assert_eq!(info(&img)["virtual-size"], 1u64 << 30);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

#[test]
fn qcow2_shrink_then_grow() {
    let dir = TestDir::new("rs-q2-shrink");
    let img = qcow2_image(&dir, "a.qcow2", "", "64M");
    qemu_io(
        "qcow2",
        img.as_ref(),
        &[
            "write -P 0xa1 1M 1M",
            "write -P 0xb2 32M 64k",
            "write -P 0xc3 40M 2M",
            "write -z 50M 1M",
            "write -P 0xd4 63M 1M",
        ],
    );
    let cut = 32 * M + 512;
    // The oracle: qemu-img's own shrink of a copy.
    let oracle = dir.file("oracle.qcow2");
    std::fs::copy(&img, &oracle).unwrap();
    qemu_img(&["resize", "-q", "--shrink", &oracle, &cut.to_string()]);
    let before = std::fs::metadata(&img).unwrap().len();

    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "n0", &img)]);
    let mut q = d.qmp();
    resize(&mut q, json!({"node-name": "n0"}), cut);
    assert_eq!(dev_len(&d, "d0"), cut);
    assert_eq!(read_dev(&d, "d0", M, M as usize), vec![0xa1; M as usize]);
    assert_eq!(read_dev(&d, "d0", 32 * M, 512), vec![0xb2; 512]);
    assert!(d.terminate().success());
    assert_clean(&img);
    assert_eq!(info(&img)["virtual-size"], cut);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        oracle.as_ref(),
        "qcow2"
    ));
    // The freed clusters are reused, not appended after.
    assert!(std::fs::metadata(&img).unwrap().len() <= before);

    // Grown back: the cut part of the last kept cluster and everything
    // after it read as zeroes.
    let expected = expected_raw(&dir, &img, "expected.raw", 48 * M);
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "n0", &img)]);
    let mut q = d.qmp();
    resize(&mut q, json!({"device": "d0"}), 48 * M);
    assert_eq!(dev_len(&d, "d0"), 48 * M);
    assert!(is_zero(&read_dev(
        &d,
        "d0",
        cut,
        (64 * 1024 - 512) as usize
    )));
    assert!(is_zero(&read_dev(&d, "d0", 40 * M, 2 * M as usize)));
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    assert!(d.terminate().success());
    assert_clean(&img);
    assert_eq!(info(&img)["virtual-size"], 48 * M);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

/// A backing file longer than the image: the grown part must not show it.
fn grow_over_longer_backing(compat: &str) {
    let dir = TestDir::new(&format!("rs-q2-backing-{compat}"));
    let base = raw_image(&dir, "base.raw", "4M");
    qemu_io("raw", base.as_ref(), &["write -P 0x11 0 4M"]);
    let top = dir.file("top.qcow2");
    let old = M + 512;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("compat={compat}"),
        "-b",
        &base,
        "-F",
        "raw",
        &top,
        &old.to_string(),
    ]);
    qemu_io("qcow2", top.as_ref(), &["write -P 0x22 64k 64k"]);
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "n0", &top)]);
    let mut q = d.qmp();
    resize(&mut q, json!({"device": "d0"}), 6 * M);
    assert_eq!(dev_len(&d, "d0"), 6 * M);
    assert_eq!(read_dev(&d, "d0", 0, 4096), vec![0x11; 4096]);
    assert_eq!(read_dev(&d, "d0", old - 512, 512), vec![0x11; 512]);
    assert!(is_zero(&read_dev(&d, "d0", old, (6 * M - old) as usize)));
    assert!(d.terminate().success());
    assert_clean(&top);
    assert_eq!(info(&top)["virtual-size"], 6 * M);
    let zeroes = format!("read -P 0 {old} {}", 6 * M - old);
    qemu_io_ro(
        "qcow2",
        top.as_ref(),
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 64k 64k",
            &format!("read -P 0x11 128k {}", old - 128 * 1024),
            &zeroes,
        ],
    );
}

#[test]
fn qcow2_grow_over_longer_backing_v3() {
    grow_over_longer_backing("1.1");
}

#[test]
fn qcow2_grow_over_longer_backing_v2() {
    grow_over_longer_backing("0.10");
}

/// base <- mid <- top, all qcow2, absolute backing names.
fn chain(dir: &TestDir) -> (String, String, String) {
    let base = qcow2_image(dir, "base.qcow2", "", "4M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x31 0 4M"]);
    let mid = dir.file("mid.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid, "4M",
    ]);
    qemu_io("qcow2", mid.as_ref(), &["write -P 0x32 1M 1M"]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top, "4M",
    ]);
    qemu_io("qcow2", top.as_ref(), &["write -P 0x33 3M 64k"]);
    (base, mid, top)
}

fn chain_spec(top: &str, mid: &str, base: &str) -> String {
    json!({"driver": "qcow2", "id": "d0", "node-name": "top", "file": file_opts(top),
        "backing": {"driver": "qcow2", "node-name": "mid", "file": file_opts(mid),
            "backing": {"driver": "qcow2", "node-name": "base", "file": file_opts(base)}}})
    .to_string()
}

#[test]
fn change_backing_file_of_a_read_only_backing_image() {
    let dir = TestDir::new("rs-cbf");
    let (base, mid, top) = chain(&dir);
    let expected = expected_raw(&dir, &top, "expected.raw", 4 * M);
    let d = Daemon::start(&dir, &[chain_spec(&top, &mid, &base)]);
    let mut q = d.qmp();
    q.ok(
        "change-backing-file",
        json!({"device": "d0", "image-node-name": "mid", "backing-file": "base.qcow2"}),
    );
    let info_mid = &q.ok("query-block", json!({}))[0]["inserted"]["image"]["backing-image"];
    assert_eq!(info_mid["backing-filename"], "base.qcow2", "{info_mid}");
    assert_eq!(info_mid["backing-filename-format"], "qcow2", "{info_mid}");
    // The image keeps working while its chain's names change.
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    q.ok("quit", json!({}));
    let mut d = d;
    assert!(d.wait(std::time::Duration::from_secs(20)).success());

    let i = info(&mid);
    assert_eq!(i["backing-filename"], "base.qcow2", "{i}");
    assert_eq!(i["backing-filename-format"], "qcow2", "{i}");
    assert_clean(&mid);
    assert_clean(&top);
    // The relative name resolves against mid's directory: the chain reads the same.
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
    // And blkfs opens the chain from the rewritten header too.
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "top", &top)]);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    assert!(d.terminate().success());
}

#[test]
fn change_backing_file_through_a_symlink_on_a_writable_image() {
    let dir = TestDir::new("rs-cbf-link");
    let (base, mid, top) = chain(&dir);
    let link = dir.file("link-to-mid.qcow2");
    std::os::unix::fs::symlink(&mid, &link).unwrap();
    let expected = expected_raw(&dir, &top, "expected.raw", 4 * M);
    let d = Daemon::start(&dir, &[chain_spec(&top, &mid, &base)]);
    let mut q = d.qmp();
    // The device's own image (writable node) gets the new name of its backing file.
    q.ok(
        "change-backing-file",
        json!({"device": "d0", "image-node-name": "top", "backing-file": &link}),
    );
    assert_eq!(
        q.ok("query-block", json!({}))[0]["inserted"]["backing_file"],
        json!(link)
    );
    write_dev(&d, "d0", 0, &pattern(9, 4096));
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    e.write_all_at(&pattern(9, 4096), 0).unwrap();
    assert!(d.terminate().success());
    let i = info(&top);
    assert_eq!(i["backing-filename"], json!(link), "{i}");
    assert_eq!(i["backing-filename-format"], "qcow2", "{i}");
    assert_clean(&top);
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

#[test]
fn change_backing_file_errors() {
    let dir = TestDir::new("rs-cbf-err");
    let (base, mid, top) = chain(&dir);
    let other_base = raw_image(&dir, "other-base.raw", "1M");
    let other = dir.file("other.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &other_base,
        "-F",
        "raw",
        &other,
        "1M",
    ]);
    let d = Daemon::start(
        &dir,
        &[
            chain_spec(&top, &mid, &base),
            spec("qcow2", "d1", "other", &other),
        ],
    );
    let mut q = d.qmp();
    let mut cbf = |node: &str, name: &str| {
        q.err(
            "change-backing-file",
            json!({"device": "d0", "image-node-name": node, "backing-file": name}),
        )
    };
    let cases = [
        ("base", "x", "without a backing file"),
        ("other", "x", "not in the same chain"),
        ("nope", "x", "image file not found"),
        ("mid", "a\u{0}b", "NUL"),
        ("mid", &"n".repeat(1024), "at most 1023"),
    ];
    for (node, name, want) in cases {
        let (class, desc) = cbf(node, name);
        assert_eq!(class, "GenericError", "{desc}");
        assert!(desc.contains(want), "expected '{want}' in '{desc}'");
    }
    assert!(d.terminate().success());
    // Nothing was rewritten.
    assert_eq!(info(&mid)["backing-filename"], json!(base));
    assert_eq!(info(&top)["backing-filename"], json!(mid));
    assert_eq!(info(&other)["backing-filename"], json!(other_base));
}

/// A version 2 image: extensions start right after the 72-byte header.
#[test]
fn change_backing_file_of_a_v2_image() {
    let dir = TestDir::new("rs-cbf-v2");
    let base = raw_image(&dir, "base.raw", "2M");
    qemu_io("raw", base.as_ref(), &["write -P 0x41 0 2M"]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        &base,
        "-F",
        "raw",
        &top,
        "2M",
    ]);
    qemu_io("qcow2", top.as_ref(), &["write -P 0x42 512k 512k"]);
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "top", &top)]);
    let mut q = d.qmp();
    q.ok(
        "change-backing-file",
        json!({"device": "d0", "image-node-name": "top", "backing-file": "base.raw"}),
    );
    let inserted = &q.ok("query-block", json!({}))[0]["inserted"];
    assert_eq!(inserted["backing_file"], "base.raw", "{inserted}");
    assert_eq!(
        inserted["image"]["backing-filename"], "base.raw",
        "{inserted}"
    );
    assert!(d.terminate().success());
    let i = info(&top);
    assert_eq!(i["backing-filename"], "base.raw", "{i}");
    assert_eq!(i["backing-filename-format"], "raw", "{i}");
    assert_eq!(i["format-specific"]["data"]["compat"], "0.10", "{i}");
    assert_clean(&top);
    qemu_io_ro(
        "qcow2",
        top.as_ref(),
        &[
            "read -P 0x41 0 512k",
            "read -P 0x42 512k 512k",
            "read -P 0x41 1M 1M",
        ],
    );
}

/// Grow, write at both ends, shrink through the middle of the writes: with
/// a refcount table that must grow, lazy refcounts, O_DIRECT, version 2.
/// Returns the image's refcount_table_clusters afterwards.
fn grow_write_shrink(name: &str, opts: &str, direct: bool, big: u64) -> u32 {
    let dir = TestDir::new(name);
    let img = qcow2_image(&dir, "a.qcow2", opts, "1M");
    qemu_io(
        "qcow2",
        img.as_ref(),
        &["write -P 0xa1 0 64k", "write -P 0xb2 1020k 4k"],
    );
    let small = big / 2 + 65536;
    let expected = expected_raw(&dir, &img, "expected.raw", big);
    let spec = json!({"driver": "qcow2", "id": "d0", "cache": {"direct": direct},
        "file": file_opts(&img)})
    .to_string();
    let d = Daemon::start(&dir, &[spec]);
    let mut q = d.qmp();
    resize(&mut q, json!({"device": "d0"}), big);
    assert_eq!(dev_len(&d, "d0"), big);
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    for (off, data) in [
        (big - 4096, pattern(1, 4096)),
        (big / 2 + 100, pattern(2, 70_000)),
    ] {
        write_dev(&d, "d0", off, &data);
        e.write_all_at(&data, off).unwrap();
    }
    resize(&mut q, json!({"device": "d0"}), small);
    e.set_len(small).unwrap();
    assert_eq!(dev_len(&d, "d0"), small);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    assert!(d.terminate().success());
    assert_clean(&img);
    assert_eq!(info(&img)["virtual-size"], small);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
    let head = std::fs::read(&img).unwrap();
    u32::from_be_bytes(head[56..60].try_into().unwrap())
}

#[test]
fn qcow2_resize_growing_the_refcount_table() {
    // 64 refcounts per 512 B block, 64 blocks per one-cluster table: the
    // 2 MiB L1 table of 8 GiB lies past what that table covers.
    let rt = grow_write_shrink(
        "rs-q2-rt",
        "cluster_size=512,refcount_bits=64",
        false,
        8 << 30,
    );
    assert!(rt > 1, "the refcount table did not grow");
}

#[test]
fn qcow2_resize_lazy_refcounts_direct() {
    grow_write_shrink(
        "rs-q2-lazy",
        "cluster_size=4096,lazy_refcounts=on",
        true,
        256 * M,
    );
}

#[test]
fn qcow2_resize_v2_direct() {
    grow_write_shrink("rs-q2-v2", "compat=0.10", true, 4 << 30);
}

/// A resize is on disk once acknowledged: after kill -9 the image has the
/// new size, no corruption, and its data.
#[test]
fn qcow2_resize_survives_kill() {
    let dir = TestDir::new("rs-q2-kill");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=512", "1M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0xa1 0 1M"]);
    let spec = spec("qcow2", "d0", "n0", &img);
    for (size, keep) in [(1u64 << 30, M), (512 * 1024, 512 * 1024)] {
        let d = Daemon::start(&dir, std::slice::from_ref(&spec));
        resize(&mut d.qmp(), json!({"device": "d0"}), size);
        drop(d); // SIGKILL, no flush, no close
        let v = qemu_img_check(&img);
        assert_eq!(v["check-errors"], 0, "{v}");
        assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
        assert_eq!(info(&img)["virtual-size"], size);
        qemu_io_ro("qcow2", img.as_ref(), &[&format!("read -P 0xa1 0 {keep}")]);
    }
}

/// Detaches a loop device on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn block_device_size_is_fixed() {
    let dir = TestDir::new("rs-blk");
    let img = raw_image(&dir, "a.raw", "1M");
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", &img])
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: no loop device ({})",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let spec = json!({"driver": "raw", "id": "d0",
        "file": {"driver": "host_device", "filename": &dev.0}})
    .to_string();
    let d = Daemon::start(&dir, &[spec]);
    let mut q = d.qmp();
    for size in [2 * M, 512 * 1024] {
        let (class, desc) = q.err("block_resize", json!({"device": "d0", "size": size}));
        assert_eq!(class, "GenericError");
        assert!(desc.contains("Cannot grow/shrink a block device"), "{desc}");
    }
    // The size it has already is accepted.
    resize(&mut q, json!({"device": "d0"}), M);
    assert_eq!(dev_len(&d, "d0"), M);
    assert!(d.terminate().success());
    assert_eq!(std::fs::metadata(&img).unwrap().len(), M);
}

/// Growing (and moving the L1 table) while a writer allocates L2 tables
/// below the old end: no write is lost.
#[test]
fn qcow2_grow_while_writing() {
    let dir = TestDir::new("rs-q2-busy");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=512", "1M");
    let expected = raw_image(&dir, "expected.raw", "1M");
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", "n0", &img)]);
    let dev = d.dev("d0");
    let exp = expected.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let f = OpenOptions::new().write(true).open(&dev).unwrap();
        let e = OpenOptions::new().write(true).open(&exp).unwrap();
        let mut seed = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            seed += 1;
            // A new L2 table (32 KiB of guest space each) every few writes.
            let off = seed * 37 * 4096 % (M - 4096);
            let data = pattern(seed, 4096);
            f.write_all_at(&data, off).unwrap();
            e.write_all_at(&data, off).unwrap();
        }
        seed
    });
    let mut q = d.qmp();
    // Every step needs 16 more L1 entries: the table moves each time.
    for step in 1..=126 {
        resize(&mut q, json!({"device": "d0"}), M + step * 512 * 1024);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{writes} writes while resizing");
    assert!(writes > 0);
    OpenOptions::new()
        .write(true)
        .open(&expected)
        .unwrap()
        .set_len(64 * M)
        .unwrap();
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        expected.as_ref(),
        "raw"
    ));
    assert!(d.terminate().success());
    assert_clean(&img);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

#[test]
fn resizing_the_file_node_below_a_raw_device_resizes_the_device() {
    let dir = TestDir::new("rs-filenode");
    let img = raw_image(&dir, "a.img", "1M");
    let spec = json!({"driver": "raw", "id": "d0",
                      "file": {"driver": "file", "node-name": "f0", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    write_dev(&d, "d0", 0, &pattern(9, 4096));
    resize(&mut q, json!({"node-name": "f0"}), 3 * M);
    assert_eq!(dev_len(&d, "d0"), 3 * M);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 3 * M);
    write_dev(&d, "d0", 3 * M - 4096, &pattern(10, 4096));
    assert_eq!(read_dev(&d, "d0", 0, 4096), pattern(9, 4096));
    assert!(is_zero(&read_dev(&d, "d0", M, 4096)));
    assert_eq!(read_dev(&d, "d0", 3 * M - 4096, 4096), pattern(10, 4096));
}
