//! `block-commit` through the real mount and socket: an intermediate
//! image committed into its base (the chain shrinks, the overlay's backing
//! string is rewritten), the active layer committed (READY, then complete
//! moves the device onto the base), a smaller base grown, and refusals.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const M: u64 = 1 << 20;

fn info(img: &str) -> Value {
    let out = qemu_img(&["info", "-U", "--output=json", img]);
    serde_json::from_str(&out).unwrap()
}

/// base <- mid <- top (16 MiB), data in every layer.
fn chain(dir: &TestDir, base_size: &str) -> (String, String, String) {
    let base = qcow2_image(dir, "base.qcow2", "", base_size);
    qemu_io("qcow2", base.as_ref(), &["write -P 0x11 0 4M"]);
    let mid = dir.file("mid.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid, "16M",
    ]);
    qemu_io(
        "qcow2",
        mid.as_ref(),
        &[
            "write -P 0x33 2M 4M",
            "write -z 1M 64k",
            "write -P 0x34 14M 1M",
        ],
    );
    let top = qcow2_overlay(dir, "top.qcow2", &mid, "qcow2");
    qemu_io("qcow2", top.as_ref(), &["write -P 0x44 3M 1M"]);
    (base, mid, top)
}

fn completed(ev: &Value) {
    assert_eq!(ev["event"], "BLOCK_JOB_COMPLETED", "{ev}");
    assert_eq!(ev["data"]["type"], "commit", "{ev}");
    assert!(ev["data"].get("error").is_none(), "{ev}");
}

#[test]
fn intermediate_commit_drops_the_layer() {
    let dir = TestDir::new("commit-mid");
    let (base, mid, top) = chain(&dir, "16M");
    let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
    let mid_view = snapshot_raw(&dir, &mid, "qcow2", "mid.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    q.ok(
        "block-commit",
        json!({"device": "d0", "top": mid, "base": base, "speed": 8 * M}),
    );
    // The guest keeps writing the active layer meanwhile.
    let f = rw(&d, "d0");
    let mut model = std::fs::read(&want).unwrap();
    let mut rng = Rng(21);
    while q.ok("query-block-jobs", json!({})) != json!([]) {
        let off = rng.below(16 * M - 8192) & !4095;
        let data = pattern(rng.next(), 8192);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + 8192].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    completed(&q.wait_job_end("d0"));
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert_eq!(inserted["backing_file_depth"], 1, "{inserted}");
    assert_eq!(inserted["backing_file"], base.as_str(), "{inserted}");
    // The base is read-only again.
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let b = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "qcow2" && n["file"] == base.as_str())
        .unwrap();
    assert_eq!(b["ro"], true, "{b}");
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["file"] == mid.as_str()),
        "{nodes}"
    );
    assert_same_bytes(&std::fs::read(d.dev("d0")).unwrap(), &model, "device");
    d.quit();
    assert_eq!(info(&top)["backing-filename"], base.as_str());
    std::fs::write(&want, &model).unwrap();
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    // The base now shows what mid showed.
    assert!(images_identical(
        base.as_ref(),
        "qcow2",
        mid_view.as_ref(),
        "raw"
    ));
    assert_check_clean(&base);
    assert_check_clean(&top);
}

#[test]
fn active_commit_then_complete_moves_onto_base() {
    let dir = TestDir::new("commit-active");
    // A smaller base grows to the top's size.
    let (base, _mid, top) = chain(&dir, "8M");
    let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
    let mut model = std::fs::read(&want).unwrap();
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    q.ok("block-commit", json!({"device": "d0", "base": base}));
    let ev = q.wait_event_where(Duration::from_secs(60), |e| {
        e["event"] == "BLOCK_JOB_READY" || e["event"] == "BLOCK_JOB_COMPLETED"
    });
    assert_eq!(ev["event"], "BLOCK_JOB_READY", "{ev}");
    assert_eq!(ev["data"]["type"], "commit", "{ev}");
    // Writes after READY reach the base too.
    let f = rw(&d, "d0");
    for i in 0..32u64 {
        let data = pattern(100 + i, 4096);
        let off = (i * 509 * 1024) & !4095;
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    q.ok("block-job-complete", json!({"device": "d0"}));
    completed(&q.wait_job_end("d0"));
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert_eq!(inserted["file"], base.as_str(), "{inserted}");
    assert_eq!(inserted["backing_file_depth"], 0, "{inserted}");
    assert_eq!(inserted["ro"], false, "{inserted}");
    assert_same_bytes(&std::fs::read(d.dev("d0")).unwrap(), &model, "device");
    d.quit();
    std::fs::write(&want, &model).unwrap();
    assert_eq!(info(&base)["virtual-size"], 16 * M);
    assert!(images_identical(
        base.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert_check_clean(&base);
}

#[test]
fn active_commit_cancelled_after_ready_stays_on_top() {
    let dir = TestDir::new("commit-cancel");
    let (base, mid, top) = chain(&dir, "16M");
    let want = snapshot_raw(&dir, &top, "qcow2", "want.raw");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top)]);
    let mut q = d.qmp();
    let mut watch = d.qmp();
    q.ok("block-commit", json!({"device": "d0"}));
    let ev = q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60));
    assert_eq!(ev["data"]["device"], "d0");
    q.ok("block-job-cancel", json!({"device": "d0"}));
    completed(&q.wait_job_end("d0"));
    assert_eq!(
        watch.job_events("d0"),
        ["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED"]
    );
    let inserted = &query_block(&mut q, "d0")["inserted"];
    assert_eq!(inserted["file"], top.as_str(), "{inserted}");
    assert_eq!(inserted["backing_file_depth"], 2, "{inserted}");
    assert_eq!(
        std::fs::read(d.dev("d0")).unwrap(),
        std::fs::read(&want).unwrap()
    );
    d.quit();
    // The base holds everything: it alone reads as the top did.
    assert!(images_identical(
        base.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        want.as_ref(),
        "raw"
    ));
    assert_check_clean(&base);
    assert_check_clean(&mid);
}

#[test]
fn commit_refusals() {
    let dir = TestDir::new("commit-refuse");
    let (base, mid, top) = chain(&dir, "16M");
    let lone = qcow2_image(&dir, "lone.qcow2", "", "1M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top), qcow2_spec("d1", &lone)]);
    let mut q = d.qmp();
    let cases = [
        // As QEMU 2.1: the base is looked for below the top.
        (
            json!({"device": "d0", "top": mid, "base": mid}),
            format!("Base '{mid}' not found"),
        ),
        (
            json!({"device": "d0", "top": "nope.qcow2"}),
            "Top image file nope.qcow2 not found".to_string(),
        ),
        (
            json!({"device": "d0", "base": "nope.qcow2"}),
            "Base 'nope.qcow2' not found".to_string(),
        ),
        (
            json!({"device": "d0", "top": mid, "base": top}),
            format!("Base '{top}' not found"),
        ),
        (
            json!({"device": "d1"}),
            "cannot commit an image into itself".to_string(),
        ),
        (
            json!({"device": "d0", "backing-file": "x"}),
            "'backing-file' specified, but 'top' is the active layer".to_string(),
        ),
        (
            json!({"device": "d0", "speed": -1}),
            "Invalid parameter 'speed'".to_string(),
        ),
    ];
    for (args, want) in cases {
        let (_, desc) = q.err("block-commit", args.clone());
        assert_eq!(desc, want, "{args}");
    }
    // Nothing changed: every node of the chain is as it was (read-only below the top).
    let nodes = q.ok("query-named-block-nodes", json!({}));
    for n in nodes.as_array().unwrap() {
        if n["drv"] == "qcow2" && (n["file"] == base.as_str() || n["file"] == mid.as_str()) {
            assert_eq!(n["ro"], true, "{n}");
        }
    }
    d.quit();
}
