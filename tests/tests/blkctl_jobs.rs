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

    // No job at the start: the result cannot be known, exit 4.
    let (code, out, err) = blkctl(&d.sock, &["job", "wait", "nodev"]);
    assert_eq!(code, 4, "blkctl job wait nodev: {out} {err}");
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

/// mirror --wait --complete, commit --wait of an intermediate image, backup
/// --wait, and the job controls on a slow job, all through blkctl.
#[test]
fn mirror_commit_backup_and_job_controls() {
    let dir = TestDir::new("ctl-jobs");
    let base = qcow2_image(&dir, "base.qcow2", "", "16M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x11 0 8M"]);
    let mid = qcow2_overlay(&dir, "mid.qcow2", &base, "qcow2");
    qemu_io("qcow2", mid.as_ref(), &["write -P 0x22 2M 2M"]);
    let top = qcow2_overlay(&dir, "top.qcow2", &mid, "qcow2");
    let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let sock = d.sock.clone();
    let run = move |args: &[&str]| {
        let (sock, args): (_, Vec<String>) =
            (sock.clone(), args.iter().map(|a| a.to_string()).collect());
        with_timeout(Duration::from_secs(120), move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            blkctl(&sock, &args)
        })
    };
    // An intermediate commit: the chain loses mid, the data stays.
    let (code, out, err) = run(&["commit", "d0", "--top", &mid, "--base", &base, "--wait"]);
    assert_eq!(code, 0, "commit: {out} {err}");
    assert_eq!(
        query_block(&mut d.qmp(), "d0")["inserted"]["backing_file_depth"],
        1
    );
    // A backup of the device as it is.
    let bk = dir.file("backup.qcow2");
    let (code, out, err) = run(&["backup", "d0", &bk, "--sync", "full", "--wait"]);
    assert_eq!(code, 0, "backup: {out} {err}");
    assert!(images_identical(bk.as_ref(), "qcow2", want.as_ref(), "raw"));
    // Job controls on a slow mirror, then complete moves the device.
    let target = dir.file("mirror.qcow2");
    let (code, out, err) = run(&["mirror", "d0", &target, "--sync", "full", "--speed", "1M"]);
    assert_eq!(code, 0, "mirror: {out} {err}");
    let (code, out, err) = run(&["--json", "jobs"]);
    assert_eq!(code, 0, "{err}");
    let jobs = parse("jobs", &out);
    assert_eq!(
        (jobs[0]["type"].as_str(), jobs[0]["speed"].as_u64()),
        (Some("mirror"), Some(1 << 20)),
        "{jobs}"
    );
    for args in [
        &["job", "pause", "d0"][..],
        &["job", "resume", "d0"],
        &["job", "set-speed", "d0", "0"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {out} {err}");
    }
    let (code, out, err) = run(&["job", "wait", "d0"]);
    // A mirror never ends by itself: wait returns once it is ready.
    assert_eq!(code, 0, "job wait: {out} {err}");
    let (code, out, err) = run(&["job", "complete", "d0"]);
    assert_eq!(code, 0, "job complete: {out} {err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while query_block(&mut d.qmp(), "d0")["inserted"]["file"] != target.as_str() {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never moved to the target"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // mirror --wait --complete in one go, back to a new image.
    let again = dir.file("again.qcow2");
    let (code, out, err) = run(&[
        "mirror",
        "d0",
        &again,
        "--sync",
        "full",
        "--wait",
        "--complete",
    ]);
    assert_eq!(code, 0, "mirror --complete: {out} {err}");
    assert_eq!(
        query_block(&mut d.qmp(), "d0")["inserted"]["file"],
        again.as_str()
    );
    d.quit();
    assert!(images_identical(
        again.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert_check_clean(&again);
}
