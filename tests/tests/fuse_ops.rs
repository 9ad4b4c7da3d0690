//! File operations on the mount beyond plain read/write: attributes and
//! allocation, directory listing, truncate, read-only devices, fallocate
//! modes and SEEK_DATA/SEEK_HOLE, with qemu-img/qemu-io as the oracle.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn blocks(p: impl AsRef<Path>) -> u64 {
    std::fs::metadata(p).unwrap().blocks()
}

fn rw(p: impl AsRef<Path>) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn attributes_report_size_mode_and_real_allocation() {
    let dir = TestDir::new("fo-attr");
    let img = raw_image(&dir, "a.img", "64M");
    qemu_io("raw", img.as_ref(), &["write -P 1 1M 1M"]);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let root = std::fs::metadata(&d.mnt).unwrap();
    assert!(root.is_dir());
    let m = std::fs::metadata(d.dev("d0")).unwrap();
    assert!(m.file_type().is_file());
    assert_eq!(m.len(), 64 << 20);
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    // Allocation is the image's, and far less than the size for a sparse image.
    let before = blocks(&img);
    assert_eq!(
        m.blocks(),
        before,
        "st_blocks of the device = st_blocks of the image"
    );
    assert!(before * 512 < 8 << 20, "image is sparse: {before} blocks");
    // Writing 4 MiB into a hole allocates it, and getattr shows that at once.
    let f = rw(d.dev("d0"));
    f.write_all_at(&pattern(4, 4 << 20), 32 << 20).unwrap();
    f.sync_all().unwrap();
    let after_img = blocks(&img);
    assert!(
        after_img >= before + (4 << 20) / 512,
        "image allocation grew: {before} -> {after_img}"
    );
    assert_eq!(
        blocks(d.dev("d0")),
        after_img,
        "st_blocks follows the image"
    );
    assert_eq!(
        std::fs::metadata(d.dev("d0")).unwrap().len(),
        64 << 20,
        "size unchanged"
    );
}

#[test]
fn directory_lists_exactly_the_devices() {
    let dir = TestDir::new("fo-dir");
    let a = raw_image(&dir, "a.img", "1M");
    let b = raw_image(&dir, "b.img", "1M");
    let d = Daemon::start(
        &dir,
        &[
            raw_spec("alpha", &a, json!({})),
            raw_spec("beta", &b, json!({})),
        ],
    );
    assert_eq!(list_dir(&d.mnt), vec!["alpha", "beta"]);
    let e = std::fs::metadata(d.dev("gamma")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    // No other files can be made in the export.
    assert!(
        File::create(d.dev("new-file")).is_err(),
        "creating a file in the mount must fail"
    );
    assert!(
        std::fs::create_dir(d.dev("subdir")).is_err(),
        "creating a directory in the mount must fail"
    );
    assert!(
        std::fs::remove_file(d.dev("alpha")).is_err(),
        "removing a device file must fail"
    );
    assert_eq!(list_dir(&d.mnt), vec!["alpha", "beta"]);
    // A device added at run time shows up in the listing.
    let c = raw_image(&dir, "c.img", "1M");
    d.qmp().ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "gamma", "file": {"driver": "file", "filename": c}}),
    );
    assert_eq!(list_dir(&d.mnt), vec!["alpha", "beta", "gamma"]);
    assert_eq!(std::fs::metadata(d.dev("gamma")).unwrap().len(), 1 << 20);
}

#[test]
fn truncate_to_another_size_is_refused() {
    let dir = TestDir::new("fo-trunc");
    let img = raw_image(&dir, "a.img", "4M");
    qemu_io("raw", img.as_ref(), &["write -P 0x5c 4032k 64k"]);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = rw(d.dev("d0"));
    for size in [0u64, 1 << 20, (4 << 20) - 1, (4 << 20) + 1, 8 << 20] {
        let e = f.set_len(size).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EPERM),
            "truncate to {size}: {e}"
        );
    }
    let e = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.dev("d0"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "O_TRUNC: {e}");
    f.set_len(4 << 20)
        .expect("truncate to the same size is accepted");
    drop(f);
    assert_eq!(std::fs::metadata(d.dev("d0")).unwrap().len(), 4 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
    qemu_io_shared(
        "raw",
        img.as_ref(),
        &["read -P 0x5c 4032k 64k", "read -P 0 0 4032k"],
    );
}

#[test]
fn read_only_devices_refuse_opening_for_write() {
    let dir = TestDir::new("fo-ro");
    let img = raw_image(&dir, "a.img", "2M");
    qemu_io("raw", img.as_ref(), &["write -P 0x6e 0 2M"]);
    let spec = json!({"driver": "raw", "id": "ro", "read-only": true, "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let m = std::fs::metadata(d.dev("ro")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o400);
    for (r, w, a) in [
        (false, true, false),
        (true, true, false),
        (false, true, true),
    ] {
        let e = OpenOptions::new()
            .read(r)
            .write(w)
            .append(a)
            .open(d.dev("ro"))
            .unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "open read={r} write={w} append={a}: {e}"
        );
    }
    let f = File::open(d.dev("ro")).unwrap();
    let mut buf = vec![0u8; 8192];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x6e));
    drop(f);
    let e = File::options().write(true).open(d.dev("ro")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    // A reader coexists with a read-only device (no -U needed).
    qemu_io_ro("raw", img.as_ref(), &["read -P 0x6e 0 2M"]);
}

/// 16 MiB image, fully written with a pattern.
fn full_image(dir: &TestDir) -> String {
    let img = raw_image(dir, "a.img", "16M");
    qemu_io("raw", img.as_ref(), &["write -P 0xaa 0 16M"]);
    img
}

#[test]
fn punch_hole_without_unmap_writes_zeroes_and_keeps_allocation() {
    let dir = TestDir::new("fo-punch");
    let img = full_image(&dir);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = rw(d.dev("d0"));
    let before = blocks(&img);
    fallocate(&f, PUNCH, 1 << 20, 2 << 20).expect("PUNCH_HOLE|KEEP_SIZE");
    // Unaligned too.
    fallocate(&f, PUNCH, 5_000_001, 70_001).expect("unaligned PUNCH_HOLE|KEEP_SIZE");
    let mut buf = vec![0xffu8; 2 << 20];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "punched range reads as zeroes through the mount"
    );
    drop(f);
    assert_eq!(std::fs::metadata(d.dev("d0")).unwrap().len(), 16 << 20);
    let exp = dir.file("exp2.img");
    qemu_img(&["create", "-q", "-f", "raw", &exp, "16M"]);
    qemu_io(
        "raw",
        exp.as_ref(),
        &[
            "write -P 0xaa 0 16M",
            "write -z 1M 2M",
            "write -z 5000001 70001",
        ],
    );
    assert!(
        images_identical(img.as_ref(), "raw", exp.as_ref(), "raw"),
        "image content after punch"
    );
    assert!(
        images_identical(&d.dev("d0"), "raw", exp.as_ref(), "raw"),
        "mount content after punch"
    );
    // Without discard=unmap nothing is deallocated.
    assert!(
        blocks(&img) >= before,
        "allocation must not shrink without discard=unmap: {before} -> {}",
        blocks(&img)
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
}

#[test]
fn punch_hole_with_discard_unmap_deallocates() {
    let dir = TestDir::new("fo-unmap");
    let img = full_image(&dir);
    let spec = json!({"driver": "raw", "id": "d0", "discard": "unmap", "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let f = rw(d.dev("d0"));
    let before = blocks(&img);
    fallocate(&f, PUNCH, 4 << 20, 4 << 20).expect("PUNCH_HOLE|KEEP_SIZE");
    let after = blocks(&img);
    assert!(
        before - after >= (4 << 20) / 512,
        "4 MiB must be deallocated: {before} -> {after} blocks"
    );
    assert_eq!(
        blocks(d.dev("d0")),
        after,
        "getattr shows the new allocation"
    );
    // The image reads zero there and qemu-img map calls the range a hole.
    qemu_io_shared(
        "raw",
        img.as_ref(),
        &["read -P 0xaa 0 4M", "read -P 0 4M 4M", "read -P 0xaa 8M 8M"],
    );
    let map = qemu_img_map(img.as_ref());
    let hole = map
        .iter()
        .find(|e| {
            e["start"].as_u64() <= Some(4 << 20)
                && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() > 4 << 20
        })
        .unwrap_or_else(|| panic!("no extent at 4M: {map:?}"));
    assert_eq!(hole["data"], false, "{hole}");
    assert_eq!(hole["zero"], true, "{hole}");
    assert!(
        hole["start"].as_u64().unwrap() + hole["length"].as_u64().unwrap() >= 8 << 20,
        "{hole}"
    );
    // And the mount's SEEK_DATA/SEEK_HOLE see the hole too.
    assert_eq!(lseek(&f, 4 << 20, libc::SEEK_DATA), Ok(8 << 20));
    assert_eq!(lseek(&f, 0, libc::SEEK_HOLE), Ok(4 << 20));
    assert_eq!(
        std::fs::metadata(&img).unwrap().len(),
        16 << 20,
        "KEEP_SIZE"
    );
}

#[test]
fn zero_range_writes_zeroes() {
    let dir = TestDir::new("fo-zero");
    let img = full_image(&dir);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = rw(d.dev("d0"));
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 2 << 20, 1 << 20).expect("ZERO_RANGE");
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 9_999, 12_345).expect("unaligned ZERO_RANGE");
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        10 << 20,
        65_536,
    )
    .expect("ZERO_RANGE|KEEP_SIZE");
    // Up to the very end is fine too.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, (16 << 20) - 4096, 4096)
        .expect("ZERO_RANGE at the end");
    drop(f);
    let exp = dir.file("exp.img");
    qemu_img(&["create", "-q", "-f", "raw", &exp, "16M"]);
    qemu_io(
        "raw",
        exp.as_ref(),
        &[
            "write -P 0xaa 0 16M",
            "write -z 2M 1M",
            "write -z 9999 12345",
            "write -z 10M 64k",
            "write -z 16380k 4k",
        ],
    );
    assert!(
        images_identical(&d.dev("d0"), "raw", exp.as_ref(), "raw"),
        "mount content after ZERO_RANGE"
    );
    assert!(
        images_identical(img.as_ref(), "raw", exp.as_ref(), "raw"),
        "image content after ZERO_RANGE"
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    assert_eq!(std::fs::metadata(d.dev("d0")).unwrap().len(), 16 << 20);
}

#[test]
fn fallocate_mode_0_is_accepted_inside_and_refused_beyond_the_end() {
    let dir = TestDir::new("fo-prealloc");
    let img = full_image(&dir);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = rw(d.dev("d0"));
    fallocate(&f, 0, 0, 16 << 20).expect("mode 0 over the whole device");
    fallocate(&f, 0, 12_345, 1 << 20).expect("mode 0 inside the device");
    assert_eq!(
        fallocate(&f, 0, (16 << 20) - 4096, 8192),
        Err(libc::EOPNOTSUPP),
        "mode 0 across the end"
    );
    assert_eq!(
        fallocate(&f, 0, 16 << 20, 4096),
        Err(libc::EOPNOTSUPP),
        "mode 0 past the end"
    );
    drop(f);
    // Nothing changed: same size, same data.
    assert_eq!(std::fs::metadata(d.dev("d0")).unwrap().len(), 16 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20);
    qemu_io_shared("raw", img.as_ref(), &["read -P 0xaa 0 16M"]);
}

/// What SEEK_DATA / SEEK_HOLE must answer at `off`, from a qemu-img map.
fn expected_seek(map: &[Value], size: u64, off: u64, want_data: bool) -> Result<i64, i32> {
    if off >= size {
        return Err(libc::ENXIO);
    }
    for e in map {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let is_data = e["data"] == true;
        if s + l > off && is_data == want_data {
            return Ok(s.max(off) as i64);
        }
    }
    if want_data {
        Err(libc::ENXIO)
    } else {
        Ok(size as i64)
    }
}

fn check_seeks(f: &File, img: &Path, size: u64) {
    let map = qemu_img_map(img);
    let mut offsets = vec![0u64, 1, 4095, 4096, size - 1, size, size + 4096];
    for e in &map {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        offsets.extend([s, s + 1, s + l / 2, s + l - 1]);
    }
    for off in offsets {
        for (whence, want_data, name) in [
            (libc::SEEK_DATA, true, "SEEK_DATA"),
            (libc::SEEK_HOLE, false, "SEEK_HOLE"),
        ] {
            let want = expected_seek(&map, size, off, want_data);
            assert_eq!(
                lseek(f, off as i64, whence),
                want,
                "{name} at {off}; image map {map:?}"
            );
        }
    }
}

#[test]
fn seek_data_and_seek_hole_follow_the_image() {
    let dir = TestDir::new("fo-seek");
    let img = raw_image(&dir, "a.img", "16M");
    qemu_io(
        "raw",
        img.as_ref(),
        &["write -P 1 1M 64k", "write -P 2 5M 1M", "write -P 3 15M 1M"],
    );
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let map = qemu_img_map(img.as_ref());
    assert!(
        map.iter().filter(|e| e["data"] == false).count() >= 3,
        "the image has holes: {map:?}"
    );
    let f = File::open(d.dev("d0")).unwrap();
    check_seeks(&f, img.as_ref(), 16 << 20);
    // qemu-img sees the same map through the mount as on the image.
    assert_eq!(
        qemu_img_map(&d.dev("d0")),
        map,
        "map of the mount vs map of the image"
    );
    // Data written through the mount into a hole is found afterwards.
    let w = rw(d.dev("d0"));
    w.write_all_at(&[9u8; 8192], 10 << 20).unwrap();
    drop(w);
    assert_eq!(lseek(&f, 6 << 20, libc::SEEK_DATA), Ok(10 << 20));
    check_seeks(&f, img.as_ref(), 16 << 20);
    assert_eq!(qemu_img_map(&d.dev("d0")), qemu_img_map(img.as_ref()));
}

#[test]
fn seek_on_a_fully_sparse_and_a_fully_allocated_device() {
    let dir = TestDir::new("fo-seek2");
    let sparse = dir.file("sparse.img");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let full = raw_image(&dir, "full.img", "8M");
    qemu_io("raw", full.as_ref(), &["write -P 5 0 8M"]);
    let d = Daemon::start(
        &dir,
        &[
            raw_spec("s", &sparse, json!({})),
            raw_spec("f", &full, json!({})),
        ],
    );
    let s = File::open(d.dev("s")).unwrap();
    assert_eq!(
        lseek(&s, 0, libc::SEEK_DATA),
        Err(libc::ENXIO),
        "no data at all"
    );
    assert_eq!(lseek(&s, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(lseek(&s, 12345, libc::SEEK_HOLE), Ok(12345));
    let f = File::open(d.dev("f")).unwrap();
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(lseek(&f, 777, libc::SEEK_DATA), Ok(777));
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE),
        Ok(8 << 20),
        "the only hole is the end"
    );
    assert_eq!(lseek(&f, 8 << 20, libc::SEEK_HOLE), Err(libc::ENXIO));
    check_seeks(&s, sparse.as_ref(), 8 << 20);
    check_seeks(&f, full.as_ref(), 8 << 20);
}

#[test]
fn directory_listing_of_many_devices_is_complete() {
    let dir = TestDir::new("fo-many");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let mut want = Vec::new();
    for i in 0..300 {
        let img = dir.file(&format!("i{i}.img"));
        File::create(&img)
            .unwrap()
            .set_len(65_536 + i * 512)
            .unwrap();
        let id = format!("device-with-a-longish-name-{i:03}");
        q.ok(
            "blockdev-add",
            json!({"driver": "raw", "id": id, "file": {"driver": "file", "filename": img}}),
        );
        want.push(id);
    }
    want.sort();
    assert_eq!(
        list_dir(&d.mnt),
        want,
        "readdir must return every device exactly once"
    );
    for (i, id) in want.iter().enumerate() {
        assert_eq!(
            std::fs::metadata(d.mnt.join(id)).unwrap().len(),
            65_536 + i as u64 * 512,
            "{id}"
        );
    }
}
