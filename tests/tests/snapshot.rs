//! `blockdev-snapshot-sync` through the real mount and socket: the new
//! overlay becomes the device's top (query-block), writes land in it only,
//! chains grow, I/O goes on while the snapshot is taken, and every refused
//! snapshot leaves the device as it was. `qemu-img` is the oracle for the
//! images afterwards.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const M: u64 = 1 << 20;

fn file_opts(file: &str) -> Value {
    json!({"driver": "file", "filename": file})
}

fn canonical(p: &str) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|e| panic!("canonicalize {p}: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn node_names(q: &mut Qmp) -> Vec<String> {
    let mut v: Vec<String> = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn wr_operations(q: &mut Qmp, id: &str) -> u64 {
    device_stats(q, id)["wr_operations"]
        .as_u64()
        .unwrap_or_else(|| panic!("no wr_operations for {id}"))
}

fn snapshot(q: &mut Qmp, args: Value) {
    q.ok("blockdev-snapshot-sync", args);
}

fn write_dev(d: &Daemon, id: &str, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(d.dev(id)).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_dev(d: &Daemon, id: &str) -> Vec<u8> {
    std::fs::read(d.dev(id)).unwrap()
}

/// Writes through the mount and into the model.
fn write_both(d: &Daemon, model: &mut [u8], offset: u64, data: &[u8]) {
    write_dev(d, "d0", offset, data);
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// `qemu-img info --output=json` with the format given.
fn info(fmt: &str, img: &str) -> Value {
    let out = qemu_img(&["info", "--output=json", "-f", fmt, img]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info ({e}): {out}"))
}

/// `qemu-img check`: no corruption, no leak.
fn assert_clean(img: &str) {
    let v = qemu_img_check(img);
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
    assert!(v.get("leaks").is_none_or(|c| c == 0), "{v}");
}

/// The chain topped by `img` (qcow2) reads exactly as `model`.
fn assert_chain_is(dir: &TestDir, img: &str, model: &[u8]) {
    let expect = dir.join("expect.raw");
    std::fs::write(&expect, model).unwrap();
    assert!(
        images_identical(Path::new(img), "qcow2", &expect, "raw"),
        "{img} differs from the model"
    );
}

/// Where the overlay's header says its backing file is, and in which format.
fn backing_of(img: &str) -> (String, String) {
    let i = info("qcow2", img);
    (
        i["backing-filename"].as_str().unwrap_or_default().into(),
        i["backing-filename-format"]
            .as_str()
            .unwrap_or_default()
            .into(),
    )
}

#[test]
fn raw_base_gets_a_qcow2_overlay_and_writes_land_in_it() {
    let dir = TestDir::new("snap-raw");
    let base = dir.file("base.img");
    let base_data = pattern(1, 4 * M as usize);
    std::fs::write(&base, &base_data).unwrap();
    let overlay = dir.file("overlay.qcow2");
    let d = Daemon::start(&dir, &[raw_spec("d0", &base, json!({}))]);
    let mut q = d.qmp();
    snapshot(
        &mut q,
        json!({"device": "d0", "snapshot-file": overlay, "snapshot-node-name": "snap1"}),
    );
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["drv"], "qcow2", "{ins}");
    assert_eq!(ins["node-name"], "snap1", "{ins}");
    assert_eq!(ins["file"], overlay.as_str(), "{ins}");
    assert_eq!(ins["backing_file"], canonical(&base), "{ins}");
    assert_eq!(ins["backing_file_depth"], 1, "{ins}");
    assert_eq!(ins["ro"], false, "{ins}");
    assert_eq!(ins["image"]["virtual-size"], 4 * M, "{ins}");
    assert_eq!(ins["image"]["backing-image"]["format"], "raw", "{ins}");
    // The device reads the base through the empty overlay.
    assert_eq!(read_dev(&d, "d0"), base_data);
    let mut model = base_data.clone();
    write_both(&d, &mut model, M, &pattern(2, 64 << 10));
    // Unaligned and crossing a cluster boundary: copy-on-write from the base.
    write_both(&d, &mut model, 3 * M - 1000, &pattern(3, 5000));
    write_both(&d, &mut model, 0, &[0u8; 4096]);
    assert_eq!(read_dev(&d, "d0"), model);
    drop(q);
    d.quit();
    assert_eq!(std::fs::read(&base).unwrap(), base_data, "base changed");
    let (backing, fmt) = backing_of(&overlay);
    assert_eq!(
        (backing.as_str(), fmt.as_str()),
        (canonical(&base).as_str(), "raw")
    );
    assert_clean(&overlay);
    assert_chain_is(&dir, &overlay, &model);
}

#[test]
fn two_snapshots_of_a_qcow2_base_make_a_chain_of_three() {
    let dir = TestDir::new("snap-chain");
    let base = qcow2_image(&dir, "base.qcow2", "cluster_size=65536", "4M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x11 0 1M"]);
    let (o1, o2) = (dir.file("o1.qcow2"), dir.file("o2.qcow2"));
    let spec = json!({"driver": "qcow2", "id": "d0", "node-name": "base0",
                      "file": file_opts(&base)});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    let mut model = vec![0u8; 4 * M as usize];
    model[..M as usize].fill(0x11);
    // Layer 0 (the base itself, through the daemon).
    write_both(&d, &mut model, 2 * M, &pattern(10, 128 << 10));
    let base_model = model.clone();
    snapshot(
        &mut q,
        json!({"device": "d0", "snapshot-file": o1, "snapshot-node-name": "s1"}),
    );
    // Layer 1.
    write_both(&d, &mut model, 4096, &pattern(11, 8192));
    write_both(&d, &mut model, 2 * M + 60_000, &pattern(12, 10_000));
    let o1_model = model.clone();
    snapshot(
        &mut q,
        json!({"device": "d0", "snapshot-file": o2, "snapshot-node-name": "s2"}),
    );
    // Layer 2, partly over the others.
    write_both(&d, &mut model, 0, &pattern(13, 6000));
    write_both(&d, &mut model, 3 * M, &pattern(14, 64 << 10));
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["node-name"], "s2", "{ins}");
    assert_eq!(ins["backing_file_depth"], 2, "{ins}");
    assert_eq!(ins["backing_file"], canonical(&o1), "{ins}");
    assert_eq!(
        ins["image"]["backing-image"]["backing-image"]["filename"],
        base.as_str(),
        "{ins}"
    );
    let names = node_names(&mut q);
    for n in ["base0", "s1", "s2"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert_eq!(read_dev(&d, "d0"), model);
    drop(q);
    d.quit();
    for img in [&base, &o1, &o2] {
        assert_clean(img);
    }
    assert_eq!(backing_of(&o2), (canonical(&o1), "qcow2".to_string()));
    assert_eq!(backing_of(&o1), (canonical(&base), "qcow2".to_string()));
    assert_chain_is(&dir, &o2, &model);
    assert_chain_is(&dir, &o1, &o1_model);
    let base_raw = dir.file("base.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &base, &base_raw]);
    assert!(
        std::fs::read(&base_raw).unwrap() == base_model,
        "base layer"
    );
}

#[test]
fn by_node_name_onto_an_existing_overlay_with_explicit_format() {
    let dir = TestDir::new("snap-existing");
    let base = dir.file("base.img");
    let base_data = pattern(20, 2 * M as usize);
    std::fs::write(&base, &base_data).unwrap();
    let overlay = dir.file("pre.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &overlay,
    ]);
    let spec = json!({"driver": "raw", "id": "d0", "node-name": "base0",
                      "file": file_opts(&base)});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    snapshot(
        &mut q,
        json!({"node-name": "base0", "snapshot-file": overlay, "snapshot-node-name": "ov",
               "mode": "existing", "format": "qcow2"}),
    );
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["node-name"], "ov", "{ins}");
    assert_eq!(ins["drv"], "qcow2", "{ins}");
    // As the existing image records it.
    assert_eq!(ins["backing_file"], base.as_str(), "{ins}");
    assert_eq!(ins["backing_file_depth"], 1, "{ins}");
    let mut model = base_data.clone();
    write_both(&d, &mut model, 512, &pattern(21, 70_000));
    assert_eq!(read_dev(&d, "d0"), model);
    drop(q);
    d.quit();
    assert_eq!(std::fs::read(&base).unwrap(), base_data, "base changed");
    // mode=existing leaves the image's own backing name alone.
    assert_eq!(backing_of(&overlay), (base.clone(), "raw".to_string()));
    assert_clean(&overlay);
    assert_chain_is(&dir, &overlay, &model);
}

/// Writer threads keep writing 4 KiB blocks (several per cluster, so the
/// overlay copies on write while the others write) until told to stop.
#[test]
fn io_goes_on_while_the_snapshot_is_taken() {
    const BLOCKS: u64 = 256; // 1 MiB of 4 KiB blocks
    const WRITERS: u64 = 3;
    let dir = TestDir::new("snap-live");
    let base = dir.file("base.img");
    std::fs::write(&base, pattern(30, 2 * M as usize)).unwrap();
    let d = Daemon::start(&dir, &[raw_spec("d0", &base, json!({}))]);
    let mut q = d.qmp();
    // model[block] = seed of the last acknowledged write (0: the base's data).
    let model = Arc::new(Mutex::new(vec![0u64; BLOCKS as usize]));
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (model, done, count) = (model.clone(), done.clone(), count.clone());
            let dev = d.dev("d0");
            std::thread::spawn(move || -> std::io::Result<()> {
                let f = OpenOptions::new().write(true).open(dev)?;
                let mut round = 0u64;
                while !done.load(Ordering::Relaxed) {
                    round += 1;
                    for b in (w..BLOCKS).step_by(WRITERS as usize) {
                        let seed = round * 1000 + b + 1;
                        f.write_all_at(&pattern(seed, 4096), b * 4096)?;
                        model.lock().unwrap()[b as usize] = seed;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let wait_for = |n: u64| {
        let c = count.clone();
        with_timeout(Duration::from_secs(30), move || {
            while c.load(Ordering::Relaxed) < n {
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    wait_for(300);
    let before = count.load(Ordering::Relaxed);
    // Three snapshots in a row, each while the writers are busy.
    let overlays: Vec<String> = (1..=3).map(|i| dir.file(&format!("o{i}.qcow2"))).collect();
    let mut at_snapshot = 0;
    for (i, ov) in overlays.iter().enumerate() {
        snapshot(
            &mut q,
            json!({"device": "d0", "snapshot-file": ov, "snapshot-node-name": format!("live{i}")}),
        );
        at_snapshot = count.load(Ordering::Relaxed);
        wait_for(at_snapshot + 300);
    }
    done.store(true, Ordering::Relaxed);
    for w in writers {
        with_timeout(Duration::from_secs(30), move || w.join().unwrap())
            .unwrap_or_else(|e| panic!("a writer failed: {e}"));
    }
    let total = count.load(Ordering::Relaxed);
    assert!(
        before > 0 && total >= at_snapshot + 300,
        "{before} {at_snapshot} {total}"
    );
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["node-name"], "live2", "{ins}");
    assert_eq!(ins["backing_file_depth"], 3, "{ins}");
    // Every write counted exactly once.
    assert_eq!(wr_operations(&mut q, "d0"), total);
    let mut expect = pattern(30, 2 * M as usize);
    for (b, &seed) in model.lock().unwrap().iter().enumerate() {
        if seed != 0 {
            expect[b * 4096..(b + 1) * 4096].copy_from_slice(&pattern(seed, 4096));
        }
    }
    assert!(read_dev(&d, "d0") == expect, "the device lost writes");
    drop(q);
    d.quit();
    for ov in &overlays {
        assert_clean(ov);
    }
    assert_chain_is(&dir, &overlays[2], &expect);
}

/// After a refused snapshot the device has its old top, serves I/O, and no
/// node was left behind.
fn assert_unchanged(d: &Daemon, q: &mut Qmp, nodes: &[String], base: &str, at: u64) {
    let ins = query_block(q, "d0")["inserted"].clone();
    assert_eq!(ins["node-name"], "base0", "{ins}");
    assert_eq!(ins["drv"], "raw", "{ins}");
    assert_eq!(node_names(q), nodes);
    let data = pattern(at, 4096);
    write_dev(d, "d0", at * 4096, &data);
    let f = std::fs::File::open(base).unwrap();
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, at * 4096).unwrap();
    assert!(back == data, "write did not reach the base");
}

#[test]
fn refused_snapshots_leave_the_device_as_it_was() {
    let dir = TestDir::new("snap-err");
    let base = raw_image(&dir, "base.img", "1M");
    let ro = raw_image(&dir, "ro.img", "1M");
    let spec = json!({"driver": "raw", "id": "d0", "node-name": "base0",
                      "file": {"driver": "file", "filename": base, "node-name": "proto0"}});
    let ro_spec = json!({"driver": "raw", "id": "r0", "read-only": true,
                         "file": file_opts(&ro)});
    let d = Daemon::start(&dir, &[spec.to_string(), ro_spec.to_string()]);
    let mut q = d.qmp();
    let nodes = node_names(&mut q);
    let ov = dir.file("ov.qcow2");
    let cases = [
        (
            json!({"device": "nope", "snapshot-file": ov}),
            "DeviceNotFound",
            "nope",
        ),
        (
            json!({"node-name": "nope", "snapshot-file": ov}),
            "DeviceNotFound",
            "nope",
        ),
        (
            json!({"device": "d0", "node-name": "base0", "snapshot-file": ov}),
            "GenericError",
            "Only one of",
        ),
        (
            json!({"snapshot-file": ov}),
            "GenericError",
            "Either 'device' or 'node-name'",
        ),
        (json!({"device": "d0"}), "GenericError", "snapshot-file"),
        (
            json!({"device": "d0", "snapshot-file": ov, "snapshot-node-name": "base0"}),
            "GenericError",
            "Duplicate node name 'base0'",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "snapshot-node-name": "proto0"}),
            "GenericError",
            "Duplicate node name 'proto0'",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "snapshot-node-name": "r0"}),
            "GenericError",
            "'r0'",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "snapshot-node-name": "1bad"}),
            "GenericError",
            "1bad",
        ),
        (
            json!({"node-name": "proto0", "snapshot-file": ov}),
            "GenericError",
            "'proto0' is not one",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "format": "raw"}),
            "GenericError",
            "'raw'",
        ),
        (
            json!({"device": "d0", "snapshot-file": base, "format": "raw", "mode": "existing"}),
            "GenericError",
            "Format 'raw' cannot have a backing file",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "format": "vmdk9"}),
            "GenericError",
            "Invalid block format 'vmdk9'",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "mode": "sideways"}),
            "GenericError",
            "sideways",
        ),
        (
            json!({"device": "r0", "snapshot-file": ov}),
            "GenericError",
            "read only",
        ),
        (
            json!({"device": "d0", "snapshot-file": ov, "mode": "existing"}),
            "GenericError",
            "ov.qcow2",
        ),
        (
            json!({"device": "d0", "snapshot-file": dir.file("missing/ov.qcow2")}),
            "GenericError",
            "missing/ov.qcow2",
        ),
    ];
    for (i, (args, class, text)) in cases.into_iter().enumerate() {
        let (c, desc) = q.err("blockdev-snapshot-sync", args.clone());
        assert_eq!(c, class, "{args}: {desc}");
        assert!(desc.contains(text), "{args}: '{desc}' lacks '{text}'");
        assert!(!Path::new(&ov).exists(), "{args} left {ov} behind");
        assert_unchanged(&d, &mut q, &nodes, &base, i as u64);
    }
    assert_eq!(query_block(&mut q, "r0")["inserted"]["drv"], "raw");
    // The device still takes a snapshot after all that.
    snapshot(&mut q, json!({"device": "d0", "snapshot-file": ov}));
    assert_eq!(query_block(&mut q, "d0")["inserted"]["drv"], "qcow2");
}

/// Creating the overlay over a file the device is using would destroy it.
#[test]
fn snapshot_file_that_is_open_is_refused() {
    let dir = TestDir::new("snap-self");
    let base = dir.file("base.img");
    let data = pattern(40, M as usize);
    std::fs::write(&base, &data).unwrap();
    let other = dir.file("other.img");
    std::fs::write(&other, pattern(41, M as usize)).unwrap();
    let spec = json!({"driver": "raw", "id": "d0", "node-name": "base0",
                      "file": file_opts(&base)});
    let d = Daemon::start(&dir, &[spec.to_string(), raw_spec("d1", &other, json!({}))]);
    let mut q = d.qmp();
    // Its own base, by another spelling of the path, and another device's file.
    let via_dots = format!("{}/../{}/base.img", dir.path.display(), {
        dir.path.file_name().unwrap().to_string_lossy()
    });
    for target in [base.clone(), via_dots, other.clone()] {
        let (class, desc) = q.err(
            "blockdev-snapshot-sync",
            json!({"device": "d0", "snapshot-file": target}),
        );
        assert_eq!(class, "GenericError", "{target}: {desc}");
        assert!(desc.contains("in use"), "{target}: {desc}");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            data,
            "{target} clobbered the base"
        );
        assert_eq!(
            std::fs::read(&other).unwrap(),
            pattern(41, M as usize),
            "{target} clobbered d1"
        );
    }
    // Opening another device's qcow2 image a second time, as an existing
    // overlay, is refused as well.
    let q2 = qcow2_image(&dir, "q2.qcow2", "", "1M");
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d2", "file": file_opts(&q2)}),
    );
    let (class, desc) = q.err(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": q2, "mode": "existing"}),
    );
    assert_eq!(class, "GenericError", "{desc}");
    assert!(desc.contains("in use"), "{desc}");
    let nodes = node_names(&mut q);
    assert_unchanged(&d, &mut q, &nodes, &base, 3);
}

#[test]
fn the_overlay_keeps_the_old_top_options() {
    let dir = TestDir::new("snap-opts");
    let base = dir.file("base.img");
    std::fs::write(&base, pattern(5, 2 * M as usize)).unwrap();
    let overlay = dir.file("overlay.qcow2");
    let spec = json!({"driver": "raw", "id": "d0", "detect-zeroes": "unmap", "discard": "unmap",
                      "cache": {"direct": true}, "file": file_opts(&base)});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    snapshot(&mut q, json!({"device": "d0", "snapshot-file": overlay}));
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["drv"], "qcow2", "{ins}");
    assert_eq!(ins["detect_zeroes"], "unmap", "{ins}");
    // Zeroes written after the snapshot stay unallocated in the overlay
    // (zero clusters), as detect-zeroes promises. The kernel may split the
    // write at a page of the user buffer; that piece's cluster is then
    // partly zeroed over backing data and must be allocated.
    write_dev(&d, "d0", 0, &vec![0u8; M as usize]);
    drop(q);
    d.quit();
    let map: Value = serde_json::from_str(&qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        &overlay,
    ]))
    .unwrap();
    let first = &map[0];
    assert_eq!(
        (
            first["start"].as_u64(),
            first["data"].as_bool(),
            first["zero"].as_bool()
        ),
        (Some(0), Some(false), Some(true)),
        "{map}"
    );
    assert!(first["length"].as_u64().unwrap() >= M - (64 << 10), "{map}");
}

/// After a snapshot the old top is a read-only backing file: its write
/// lock is given back, so tools may open it again without `-U`.
#[test]
fn the_old_top_is_reopened_read_only() {
    let dir = TestDir::new("snap-reopen");
    let top = qcow2_image(&dir, "top.qcow2", "", "4M");
    qemu_io("qcow2", top.as_ref(), &["write -P 0x17 0 1M"]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    let held = std::process::Command::new("qemu-img")
        .args(["info", &top])
        .output()
        .unwrap();
    assert!(
        !held.status.success(),
        "qemu-img opened an image blkfs writes"
    );
    snapshot(
        &mut q,
        json!({"device": "d0", "snapshot-file": dir.file("over.qcow2")}),
    );
    let out = qemu_img(&["info", "--output=json", &top]);
    assert!(out.contains("\"virtual-size\": 4194304"), "{out}");
    qemu_io_ro("qcow2", top.as_ref(), &["read -P 0x17 0 1M"]);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let old = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "qcow2" && n["file"] == top.as_str())
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(old["ro"], true, "{old}");
    // Writing it from outside stays refused: it is still our backing file.
    let w = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k", &top])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success() && err.contains("lock"), "{err}");
    write_dev(&d, "d0", 0, &pattern(9, 4096));
    d.quit();
}
