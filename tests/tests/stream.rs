//! `block-stream` through the real mount and socket: chains built with
//! qemu-img and patterns from qemu-io, the job run over QMP while guests
//! write through the mount, the result checked with `qemu-img compare`,
//! `check` and `info` (backing strings), events in order. Also the job
//! control commands, shared by every job.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;

/// base <- mid <- top, 16 MiB, with data in every layer (overlapping).
struct Chain {
    base: String,
    mid: String,
    top: String,
}

fn chain(dir: &TestDir) -> Chain {
    let base = qcow2_image(dir, "base.qcow2", "", "16M");
    qemu_io(
        "qcow2",
        base.as_ref(),
        &["write -P 0x11 0 4M", "write -P 0x12 12M 2M"],
    );
    let mid = qcow2_overlay(dir, "mid.qcow2", &base, "qcow2");
    qemu_io(
        "qcow2",
        mid.as_ref(),
        &["write -P 0x33 1M 2M", "write -z 13M 512k"],
    );
    let top = qcow2_overlay(dir, "top.qcow2", &mid, "qcow2");
    qemu_io(
        "qcow2",
        top.as_ref(),
        &["write -P 0x44 2M 64k", "write -P 0x45 8M 1M"],
    );
    Chain { base, mid, top }
}

fn backing_of(img: &str) -> Option<String> {
    let out = qemu_img(&["info", "-U", "--output=json", "-f", "qcow2", img]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["backing-filename"].as_str().map(str::to_string)
}

fn node_names(q: &mut Qmp) -> Vec<String> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["file"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn completed_ok(ev: &Value, kind: &str, dev: &str) {
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["type"], kind, "{ev}");
    assert_eq!(ev["data"]["device"], dev, "{ev}");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert_eq!(ev["data"]["offset"], ev["data"]["len"], "{ev}");
}

#[test]
fn stream_whole_chain_drops_backing() {
    let dir = TestDir::new("stream-all");
    let c = chain(&dir);
    let want = snapshot_raw(&dir, &c.top, "qcow2", "want.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &c.top)]);
    let mut q = d.qmp();
    q.ok("block-stream", json!({"device": "d0"}));
    let ev = q.wait_job_end("d0");
    completed_ok(&ev, "stream", "d0");
    assert_eq!(ev["data"]["len"], 16 * M);
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    // The device reads the same, now from the top alone.
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert!(inserted.get("backing_file").is_none(), "{inserted}");
    assert_eq!(inserted["backing_file_depth"], 0, "{inserted}");
    let files = node_names(&mut q);
    assert!(
        !files.iter().any(|f| f == &c.mid || f == &c.base),
        "{files:?}"
    );
    assert!(images_identical(&d.dev("d0"), "raw", want.as_ref(), "raw"));
    d.quit();
    assert_eq!(backing_of(&c.top), None);
    assert!(images_identical(
        c.top.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert_check_clean(&c.top);
    assert_check_clean(&c.mid);
}

#[test]
fn stream_to_base_keeps_base_and_backing_string() {
    let dir = TestDir::new("stream-base");
    let c = chain(&dir);
    let want = snapshot_raw(&dir, &c.top, "qcow2", "want.raw");
    let base_before = snapshot_raw(&dir, &c.base, "qcow2", "base.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &c.top)]);
    let mut q = d.qmp();
    q.ok("block-stream", json!({"device": "d0", "base": c.base}));
    completed_ok(&q.wait_job_end("d0"), "stream", "d0");
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert_eq!(inserted["backing_file"], c.base.as_str(), "{inserted}");
    assert_eq!(inserted["backing_file_depth"], 1, "{inserted}");
    // A later stream with an explicit backing-file string writes that string.
    q.ok(
        "block-stream",
        json!({"device": "d0", "base": "base.qcow2", "backing-file": "base.qcow2"}),
    );
    completed_ok(&q.wait_job_end("d0"), "stream", "d0");
    d.quit();
    assert_eq!(backing_of(&c.top).as_deref(), Some("base.qcow2"));
    assert!(images_identical(
        c.top.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert!(images_identical(
        c.base.as_ref(),
        "qcow2",
        base_before.as_ref(),
        "raw"
    ));
    // Only the layers above base were copied: mid's data (1M..3M, where
    // top's own 64k lies) and its zeroes (13M..13.5M), with top's 8M..9M.
    let out = qemu_img(&["map", "--output=json", "-f", "qcow2", &c.top]);
    let map: Vec<Value> = serde_json::from_str(&out).unwrap();
    let sum = |data: bool, zero: bool| -> u64 {
        map.iter()
            .filter(|m| m["depth"] == 0 && m["data"] == data && m["zero"] == zero)
            .map(|m| m["length"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(sum(true, false), 3 * M, "{out}");
    assert_eq!(sum(false, true), M / 2, "{out}");
    assert_check_clean(&c.top);
}

#[test]
fn stream_with_guest_writes_loses_nothing() {
    let dir = TestDir::new("stream-writes");
    let c = chain(&dir);
    let want_path = snapshot_raw(&dir, &c.top, "qcow2", "want.raw");
    let mut model = std::fs::read(&want_path).unwrap();
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &c.top)]);
    let mut q = d.qmp();
    // Slow enough that the writes below land while it runs.
    q.ok("block-stream", json!({"device": "d0", "speed": 4 * M}));
    // A reader checks the upper half (nobody writes it) all along.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (running, upper) = (running.clone(), model[8 * M as usize..].to_vec());
        let f = rw(&d, "d0");
        std::thread::spawn(move || {
            let (mut rng, mut reads) = (Rng(8), 0);
            let mut buf = vec![0u8; 64 << 10];
            while running.load(std::sync::atomic::Ordering::SeqCst) {
                let off = rng.below(8 * M - buf.len() as u64) & !511;
                f.read_exact_at(&mut buf, 8 * M + off).unwrap();
                let want = &upper[off as usize..off as usize + buf.len()];
                assert!(buf == want, "stale read at {:#x}", 8 * M + off);
                reads += 1;
            }
            reads
        })
    };
    let f = rw(&d, "d0");
    let mut rng = Rng(7);
    let mut writes = 0;
    while q.ok("query-block-jobs", json!({})) != json!([]) && writes < 400 {
        let len = (1 + rng.below(16)) as usize * 4096;
        let off = rng.below(8 * M - len as u64) & !4095;
        let data = pattern(rng.next(), len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        writes += 1;
    }
    completed_ok(&q.wait_job_end("d0"), "stream", "d0");
    running.store(false, std::sync::atomic::Ordering::SeqCst);
    let reads = reader.join().expect("the reader saw stale data");
    assert!(writes > 20, "only {writes} writes ran during the stream");
    assert!(reads > 20, "only {reads} reads ran during the stream");
    f.sync_all().unwrap();
    drop(f);
    assert_same_bytes(&std::fs::read(d.dev("d0")).unwrap(), &model, "device");
    d.quit();
    std::fs::write(&want_path, &model).unwrap();
    assert!(images_identical(
        c.top.as_ref(),
        "qcow2",
        want_path.as_ref(),
        "raw"
    ));
    assert_eq!(backing_of(&c.top), None);
    assert_check_clean(&c.top);
}

#[test]
fn job_control_pause_resume_speed_cancel() {
    let dir = TestDir::new("stream-control");
    let c = chain(&dir);
    let want = snapshot_raw(&dir, &c.top, "qcow2", "want.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &c.top)]);
    let mut q = d.qmp();
    // Refusals: no job, bad speed, unknown base or device.
    let (class, desc) = q.err("block-job-pause", json!({"device": "d0"}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("DeviceNotActive", "No active block job on device 'd0'")
    );
    let (class, _) = q.err("block-job-cancel", json!({"device": "d0"}));
    assert_eq!(class, "DeviceNotActive");
    let (_, desc) = q.err("block-stream", json!({"device": "d0", "speed": -1}));
    assert_eq!(desc, "Invalid parameter 'speed'");
    let (_, desc) = q.err(
        "block-stream",
        json!({"device": "d0", "base": "nope.qcow2"}),
    );
    assert_eq!(desc, "Base 'nope.qcow2' not found");
    let (class, _) = q.err("block-stream", json!({"device": "nope"}));
    assert_eq!(class, "DeviceNotFound");
    let (_, desc) = q.err("block-stream", json!({"device": "d0", "backing-file": "x"}));
    assert_eq!(
        desc,
        "backing file specified, but streaming the entire chain"
    );

    q.ok("block-stream", json!({"device": "d0", "speed": M}));
    let (_, desc) = q.err("block-stream", json!({"device": "d0"}));
    assert_eq!(desc, "Device 'd0' is in use");
    let (_, desc) = q.err("block_resize", json!({"device": "d0", "size": 32 * M}));
    assert_eq!(
        desc,
        "Device 'd0' is busy: block device is in use by block job: stream"
    );
    let snap = json!({"device": "d0", "snapshot-file": dir.file("snap.qcow2")});
    let (_, desc) = q.err("blockdev-snapshot-sync", snap);
    assert_eq!(
        desc,
        "Device 'd0' is busy: block device is in use by block job: stream"
    );
    let (_, desc) = q.err("block-job-complete", json!({"device": "d0"}));
    assert_eq!(
        desc,
        "The active block job for device 'd0' cannot be completed"
    );
    let jobs = q.ok("query-block-jobs", json!({}));
    let j = &jobs[0];
    assert_eq!(
        (
            j["type"].as_str(),
            j["device"].as_str(),
            j["len"].as_u64(),
            j["speed"].as_u64()
        ),
        (Some("stream"), Some("d0"), Some(16 * M), Some(M)),
        "{jobs}"
    );
    assert_eq!(
        (j["paused"].as_bool(), j["io-status"].as_str()),
        (Some(false), Some("ok")),
        "{jobs}"
    );
    q.ok("block-job-pause", json!({"device": "d0"}));
    let deadline = Instant::now() + Duration::from_secs(10);
    let paused = loop {
        let j = q.ok("query-block-jobs", json!({}))[0].clone();
        if j["busy"] == false || Instant::now() > deadline {
            break j;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (paused["paused"].as_bool(), paused["busy"].as_bool()),
        (Some(true), Some(false)),
        "{paused}"
    );
    let at = paused["offset"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        q.ok("query-block-jobs", json!({}))[0]["offset"].as_u64(),
        Some(at),
        "a paused job moved"
    );
    // A paused job is cancelled only with force.
    let (_, desc) = q.err("block-job-cancel", json!({"device": "d0"}));
    assert_eq!(desc, "The block job for device 'd0' is currently paused");
    q.ok("block-job-resume", json!({"device": "d0"}));
    q.ok(
        "block-job-set-speed",
        json!({"device": "d0", "speed": 2 * M}),
    );
    assert_eq!(q.ok("query-block-jobs", json!({}))[0]["speed"], 2 * M);
    let (_, desc) = q.err("block-job-set-speed", json!({"device": "d0", "speed": -5}));
    assert_eq!(desc, "Invalid parameter 'speed'");
    q.ok("block-job-pause", json!({"device": "d0"}));
    q.ok("block-job-cancel", json!({"device": "d0", "force": true}));
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["event"], "BLOCK_JOB_CANCELLED", "{ev}");
    assert_eq!(
        (ev["data"]["type"].as_str(), ev["data"]["speed"].as_u64()),
        (Some("stream"), Some(2 * M))
    );
    assert!(ev["data"]["offset"].as_u64().unwrap() < 16 * M, "{ev}");
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    // A cancelled stream keeps the chain; the data is unchanged.
    assert_eq!(
        query_block(&mut q, "d0")["inserted"]["backing_file_depth"],
        2
    );
    assert!(images_identical(&d.dev("d0"), "raw", want.as_ref(), "raw"));
    d.quit();
    assert_eq!(backing_of(&c.top).as_deref(), Some(c.mid.as_str()));
    assert!(images_identical(
        c.top.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert_check_clean(&c.top);
}

#[test]
fn speed_limits_the_rate() {
    let dir = TestDir::new("stream-speed");
    let base = qcow2_image(&dir, "base.qcow2", "", "32M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x21 0 24M"]);
    let top = qcow2_overlay(&dir, "top.qcow2", &base, "qcow2");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    let t0 = Instant::now();
    q.ok("block-stream", json!({"device": "d0", "speed": 8 * M}));
    completed_ok(&q.wait_job_end("d0"), "stream", "d0");
    // 24 MiB at 8 MiB/s: 3 s, less the first 1 MiB copy and one 100 ms
    // slice of credit (2.78 s): never more than 10% fast. Slower is the
    // machine's doing (a loose bound).
    let secs = t0.elapsed().as_secs_f64();
    assert!(secs >= 2.7, "24 MiB at 8 MiB/s took only {secs:.2} s");
    assert!(secs < 10.0, "24 MiB at 8 MiB/s took {secs:.2} s");
    d.quit();
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        base.as_ref(),
        "qcow2"
    ));
}

#[test]
fn stream_of_an_image_without_backing_completes() {
    let dir = TestDir::new("stream-alone");
    let img = raw_image(&dir, "a.raw", "4M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    q.ok("block-stream", json!({"device": "d0"}));
    completed_ok(&q.wait_job_end("d0"), "stream", "d0");
    d.quit();
}
