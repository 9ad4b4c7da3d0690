//! `drive-mirror` through the real mount and socket: full, top and none
//! syncs to new and existing targets, guest writes during the copy, READY
//! and `block-job-complete` switching the device, cancel after READY
//! leaving both images equal, and the argument refusals.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const M: u64 = 1 << 20;

fn info(img: &str) -> Value {
    let out = qemu_img(&["info", "-U", "--output=json", img]);
    serde_json::from_str(&out).unwrap()
}

fn ready(q: &mut Qmp, dev: &str) -> Value {
    let ev = q.wait_event_where(Duration::from_secs(60), |e| {
        e["event"] == "BLOCK_JOB_READY"
            || (e["event"]
                .as_str()
                .is_some_and(|n| n.starts_with("BLOCK_JOB_"))
                && e["event"] != "BLOCK_JOB_ERROR")
    });
    assert_eq!(ev["event"], "BLOCK_JOB_READY", "{ev}");
    assert_eq!(ev["data"]["device"], dev, "{ev}");
    assert_eq!(ev["data"]["offset"], ev["data"]["len"], "{ev}");
    ev
}

/// Writes random chunks through the mount into the model while `busy` says so.
fn scribble(d: &Daemon, model: &mut [u8], seed: u64, count: usize) {
    let f = rw(d, "d0");
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for _ in 0..count {
        let len = (1 + rng.below(8)) as usize * 4096;
        let off = rng.below(size - len as u64) & !4095;
        let data = pattern(rng.next(), len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
}

#[test]
fn full_mirror_of_qcow2_chain_then_complete() {
    let dir = TestDir::new("mirror-full");
    let base = qcow2_image(&dir, "base.qcow2", "", "32M");
    qemu_io(
        "qcow2",
        base.as_ref(),
        &["write -P 0x11 0 8M", "write -P 0x12 20M 1M"],
    );
    let top = qcow2_overlay(&dir, "top.qcow2", &base, "qcow2");
    qemu_io(
        "qcow2",
        top.as_ref(),
        &["write -P 0x44 4M 2M", "write -z 20M 512k"],
    );
    let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
    let mut model = std::fs::read(&want).unwrap();
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    let target = dir.file("target.qcow2");
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "target": target, "sync": "full", "node-name": "mirror0"}),
    );
    let (_, desc) = q.err(
        "drive-mirror",
        json!({"device": "d0", "target": dir.file("t2.qcow2"), "sync": "full"}),
    );
    assert_eq!(desc, "Device 'd0' is in use");
    ready(&mut q, "d0");
    let j = q.ok("query-block-jobs", json!({}));
    assert_eq!(
        (j[0]["type"].as_str(), j[0]["device"].as_str()),
        (Some("mirror"), Some("d0")),
        "{j}"
    );
    // Still mirroring: writes after READY reach the target too.
    scribble(&d, &mut model, 3, 200);
    q.ok("block-job-complete", json!({"device": "d0"}));
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert_eq!(inserted["file"], target.as_str(), "{inserted}");
    assert_eq!(inserted["node-name"], "mirror0", "{inserted}");
    assert_eq!(inserted["backing_file_depth"], 0, "{inserted}");
    // The device now writes the target only.
    let before_top = snapshot_raw(&dir, &top, "qcow2", "top-after.raw");
    scribble(&d, &mut model, 4, 50);
    assert_same_bytes(&std::fs::read(d.dev("d0")).unwrap(), &model, "device");
    d.quit();
    std::fs::write(&want, &model).unwrap();
    assert!(images_identical(
        target.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert!(info(&target).get("backing-filename").is_none());
    assert_check_clean(&target);
    assert_check_clean(&top);
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        before_top.as_ref(),
        "raw"
    ));
}

#[test]
fn top_and_none_syncs_share_the_backing() {
    for (sync, backing_is_top) in [("top", false), ("none", true)] {
        let dir = TestDir::new(&format!("mirror-{sync}"));
        let base = qcow2_image(&dir, "base.qcow2", "", "16M");
        qemu_io("qcow2", base.as_ref(), &["write -P 0x11 0 4M"]);
        let top = qcow2_overlay(&dir, "top.qcow2", &base, "qcow2");
        qemu_io("qcow2", top.as_ref(), &["write -P 0x44 1M 1M"]);
        let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
        let mut model = std::fs::read(&want).unwrap();
        let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
        let mut q = d.qmp();
        let target = dir.file("target.qcow2");
        q.ok(
            "drive-mirror",
            json!({"device": "d0", "target": target, "sync": sync}),
        );
        ready(&mut q, "d0");
        // Only the top's data (or none of it) was copied.
        let out = qemu_img(&["map", "-U", "--output=json", &target]);
        let map: Vec<Value> = serde_json::from_str(&out).unwrap();
        let own: u64 = map
            .iter()
            .filter(|m| m["depth"] == 0 && m["data"] == true)
            .map(|m| m["length"].as_u64().unwrap())
            .sum();
        assert_eq!(own, if sync == "top" { M } else { 0 }, "{sync}: {out}");
        scribble(&d, &mut model, 5, 100);
        q.ok("block-job-complete", json!({"device": "d0"}));
        let ev = q.wait_job_end("d0");
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
        let want_backing = if backing_is_top { &top } else { &base };
        // Created targets record the canonical path of their backing file.
        let want_backing = &std::fs::canonicalize(want_backing)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let inserted = &query_block(&mut q, "d0")["inserted"];
        assert_eq!(
            inserted["backing_file"],
            want_backing.as_str(),
            "{sync}: {inserted}"
        );
        assert_same_bytes(&std::fs::read(d.dev("d0")).unwrap(), &model, sync);
        d.quit();
        assert_eq!(
            info(&target)["backing-filename"],
            want_backing.as_str(),
            "{sync}"
        );
        std::fs::write(&want, &model).unwrap();
        assert!(
            images_identical(target.as_ref(), "qcow2", want.as_ref(), "raw"),
            "{sync}"
        );
        assert_check_clean(&target);
    }
}

#[test]
fn cancel_after_ready_leaves_both_equal_on_the_source() {
    cancel_after_ready("threads");
}

/// With `aio=native` a FUSE worker of the io_uring transport writes on its
/// own ring, past the engine, unless something must see the write: the
/// mirror's hook, installed while the device runs, sees every one.
#[test]
fn cancel_after_ready_mirrors_the_writes_of_a_workers_ring() {
    cancel_after_ready("native");
}

fn cancel_after_ready(aio: &str) {
    let dir = TestDir::new(&format!("mirror-cancel-{aio}"));
    let src = raw_image(&dir, "src.raw", "16M");
    qemu_io(
        "raw",
        src.as_ref(),
        &["write -P 0x61 0 5M", "write -P 0x62 9M 3M"],
    );
    let d = Daemon::start(&dir, &[raw_spec("d0", &src, json!({"aio": aio}))]);
    let mut model = std::fs::read(&src).unwrap();
    // Writes before the job, so a worker has served the device already.
    scribble(&d, &mut model, 8, 10);
    let mut q = d.qmp();
    let target = dir.file("target.raw");
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "target": target, "sync": "full", "format": "raw"}),
    );
    ready(&mut q, "d0");
    scribble(&d, &mut model, 9, 100);
    q.ok("block-job-cancel", json!({"device": "d0"}));
    let ev = q.wait_job_end("d0");
    // QEMU 2.1: a cancel after READY completes the job.
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert_eq!(query_block(&mut q, "d0")["inserted"]["file"], src.as_str());
    assert!(images_identical(
        target.as_ref(),
        "raw",
        src.as_ref(),
        "raw"
    ));
    // The target is closed: another writer may take it.
    qemu_io("raw", target.as_ref(), &["write -P 0x01 0 4k"]);
    d.quit();
    assert_eq!(std::fs::read(&src).unwrap(), model);
    // Holes stay holes: 8 MiB of data plus what the guest wrote.
    let used = std::fs::metadata(&target)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(used < 12 * M, "target uses {used} bytes");
}

#[test]
fn cancel_before_ready_and_refusals() {
    let dir = TestDir::new("mirror-refuse");
    let src = qcow2_image(&dir, "src.qcow2", "", "16M");
    qemu_io("qcow2", src.as_ref(), &["write -P 0x61 0 16M"]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &src)]);
    let mut q = d.qmp();
    let t = dir.file("t.qcow2");
    let bad = [
        (
            json!({"device": "d0", "target": t, "sync": "full", "granularity": 100}),
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        ),
        (
            json!({"device": "d0", "target": t, "sync": "full", "granularity": 3 << 10}),
            "Parameter 'granularity' expects power of 2",
        ),
        (
            json!({"device": "d0", "target": t, "sync": "full", "replaces": "x"}),
            "a node-name must be provided when replacing a named node of the graph",
        ),
        (
            json!({"device": "d0", "target": t, "sync": "full", "speed": -1}),
            "Invalid parameter 'speed'",
        ),
        (
            json!({"device": "d0", "target": t, "sync": "sideways"}),
            "Parameter 'sync' does not accept value 'sideways'",
        ),
        (
            json!({"device": "d0", "target": src, "sync": "full"}),
            "in use by node",
        ),
        (
            json!({"device": "d0", "target": dir.file("missing.qcow2"), "sync": "full", "mode": "existing"}),
            "missing.qcow2",
        ),
        (
            json!({"device": "d0", "target": t, "sync": "full", "format": "bochs"}),
            "Creating 'bochs' images is not supported",
        ),
    ];
    for (args, want) in bad {
        let (class, desc) = q.err("drive-mirror", args.clone());
        assert_eq!(class, "GenericError", "{args}");
        assert!(desc.contains(want), "{args}: {desc}");
    }
    let nodes_before = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .len();
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "target": t, "sync": "full", "speed": M}),
    );
    q.ok("block-job-cancel", json!({"device": "d0"}));
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["event"], "BLOCK_JOB_CANCELLED", "{ev}");
    assert_eq!(
        q.ok("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .len(),
        nodes_before
    );
    assert_eq!(query_block(&mut q, "d0")["inserted"]["file"], src.as_str());
    d.quit();
    assert_check_clean(&t);
}

#[test]
fn existing_target_of_the_same_size() {
    let dir = TestDir::new("mirror-existing");
    let src = qcow2_image(&dir, "src.qcow2", "", "8M");
    qemu_io("qcow2", src.as_ref(), &["write -P 0x71 1M 3M"]);
    let t = qcow2_image(&dir, "t.qcow2", "", "8M");
    qemu_io("qcow2", t.as_ref(), &["write -P 0x99 0 8M"]);
    let small = qcow2_image(&dir, "small.qcow2", "", "4M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &src)]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "drive-mirror",
        json!({"device": "d0", "target": small, "sync": "full", "mode": "existing"}),
    );
    assert_eq!(desc, "Source and target image have different sizes");
    q.ok("drive-mirror", json!({"device": "d0", "target": t, "sync": "full", "mode": "existing", "granularity": 65536}));
    ready(&mut q, "d0");
    q.ok("block-job-complete", json!({"device": "d0"}));
    assert_eq!(q.wait_job_end("d0")["event"], "BLOCK_JOB_COMPLETED");
    d.quit();
    // Every old byte of the target was overwritten (zeroes included).
    assert!(images_identical(t.as_ref(), "qcow2", src.as_ref(), "qcow2"));
    assert_check_clean(&t);
}

/// The target's metadata is written back lazily while only the job writes
/// it; once the device is switched onto it, every acknowledged guest write
/// has its metadata in the file again, as on any qcow2: a kill -9 right
/// after writes (no fsync) loses none of them.
#[test]
fn writes_after_the_switch_survive_kill_9() {
    let dir = TestDir::new("mirror-switch-crash");
    let src = qcow2_image(&dir, "src.qcow2", "", "16M");
    qemu_io("qcow2", src.as_ref(), &["write -P 0x21 0 4M"]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &src)]);
    let mut q = d.qmp();
    let target = dir.file("target.qcow2");
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "target": target, "format": "qcow2", "sync": "full"}),
    );
    ready(&mut q, "d0");
    q.ok("block-job-complete", json!({"device": "d0"}));
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    // Clusters the target never had: each write allocates, none is flushed.
    let f = rw(&d, "d0");
    let mut want = vec![0u8; 16 << 20];
    want[..4 << 20].fill(0x21);
    for i in 0..32u64 {
        let off = (8 << 20) + i * 65536;
        let data = pattern(i, 4096);
        f.write_all_at(&data, off).unwrap();
        want[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(f);
    drop(q);
    drop(d);
    let check = qemu_img_check(&target);
    assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
    assert_eq!(check["check-errors"].as_u64(), Some(0), "{check}");
    let got = snapshot_raw(&dir, &target, "qcow2", "got.raw");
    assert_same_bytes(
        &std::fs::read(got).unwrap(),
        &want,
        "the target after kill -9",
    );
}
