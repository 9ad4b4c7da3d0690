//! blkctl's block-job subcommands against a real daemon (needs the engine's
//! block-stream, query-block-jobs and block-job-cancel).

use blkfs_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

fn parse(what: &str, out: &str) -> Value {
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{what}: output is not JSON ({e}): {out:?}"))
}

/// `qemu-img info` of a qcow2 image a running daemon may have open.
fn qcow2_info(img: &str) -> Value {
    let out = qemu_img(&["info", "-U", "--output=json", "-f", "qcow2", img]);
    parse("qemu-img info", &out)
}

#[test]
fn stream_wait_pulls_the_backing_data_into_the_overlay() {
    let dir = TestDir::new("ctl-stream");
    let base = qcow2_image(&dir, "base.qcow2", "", "4M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x5a 0 1M"]);
    let overlay = dir.file("overlay.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &overlay,
    ]);
    assert!(qcow2_info(&overlay).get("backing-filename").is_some());

    let d = Daemon::start(&dir, &[qcow2_spec("d0", &overlay)]);
    let sock = d.sock.clone();
    // A job that never ends must fail the test, not hang it.
    let (code, out, err) = with_timeout(Duration::from_secs(120), move || {
        blkctl(&sock, &["stream", "d0", "--wait"])
    });
    assert_eq!(code, 0, "blkctl stream --wait: {out} {err}");
    assert!(out.contains("d0: stream job completed"), "stdout: {out}");

    let info = qcow2_info(&overlay);
    assert!(
        info.get("backing-filename").is_none(),
        "the overlay still has a backing file: {info}"
    );
    assert!(
        images_identical(overlay.as_ref(), "qcow2", base.as_ref(), "qcow2"),
        "overlay and base differ after the stream"
    );
    // The device reads the same through the mount.
    qemu_io(
        "raw",
        &d.dev("d0"),
        &["read -P 0x5a 0 1M", "read -P 0 1M 3M"],
    );

    let (code, out, err) = blkctl(&d.sock, &["--json", "jobs"]);
    assert_eq!(code, 0, "blkctl --json jobs: {err}");
    assert_eq!(parse("jobs", &out), json!([]));
}

#[test]
fn job_wait_and_cancel_without_a_job_fail() {
    let dir = TestDir::new("ctl-nojob");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);

    // No job at the start: the result cannot be known, exit 2.
    let (code, out, err) = blkctl(&d.sock, &["job", "wait", "nodev"]);
    assert_eq!(code, 2, "blkctl job wait nodev: {out} {err}");
    assert!(err.contains("no active job on nodev"), "stderr: {err}");

    let (code, out, err) = blkctl(&d.sock, &["job", "cancel", "d0"]);
    assert_ne!(code, 0, "blkctl job cancel d0 without a job: {out}");
    assert!(
        err.contains("DeviceNotActive") && err.contains("'d0'"),
        "stderr: {err}"
    );

    // The empty list: a header only, or [] with --json.
    let (code, out, err) = blkctl(&d.sock, &["jobs"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("TYPE"), "{out}");
    let (code, out, err) = blkctl(&d.sock, &["--json", "jobs"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(parse("jobs", &out), json!([]));
}
