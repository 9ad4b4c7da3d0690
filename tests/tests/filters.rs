//! The blkverify and quorum filters through the mount and the socket:
//! writes reach every copy (qemu-img compare as the oracle), reads of
//! copies that agree succeed, a disagreement is reported with the right
//! event and errno, quorum outvotes a corrupted or failing child, repairs
//! it with rewrite-corrupted, and a broken child is replaced by a mirror.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const M: u64 = 1 << 20;

fn file(path: &str) -> Value {
    json!({"driver": "file", "filename": path})
}

fn qcow2(path: &str) -> Value {
    json!({"driver": "qcow2", "file": file(path)})
}

/// `n` qcow2 images of 4 MiB holding the same pattern.
fn copies(dir: &TestDir, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let img = qcow2_image(dir, &format!("c{i}.qcow2"), "", "4M");
            qemu_io("qcow2", img.as_ref(), &["write -P 0x11 0 4M"]);
            img
        })
        .collect()
}

fn read_at(d: &Daemon, id: &str, off: u64, len: usize) -> Result<Vec<u8>, i32> {
    let f = rw(d, id);
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .map(|()| buf)
        .map_err(|e| e.raw_os_error().unwrap_or(0))
}

fn quorum(id: &str, children: Vec<Value>, threshold: u64, extra: Value) -> String {
    let mut q = json!({"driver": "quorum", "id": id, "children": children,
                       "vote-threshold": threshold, "rerror": "report", "werror": "report"});
    for (k, v) in obj(&extra) {
        q[k] = v.clone();
    }
    q.to_string()
}

/// The QUORUM_REPORT_BAD events seen so far, as (type, node-name, has error).
fn bad_reports(q: &mut Qmp) -> Vec<(String, String, bool)> {
    // A no-op command makes sure earlier events have arrived.
    q.ok("query-block", json!({}));
    q.take_events("QUORUM_REPORT_BAD")
        .iter()
        .map(|e| {
            let d = &e["data"];
            (
                d["type"].as_str().unwrap_or_default().to_string(),
                d["node-name"].as_str().unwrap_or_default().to_string(),
                d.get("error").is_some(),
            )
        })
        .collect()
}

#[test]
fn blkverify_passes_agreeing_copies_and_fails_loudly_on_a_mismatch() {
    let dir = TestDir::new("blkverify");
    let test = qcow2_image(&dir, "test.qcow2", "", "4M");
    let raw = raw_image(&dir, "raw.img", "4M");
    qemu_io("qcow2", test.as_ref(), &["write -P 0x22 0 4M"]);
    qemu_io("raw", raw.as_ref(), &["write -P 0x22 0 4M"]);
    // The reference copy differs in one byte at 3 MiB + 100.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .unwrap()
        .write_all_at(&[0x23], 3 * M + 100)
        .unwrap();
    let spec = json!({"driver": "blkverify", "id": "v0", "node-name": "verify",
                      "rerror": "report", "werror": "report",
                      "test": qcow2(&test), "raw": {"driver": "raw", "file": file(&raw)}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    assert_eq!(
        read_at(&d, "v0", 0, M as usize).unwrap(),
        vec![0x22; M as usize]
    );
    // Writes go to both; the new data reads back verified.
    let data = pattern(1, 64 << 10);
    rw(&d, "v0").write_all_at(&data, M + 4096).unwrap();
    assert_eq!(read_at(&d, "v0", M + 4096, data.len()).unwrap(), data);
    assert_eq!(read_at(&d, "v0", 3 * M, 4096), Err(libc::EIO));
    let ev = q.wait_event("BLKVERIFY_MISMATCH", Duration::from_secs(10));
    assert_eq!(ev["data"]["node-name"], "verify", "{ev}");
    assert_eq!(ev["data"]["type"], "read", "{ev}");
    assert_eq!(ev["data"]["offset"], 3 * M, "{ev}");
    assert_eq!(ev["data"]["bytes"], 4096, "{ev}");
    let detail = ev["data"]["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("{}", 3 * M + 100)), "{ev}");
    assert!(d.stderr().contains("contents mismatch"), "{}", d.stderr());
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let v = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "verify")
        .unwrap_or_else(|| panic!("{nodes}"));
    assert_eq!(v["drv"], "blkverify");
    assert_eq!(v["file"], format!("blkverify:{raw}:{test}"));
    // The mismatch did not stop the daemon or the device.
    assert_eq!(read_at(&d, "v0", 0, 4096).unwrap(), vec![0x22; 4096]);
    d.quit();
    let want = pattern(1, 64 << 10);
    let got = qemu_io_ro(
        "qcow2",
        test.as_ref(),
        &[&format!("read -v {} 16", M + 4096)],
    );
    assert!(
        got.contains(&format!("{:02x} {:02x}", want[0], want[1])),
        "{got}"
    );
    let raw_data = std::fs::read(&raw).unwrap();
    assert_eq!(
        &raw_data[(M + 4096) as usize..(M + 4096) as usize + want.len()],
        &want[..]
    );
    assert_check_clean(&test);
}

#[test]
fn blkverify_refuses_copies_of_different_sizes() {
    let dir = TestDir::new("blkverify-size");
    let test = qcow2_image(&dir, "t.qcow2", "", "4M");
    let raw = raw_image(&dir, "r.img", "2M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "blkverify", "id": "v0", "test": qcow2(&test),
                           "raw": {"driver": "raw", "file": file(&raw)}}}),
    );
    assert!(desc.contains("must be the same size"), "{desc}");
    q.ok("query-block", json!({}));
}

#[test]
fn quorum_writes_every_child_and_outvotes_a_corrupted_one() {
    let dir = TestDir::new("quorum-vote");
    let imgs = copies(&dir, 3);
    // Child 2 was corrupted behind the quorum's back.
    qemu_io("qcow2", imgs[2].as_ref(), &["write -P 0x66 1M 64k"]);
    let children: Vec<Value> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"driver": "qcow2", "node-name": format!("q{i}"), "file": file(p)}))
        .collect();
    let d = Daemon::start(&dir, &[quorum("v0", children, 2, json!({}))]);
    let mut q = d.qmp();
    let data = pattern(7, 256 << 10);
    rw(&d, "v0").write_all_at(&data, 2 * M).unwrap();
    assert_eq!(read_at(&d, "v0", 2 * M, data.len()).unwrap(), data);
    assert!(bad_reports(&mut q).is_empty(), "all agree");
    // The majority's data, and child 2 reported bad for this read.
    assert_eq!(read_at(&d, "v0", M, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(
        bad_reports(&mut q),
        vec![("read".to_string(), "q2".to_string(), false)]
    );
    let info = query_block(&mut q, "v0");
    assert_eq!(info["inserted"]["drv"], "quorum", "{info}");
    assert_eq!(info["inserted"]["image"]["virtual-size"], 4 * M, "{info}");
    d.quit();
    for img in &imgs {
        assert_check_clean(img);
    }
    assert!(images_identical(
        imgs[0].as_ref(),
        "qcow2",
        imgs[1].as_ref(),
        "qcow2"
    ));
    // The write reached child 2 as well; only its old corruption differs.
    let out = qemu_io_ro(
        "qcow2",
        imgs[2].as_ref(),
        &[&format!("read -v {} 8", 2 * M)],
    );
    assert!(
        out.contains(&format!("{:02x} {:02x}", data[0], data[1])),
        "{out}"
    );
}

#[test]
fn quorum_rewrite_corrupted_repairs_the_outvoted_child() {
    let dir = TestDir::new("quorum-rewrite");
    let imgs = copies(&dir, 3);
    qemu_io("qcow2", imgs[1].as_ref(), &["write -P 0x77 512k 8k"]);
    let children: Vec<Value> = imgs.iter().map(|p| qcow2(p)).collect();
    let d = Daemon::start(
        &dir,
        &[quorum(
            "v0",
            children,
            2,
            json!({"rewrite-corrupted": true}),
        )],
    );
    let mut q = d.qmp();
    assert_eq!(
        read_at(&d, "v0", 0, M as usize).unwrap(),
        vec![0x11; M as usize]
    );
    assert_eq!(bad_reports(&mut q).len(), 1);
    // Repaired: the same range now reads without a report.
    assert_eq!(
        read_at(&d, "v0", 0, M as usize).unwrap(),
        vec![0x11; M as usize]
    );
    assert!(bad_reports(&mut q).is_empty());
    d.quit();
    assert!(images_identical(
        imgs[0].as_ref(),
        "qcow2",
        imgs[1].as_ref(),
        "qcow2"
    ));
}

#[test]
fn quorum_fails_when_too_few_children_agree() {
    let dir = TestDir::new("quorum-fail");
    let imgs = copies(&dir, 3);
    qemu_io("qcow2", imgs[0].as_ref(), &["write -P 0x01 0 4k"]);
    qemu_io("qcow2", imgs[1].as_ref(), &["write -P 0x02 0 4k"]);
    let children: Vec<Value> = imgs.iter().map(|p| qcow2(p)).collect();
    let d = Daemon::start(&dir, &[quorum("v0", children, 2, json!({}))]);
    let mut q = d.qmp();
    assert_eq!(read_at(&d, "v0", 0, 4096), Err(libc::EIO));
    let ev = q.wait_event("QUORUM_FAILURE", Duration::from_secs(10));
    assert_eq!(
        ev["data"],
        json!({"reference": "v0", "sector-num": 0, "sectors-count": 8})
    );
    // Elsewhere the three agree.
    assert_eq!(read_at(&d, "v0", M, 4096).unwrap(), vec![0x11; 4096]);
    d.quit();
}

#[test]
fn quorum_survives_a_failing_child_and_reports_its_error() {
    let dir = TestDir::new("quorum-eio");
    let imgs = copies(&dir, 3);
    let mut children: Vec<Value> = imgs.iter().map(|p| qcow2(p)).collect();
    // Child 1 fails every read and write of its data file.
    children[1] = json!({"driver": "qcow2", "node-name": "flaky",
        "file": {"driver": "blkdebug", "image": file(&imgs[1]),
                 "inject-error": [{"event": "read_aio", "errno": 5},
                                  {"event": "write_aio", "errno": 5}]}});
    let d = Daemon::start(&dir, &[quorum("v0", children, 2, json!({}))]);
    let mut q = d.qmp();
    assert_eq!(read_at(&d, "v0", 0, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(
        bad_reports(&mut q),
        vec![("read".to_string(), "flaky".to_string(), true)]
    );
    // Within a second of the last report, the next is held until the
    // second is over (QEMU's rate limit), then sent.
    rw(&d, "v0").write_all_at(&[0x44; 4096], 8192).unwrap();
    let ev = q.wait_event("QUORUM_REPORT_BAD", Duration::from_secs(5));
    assert_eq!(
        (&ev["data"]["type"], &ev["data"]["node-name"]),
        (&json!("write"), &json!("flaky")),
        "{ev}"
    );
    // A burst of failing reads: one report now, the latest one a second
    // later, nothing in between.
    for _ in 0..20 {
        assert_eq!(read_at(&d, "v0", 8192, 4096).unwrap(), vec![0x44; 4096]);
    }
    std::thread::sleep(Duration::from_millis(2500));
    let n = bad_reports(&mut q).len();
    assert!((1..=2).contains(&n), "{n} reports for 20 failing reads");
    d.quit();
}

#[test]
fn quorum_of_referenced_nodes_and_the_option_refusals() {
    let dir = TestDir::new("quorum-refs");
    let imgs = copies(&dir, 3);
    let small = qcow2_image(&dir, "small.qcow2", "", "1M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    for (i, p) in imgs.iter().enumerate() {
        let mut o = qcow2(p);
        o["node-name"] = json!(format!("n{i}"));
        q.ok("blockdev-add", json!({"options": o}));
    }
    let mut s = qcow2(&small);
    s["node-name"] = json!("small");
    q.ok("blockdev-add", json!({"options": s}));
    let refusals = [
        (
            json!(["n0", "n1"]),
            json!({"vote-threshold": 0}),
            "expects a value >= 1",
        ),
        (
            json!(["n0", "n1"]),
            json!({"vote-threshold": 3}),
            "may not exceed children count",
        ),
        (json!([]), json!({"vote-threshold": 1}), "must be 1 or more"),
        (
            json!(["n0", "n1", "n2"]),
            json!({"vote-threshold": 2, "blkverify": true}),
            "exactly two files",
        ),
        (
            json!(["n0", "n1"]),
            json!({"vote-threshold": 2, "blkverify": true, "rewrite-corrupted": true}),
            "cannot be used with blkverify",
        ),
        (
            json!(["n0", "small"]),
            json!({"vote-threshold": 1}),
            "the same size",
        ),
        (json!(["n0", "nope"]), json!({"vote-threshold": 1}), "nope"),
    ];
    for (children, extra, want) in refusals {
        let mut o = json!({"driver": "quorum", "id": "v0", "children": children});
        for (k, v) in obj(&extra) {
            o[k] = v.clone();
        }
        let (_, desc) = q.err("blockdev-add", json!({"options": o}));
        assert!(desc.contains(want), "{extra}: {desc}");
    }
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "quorum", "id": "v0", "children": ["n0", "n1", "n2"],
                           "vote-threshold": 2}}),
    );
    // A child in use by the quorum cannot be taken by a second writer.
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "x", "file": "n0"}}),
    );
    assert!(desc.contains("Permission conflict"), "{desc}");
    let data = pattern(3, 128 << 10);
    rw(&d, "v0").write_all_at(&data, 0).unwrap();
    assert_eq!(read_at(&d, "v0", 0, data.len()).unwrap(), data);
    d.quit();
    assert!(images_identical(
        imgs[0].as_ref(),
        "qcow2",
        imgs[2].as_ref(),
        "qcow2"
    ));
}

#[test]
fn quorum_blkverify_mode_fails_any_difference() {
    let dir = TestDir::new("quorum-blkverify");
    let imgs = copies(&dir, 2);
    qemu_io("qcow2", imgs[1].as_ref(), &["write -P 0x55 64k 512"]);
    let children: Vec<Value> = imgs.iter().map(|p| qcow2(p)).collect();
    let d = Daemon::start(
        &dir,
        &[quorum("v0", children, 2, json!({"blkverify": true}))],
    );
    assert_eq!(read_at(&d, "v0", 0, 4096).unwrap(), vec![0x11; 4096]);
    assert_eq!(read_at(&d, "v0", 64 << 10, 4096), Err(libc::EIO));
    assert!(
        d.stderr().contains("contents mismatch at offset 65536"),
        "{}",
        d.stderr()
    );
    d.quit();
}

#[test]
fn mirror_replaces_a_broken_quorum_child() {
    let dir = TestDir::new("quorum-mirror");
    let imgs = copies(&dir, 3);
    qemu_io("qcow2", imgs[2].as_ref(), &["write -P 0x99 0 4M"]);
    let children: Vec<Value> = imgs
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"driver": "qcow2", "node-name": format!("q{i}"), "file": file(p)}))
        .collect();
    let d = Daemon::start(&dir, &[quorum("v0", children, 2, json!({}))]);
    let mut q = d.qmp();
    let target = dir.file("new.qcow2");
    let (_, desc) = q.err(
        "drive-mirror",
        json!({"device": "v0", "target": target, "format": "qcow2", "sync": "top",
               "node-name": "fresh", "replaces": "q2"}),
    );
    assert!(desc.contains("sync=full"), "{desc}");
    q.ok(
        "drive-mirror",
        json!({"device": "v0", "target": target, "format": "qcow2", "sync": "full",
               "node-name": "fresh", "replaces": "q2"}),
    );
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60));
    q.ok("block-job-complete", json!({"device": "v0"}));
    let end = q.wait_job_end("v0");
    assert_eq!(end["event"], "BLOCK_JOB_COMPLETED", "{end}");
    assert!(end["data"].get("error").is_none(), "{end}");
    // The copy's reads reported q2; a report held by the rate limit comes
    // within the second.
    std::thread::sleep(Duration::from_millis(1500));
    bad_reports(&mut q);
    // The device stays the quorum, now without disagreement.
    let info = query_block(&mut q, "v0");
    assert_eq!(info["inserted"]["drv"], "quorum", "{info}");
    assert_eq!(
        read_at(&d, "v0", 0, 4 * M as usize).unwrap(),
        vec![0x11; 4 * M as usize]
    );
    assert!(bad_reports(&mut q).is_empty());
    let names: Vec<Value> = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].clone())
        .collect();
    assert!(names.contains(&json!("fresh")), "{names:?}");
    assert!(
        !names.contains(&json!("q2")),
        "the replaced child is closed: {names:?}"
    );
    d.quit();
    assert!(images_identical(
        imgs[0].as_ref(),
        "qcow2",
        target.as_ref(),
        "qcow2"
    ));
    assert_check_clean(&target);
}
