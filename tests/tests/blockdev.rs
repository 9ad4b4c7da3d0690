//! blockdev-add (both argument forms, references, failures that must leave
//! no trace) and the query commands (query-block, query-named-block-nodes,
//! query-blockstats) checked against the images and qemu-img.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};

fn nodes(q: &mut Qmp) -> Vec<Value> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .cloned()
        .expect("query-named-block-nodes returns a list")
}

fn blocks(q: &mut Qmp) -> Vec<Value> {
    q.ok("query-block", json!({}))
        .as_array()
        .cloned()
        .expect("query-block returns a list")
}

fn stats_of(q: &mut Qmp, dev: &str) -> Value {
    let all = q.ok("query-blockstats", json!({}));
    all.as_array()
        .expect("query-blockstats returns a list")
        .iter()
        .find(|s| s["device"] == dev)
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {dev}: {all}"))
}

fn file_spec(img: &str) -> Value {
    json!({"driver": "file", "filename": img})
}

#[test]
fn added_devices_appear_at_once_in_both_argument_forms() {
    let dir = TestDir::new("bd-add");
    let a = raw_image(&dir, "a.img", "3M");
    let b = raw_image(&dir, "b.img", "5M");
    let c = raw_image(&dir, "c.img", "2M");
    qemu_io("raw", a.as_ref(), &["write -P 0x3c 4096 64k"]);
    qemu_io("raw", b.as_ref(), &["write -P 0x4d 1M 4k"]);
    let d = Daemon::start(&dir, &[]);
    assert!(list_dir(&d.mnt).is_empty(), "no devices yet");
    let mut q = d.qmp();
    // Looked up before it exists: the add must still show it at once.
    assert_eq!(
        std::fs::metadata(d.dev("s0")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    // Seed form.
    let r = q.ok(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "s0", "file": file_spec(&a)}}),
    );
    assert_eq!(r, json!({}));
    let m = std::fs::metadata(d.dev("s0")).expect("s0 visible right after blockdev-add");
    assert!(m.is_file());
    assert_eq!(m.len(), 3 << 20);
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(list_dir(&d.mnt), vec!["s0"]);

    // Flat form, read-only.
    let r = q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "f0", "read-only": true, "file": file_spec(&b)}),
    );
    assert_eq!(r, json!({}));
    let m = std::fs::metadata(d.dev("f0")).expect("f0 visible right after blockdev-add");
    assert_eq!(m.len(), 5 << 20);
    assert_eq!(m.permissions().mode() & 0o7777, 0o400);
    assert_eq!(list_dir(&d.mnt), vec!["f0", "s0"]);

    // A node without an id is not shown; a device referring to it by name is.
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "proto-c", "filename": c}),
    );
    assert_eq!(
        list_dir(&d.mnt),
        vec!["f0", "s0"],
        "a node without id is not a device"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "r0", "node-name": "fmt-c", "file": "proto-c"}),
    );
    assert_eq!(list_dir(&d.mnt), vec!["f0", "r0", "s0"]);
    assert_eq!(std::fs::metadata(d.dev("r0")).unwrap().len(), 2 << 20);

    // Contents are the images' contents.
    qemu_io(
        "raw",
        &d.dev("s0"),
        &["read -P 0 0 4k", "read -P 0x3c 4k 64k", "read -P 0 68k 1M"],
    );
    qemu_io_ro(
        "raw",
        &d.dev("f0"),
        &["read -P 0x4d 1M 4k", "read -P 0 0 1M"],
    );
    assert!(images_identical(&d.dev("r0"), "raw", c.as_ref(), "raw"));

    let names: Vec<Value> = nodes(&mut q)
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert!(
        names.contains(&json!("proto-c")) && names.contains(&json!("fmt-c")),
        "{names:?}"
    );
    assert_eq!(names.len(), 6, "two nodes per raw device: {names:?}");
}

#[test]
fn failed_adds_report_clearly_and_register_nothing() {
    let dir = TestDir::new("bd-fail");
    let img = raw_image(&dir, "a.img", "1M");
    let img2 = raw_image(&dir, "b.img", "1M");
    let junk = raw_image(&dir, "junk.img", "1M");
    let missing = dir.file("no-such-image.img");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "d0", "node-name": "n1", "file": file_spec(&img)}),
    );
    let before_nodes = nodes(&mut q);
    let before_blocks = blocks(&mut q);
    assert_eq!(before_nodes.len(), 2);

    let cases: Vec<(Value, String)> = vec![
        (
            json!({"driver": "raw", "id": "d0", "file": file_spec(&img2)}),
            "Duplicate ID 'd0' for drive".into(),
        ),
        (
            json!({"options": {"driver": "raw", "id": "d0", "file": file_spec(&img2)}}),
            "Duplicate ID 'd0' for drive".into(),
        ),
        (
            json!({"driver": "raw", "id": "d1", "node-name": "n1", "file": file_spec(&img2)}),
            "Duplicate node name 'n1'".into(),
        ),
        // The duplicate is the child's name: the parent must not be registered either.
        (
            json!({"driver": "raw", "id": "d1", "node-name": "n2", "file": {"driver": "file", "node-name": "n1", "filename": img2}}),
            "Duplicate node name 'n1'".into(),
        ),
        (
            json!({"driver": "raw", "id": "d1", "file": "nope"}),
            "Cannot find device=nope nor node_name=nope".into(),
        ),
    ];
    for (args, want) in &cases {
        let (class, desc) = q.err("blockdev-add", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert_eq!(&desc, want, "{args}");
    }
    // Missing image file: the message names the file.
    for args in [
        json!({"driver": "raw", "id": "d1", "node-name": "n2", "file": file_spec(&missing)}),
        json!({"driver": "file", "node-name": "n2", "filename": missing}),
    ] {
        let (class, desc) = q.err("blockdev-add", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert!(
            desc.contains(&missing),
            "desc should name {missing}: {desc}"
        );
    }
    // A format the file is not in, found after its file node opened.
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "vmdk", "id": "d1", "node-name": "n2", "file": {"driver": "file", "node-name": "n3", "filename": junk}}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("not in VMDK format"), "{desc}");
    assert!(desc.contains(&junk), "{desc}");
    // An option blkfs does not support.
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "vvfat", "id": "d1", "node-name": "n2", "dir": dir.file(""), "rw": true}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("is not supported by blkfs"), "{desc}");
    assert!(desc.contains("vvfat"), "{desc}");

    // Nothing of the failed adds was registered.
    assert_eq!(nodes(&mut q), before_nodes);
    assert_eq!(blocks(&mut q), before_blocks);
    assert_eq!(list_dir(&d.mnt), vec!["d0"]);
    // The names the failed adds tried to use are still free.
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "d1", "node-name": "n2", "file": {"driver": "file", "node-name": "n3", "filename": img2}}),
    );
    assert_eq!(list_dir(&d.mnt), vec!["d0", "d1"]);
    assert_eq!(nodes(&mut q).len(), 4);
    // The daemon still serves I/O on the first device.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    f.write_all_at(&[7u8; 512], 0).unwrap();
    drop(f);
    qemu_io_shared("raw", img.as_ref(), &["read -P 7 0 512"]);
}

#[test]
fn query_block_describes_devices_like_qemu_img() {
    let dir = TestDir::new("bd-qblock");
    let a = raw_image(&dir, "a.img", "64M");
    let b = raw_image(&dir, "b.img", "8M");
    qemu_io(
        "raw",
        a.as_ref(),
        &["write -P 1 1M 3M", "write -P 2 40M 512k"],
    );
    let spec_b = json!({"driver": "raw", "id": "ro0", "node-name": "fmt-b", "read-only": true,
                        "detect-zeroes": "on", "file": {"driver": "file", "filename": b}});
    let d = Daemon::start(&dir, &[raw_spec("d0", &a, json!({})), spec_b.to_string()]);
    let mut q = d.qmp();
    // Write through the mount so actual-size is not just what qemu-io left.
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&pattern(3, 2 << 20), 20 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let list = blocks(&mut q);
    assert_eq!(list.len(), 2, "{list:?}");
    let by_dev = |id: &str| {
        list.iter()
            .find(|b| b["device"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no {id}"))
    };
    for (id, img, ro, dz) in [("d0", &a, false, "off"), ("ro0", &b, true, "on")] {
        let bi = by_dev(id);
        assert!(bi["type"].is_string(), "{bi}");
        assert!(
            bi["removable"].is_boolean() && bi["locked"].is_boolean(),
            "{bi}"
        );
        let ins = &bi["inserted"];
        assert_eq!(ins["file"], json!(img), "{ins}");
        assert_eq!(ins["ro"], ro, "{ins}");
        assert_eq!(ins["drv"], "raw", "{ins}");
        assert_eq!(ins["backing_file_depth"], 0, "{ins}");
        assert!(ins.get("backing_file").is_none(), "{ins}");
        assert_eq!(ins["encrypted"], false, "{ins}");
        assert_eq!(ins["encryption_key_missing"], false, "{ins}");
        assert_eq!(ins["detect_zeroes"], dz, "{ins}");
        for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
            assert_eq!(ins[k], 0, "{k} in {ins}");
        }
        let name = ins["node-name"]
            .as_str()
            .unwrap_or_else(|| panic!("node-name: {ins}"));
        if id == "ro0" {
            assert_eq!(name, "fmt-b");
        } else {
            assert!(name.starts_with("#block"), "auto name {name}");
        }
        // ImageInfo against qemu-img info and stat of the image file.
        let image = &ins["image"];
        let info = qemu_img_info(img.as_ref());
        assert_eq!(image["filename"], json!(img), "{image}");
        assert_eq!(image["format"], "raw", "{image}");
        assert_eq!(
            image["virtual-size"], info["virtual-size"],
            "{image} vs {info}"
        );
        let blocks512 = std::fs::metadata(img).unwrap().blocks() * 512;
        assert_eq!(
            image["actual-size"], blocks512,
            "actual-size = st_blocks*512 of {img}: {image}"
        );
        assert_eq!(
            image["actual-size"], info["actual-size"],
            "{image} vs {info}"
        );
    }
    assert!(
        std::fs::metadata(&a).unwrap().blocks() * 512 >= 5 << 20,
        "the writes allocated space"
    );
}

#[test]
fn query_named_block_nodes_lists_every_node() {
    let dir = TestDir::new("bd-nodes");
    let a = raw_image(&dir, "a.img", "4M");
    let b = raw_image(&dir, "b.img", "6M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &a, json!({}))]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "d1", "node-name": "top1", "read-only": true,
               "file": {"driver": "file", "node-name": "proto1", "filename": b}}),
    );
    let list = nodes(&mut q);
    assert_eq!(list.len(), 4, "{list:?}");
    let names: Vec<&str> = list
        .iter()
        .map(|n| n["node-name"].as_str().expect("node-name"))
        .collect();
    let mut uniq = names.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4, "node names are unique: {names:?}");
    let auto: Vec<&&str> = names.iter().filter(|n| n.starts_with("#block")).collect();
    assert_eq!(
        auto.len(),
        2,
        "d0's two nodes have generated names: {names:?}"
    );
    assert!(
        names.contains(&"top1") && names.contains(&"proto1"),
        "{names:?}"
    );

    let by_name = |n: &str| list.iter().find(|x| x["node-name"] == n).unwrap();
    for (n, drv, file, ro, size) in [
        ("top1", "raw", &b, true, 6u64 << 20),
        ("proto1", "file", &b, true, 6 << 20),
    ] {
        let x = by_name(n);
        assert_eq!(x["drv"], drv, "{x}");
        assert_eq!(x["file"], json!(file), "{x}");
        assert_eq!(x["ro"], ro, "{x}");
        assert_eq!(x["image"]["virtual-size"], size, "{x}");
        assert_eq!(x["image"]["filename"], json!(file), "{x}");
        assert_eq!(x["backing_file_depth"], 0, "{x}");
    }
    // d0: one raw and one file node, both over a.img, both writable.
    let mut drvs: Vec<&str> = list
        .iter()
        .filter(|x| x["node-name"].as_str().unwrap().starts_with("#block"))
        .map(|x| {
            assert_eq!(x["file"], json!(a), "{x}");
            assert_eq!(x["ro"], false, "{x}");
            assert_eq!(x["image"]["virtual-size"], 4 << 20, "{x}");
            x["drv"].as_str().unwrap()
        })
        .collect();
    drvs.sort();
    assert_eq!(drvs, vec!["file", "raw"]);
    // query-block's node-name is one of these nodes, the raw one.
    for bi in blocks(&mut q) {
        let n = bi["inserted"]["node-name"].as_str().unwrap();
        assert_eq!(by_name(n)["drv"], "raw", "{bi}");
    }
}

#[test]
fn blockstats_count_what_was_done() {
    let dir = TestDir::new("bd-stats");
    let a = raw_image(&dir, "a.img", "16M");
    let b = raw_image(&dir, "b.img", "16M");
    let d = Daemon::start(
        &dir,
        &[raw_spec("d0", &a, json!({})), raw_spec("d1", &b, json!({}))],
    );
    let mut q = d.qmp();
    let keys = [
        "rd_bytes",
        "wr_bytes",
        "rd_operations",
        "wr_operations",
        "flush_operations",
        "flush_total_time_ns",
        "wr_total_time_ns",
        "rd_total_time_ns",
        "wr_highest_offset",
    ];
    // Untouched devices count nothing.
    let s0 = stats_of(&mut q, "d0");
    for k in keys {
        assert_eq!(s0["stats"][k], 0, "{k} before any I/O: {s0}");
        assert_eq!(
            s0["parent"]["stats"][k], 0,
            "parent {k} before any I/O: {s0}"
        );
    }

    // Exactly one write of N bytes at X, with O_DIRECT so nothing else happens.
    const X: u64 = 3 << 20;
    const N: usize = 192 << 10;
    let data = pattern(9, N);
    let mut buf = AlignedBuf::new(N);
    buf.as_mut().copy_from_slice(&data);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(d.dev("d0"))
        .unwrap();
    f.write_all_at(buf.as_ref(), X).unwrap();
    let s = stats_of(&mut q, "d0");
    assert!(s["stats"]["wr_bytes"].as_u64().unwrap() >= N as u64, "{s}");
    assert!(s["stats"]["wr_operations"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["stats"]["wr_highest_offset"], X + N as u64, "{s}");
    assert_eq!(s["stats"]["rd_operations"], 0, "{s}");
    assert_eq!(s["stats"]["rd_bytes"], 0, "{s}");
    // The file node below saw the same write.
    let p = &s["parent"];
    assert!(p.is_object(), "parent stats of the file node: {s}");
    assert!(p["stats"]["wr_bytes"].as_u64().unwrap() >= N as u64, "{s}");
    assert_eq!(p["stats"]["wr_highest_offset"], X + N as u64, "{s}");

    // Reads of M bytes.
    const M: usize = 128 << 10;
    let mut rbuf = AlignedBuf::new(M);
    f.read_exact_at(rbuf.as_mut(), X).unwrap();
    assert_eq!(rbuf.as_ref(), &data[..M]);
    let s = stats_of(&mut q, "d0");
    assert!(s["stats"]["rd_bytes"].as_u64().unwrap() >= M as u64, "{s}");
    assert!(s["stats"]["rd_operations"].as_u64().unwrap() >= 1, "{s}");
    assert!(
        s["parent"]["stats"]["rd_bytes"].as_u64().unwrap() >= M as u64,
        "{s}"
    );
    assert_eq!(
        s["stats"]["wr_highest_offset"],
        X + N as u64,
        "reads do not move it: {s}"
    );

    // fsync counts a flush.
    let flushes = s["stats"]["flush_operations"].as_u64().unwrap();
    f.sync_all().unwrap();
    let s = stats_of(&mut q, "d0");
    assert!(
        s["stats"]["flush_operations"].as_u64().unwrap() > flushes,
        "{s}"
    );
    drop(f);

    // A lower write does not lower the highest offset.
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(d.dev("d0"))
        .unwrap();
    f.write_all_at(&buf.as_ref()[..4096], 0).unwrap();
    drop(f);
    let s = stats_of(&mut q, "d0");
    assert_eq!(s["stats"]["wr_highest_offset"], X + N as u64, "{s}");
    assert!(
        s["stats"]["wr_bytes"].as_u64().unwrap() >= N as u64 + 4096,
        "{s}"
    );

    // The other device saw none of it.
    let s1 = stats_of(&mut q, "d1");
    for k in [
        "rd_bytes",
        "wr_bytes",
        "rd_operations",
        "wr_operations",
        "wr_highest_offset",
    ] {
        assert_eq!(s1["stats"][k], 0, "{k} of the untouched device: {s1}");
    }
    // Every entry names its device and carries all the counters.
    let all = q.ok("query-blockstats", json!({}));
    let mut devs: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["device"].as_str().unwrap())
        .collect();
    devs.sort();
    assert_eq!(devs, vec!["d0", "d1"]);
    for s in all.as_array().unwrap() {
        for k in keys {
            assert!(s["stats"][k].is_u64(), "{k} in {s}");
            assert!(s["parent"]["stats"][k].is_u64(), "parent {k} in {s}");
        }
    }
    // And the data really is in the image.
    let expected = dir.file("expected.img");
    qemu_img(&["create", "-q", "-f", "raw", &expected, "16M"]);
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    e.write_all_at(&data, X).unwrap();
    e.write_all_at(&data[..4096], 0).unwrap();
    drop(e);
    assert!(images_identical(
        a.as_ref(),
        "raw",
        expected.as_ref(),
        "raw"
    ));
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len bytes, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr,
                std::alloc::Layout::from_size_align(self.len, 4096).unwrap(),
            )
        };
    }
}

/// The open flags (`/proc/PID/fdinfo`) of every descriptor `pid` holds on `path`.
fn open_flags(pid: u32, path: &str) -> Vec<u32> {
    let want = std::fs::canonicalize(path).expect("image path");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("daemon's /proc fd list");
    fds.filter_map(|e| e.ok())
        .filter(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(want.as_path()))
        .filter_map(|e| {
            let name = e.file_name();
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
                    .ok()?;
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
            u32::from_str_radix(flags.trim(), 8).ok()
        })
        .collect()
}

/// Threads of `pid` named `prefix*`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("daemon's /proc task list")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

#[test]
fn backing_files_named_by_the_header_read_with_the_images_aio_and_cache() {
    let dir = TestDir::new("chain-io");
    let base = raw_image(&dir, "base.raw", "4M");
    qemu_io("raw", base.as_ref(), &["write -P 0x5a 0 1M"]);
    let mid = qcow2_overlay(&dir, "mid.qcow2", &base, "raw");
    qemu_io("qcow2", mid.as_ref(), &["write -P 0x6b 1M 1M"]);
    let top = qcow2_overlay(&dir, "top.qcow2", &mid, "qcow2");
    let spec = json!({"driver": "qcow2", "id": "d0", "file": {
        "driver": "file", "filename": top, "aio": "native", "cache": {"direct": true}}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let f = rw(&d, "d0");
    let mut got = vec![0u8; 2 << 20];
    f.read_exact_at(&mut got, 0)
        .expect("read through the chain");
    assert_same_bytes(&got[..1 << 20], &[0x5a; 1 << 20], "base's data");
    assert_same_bytes(&got[1 << 20..], &[0x6b; 1 << 20], "mid's data");

    for img in [&top, &mid, &base] {
        let flags = open_flags(d.pid(), img);
        assert!(!flags.is_empty(), "the daemon has no descriptor on {img}");
        for fl in flags {
            assert!(
                fl & libc::O_DIRECT as u32 != 0,
                "{img} is open without O_DIRECT (flags {fl:o})"
            );
        }
    }
    // aio=native everywhere: nothing ever started the thread pool.
    assert_eq!(
        threads_named(d.pid(), "blkfs-pool"),
        0,
        "some node of the chain does its I/O on the thread pool"
    );

    // A snapshot's new overlay is opened like the image it covers.
    let snap = dir.file("snap.qcow2");
    let mut q = d.qmp();
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": snap, "format": "qcow2"}),
    );
    f.write_all_at(&[0x7c; 4096], 0)
        .expect("write to the overlay");
    let flags = open_flags(d.pid(), &snap);
    assert!(
        !flags.is_empty() && flags.iter().all(|fl| fl & libc::O_DIRECT as u32 != 0),
        "the snapshot overlay is open without O_DIRECT: {flags:?}"
    );
    assert_eq!(threads_named(d.pid(), "blkfs-pool"), 0);
    drop(f);
    d.quit();
}
