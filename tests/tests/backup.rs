//! `drive-backup` through the real mount and socket: the target holds the
//! device as it was when the job started, whatever the guest writes during
//! the copy (copy-before-write), for sync full, top and none.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;

const M: u64 = 1 << 20;

/// Writes random chunks through the mount until the job ends; returns how many.
fn write_during_job(d: &Daemon, q: &mut Qmp, size: u64, seed: u64) -> usize {
    let f = rw(d, "d0");
    let mut rng = Rng(seed);
    let mut n = 0;
    while q.ok("query-block-jobs", json!({})) != json!([]) && n < 300 {
        for _ in 0..4 {
            let len = (1 + rng.below(8)) as usize * 4096;
            let off = rng.below(size - len as u64) & !4095;
            f.write_all_at(&pattern(rng.next(), len), off).unwrap();
            n += 1;
        }
    }
    f.sync_all().unwrap();
    n
}

fn completed(ev: &Value) {
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["type"], "backup", "{ev}");
    assert!(ev["data"].get("error").is_none(), "{ev}");
}

#[test]
fn full_backup_is_point_in_time() {
    for fmt in ["qcow2", "raw"] {
        let dir = TestDir::new(&format!("backup-full-{fmt}"));
        let src = dir.file(&format!("src.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, &src, "32M"]);
        qemu_io(
            fmt,
            src.as_ref(),
            &["write -P 0x51 0 10M", "write -P 0x52 20M 4M"],
        );
        let at_start = snapshot_raw(&dir, &src, fmt, "start.raw");
        let spec = if fmt == "raw" {
            raw_spec("d0", &src, json!({}))
        } else {
            qcow2_spec("d0", &src)
        };
        let d = Daemon::start(&dir, &[spec]);
        let mut q = d.qmp();
        let target = dir.file(&format!("target.{fmt}"));
        q.ok(
            "drive-backup",
            json!({"device": "d0", "target": target, "sync": "full", "speed": 16 * M}),
        );
        let writes = write_during_job(&d, &mut q, 32 * M, 11);
        assert!(writes > 20, "{fmt}: only {writes} writes during the backup");
        completed(&q.wait_job_end("d0"));
        // The device still runs on its source; the target is closed.
        assert_eq!(query_block(&mut q, "d0")["inserted"]["file"], src.as_str());
        let now = std::fs::read(d.dev("d0")).unwrap();
        assert_ne!(
            now,
            std::fs::read(&at_start).unwrap(),
            "{fmt}: the writes did not land"
        );
        assert!(
            images_identical(target.as_ref(), fmt, at_start.as_ref(), "raw"),
            "{fmt}"
        );
        d.quit();
        if fmt == "qcow2" {
            assert_check_clean(&target);
            assert_check_clean(&src);
        }
    }
}

#[test]
fn top_and_none_backups_are_backed_by_the_chain() {
    for sync in ["top", "none"] {
        let dir = TestDir::new(&format!("backup-{sync}"));
        let base = qcow2_image(&dir, "base.qcow2", "", "16M");
        qemu_io("qcow2", base.as_ref(), &["write -P 0x11 0 8M"]);
        let top = qcow2_overlay(&dir, "top.qcow2", &base, "qcow2");
        qemu_io("qcow2", top.as_ref(), &["write -P 0x44 2M 1M"]);
        let at_start = snapshot_raw(&dir, &top, "qcow2", "start.raw");
        let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
        let mut q = d.qmp();
        let target = dir.file("target.qcow2");
        q.ok(
            "drive-backup",
            json!({"device": "d0", "target": target, "sync": sync, "speed": 2 * M}),
        );
        if sync == "none" {
            // Nothing to copy but what the guest overwrites: write, then cancel.
            let f = rw(&d, "d0");
            f.write_all_at(&pattern(1, 1 << 20), 5 * M).unwrap();
            f.write_all_at(&pattern(2, 4096), 2 * M + 4096).unwrap();
            f.sync_all().unwrap();
            q.ok("block-job-cancel", json!({"device": "d0"}));
            let ev = q.wait_job_end("d0");
            assert_eq!(ev["event"], "BLOCK_JOB_CANCELLED", "{ev}");
            // The target, read through its backing file (the live source),
            // shows the old data where the guest wrote.
            let got = run(
                "qemu-io",
                &[
                    "-U",
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    "read -P 0x11 5M 1M",
                    "-c",
                    "read -P 0x44 2M 1M",
                    &target,
                ],
            );
            assert!(!got.contains("failed"), "{got}");
        } else {
            write_during_job(&d, &mut q, 16 * M, 12);
            completed(&q.wait_job_end("d0"));
            // Its backing file is the source's: together they show the start.
            assert!(
                images_identical(target.as_ref(), "qcow2", at_start.as_ref(), "raw"),
                "{sync}"
            );
        }
        d.quit();
        let info: Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", &target])).unwrap();
        let want = if sync == "top" { &base } else { &top };
        let want = std::fs::canonicalize(want).unwrap();
        assert_eq!(
            info["backing-filename"],
            want.to_string_lossy().as_ref(),
            "{sync}"
        );
        assert_check_clean(&target);
    }
}

#[test]
fn backup_refusals() {
    let dir = TestDir::new("backup-refuse");
    let src = qcow2_image(&dir, "src.qcow2", "", "8M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &src)]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "drive-backup",
        json!({"device": "d0", "target": src, "sync": "full"}),
    );
    assert!(desc.contains("in use by node"), "{desc}");
    let (class, _) = q.err(
        "drive-backup",
        json!({"device": "nope", "target": dir.file("t"), "sync": "full"}),
    );
    assert_eq!(class, "DeviceNotFound");
    let (_, desc) = q.err("drive-backup", json!({"device": "d0", "target": dir.file("t"), "sync": "full", "format": "raw", "mode": "existing"}));
    assert!(desc.contains("Could not open"), "{desc}");
    let (_, desc) = q.err(
        "drive-backup",
        json!({"device": "d0", "target": dir.file("t"), "sync": "none", "format": "raw"}),
    );
    assert_eq!(
        desc,
        "Format 'raw' cannot have a backing file: use sync=full"
    );
    d.quit();
}

/// A write made the moment `drive-backup` returns is already behind the
/// copy-before-write (the hook is in place before the reply): the target
/// keeps the old data. The window was too short to hit from here; the
/// kill -9 loop (jobs_crash) found it.
#[test]
fn a_write_right_after_the_command_is_copied_before() {
    let dir = TestDir::new("backup-race");
    let src = qcow2_image(&dir, "src.qcow2", "", "8M");
    qemu_io("qcow2", src.as_ref(), &["write -P 0x31 0 8M"]);
    let at_start = snapshot_raw(&dir, &src, "qcow2", "start.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &src)]);
    let mut q = d.qmp();
    let f = rw(&d, "d0");
    let target = dir.file("t.qcow2");
    q.ok(
        "drive-backup",
        json!({"device": "d0", "target": target, "sync": "full", "speed": 4 * M}),
    );
    // The job copies from the start: the end is a second and more away.
    f.write_all_at(&pattern(3, 64 << 10), 7 * M).unwrap();
    f.sync_all().unwrap();
    completed(&q.wait_job_end("d0"));
    d.quit();
    assert!(images_identical(
        target.as_ref(),
        "qcow2",
        at_start.as_ref(),
        "raw"
    ));
}

/// A cluster that starts with a hole and holds data after it is copied
/// whole (the job skipped the rest of the cluster after the hole).
#[test]
fn holes_inside_a_cluster_do_not_hide_its_data() {
    let dir = TestDir::new("backup-holes");
    let src = raw_image(&dir, "src.raw", "4M");
    qemu_io(
        "raw",
        src.as_ref(),
        &["write -P 0x41 4k 60k", "write -P 0x42 1028k 8k"],
    );
    let d = Daemon::start(&dir, &[raw_spec("d0", &src, json!({}))]);
    let mut q = d.qmp();
    let target = dir.file("t.raw");
    q.ok(
        "drive-backup",
        json!({"device": "d0", "target": target, "sync": "full", "format": "raw"}),
    );
    completed(&q.wait_job_end("d0"));
    d.quit();
    assert!(images_identical(
        target.as_ref(),
        "raw",
        src.as_ref(),
        "raw"
    ));
}
