//! Images made by other tools (QEMU's own test images, see
//! ../shared/testdata/qemu-sample-images/MANIFEST.md) and images built
//! here from the formats' descriptions: each reads through the mount as
//! qemu-img reads it, and what the manifest says it holds.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/qemu-sample-images")
}

/// Decompresses sample `name` into `dir`.
fn sample(dir: &TestDir, name: &str) -> String {
    let out = dir.file(name);
    let src = samples().join(format!("{name}.bz2"));
    let data = std::process::Command::new("bunzip2")
        .arg("-c")
        .arg(&src)
        .output()
        .expect("run bunzip2");
    assert!(data.status.success(), "bunzip2 {}", src.display());
    std::fs::write(&out, data.stdout).unwrap();
    out
}

fn spec(format: &str, id: &str, file: &str) -> String {
    json!({"driver": format, "id": id, "read-only": true,
        "file": {"driver": "file", "filename": file}})
    .to_string()
}

/// (sample, format) pairs blkfs opens.
const SAMPLES: &[(&str, &str)] = &[
    ("empty.bochs", "bochs"),
    ("simple-pattern.cloop", "cloop"),
    ("fake.parallels", "parallels"),
    ("parallels-v1", "parallels"),
    ("parallels-v2", "parallels"),
    ("virtualpc-dynamic.vhd", "vpc"),
    ("hyperv2012r2-dynamic.vhd", "vpc"),
    ("d2v-zerofilled.vhd", "vpc"),
    ("iotest-version3.vmdk", "vmdk"),
    ("iotest-dynamic-1G.vhdx", "vhdx"),
    ("test-disk2vhd.vhdx", "vhdx"),
];

#[test]
fn every_sample_reads_as_qemu_img_reads_it() {
    let dir = TestDir::new("samples");
    let mut specs = Vec::new();
    let mut files = Vec::new();
    for (i, (name, format)) in SAMPLES.iter().enumerate() {
        let f = sample(&dir, name);
        specs.push(spec(format, &format!("s{i}"), &f));
        files.push(f);
    }
    let d = Daemon::start(&dir, &specs);
    for (i, (name, format)) in SAMPLES.iter().enumerate() {
        let dev = d.dev(&format!("s{i}"));
        let info: Value = serde_json::from_str(&qemu_img(&[
            "info",
            "-U",
            "--output=json",
            "-f",
            format,
            &files[i],
        ]))
        .unwrap();
        let len = std::fs::metadata(&dev).unwrap().len();
        assert_eq!(Some(len), info["virtual-size"].as_u64(), "{name}: size");
        assert!(
            images_identical(&dev, "raw", Path::new(&files[i]), format),
            "{name}: the mount reads other data than qemu-img"
        );
    }
    // What the manifest says they hold.
    let parallels = std::fs::read(d.dev("s2")).unwrap();
    for (k, byte) in [0x11u8, 0x22, 0x33, 0x44].into_iter().enumerate() {
        let block = &parallels[k << 16..(k + 1) << 16];
        assert!(block.iter().all(|&b| b == byte), "fake.parallels block {k}");
    }
    assert!(parallels[4 << 16..].iter().all(|&b| b == 0));
    let cloop = std::fs::read(d.dev("s1")).unwrap();
    for k in 0..16usize {
        let block = &cloop[k << 16..(k + 1) << 16];
        let head = if k == 0 { 0 } else { k as u8 };
        assert!(block[..512].iter().all(|&b| b == head), "cloop block {k}");
        assert!(block[512..].iter().all(|&b| b == 0), "cloop block {k} tail");
    }
    assert!(std::fs::read(d.dev("s0")).unwrap().iter().all(|&b| b == 0));
    d.quit();
}

#[test]
fn read_only_formats_refuse_a_read_write_open() {
    let dir = TestDir::new("samples-ro");
    let f = sample(&dir, "simple-pattern.cloop");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "cloop", "id": "c", "file": {"driver": "file", "filename": f}}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("read-only"), "{desc}");
    d.quit();
}

/// A Bochs growing image built from the format's description: extents of
/// 64 KiB, some allocated, with sectors present and absent in the
/// bitmaps. Returns (image, the bytes it holds).
fn bochs_image(dir: &TestDir, version: u32) -> (String, Vec<u8>) {
    const EXTENT: usize = 64 << 10;
    const SECTORS: usize = EXTENT / 512;
    let size = 16 * EXTENT;
    let mut expected = vec![0u8; size];
    let mut h = vec![0u8; 512];
    h[..22].copy_from_slice(b"Bochs Virtual HD Image");
    h[32..39].copy_from_slice(b"Redolog");
    h[48..55].copy_from_slice(b"Growing");
    h[64..68].copy_from_slice(&version.to_le_bytes());
    h[68..72].copy_from_slice(&512u32.to_le_bytes());
    h[72..76].copy_from_slice(&16u32.to_le_bytes());
    h[76..80].copy_from_slice(&16u32.to_le_bytes()); // bitmap bytes
    h[80..84].copy_from_slice(&(EXTENT as u32).to_le_bytes());
    let at = if version == 0x20000 { 88 } else { 84 };
    h[at..at + 8].copy_from_slice(&(size as u64).to_le_bytes());
    let mut catalog = vec![0xffu8; 16 * 4];
    let mut slots = Vec::new();
    // Extent 2 in slot 0, extent 9 in slot 1.
    for (slot, ext) in [(0u32, 2usize), (1, 9)] {
        catalog[ext * 4..ext * 4 + 4].copy_from_slice(&slot.to_le_bytes());
        let mut bitmap = vec![0u8; 512];
        let data = pattern(ext as u64, EXTENT);
        for s in 0..SECTORS {
            // Present: sectors 0-2, 5, 64-100; absent elsewhere.
            if s < 3 || s == 5 || (64..=100).contains(&s) {
                bitmap[s / 8] |= 1 << (s % 8);
                let g = ext * EXTENT + s * 512;
                expected[g..g + 512].copy_from_slice(&data[s * 512..(s + 1) * 512]);
            }
        }
        slots.extend_from_slice(&bitmap);
        slots.extend_from_slice(&data);
    }
    let mut img = h;
    img.extend_from_slice(&catalog);
    img.extend_from_slice(&slots);
    let f = dir.file(&format!("built-v{}.bochs", version >> 16));
    std::fs::write(&f, img).unwrap();
    (f, expected)
}

#[test]
fn bochs_images_with_data_read_as_qemu_reads_them() {
    let dir = TestDir::new("bochs-built");
    for version in [0x10000u32, 0x20000] {
        let (img, expected) = bochs_image(&dir, version);
        let d = Daemon::start(&dir, &[spec("bochs", "b", &img)]);
        let got = std::fs::read(d.dev("b")).unwrap();
        assert!(
            got == expected,
            "bochs v{}: the mount reads other data",
            version >> 16
        );
        assert!(
            images_identical(&d.dev("b"), "raw", Path::new(&img), "bochs"),
            "bochs v{}: qemu-img reads other data",
            version >> 16
        );
        d.quit();
    }
}

/// Standard base64 with line breaks, as plists carry it.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, c) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push('\n');
        }
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (j, &b)| n | (b as u32) << (16 - 8 * j));
        for j in 0..4 {
            if j <= c.len() {
                out.push(T[(n >> (18 - 6 * j) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A UDIF image built from the format's description: chunks stored zlib
/// compressed, raw, as zeroes, ignored, and (with `bzip2`) bzip2
/// compressed, the tables in the resource fork or (with `xml`) in an XML
/// plist. Returns (image, the bytes it holds).
fn dmg_image(dir: &TestDir, name: &str, xml: bool, bzip2: bool) -> (String, Vec<u8>) {
    use std::io::Write;
    let zlib_data = pattern(21, 64 * 512);
    let raw_data = pattern(22, 16 * 512);
    let bz_data = pattern(23, 32 * 512);
    let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&zlib_data, 6);
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    bz.write_all(&bz_data).unwrap();
    let bz = bz.finish().unwrap();
    // (type, first sector, sectors, data)
    let mut chunks: Vec<(u32, u64, u64, Vec<u8>)> = vec![
        (0x8000_0005, 0, 64, zlib),
        (1, 64, 16, raw_data.clone()),
        (0, 80, 8, Vec::new()),
        (2, 88, 8, Vec::new()),
    ];
    let mut expected = Vec::new();
    expected.extend_from_slice(&zlib_data);
    expected.extend_from_slice(&raw_data);
    expected.extend(std::iter::repeat_n(0u8, 16 * 512));
    if bzip2 {
        chunks.push((0x8000_0006, 96, 32, bz));
        expected.extend_from_slice(&bz_data);
    }
    let sectors = expected.len() as u64 / 512;
    chunks.push((0x7fff_fffe, sectors, 0, Vec::new()));
    chunks.push((0xffff_ffff, sectors, 0, Vec::new()));
    // The data fork after 512 leading bytes; chunk offsets from its start.
    let mut file = vec![0u8; 512];
    let mut mish = vec![0u8; 204 + 40 * chunks.len()];
    put32(&mut mish, 0, 0x6d69_7368);
    put32(&mut mish, 4, 1);
    put64(&mut mish, 0x10, sectors);
    put32(&mut mish, 0xc8, chunks.len() as u32);
    let mut fork_len = 0u64;
    for (n, (kind, sector, count, data)) in chunks.iter().enumerate() {
        let e = 204 + 40 * n;
        put32(&mut mish, e, *kind);
        put64(&mut mish, e + 8, *sector);
        put64(&mut mish, e + 0x10, *count);
        put64(&mut mish, e + 0x18, fork_len);
        put64(&mut mish, e + 0x20, data.len() as u64);
        file.extend_from_slice(data);
        fork_len += data.len() as u64;
    }
    let tables_at = file.len() as u64;
    if xml {
        let plist = format!(
            "<?xml version=\"1.0\"?>\n<plist version=\"1.0\"><dict><key>resource-fork</key><dict>\
             <key>blkx</key><array><dict><key>Data</key>\n<data>\n{}\n</data></dict></array>\
             </dict></dict></plist>\n",
            base64(&mish)
        );
        file.extend_from_slice(plist.as_bytes());
    } else {
        let mut fork = vec![0u8; 256];
        put32(&mut fork, 0, 256);
        put32(&mut fork, 8, 4 + mish.len() as u32);
        fork.extend_from_slice(&(mish.len() as u32).to_be_bytes());
        fork.extend_from_slice(&mish);
        file.extend_from_slice(&fork);
    }
    let tables_len = file.len() as u64 - tables_at;
    let mut koly = vec![0u8; 512];
    koly[..4].copy_from_slice(b"koly");
    put32(&mut koly, 4, 4);
    put32(&mut koly, 8, 512);
    put64(&mut koly, 0x18, 512);
    put64(&mut koly, 0x20, fork_len);
    let (off, len) = if xml { (0xd8, 0xe0) } else { (0x28, 0x30) };
    put64(&mut koly, off, tables_at);
    put64(&mut koly, len, tables_len);
    put64(&mut koly, 0x1ec, sectors);
    file.extend_from_slice(&koly);
    let f = dir.file(name);
    std::fs::write(&f, file).unwrap();
    (f, expected)
}

#[test]
fn dmg_images_read_every_chunk_type() {
    let dir = TestDir::new("dmg-built");
    for xml in [false, true] {
        // qemu-img reads these (its bzip2 module is not in Debian's build).
        let (img, expected) = dmg_image(&dir, &format!("plain-{xml}.dmg"), xml, false);
        // And this one only blkfs.
        let (bz_img, bz_expected) = dmg_image(&dir, &format!("bz-{xml}.dmg"), xml, true);
        let d = Daemon::start(&dir, &[spec("dmg", "a", &img), spec("dmg", "b", &bz_img)]);
        assert!(std::fs::read(d.dev("a")).unwrap() == expected, "xml={xml}");
        assert!(
            std::fs::read(d.dev("b")).unwrap() == bz_expected,
            "xml={xml}, bzip2"
        );
        assert!(
            images_identical(&d.dev("a"), "raw", Path::new(&img), "dmg"),
            "xml={xml}: qemu-img reads other data"
        );
        d.quit();
    }
}

#[test]
fn damaged_dmg_tables_fail_cleanly() {
    let dir = TestDir::new("dmg-damaged");
    let (img, _) = dmg_image(&dir, "a.dmg", false, true);
    let good = std::fs::read(&img).unwrap();
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let mut seed = Rng(7);
    for n in 0..200 {
        let mut bad = good.clone();
        // Bytes of the tables and the trailer.
        for _ in 0..3 {
            let at = good.len() - 1 - seed.below(900) as usize;
            bad[at] = seed.next() as u8;
        }
        let f = dir.file(&format!("bad{n}.dmg"));
        std::fs::write(&f, &bad).unwrap();
        let r = q.execute(
            "blockdev-add",
            serde_json::from_str(&spec("dmg", &format!("d{n}"), &f)).unwrap(),
        );
        if r.get("return").is_some() {
            // Opened: every read answers data or EIO, never hangs or crashes.
            let _ = std::fs::read(d.dev(&format!("d{n}")));
        }
    }
    q.ok("query-block", json!({}));
    d.quit();
}

#[test]
fn fuzzed_samples_fail_to_open_with_a_clear_error() {
    let dir = TestDir::new("samples-fuzzed");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let fuzzed: &[(&str, &str)] = &[("afl9.vmdk", "vmdk"), ("afl5.img", "vhdx")];
    for (name, format) in fuzzed {
        let f = sample(&dir, name);
        let (class, desc) = q.err(
            "blockdev-add",
            serde_json::from_str(&spec(format, "x", &f)).unwrap(),
        );
        assert_eq!(class, "GenericError", "{name}");
        assert!(
            desc.contains(&f),
            "{name}: the error names the image: {desc}"
        );
    }
    q.ok("query-block", json!({}));
    d.quit();
}

#[test]
fn a_vhdx_log_is_replayed_read_write_and_refused_read_only() {
    let dir = TestDir::new("samples-vhdx-log");
    let ours = sample(&dir, "iotest-dirtylog-10G-4M.vhdx");
    let theirs = dir.file("theirs.vhdx");
    std::fs::copy(&ours, &theirs).unwrap();
    // qemu-img's repair replays the log: the reference.
    qemu_img(&["check", "-q", "-r", "all", &theirs]);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&spec("vhdx", "ro", &ours)).unwrap(),
    );
    assert!(desc.contains("log that needs to be replayed"), "{desc}");
    let rw = json!({"driver": "vhdx", "id": "rw", "file": {"driver": "file", "filename": ours}});
    q.ok("blockdev-add", rw);
    // The first 32 MiB (the image is 10 GiB; qemu-img compares the rest).
    let mut data = vec![0u8; 32 << 20];
    std::fs::File::open(d.dev("rw"))
        .unwrap()
        .read_exact_at(&mut data, 0)
        .unwrap();
    assert!(
        data[..18 << 20].iter().all(|&b| b == 0xa5),
        "the replayed data"
    );
    assert!(data[18 << 20..].iter().all(|&b| b == 0), "zeroes after");
    d.quit();
    assert!(images_identical(
        Path::new(&ours),
        "vhdx",
        Path::new(&theirs),
        "vhdx"
    ));
    let r = qemu_img_check(&ours);
    assert_eq!(r["check-errors"], 0, "{r}");
}

/// Images from the formats' own tools (Debian's bximage and cloop-utils):
/// a raw file with data and holes, converted, reads back byte for byte.
#[test]
fn images_from_bximage_and_create_compressed_fs_read_back() {
    let dir = TestDir::new("samples-tools");
    let src = dir.file("src.raw");
    let size = 10u64 << 20;
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in [
        (0u64, 4096usize),
        (1 << 20, 300_000),
        (6 << 20, 1 << 20),
        (size - 5000, 5000),
    ]
    .into_iter()
    .enumerate()
    {
        f.write_all_at(&pattern(i as u64 + 40, len), off).unwrap();
    }
    drop(f);
    let bochs = dir.file("b.bochs");
    let out = std::process::Command::new("bximage")
        .args(["-func=convert", "-imgmode=growing", "-q", &src, &bochs])
        .output()
        .expect("run bximage");
    assert!(
        out.status.success(),
        "bximage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cloop = dir.file("b.cloop");
    let out = std::process::Command::new("create_compressed_fs")
        .args(["-B", "65536", &src, &cloop])
        .output()
        .expect("run create_compressed_fs");
    assert!(
        out.status.success(),
        "create_compressed_fs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Daemon::start(
        &dir,
        &[spec("bochs", "b", &bochs), spec("cloop", "c", &cloop)],
    );
    let want = std::fs::read(&src).unwrap();
    assert!(
        std::fs::read(d.dev("b")).unwrap() == want,
        "bximage's image"
    );
    assert!(
        std::fs::read(d.dev("c")).unwrap() == want,
        "create_compressed_fs's image"
    );
    d.quit();
}
