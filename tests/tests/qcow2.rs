//! qcow2 through the mount, with qemu-img/qemu-io as the oracle: images and
//! chains made by qemu tools are read back, writes through the mount are
//! compared against an expected raw copy, and `qemu-img check` must find
//! no error afterwards.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

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

/// Writes `data` at each offset through the mount and into `expected`.
fn write_both(dev: &Path, expected: &str, writes: &[(u64, Vec<u8>)]) {
    let f = OpenOptions::new().write(true).open(dev).unwrap();
    let e = OpenOptions::new().write(true).open(expected).unwrap();
    for (off, data) in writes {
        f.write_all_at(data, *off).unwrap();
        e.write_all_at(data, *off).unwrap();
    }
    f.sync_all().unwrap();
}

fn writes_for(cluster: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (7, pattern(1, 1000)),            // unaligned, inside the first cluster
        (cluster - 100, pattern(2, 300)), // across a cluster boundary
        (5 * cluster, pattern(3, 3 * cluster as usize)), // whole clusters
        (3 << 20, pattern(4, 4096)),      // over qemu-io's data
        ((40 << 20) + 513, pattern(5, 70_000)), // fresh area, new L2 entries
    ]
}

fn matrix_case(cluster: u64, compat: &str, refcount_bits: u32) {
    let dir = TestDir::new(&format!("q2-{cluster}-{compat}-{refcount_bits}"));
    let img = dir.file("a.qcow2");
    let opts = format!("cluster_size={cluster},compat={compat},refcount_bits={refcount_bits}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &img, "64M"]);
    qemu_io(
        "qcow2",
        img.as_ref(),
        &[
            "write -P 0xa1 3M 1M",
            "write -P 0xb2 9000 20000",
            "write -z 50M 2M",
        ],
    );
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &expected]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let dev = d.dev("d0");
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 64 << 20);
    assert!(
        images_identical(&dev, "raw", expected.as_ref(), "raw"),
        "read mismatch"
    );
    write_both(&dev, &expected, &writes_for(cluster));
    assert!(
        images_identical(&dev, "raw", expected.as_ref(), "raw"),
        "mount mismatch after writes"
    );
    assert!(d.terminate().success());
    assert_clean(&img);
    assert!(
        images_identical(img.as_ref(), "qcow2", expected.as_ref(), "raw"),
        "image mismatch after writes"
    );
}

#[test]
fn matrix_cluster_sizes_v3() {
    for cluster in [512, 4096, 65536, 2 << 20] {
        matrix_case(cluster, "1.1", 16);
    }
}

#[test]
fn matrix_compat_v2() {
    matrix_case(65536, "0.10", 16);
    matrix_case(4096, "0.10", 16);
}

#[test]
fn matrix_refcount_widths() {
    for bits in [1, 2, 4, 8, 32, 64] {
        matrix_case(65536, "1.1", bits);
    }
}

#[test]
fn backing_chain_reads_and_copy_on_write() {
    let dir = TestDir::new("q2-chain");
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "32M"]);
    qemu_io("raw", base.as_ref(), &["write -P 0x11 0 8M"]);
    let mid = dir.file("mid.qcow2");
    // Relative backing names, resolved against the image's directory.
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &mid, "32M",
    ]);
    qemu_io(
        "qcow2",
        mid.as_ref(),
        &["write -P 0x22 1M 100k", "write -z 2M 64k"],
    );
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &top,
        "32M",
    ]);
    // Turn the backing-format extension into an unknown one: the format must
    // then be probed, and the unknown extension ignored.
    hide_backing_format(&top);
    qemu_io("qcow2", top.as_ref(), &["write -P 0x33 1050k 10k"]);
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &top, &expected]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let dev = d.dev("d0");
    assert!(
        images_identical(&dev, "raw", expected.as_ref(), "raw"),
        "chain read mismatch"
    );
    let mut q = d.qmp();
    let info = q.ok("query-block", json!({}));
    assert_eq!(info[0]["inserted"]["backing_file_depth"], 2);
    assert_eq!(
        info[0]["inserted"]["image"]["backing-image"]["format"],
        "qcow2"
    );
    assert_eq!(
        info[0]["inserted"]["image"]["backing-image"]["backing-image"]["format"],
        "raw"
    );
    // Partial-cluster writes over backing data must copy the rest of the cluster up.
    write_both(
        &dev,
        &expected,
        &[
            (1_000_000, pattern(9, 100)),
            (2 * 65536 + 5, pattern(8, 10)),
        ],
    );
    assert!(d.terminate().success());
    assert_clean(&top);
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
    // The backing files were not touched.
    assert_clean(&mid);
    qemu_io("raw", base.as_ref(), &["read -P 0x11 0 8M"]);
}

fn hide_backing_format(img: &str) {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0xE2, 0x79, 0x2A, 0xCA])
        .expect("backing format extension");
    f.write_all_at(&0x1234_5678u32.to_be_bytes(), at as u64)
        .unwrap();
    assert!(
        !qemu_img(&["info", img]).contains("backing file format"),
        "extension still visible"
    );
}

#[test]
fn backing_override_empty_means_no_backing() {
    let dir = TestDir::new("q2-nobacking");
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "8M"]);
    qemu_io("raw", base.as_ref(), &["write -P 0x11 0 8M"]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &top, "8M",
    ]);
    qemu_io("qcow2", top.as_ref(), &["write -P 0x22 0 64k"]);
    let spec = json!({"driver": "qcow2", "id": "d0", "backing": "",
                      "file": {"driver": "file", "filename": top}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    qemu_io_ro(
        "raw",
        &d.dev("d0"),
        &["read -P 0x22 0 64k", "read -P 0 64k 1M"],
    );
    assert_eq!(
        d.qmp().ok("query-block", json!({}))[0]["inserted"]["backing_file_depth"],
        0
    );
}

#[test]
fn compressed_clusters_read_and_rewrite() {
    compressed_case("zlib");
}

#[test]
fn zstd_compressed_clusters_read_and_rewrite() {
    compressed_case("zstd");
}

fn compressed_case(ctype: &str) {
    let dir = TestDir::new(&format!("q2-compressed-{ctype}"));
    let src = dir.file("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &src, "16M"]);
    qemu_io(
        "raw",
        src.as_ref(),
        &["write -P 0x5c 0 3M", "write -P 0x17 5M 200k"],
    );
    let img = dir.file("c.qcow2");
    qemu_img(&[
        "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", &src, &img,
    ]);
    let info = qemu_img(&["check", "--output=json", &img]);
    assert!(
        info.contains("\"compressed-clusters\""),
        "no compressed clusters made: {info}"
    );
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &src, &expected]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let dev = d.dev("d0");
    assert!(
        images_identical(&dev, "raw", expected.as_ref(), "raw"),
        "compressed read mismatch"
    );
    write_both(
        &dev,
        &expected,
        &[(100_000, pattern(3, 5000)), (5 << 20, pattern(4, 65536))],
    );
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
fn punch_hole_and_zero_range_make_zero_clusters() {
    let dir = TestDir::new("q2-zero");
    let img = qcow2_image(&dir, "z.qcow2", "", "16M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x66 0 16M"]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        1 << 20,
        1 << 20,
    )
    .unwrap();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, (4 << 20) + 100, 300_000).unwrap();
    drop(f);
    qemu_io_ro(
        "raw",
        &d.dev("d0"),
        &["read -P 0x66 0 1M", "read -P 0 1M 1M", "read -P 0x66 2M 2M"],
    );
    qemu_io_ro(
        "raw",
        &d.dev("d0"),
        &[
            "read -P 0x66 4M 100",
            "read -P 0 4194404 300000",
            "read -P 0x66 4494404 100",
        ],
    );
    assert!(d.terminate().success());
    assert_clean(&img);
    let map = qemu_img(&["map", "--output=json", &img]);
    let map: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let zero_at_1m = map
        .iter()
        .find(|e| e["start"] == 1 << 20)
        .expect("an extent at 1M");
    assert_eq!(zero_at_1m["zero"], true, "{map:?}");
    assert_eq!(
        zero_at_1m["data"], false,
        "punched clusters must not hold data: {map:?}"
    );
    qemu_io(
        "qcow2",
        img.as_ref(),
        &["read -P 0 1M 1M", "read -P 0x66 2M 2M"],
    );
}

#[test]
fn concurrent_allocating_writers() {
    let dir = TestDir::new("q2-concurrent");
    let img = qcow2_image(&dir, "c.qcow2", "cluster_size=4096", "32M");
    let expected = raw_image(&dir, "expected.raw", "32M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let dev = d.dev("d0");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let dev = dev.clone();
            let expected = expected.clone();
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&dev).unwrap();
                let e = OpenOptions::new().write(true).open(&expected).unwrap();
                for i in 0..64u64 {
                    // Interleaved 3000-byte writes: neighbours share clusters.
                    let off = (i * 8 + t) * 3000;
                    let data = pattern(t * 1000 + i, 3000);
                    f.write_all_at(&data, off).unwrap();
                    e.write_all_at(&data, off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(images_identical(&dev, "raw", expected.as_ref(), "raw"));
    assert!(d.terminate().success());
    assert_clean(&img);
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

/// Sets bits in the v3 incompatible feature field (offset 72).
fn set_incompatible(img: &str, bits: u64) {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    let v = u64::from_be_bytes(b) | bits;
    f.write_all_at(&v.to_be_bytes(), 72).unwrap();
}

#[test]
fn header_feature_bits_are_enforced() {
    let dir = TestDir::new("q2-features");
    let corrupt = qcow2_image(&dir, "corrupt.qcow2", "", "8M");
    set_incompatible(&corrupt, 2);
    let unknown = qcow2_image(&dir, "unknown.qcow2", "", "8M");
    set_incompatible(&unknown, 1 << 40);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let spec = |id: &str, f: &str, ro: bool| json!({"driver": "qcow2", "id": id, "read-only": ro, "file": {"driver": "file", "filename": f}});
    let (class, desc) = q.err("blockdev-add", spec("c", &corrupt, false));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("corrupt"), "{desc}");
    q.ok("blockdev-add", spec("c", &corrupt, true));
    let (_, desc) = q.err("blockdev-add", spec("u", &unknown, true));
    assert!(desc.contains("incompatible feature bit 40"), "{desc}");
    let garbage = qcow2_image(&dir, "garbage.qcow2", "", "8M");
    let f = OpenOptions::new().write(true).open(&garbage).unwrap();
    f.write_all_at(&0x7fff_ffff_0000u64.to_be_bytes(), 40)
        .unwrap(); // L1 table offset past the end
    let (_, desc) = q.err("blockdev-add", spec("g", &garbage, true));
    assert!(desc.contains("L1 table"), "{desc}");
    // The daemon is still up and only the valid device exists.
    assert_eq!(q.ok("query-block", json!({})).as_array().unwrap().len(), 1);
}

#[test]
fn corruption_found_at_run_time_is_reported_and_contained() {
    let dir = TestDir::new("q2-corrupt-runtime");
    let img = qcow2_image(&dir, "c.qcow2", "", "8M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x42 0 128k"]);
    // Point the L2 entry of guest cluster 0 past the end of the file.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap();
    let l1_off = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1_off).unwrap();
    let l2_off = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    f.write_all_at(&((1u64 << 63) | 0x7000_0000).to_be_bytes(), l2_off)
        .unwrap();
    drop(f);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let mut q = d.qmp();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let e = dev.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    let ev = q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(10));
    assert_eq!(ev["data"]["device"], "d0");
    assert!(
        ev["data"]["msg"].as_str().unwrap().contains("corrupt"),
        "{ev}"
    );
    // Found again: still EIO, but the event is not repeated (QEMU: "further
    // corruption events will be suppressed").
    let e = dev.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    q.ok("query-version", json!({}));
    assert!(
        q.events
            .iter()
            .all(|e| e["event"] != "BLOCK_IMAGE_CORRUPTED"),
        "{:?}",
        q.events
    );
    // Other clusters still read; writes are refused from now on; the daemon is up.
    dev.read_exact_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&x| x == 0x42));
    assert_eq!(
        dev.write_at(&buf, 1 << 20).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    q.ok("query-block", json!({}));
    drop(dev);
    assert!(d.terminate().success());
    let info = qemu_img(&["info", "--output=json", "-U", &img]);
    assert!(
        info.contains("\"corrupt\": true"),
        "corrupt bit not set: {info}"
    );
}

#[test]
fn internal_snapshots_are_listed_and_never_overwritten() {
    let dir = TestDir::new("q2-snapshots");
    let img = qcow2_image(&dir, "s.qcow2", "cluster_size=4096", "8M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x10 0 1M"]);
    qemu_img(&["snapshot", "-c", "before", &img]);
    let snap_copy = dir.file("snap.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &snap_copy]);
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &expected]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let info = d.qmp().ok("query-block", json!({}));
    let snaps = &info[0]["inserted"]["image"]["snapshots"];
    assert_eq!(snaps[0]["name"], "before", "{info}");
    assert_eq!(snaps[0]["id"], "1");
    assert!(snaps[0]["date-sec"].as_u64().unwrap() > 1_600_000_000);
    // Writes into clusters (and L2 tables) shared with the snapshot.
    write_both(
        &d.dev("d0"),
        &expected,
        &[(100, pattern(1, 5000)), (512 * 1024, pattern(2, 70_000))],
    );
    assert!(d.terminate().success());
    assert_clean(&img);
    assert!(
        images_identical(img.as_ref(), "qcow2", expected.as_ref(), "raw"),
        "active layer wrong"
    );
    // The snapshot still holds the old data.
    qemu_img(&["snapshot", "-a", "before", &img]);
    assert!(
        images_identical(img.as_ref(), "qcow2", snap_copy.as_ref(), "raw"),
        "snapshot was modified"
    );
    assert_clean(&img);
}

#[test]
fn refcount_table_grows_when_metadata_outgrows_it() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB (16-bit
    // refcounts) or 2 MiB (64-bit), so these writes must move the table.
    for bits in ["16", "64"] {
        let dir = TestDir::new(&format!("q2-reftable-{bits}"));
        let img = dir.file("g.qcow2");
        let opts = format!("cluster_size=512,refcount_bits={bits}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &img, "64M"]);
        let expected = raw_image(&dir, "expected.raw", "64M");
        let table_clusters = || {
            let mut b = [0u8; 4];
            OpenOptions::new()
                .read(true)
                .open(&img)
                .unwrap()
                .read_exact_at(&mut b, 56)
                .unwrap();
            u32::from_be_bytes(b)
        };
        let before = table_clusters();
        let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
        let writes: Vec<(u64, Vec<u8>)> = (0..20u64)
            .map(|i| ((i * 3 + 1) << 20, pattern(i, 1 << 20)))
            .collect();
        write_both(&d.dev("d0"), &expected, &writes);
        assert!(images_identical(
            &d.dev("d0"),
            "raw",
            expected.as_ref(),
            "raw"
        ));
        assert!(d.terminate().success());
        assert_clean(&img);
        assert!(
            images_identical(img.as_ref(), "qcow2", expected.as_ref(), "raw"),
            "refcount_bits={bits}"
        );
        assert!(
            table_clusters() > before,
            "the refcount table did not grow ({before} clusters)"
        );
    }
}

/// Big writes into unallocated space take one allocation, one data write
/// and one L2 update per run of clusters; with caches of one slice and one
/// refcount chunk the runs cross L2 tables and refcount blocks, and every
/// change still reaches the image.
#[test]
fn multi_cluster_runs_with_tiny_caches() {
    let dir = TestDir::new("qcow2-runs");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=4096", "64M");
    let spec = json!({"driver": "qcow2", "id": "d0", "l2-cache-size": 4096,
                      "refcount-cache-size": 4096,
                      "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let f = rw(&d, "d0");
    let mut model = vec![0u8; 64 << 20];
    let mut rng = Rng(5);
    for i in 0..40u64 {
        let len = (1 + rng.below(256)) as usize * 4096;
        let off = (rng.below((64 << 20) - len as u64) & !4095) + if i % 3 == 0 { 512 } else { 0 };
        let off = off.min((64 << 20) - len as u64);
        let data = pattern(i, len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    let mut back = vec![0u8; 64 << 20];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "the device reads back other data");
    drop(f);
    d.terminate();
    let want = dir.file("want.raw");
    std::fs::write(&want, &model).unwrap();
    assert!(images_identical(
        img.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    let c = qemu_img_check(&img);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{c}");
}
