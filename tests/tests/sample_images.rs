//! Images made by other tools (QEMU's own test images, see
//! ../shared/testdata/qemu-sample-images/MANIFEST.md) and images built
//! here from the formats' descriptions: each reads through the mount as
//! qemu-img reads it, and what the manifest says it holds.

use blkfs_tests::*;
use serde_json::{json, Value};
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
