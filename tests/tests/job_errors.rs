//! Block job error policies with blkdebug: a read error at a chosen offset
//! of the source, under `report`, `ignore`, `stop` (+ resume) and `enospc`
//! (errno 28 stops, others report), for stream, mirror and backup.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;
/// The failing sector: 4 MiB into the raw base, inside its data.
const BAD_SECTOR: u64 = 4 * M / 512;

/// A raw base (8 MiB of data) read through blkdebug failing at BAD_SECTOR.
fn failing_base(base: &str, errno: i32, once: bool) -> Value {
    json!({"driver": "raw", "file": {
        "driver": "blkdebug",
        "image": {"driver": "file", "filename": base},
        "inject-error": [{"event": "read_aio", "errno": errno, "sector": BAD_SECTOR, "once": once}],
    }})
}

/// top.qcow2 over base.raw (failing), as device d0.
fn stream_setup(dir: &TestDir, errno: i32, once: bool) -> (Daemon, String, String) {
    let base = raw_image(dir, "base.raw", "16M");
    qemu_io("raw", base.as_ref(), &["write -P 0x5a 0 8M"]);
    let top = qcow2_overlay(dir, "top.qcow2", &base, "raw");
    let spec = json!({"driver": "qcow2", "id": "d0",
        "file": {"driver": "file", "filename": top},
        "backing": failing_base(&base, errno, once)});
    let d = Daemon::start(dir, &[spec.to_string()]);
    (d, base, top)
}

fn job_error(q: &mut Qmp) -> Value {
    let ev = q.wait_event("BLOCK_JOB_ERROR", Duration::from_secs(60));
    assert_eq!(ev["data"]["device"], "d0", "{ev}");
    assert_eq!(ev["data"]["operation"], "read", "{ev}");
    ev
}

/// Waits until the job sits paused; returns its BlockJobInfo.
fn paused_job(q: &mut Qmp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let jobs = q.ok("query-block-jobs", json!({}));
        if jobs[0]["busy"] == false || Instant::now() > deadline {
            return jobs[0].clone();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn report_fails_the_job_and_keeps_the_chain() {
    let dir = TestDir::new("joberr-report");
    let (d, base, top) = stream_setup(&dir, 5, false);
    let mut q = d.qmp();
    // Subscribed before the job starts: no event can pass it by.
    let mut watch = d.qmp();
    q.ok("block-stream", json!({"device": "d0"}));
    assert_eq!(job_error(&mut q)["data"]["action"], "report");
    let ev = q.wait_job_end("d0");
    // In order, as another client sees them.
    assert_eq!(
        watch.job_events("d0"),
        ["BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED"]
    );
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["error"], "Input/output error", "{ev}");
    assert_eq!(
        query_block(&mut q, "d0")["inserted"]["backing_file_depth"],
        1
    );
    d.quit();
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        base.as_ref(),
        "raw"
    ));
    assert_check_clean(&top);
}

#[test]
fn ignore_goes_on_but_ends_with_the_error() {
    let dir = TestDir::new("joberr-ignore");
    let (d, _base, top) = stream_setup(&dir, 5, false);
    let mut q = d.qmp();
    q.ok(
        "block-stream",
        json!({"device": "d0", "on-error": "ignore"}),
    );
    assert_eq!(job_error(&mut q)["data"]["action"], "ignore");
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["error"], "Input/output error", "{ev}");
    // It went on past the error: the data after it is in the top.
    assert_eq!(ev["data"]["offset"], 16 * M, "{ev}");
    d.quit();
    let out = qemu_img(&["map", "--output=json", "-f", "qcow2", &top]);
    let map: Vec<Value> = serde_json::from_str(&out).unwrap();
    let own: u64 = map
        .iter()
        .filter(|m| m["depth"] == 0 && m["data"] == true)
        .map(|m| m["length"].as_u64().unwrap())
        .sum();
    assert!((7 * M..8 * M).contains(&own), "{out}");
    assert_check_clean(&top);
}

#[test]
fn stop_pauses_with_io_status_and_resume_retries() {
    for (errno, status) in [(5, "failed"), (28, "nospace")] {
        let dir = TestDir::new(&format!("joberr-stop-{errno}"));
        let (d, base, top) = stream_setup(&dir, errno, true);
        let mut q = d.qmp();
        let policy = if errno == 28 { "enospc" } else { "stop" };
        q.ok("block-stream", json!({"device": "d0", "on-error": policy}));
        assert_eq!(job_error(&mut q)["data"]["action"], "stop");
        let j = paused_job(&mut q);
        assert_eq!(
            (j["paused"].as_bool(), j["io-status"].as_str()),
            (Some(true), Some(status)),
            "{j}"
        );
        q.ok("block-job-resume", json!({"device": "d0"}));
        let ev = q.wait_job_end("d0");
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
        assert!(ev["data"].get("error").is_none(), "{ev}");
        d.quit();
        // The retried range was copied: the top alone equals the base.
        assert!(
            images_identical(top.as_ref(), "qcow2", base.as_ref(), "raw"),
            "{errno}"
        );
        assert_check_clean(&top);
    }
}

#[test]
fn enospc_reports_other_errors() {
    let dir = TestDir::new("joberr-enospc-eio");
    let (d, _base, _top) = stream_setup(&dir, 5, false);
    let mut q = d.qmp();
    q.ok(
        "block-stream",
        json!({"device": "d0", "on-error": "enospc"}),
    );
    assert_eq!(job_error(&mut q)["data"]["action"], "report");
    let ev = q.wait_job_end("d0");
    assert_eq!(ev["data"]["error"], "Input/output error", "{ev}");
    d.quit();
}

#[test]
fn mirror_and_backup_source_errors() {
    for job in ["mirror", "backup"] {
        let dir = TestDir::new(&format!("joberr-{job}"));
        let src = raw_image(&dir, "src.raw", "16M");
        qemu_io("raw", src.as_ref(), &["write -P 0x5a 0 8M"]);
        let spec = json!({"driver": "raw", "id": "d0", "file": {
            "driver": "blkdebug",
            "image": {"driver": "file", "filename": src},
            "inject-error": [{"event": "read_aio", "errno": 5, "sector": BAD_SECTOR, "once": true}],
        }});
        let d = Daemon::start(&dir, &[spec.to_string()]);
        let mut q = d.qmp();
        let target = dir.file("t.raw");
        let cmd = if job == "mirror" {
            "drive-mirror"
        } else {
            "drive-backup"
        };
        q.ok(cmd, json!({"device": "d0", "target": target, "sync": "full", "format": "raw", "on-source-error": "stop"}));
        assert_eq!(job_error(&mut q)["data"]["action"], "stop");
        let j = paused_job(&mut q);
        assert_eq!(
            (j["paused"].as_bool(), j["io-status"].as_str()),
            (Some(true), Some("failed")),
            "{job}: {j}"
        );
        q.ok("block-job-resume", json!({"device": "d0"}));
        if job == "mirror" {
            let ev = q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60));
            assert_eq!(ev["data"]["device"], "d0");
            q.ok("block-job-complete", json!({"device": "d0"}));
        }
        let ev = q.wait_job_end("d0");
        assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{job}: {ev}");
        assert!(ev["data"].get("error").is_none(), "{job}: {ev}");
        d.quit();
        assert!(
            images_identical(target.as_ref(), "raw", src.as_ref(), "raw"),
            "{job}"
        );
    }
}

/// `quit` (and SIGTERM) during a job cancel it cleanly: the daemon exits
/// at once, every image checks clean and the source reads as before.
#[test]
fn quit_or_sigterm_during_a_job() {
    for (i, job) in ["stream", "mirror", "backup", "commit"].iter().enumerate() {
        let dir = TestDir::new(&format!("job-quit-{job}"));
        let base = qcow2_image(&dir, "base.qcow2", "", "32M");
        qemu_io("qcow2", base.as_ref(), &["write -P 0x21 0 24M"]);
        let top = qcow2_overlay(&dir, "top.qcow2", &base, "qcow2");
        qemu_io("qcow2", top.as_ref(), &["write -P 0x22 4M 20M"]);
        let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
        let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
        let mut q = d.qmp();
        let target = dir.file("t.qcow2");
        let (cmd, args) = match *job {
            "stream" => ("block-stream", json!({"device": "d0"})),
            "mirror" => (
                "drive-mirror",
                json!({"device": "d0", "target": target, "sync": "full"}),
            ),
            "backup" => (
                "drive-backup",
                json!({"device": "d0", "target": target, "sync": "full"}),
            ),
            _ => (
                "block-commit",
                json!({"device": "d0", "top": top, "base": base}),
            ),
        };
        let mut args = args;
        args["speed"] = json!(4 * M);
        if *job == "commit" {
            // An intermediate commit: the device runs on an overlay of top.
            let snap = dir.file("active.qcow2");
            q.ok(
                "blockdev-snapshot-sync",
                json!({"device": "d0", "snapshot-file": snap}),
            );
        }
        q.ok(cmd, args);
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let status = if i % 2 == 0 {
            q.ok("quit", json!({}));
            let mut d = d;
            d.wait(Duration::from_secs(30))
        } else {
            d.terminate()
        };
        assert!(status.success(), "{job}: {status}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{job}: exit took {:?}",
            t0.elapsed()
        );
        assert!(
            images_identical(top.as_ref(), "qcow2", want.as_ref(), "raw"),
            "{job}"
        );
        assert_check_clean(&top);
        assert_check_clean(&base);
        if *job == "mirror" || *job == "backup" {
            let c = qemu_img_check(&target);
            assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{job}: {c}");
        }
    }
}
