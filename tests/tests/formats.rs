//! The block-mapped formats through the mount, qemu-img as the oracle: for
//! each format and subformat, qemu-img converts data with holes into it,
//! the mount reads it back byte for byte, writes through the mount are
//! what qemu-img reads after the daemon quits (`qemu-img compare`, and
//! `qemu-img check` where qemu has one), and images `blkctl create` makes
//! are ones qemu-img accepts.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// One format case: driver, `qemu-img convert -o` options, whether blkfs
/// writes it, whether `qemu-img check` knows the format.
struct Case {
    format: &'static str,
    options: &'static str,
    writable: bool,
    check: bool,
    /// `blkctl create` makes it too.
    create: bool,
}

/// Formats whose allocation map qemu-img does not know (it says data
/// everywhere): blkfs's map is checked against the data instead.
const NO_QEMU_MAP: &[&str] = &["vhdx"];

const CASES: &[Case] = &[
    Case {
        format: "vdi",
        options: "",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vdi",
        options: "static=on",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vpc",
        options: "",
        writable: true,
        check: false,
        create: true,
    },
    Case {
        format: "vpc",
        options: "subformat=fixed",
        writable: true,
        check: false,
        create: true,
    },
    Case {
        format: "parallels",
        options: "",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "parallels",
        options: "cluster_size=64K",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "qed",
        options: "",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "qed",
        options: "cluster_size=4K",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vmdk",
        options: "",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vmdk",
        options: "subformat=twoGbMaxExtentSparse",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vmdk",
        options: "subformat=monolithicFlat",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vmdk",
        options: "subformat=twoGbMaxExtentFlat",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vmdk",
        options: "subformat=streamOptimized",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vhdx",
        options: "block_size=1M",
        writable: true,
        check: true,
        create: true,
    },
    Case {
        format: "vhdx",
        options: "subformat=fixed,block_state_zero=off,block_size=1M",
        writable: true,
        check: true,
        create: true,
    },
];

const SIZE: u64 = 9 << 20;

fn spec(format: &str, id: &str, file: &str, read_only: bool) -> String {
    json!({"driver": format, "id": id, "read-only": read_only,
        "file": {"driver": "file", "filename": file}})
    .to_string()
}

/// A raw image of SIZE (not a whole number of MiB blocks at the end)
/// holding data in some places, holes between, and a zero run.
fn source(dir: &TestDir) -> String {
    let f = dir.file("src.raw");
    let size = SIZE + 12 * 1024;
    let file = std::fs::File::create(&f).unwrap();
    file.set_len(size).unwrap();
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (1 << 20, 300_000),
        ((3 << 20) - 1000, 70_000),
        ((6 << 20) + 12_345, 1 << 20),
        (size - 5000, 5000),
    ]
    .into_iter()
    .enumerate()
    {
        file.write_all_at(&pattern(i as u64 + 1, len), off).unwrap();
    }
    f
}

fn convert(dir: &TestDir, src: &str, c: &Case, name: &str) -> String {
    let img = dir.file(name);
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", c.format];
    if !c.options.is_empty() {
        args.extend(["-o", c.options]);
    }
    args.extend([src, img.as_str()]);
    qemu_img(&args);
    img
}

/// Writes of every shape through the mount and into `expected`.
fn write_patterns(dev: &Path, expected: &str, size: u64) {
    let f = OpenOptions::new().write(true).open(dev).unwrap();
    let e = OpenOptions::new().write(true).open(expected).unwrap();
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (7, pattern(11, 1000)),                      // unaligned, in data
        ((1 << 20) - 100, pattern(12, 300)),         // across a block boundary
        ((2 << 20) + 4096, pattern(13, 8192)),       // into a hole: allocates
        (5 << 20, pattern(14, 1 << 20)),             // a whole block
        ((7 << 20) + 513, pattern(15, 70_000)),      // over data, unaligned
        (size - 3000, pattern(16, 3000)),            // the partial last block
        ((4 << 20) + 100_000, pattern(17, 200_000)), // another hole
    ];
    for (off, data) in &writes {
        f.write_all_at(data, *off).unwrap();
        e.write_all_at(data, *off).unwrap();
    }
    // Zeroes over data and over a hole.
    let (zoff, zlen) = ((1 << 20) + 1000, (3 << 20) as u64);
    let r = unsafe_fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, zoff, zlen);
    assert_eq!(r, 0, "zero range through the mount");
    e.write_all_at(&vec![0u8; zlen as usize], zoff).unwrap();
    f.sync_all().unwrap();
}

fn unsafe_fallocate(f: &std::fs::File, mode: i32, off: u64, len: u64) -> i32 {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

/// Device d0 of `d` reads as `src`, takes [`write_patterns`] (mirrored
/// into `expected`), and reads as `expected` after them.
fn reads_then_takes_writes(d: &Daemon, src: &str, expected: &str, size: u64) {
    assert!(images_identical(&d.dev("d0"), "raw", Path::new(src), "raw"));
    write_patterns(&d.dev("d0"), expected, size);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(expected),
        "raw"
    ));
}

/// qemu-img reads `img` as `expected` (raw) holds, and checks it clean.
fn assert_qemu_reads(img: &str, c: &Case, expected: &str) {
    assert!(
        images_identical(Path::new(img), c.format, Path::new(expected), "raw"),
        "{} {}: qemu-img reads other data than was written",
        c.format,
        c.options
    );
    check_image(img, c);
}

fn check_image(img: &str, c: &Case) {
    if c.check {
        assert_no_corruption(img);
    }
}

/// `qemu-img info` of an image of case `c` (named: vpc's fixed images
/// are not probed).
fn qemu_img_info_of(img: &str, c: &Case) -> Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "-U",
        "--output=json",
        "-f",
        c.format,
        img,
    ]))
    .unwrap()
}

#[test]
fn every_format_reads_what_qemu_img_wrote_and_writes_what_it_reads() {
    let dir = TestDir::new("formats-matrix");
    let src = source(&dir);
    let size = std::fs::metadata(&src).unwrap().len();
    for (i, c) in CASES.iter().enumerate() {
        let img = convert(&dir, &src, c, &format!("img{i}.{}", c.format));
        let expected = dir.file(&format!("expected{i}.raw"));
        std::fs::copy(&src, &expected).unwrap();
        let d = Daemon::start(&dir, &[spec(c.format, "d0", &img, !c.writable)]);
        let got = std::fs::read(d.dev("d0")).unwrap();
        let want = std::fs::read(&src).unwrap();
        // Some formats round the size up (vpc: to CHS geometry).
        let virtual_size = qemu_img_info_of(&img, c)["virtual-size"].as_u64().unwrap();
        assert_eq!(
            got.len() as u64,
            virtual_size,
            "{} {}: size",
            c.format,
            c.options
        );
        assert!(
            got[..want.len()] == want[..],
            "{} {}: the mount reads other data",
            c.format,
            c.options
        );
        assert!(
            got[want.len()..].iter().all(|&b| b == 0),
            "{} {}: the tail",
            c.format,
            c.options
        );
        if c.writable {
            write_patterns(&d.dev("d0"), &expected, size);
            assert!(
                images_identical(&d.dev("d0"), "raw", Path::new(&expected), "raw"),
                "{} {}: the mount reads other data than was written",
                c.format,
                c.options
            );
        }
        d.quit();
        assert_qemu_reads(&img, c, &expected);
    }
}

#[test]
fn images_blkctl_creates_are_what_qemu_img_expects() {
    let dir = TestDir::new("formats-create");
    let sock = dir.join("none.sock");
    for (i, c) in CASES.iter().filter(|c| c.create).enumerate() {
        let img = dir.file(&format!("new{i}.{}", c.format));
        let mut args = vec!["create", "-f", c.format];
        if !c.options.is_empty() {
            args.extend(["-o", c.options]);
        }
        args.extend([img.as_str(), "9228K"]);
        let (code, _, err) = blkctl(&sock, &args);
        assert_eq!(code, 0, "blkctl create {} {}: {err}", c.format, c.options);
        let info = qemu_img_info_of(&img, c);
        assert_eq!(info["format"], c.format);
        // The size qemu-img gives the same request.
        let reference = dir.file(&format!("ref{i}.{}", c.format));
        let mut qargs = vec!["create", "-q", "-f", c.format];
        if !c.options.is_empty() {
            qargs.extend(["-o", c.options]);
        }
        qargs.extend([reference.as_str(), "9228K"]);
        qemu_img(&qargs);
        let size = qemu_img_info_of(&reference, c)["virtual-size"]
            .as_u64()
            .unwrap();
        assert_eq!(info["virtual-size"], size, "{info}");
        check_image(&img, c);
        // Reads as zeroes, and takes writes qemu-img then reads.
        let expected = dir.file(&format!("new{i}.raw"));
        std::fs::File::create(&expected)
            .unwrap()
            .set_len(size)
            .unwrap();
        let d = Daemon::start(&dir, &[spec(c.format, "d0", &img, false)]);
        let got = std::fs::read(d.dev("d0")).unwrap();
        assert!(
            got.iter().all(|&b| b == 0),
            "{}: a new image reads as zeroes",
            c.format
        );
        write_patterns(&d.dev("d0"), &expected, size);
        d.quit();
        assert_qemu_reads(&img, c, &expected);
    }
}

#[test]
fn the_allocation_map_matches_qemu_img_map() {
    let dir = TestDir::new("formats-map");
    let src = source(&dir);
    let sock = dir.join("none.sock");
    for (i, c) in CASES.iter().enumerate() {
        let img = convert(&dir, &src, c, &format!("img{i}.{}", c.format));
        let (code, ours, err) = blkctl(&sock, &["map", "--json", "-f", c.format, &img]);
        assert_eq!(code, 0, "blkctl map: {err}");
        let ours: Value = serde_json::from_str(&ours).unwrap();
        if NO_QEMU_MAP.contains(&c.format) {
            // What the map calls zero or absent reads as zeroes, and the
            // data of the source is all inside what it calls data.
            let data = std::fs::read(&src).unwrap();
            let mut covered = 0;
            for e in ours.as_array().unwrap() {
                let (start, len) = (
                    e["start"].as_u64().unwrap() as usize,
                    e["length"].as_u64().unwrap() as usize,
                );
                let end = (start + len).min(data.len());
                if e["zero"] == true || e["data"] == false {
                    assert!(
                        data[start.min(end)..end].iter().all(|&b| b == 0),
                        "{}: {e}",
                        c.format
                    );
                } else {
                    covered += end.saturating_sub(start);
                }
            }
            let nonzero = data.iter().filter(|&&b| b != 0).count();
            assert!(covered >= nonzero, "{}: {covered} bytes of data", c.format);
            // A dynamic image of 1 MiB blocks has holes where the source has.
            if !c.options.contains("fixed") {
                assert!(covered < data.len(), "{}: no holes in the map", c.format);
            }
            continue;
        }
        let theirs: Value =
            serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", c.format, &img]))
                .unwrap();
        let strip = |v: &Value| -> Vec<(u64, u64, bool, bool)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["start"].as_u64().unwrap(),
                        e["length"].as_u64().unwrap(),
                        e["data"].as_bool().unwrap(),
                        e["zero"].as_bool().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(strip(&ours), strip(&theirs), "{} {}", c.format, c.options);
    }
}

#[test]
fn corrupt_headers_fail_to_open_with_a_clear_error() {
    let dir = TestDir::new("formats-corrupt");
    let src = source(&dir);
    for (i, c) in CASES.iter().enumerate() {
        let img = convert(&dir, &src, c, &format!("img{i}.{}", c.format));
        // Every format's magic or header fields are in these bytes or in
        // the last sector (vpc's fixed images).
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0xff; 12], 4).unwrap();
        f.write_all_at(&[0xff; 96], 0x40).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(&[0xff; 96], len - 512).unwrap();
        drop(f);
        let d = Daemon::start(&dir, &[]);
        let mut q = d.qmp();
        let args: Value = serde_json::from_str(&spec(c.format, "d1", &img, true)).unwrap();
        let (class, desc) = q.err("blockdev-add", args);
        assert_eq!(class, "GenericError");
        assert!(
            desc.contains(&img),
            "{}: the error names the image: {desc}",
            c.format
        );
        q.ok("query-block", json!({}));
    }
}

#[test]
fn qed_over_a_backing_file_copies_on_write() {
    let dir = TestDir::new("formats-qed-backing");
    let src = source(&dir);
    let size = std::fs::metadata(&src).unwrap().len();
    let size_arg = size.to_string();
    // A qcow2 base: QED records no format for it, so it is probed.
    let base_qcow2 = dir.file("base.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &src,
        &base_qcow2,
    ]);
    for (fmt, opts, base, base_fmt) in [
        ("qed", "", &src, "raw"),
        ("qed", "cluster_size=4K", &src, "raw"),
        ("qed", "", &base_qcow2, "qcow2"),
    ] {
        let top = dir.file("top.qed");
        let mut args = vec![
            "create",
            "-q",
            "-f",
            fmt,
            "-b",
            base.as_str(),
            "-F",
            base_fmt,
        ];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([top.as_str(), size_arg.as_str()]);
        qemu_img(&args);
        let expected = dir.file("expected.raw");
        std::fs::copy(&src, &expected).unwrap();
        let d = Daemon::start(&dir, &[spec(fmt, "d0", &top, false)]);
        reads_then_takes_writes(&d, &src, &expected, size);
        d.quit();
        assert!(
            images_identical(Path::new(&top), fmt, Path::new(&expected), "raw"),
            "{fmt} {opts}: qemu-img reads other data than was written"
        );
        assert_no_corruption(&top);
        // The backing file is untouched.
        let base = std::fs::read(&src).unwrap();
        assert_eq!(base.len() as u64, size);
        std::fs::remove_file(&top).unwrap();
    }
}

/// uml_mkcow (Debian's uml-utilities) over a copy of the source.
fn uml_mkcow(dir: &TestDir, base: &str, name: &str) -> String {
    let cow = dir.file(name);
    run("uml_mkcow", &[&cow, base]);
    cow
}

#[test]
fn uml_cow_images_read_write_and_keep_the_backing_file() {
    let dir = TestDir::new("formats-cow");
    let src = source(&dir);
    let size = std::fs::metadata(&src).unwrap().len();
    let base = dir.file("base.raw");
    std::fs::copy(&src, &base).unwrap();
    let cow = uml_mkcow(&dir, &base, "top.cow");
    let expected = dir.file("expected.raw");
    std::fs::copy(&src, &expected).unwrap();
    let d = Daemon::start(&dir, &[spec("cow", "d0", &cow, false)]);
    reads_then_takes_writes(&d, &src, &expected, size);
    d.quit();
    // The bitmap on disk: the sectors written are this file's.
    let img = std::fs::read(&cow).unwrap();
    let bit = |s: usize| img[8192 + s / 8] >> (s % 8) & 1 == 1;
    assert!(bit(0) && bit((5 << 20) / 512) && !bit((8 << 20) / 512));
    let data_at = 8192 + (size as usize / 512).div_ceil(8);
    let data_at = data_at.next_multiple_of(4096);
    let written = pattern(14, 1 << 20);
    assert_eq!(&img[data_at + (5 << 20)..data_at + (6 << 20)], &written[..]);
    // Another daemon reads what was written; the backing file is as it was.
    let d = Daemon::start(&dir, &[spec("cow", "d0", &cow, true)]);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(&expected),
        "raw"
    ));
    d.quit();
    assert!(images_identical(
        Path::new(&base),
        "raw",
        Path::new(&src),
        "raw"
    ));
}

#[test]
fn blkctl_creates_cow_images_as_uml_mkcow_does() {
    let dir = TestDir::new("formats-cow-create");
    let base = source(&dir);
    let theirs = uml_mkcow(&dir, &base, "theirs.cow");
    let ours = dir.file("ours.cow");
    let (code, _, err) = blkctl(
        &dir.join("none.sock"),
        &["create", "-f", "cow", "-b", &base, &ours],
    );
    assert_eq!(code, 0, "{err}");
    let (a, b) = (
        std::fs::read(&theirs).unwrap(),
        std::fs::read(&ours).unwrap(),
    );
    assert_eq!(a.len(), b.len(), "file length");
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first, None, "blkctl's COW image differs from uml_mkcow's");
}

#[test]
fn qed_grows_and_changes_its_backing_name_others_refuse_as_qemu() {
    let dir = TestDir::new("formats-resize");
    let base = dir.file("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let top = dir.file("top.qed");
    qemu_img(&[
        "create", "-q", "-f", "qed", "-b", &base, "-F", "raw", &top, "4M",
    ]);
    let vdi = dir.file("a.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", &vdi, "4M"]);
    let mut top_spec: Value = serde_json::from_str(&spec("qed", "q", &top, false)).unwrap();
    top_spec["node-name"] = json!("qtop");
    let d = Daemon::start(&dir, &[top_spec.to_string(), spec("vdi", "v", &vdi, false)]);
    let mut q = d.qmp();
    q.ok("block_resize", json!({"device": "q", "size": 8 << 20}));
    assert_eq!(std::fs::metadata(d.dev("q")).unwrap().len(), 8 << 20);
    let (_, desc) = q.err("block_resize", json!({"device": "q", "size": 2 << 20}));
    assert!(desc.contains("Shrinking"), "{desc}");
    let (_, desc) = q.err("block_resize", json!({"device": "v", "size": 8 << 20}));
    assert!(desc.contains("does not support resizing"), "{desc}");
    q.ok(
        "change-backing-file",
        json!({"device": "q", "image-node-name": "qtop", "backing-file": "other-name.raw"}),
    );
    d.quit();
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", "qed", &top])).unwrap();
    assert_eq!(info["virtual-size"], 8 << 20, "{info}");
    assert_eq!(info["backing-filename"], "other-name.raw", "{info}");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
}

/// drive-mirror and drive-backup create their targets in any format blkfs
/// creates; the device then runs on (or the backup holds) the same data.
#[test]
fn jobs_create_targets_in_the_block_mapped_formats() {
    let dir = TestDir::new("formats-jobs");
    let src = source(&dir);
    let size = std::fs::metadata(&src).unwrap().len();
    for format in ["vdi", "qed", "parallels"] {
        let img = dir.file(&format!("src-{format}.qcow2"));
        qemu_img(&["convert", "-q", "-f", "raw", "-O", "qcow2", &src, &img]);
        let d = Daemon::start(
            &dir,
            &[json!({"driver": "qcow2", "id": "d0",
            "file": {"driver": "file", "filename": img}})
            .to_string()],
        );
        let mut q = d.qmp();
        let backup = dir.file(&format!("backup.{format}"));
        q.ok(
            "drive-backup",
            json!({"device": "d0", "target": backup, "format": format, "sync": "full"}),
        );
        let ev = q.wait_job_end("d0");
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{format}: {ev}");
        let target = dir.file(&format!("mirror.{format}"));
        q.ok(
            "drive-mirror",
            json!({"device": "d0", "target": target, "format": format, "sync": "full"}),
        );
        q.wait_event("BLOCK_JOB_READY", std::time::Duration::from_secs(60));
        q.ok("block-job-complete", json!({"device": "d0"}));
        let ev = q.wait_job_end("d0");
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{format}: {ev}");
        // The device runs on the new image now: a write lands there.
        let expected = dir.file("expected.raw");
        std::fs::copy(&src, &expected).unwrap();
        write_patterns(&d.dev("d0"), &expected, size);
        d.quit();
        for (img, what) in [(&backup, "backup"), (&target, "mirror")] {
            let want = if what == "backup" { &src } else { &expected };
            assert!(
                images_identical(Path::new(img), format, Path::new(want), "raw"),
                "{format} {what}: other data than the device's"
            );
            assert_no_corruption(img);
        }
    }
}

#[test]
fn vmdk_over_a_parent_reads_through_and_copies_on_write() {
    let dir = TestDir::new("formats-vmdk-parent");
    let src = source(&dir);
    let size = std::fs::metadata(&src).unwrap().len();
    let base = dir.file("base.vmdk");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vmdk", &src, &base]);
    let top = dir.file("top.vmdk");
    let (code, _, err) = blkctl(
        &dir.join("none.sock"),
        &[
            "create",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            &top,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let info: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-f", "vmdk", &top])).unwrap();
    assert_eq!(info["backing-filename"], "base.vmdk", "{info}");
    let expected = dir.file("expected.raw");
    std::fs::copy(&src, &expected).unwrap();
    let d = Daemon::start(&dir, &[spec("vmdk", "d0", &top, false)]);
    assert!(images_identical(
        &d.dev("d0"),
        "raw",
        Path::new(&src),
        "raw"
    ));
    write_patterns(&d.dev("d0"), &expected, size);
    d.quit();
    assert!(images_identical(
        Path::new(&top),
        "vmdk",
        Path::new(&expected),
        "raw"
    ));
    assert!(images_identical(
        Path::new(&base),
        "vmdk",
        Path::new(&src),
        "raw"
    ));
    let r = qemu_img_check(&top);
    assert_eq!(r["check-errors"], 0, "{r}");
}

/// query-block's image information agrees with `qemu-img info`.
#[test]
fn query_block_image_info_agrees_with_qemu_img_info() {
    let dir = TestDir::new("formats-info");
    let src = source(&dir);
    for (i, c) in CASES.iter().enumerate() {
        let img = convert(&dir, &src, c, &format!("img{i}.{}", c.format));
        let theirs = qemu_img_info_of(&img, c);
        let d = Daemon::start(&dir, &[spec(c.format, "d0", &img, true)]);
        let mut q = d.qmp();
        let blocks = q.ok("query-block", json!({}));
        let ours = &blocks[0]["inserted"]["image"];
        for key in ["format", "virtual-size", "cluster-size", "backing-filename"] {
            assert_eq!(
                ours.get(key),
                theirs.get(key),
                "{} {}: {key}: ours {ours}, theirs {theirs}",
                c.format,
                c.options
            );
        }
        if c.format == "vmdk" {
            let (o, t) = (
                &ours["format-specific"]["data"],
                &theirs["format-specific"]["data"],
            );
            for key in ["create-type", "cid", "parent-cid"] {
                assert_eq!(o[key], t[key], "vmdk {}: {key}", c.options);
            }
            assert_eq!(
                o["extents"].as_array().map(Vec::len),
                t["extents"].as_array().map(Vec::len)
            );
        }
        d.quit();
    }
}

/// `--blockdev` without a driver: the format is probed; a probed raw image
/// never takes a write that would make it probe as another format.
#[test]
fn blockdevs_without_a_driver_are_probed_and_raw_stays_raw() {
    let dir = TestDir::new("formats-probe");
    let src = source(&dir);
    let vmdk = dir.file("a.vmdk");
    qemu_img(&["convert", "-q", "-f", "raw", "-O", "vmdk", &src, &vmdk]);
    let raw = dir.file("b.raw");
    std::fs::copy(&src, &raw).unwrap();
    let d = Daemon::start(
        &dir,
        &[
            format!("id=v,file.filename={vmdk}"),
            format!("id=r,file.filename={raw}"),
        ],
    );
    let mut q = d.qmp();
    let blocks = q.ok("query-block", json!({}));
    let drv: Vec<&str> = blocks
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["inserted"]["drv"].as_str().unwrap())
        .collect();
    assert_eq!(drv, ["vmdk", "raw"]);
    assert!(images_identical(&d.dev("v"), "raw", Path::new(&src), "raw"));
    let f = OpenOptions::new().write(true).open(d.dev("r")).unwrap();
    // A qcow2 header into the first sector: refused.
    let mut sector = vec![0u8; 512];
    sector[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
    let e = f.write_all_at(&sector, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Even piece by piece: the magic's last byte completes it.
    f.write_all_at(&sector[..3], 0).unwrap();
    let e = f.write_all_at(&sector[3..8], 3).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // Anything else goes.
    f.write_all_at(&[7u8; 4096], 0).unwrap();
    drop(f);
    d.quit();
    assert_eq!(&std::fs::read(&raw).unwrap()[..4096], &[7u8; 4096][..]);
}

/// `blkctl check` where qemu-img has a check: clean images pass, a block
/// map with two blocks on the same data is a corruption for both.
#[test]
fn blkctl_check_agrees_with_qemu_img_check() {
    let dir = TestDir::new("formats-check");
    let src = source(&dir);
    let sock = dir.join("none.sock");
    for (i, c) in CASES.iter().enumerate().filter(|(_, c)| c.check) {
        let img = convert(&dir, &src, c, &format!("img{i}.{}", c.format));
        let (code, out, err) = blkctl(&sock, &["check", "--json", &img]);
        assert_eq!(code, 0, "{} {}: {out} {err}", c.format, c.options);
        let r: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["format"], c.format);
        assert_eq!(r.get("corruptions"), None, "{r}");
    }
    // Two VDI blocks mapped onto one: blocks 1 and 6 of the source hold data.
    let c = &CASES[0];
    let img = convert(&dir, &src, c, "bad.vdi");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut e = [0u8; 4];
    f.read_exact_at(&mut e, 0x200 + 4).unwrap();
    f.write_all_at(&e, 0x200 + 6 * 4).unwrap();
    drop(f);
    let (code, out, _) = blkctl(&sock, &["check", "--json", &img]);
    assert_eq!(code, 2, "{out}");
    let ours: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        ours["corruptions"],
        qemu_img_check(&img)["corruptions"],
        "{ours}"
    );
    let (code, _, err) = blkctl(&sock, &["check", "-r", "all", &img]);
    assert_ne!(code, 0);
    assert!(err.contains("qcow2"), "{err}");
}

/// A vmdk's CID changes with its first write of a session, as QEMU's does
/// (its overlays then see it changed); its descriptor stays readable.
#[test]
fn vmdk_cid_changes_on_the_first_write() {
    let dir = TestDir::new("formats-vmdk-cid");
    let src = source(&dir);
    for options in ["", "subformat=monolithicFlat"] {
        let c = Case {
            format: "vmdk",
            options,
            writable: true,
            check: true,
            create: true,
        };
        let img = convert(&dir, &src, &c, "cid.vmdk");
        let cid = |img: &str| qemu_img_info_of(img, &c)["format-specific"]["data"]["cid"].clone();
        let before = cid(&img);
        // Reading changes nothing.
        let d = Daemon::start(&dir, &[spec("vmdk", "d0", &img, false)]);
        std::fs::read(d.dev("d0")).unwrap();
        d.quit();
        assert_eq!(cid(&img), before, "{options}");
        let expected = dir.file("cid.raw");
        std::fs::copy(&src, &expected).unwrap();
        let d = Daemon::start(&dir, &[spec("vmdk", "d0", &img, false)]);
        write_patterns(
            &d.dev("d0"),
            &expected,
            std::fs::metadata(&src).unwrap().len(),
        );
        let ours = d.qmp().ok("query-block", json!({}))[0]["inserted"]["image"]["format-specific"]
            ["data"]["cid"]
            .clone();
        d.quit();
        let after = cid(&img);
        assert_ne!(after, before, "{options}");
        assert_eq!(ours, after, "{options}: query-block shows the new CID");
        assert_qemu_reads(&img, &c, &expected);
    }
}
