//! Image locking against QEMU's tools and between blkfs nodes: each test
//! first reproduces a finding of issue 8 (two writers of one image), then
//! checks that it is refused the way QEMU refuses it, and that what QEMU
//! allows (read-only users, `-U`, `locking=off`) still works.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a command to completion: (success, stdout, stderr).
fn output(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must fail, and returns its stdout and stderr.
fn refused(cmd: &str, args: &[&str]) -> String {
    let (ok, out, err) = output(cmd, args);
    assert!(!ok, "{cmd} {args:?} should have been refused: {out}{err}");
    format!("{out}{err}")
}

fn qcow2_spec(id: &str, file: &str, extra: Value) -> String {
    let mut v = json!({"driver": "qcow2", "id": id, "file": {"driver": "file", "filename": file}});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v.to_string()
}

/// Writes `data` at `offset` of a device file and syncs it.
fn write_dev(d: &Daemon, id: &str, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.dev(id))
        .expect("open device");
    f.write_all_at(data, offset).expect("write device");
    f.sync_all().expect("fsync device");
}

fn assert_lock_error(what: &str, msg: &str, lock: &str, file: &str) {
    assert!(
        msg.contains(&format!("Failed to get {lock} lock")),
        "{what}: expected a {lock} lock failure: {msg}"
    );
    assert!(
        msg.contains(&format!("Is another process using the image [{file}]?")),
        "{what}: the error should name the image: {msg}"
    );
}

#[test]
fn qemu_io_cannot_write_an_image_blkfs_writes() {
    let dir = TestDir::new("lock-qemu-io");
    let img = qcow2_image(&dir, "top.qcow2", "", "16M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img, json!({}))]);
    write_dev(&d, "d0", 0, &[0xab; 65536]);
    // The finding: this write used to succeed and was later lost.
    let msg = refused(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0xcd 0 4k", &img],
    );
    assert_lock_error("qemu-io write", &msg, "\"write\"", &img);
    // qemu-img info needs the shared "write" permission blkfs does not give;
    // with -U (force share) it reads the image.
    let msg = refused("qemu-img", &["info", "-f", "qcow2", &img]);
    assert_lock_error("qemu-img info", &msg, "shared \"write\"", &img);
    let info = qemu_img(&["info", "-U", "--output=json", "-f", "qcow2", &img]);
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    assert!(d.terminate().success());
    // Once blkfs is gone the image is free, and blkfs's data is there.
    qemu_io("qcow2", Path::new(&img), &["write -P 0xcd 65536 4k"]);
    qemu_io_ro(
        "qcow2",
        Path::new(&img),
        &["read -P 0xab 0 64k", "read -P 0xcd 64k 4k"],
    );
    assert_eq!(qemu_img_check(&img)["check-errors"], 0);
}

/// A qemu-storage-daemon holding an image through file + qcow2 nodes (no
/// export), killed on drop.
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(dir: &TestDir, img: &str, read_only: bool) -> Qsd {
        let sock = dir.file("qsd.sock");
        let ro = if read_only { "on" } else { "off" };
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f,filename={img},read-only={ro}"),
                "--blockdev",
                &format!("driver=qcow2,node-name=q,file=f,read-only={ro}"),
                "--chardev",
                &format!("socket,id=m,path={sock},server=on,wait=off"),
                "--monitor",
                "chardev=m",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut q = Qsd { child };
        // qsd opens the blockdevs before it creates the monitor socket.
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&sock).is_err() {
            if let Ok(Some(s)) = q.child.try_wait() {
                panic!("qemu-storage-daemon exited: {s}");
            }
            assert!(Instant::now() < deadline, "qemu-storage-daemon not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn blkfs_refuses_an_image_qsd_writes() {
    let dir = TestDir::new("lock-qsd");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let other = qcow2_image(&dir, "b.qcow2", "", "16M");
    let qsd = Qsd::start(&dir, &img, false);
    // At start: --blockdev fails and the daemon exits, naming the lock.
    let mnt = dir.join("mnt");
    let sock = dir.file("qmp.sock");
    let (code, stderr) = run_blkfs(
        &[
            "--mount",
            &mnt.to_string_lossy(),
            "--qmp",
            &sock,
            "--blockdev",
            &qcow2_spec("d0", &img, json!({})),
        ],
        START_TIMEOUT,
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert_lock_error("--blockdev", &stderr, "\"write\"", &img);
    // At run time: blockdev-add fails, writable or read-only (qsd does not
    // share "write"); with force-share a read-only user gets in.
    let d = Daemon::start(&dir, &[qcow2_spec("d1", &other, json!({}))]);
    let mut q = d.qmp();
    let (class, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d0", &img, json!({}))).expect("spec"),
    );
    assert_eq!(class, "GenericError");
    assert_lock_error("blockdev-add", &desc, "\"write\"", &img);
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d0", &img, json!({"read-only": true}))).expect("spec"),
    );
    assert_lock_error("read-only blockdev-add", &desc, "shared \"write\"", &img);
    let shared = json!({"read-only": true, "force-share": true});
    q.ok(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d2", &img, shared)).expect("spec"),
    );
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d3", &img, json!({"force-share": true}))).expect("spec"),
    );
    assert_eq!(
        desc,
        "force-share=on can only be used with read-only images"
    );
    let devices: Vec<Value> = q
        .ok("query-block", json!({}))
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ids: Vec<&str> = devices
        .iter()
        .filter_map(|b| b["device"].as_str())
        .collect();
    assert_eq!(ids, ["d1", "d2"]);
    drop(qsd);
    // qsd gone: the image can be opened for writing.
    q.ok(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec(
            "d4",
            &img,
            json!({"file": {"driver": "file", "filename": img, "locking": "on"}}),
        ))
        .expect("spec"),
    );
}

#[test]
fn two_devices_of_one_daemon_never_write_one_file() {
    let dir = TestDir::new("lock-twice");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    // The finding: a second writable device of the same qcow2 allocated at
    // the same end-of-file offset as the first.
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d1", &img, json!({}))).expect("spec"),
    );
    assert_lock_error("second writer", &desc, "\"write\"", &img);
    // Nor as raw over the same file, nor read-only.
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&raw_spec("d1", &img, json!({}))).expect("spec"),
    );
    assert_lock_error("raw second writer", &desc, "\"write\"", &img);
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d1", &img, json!({"read-only": true}))).expect("spec"),
    );
    assert_lock_error("reader", &desc, "shared \"write\"", &img);
    assert_eq!(
        q.ok("query-named-block-nodes", json!({}))
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // The first device is untouched by the refusals.
    write_dev(&d, "d0", 1 << 20, &[0x5a; 8192]);
    assert!(d.terminate().success());
    qemu_io_ro("qcow2", Path::new(&img), &["read -P 0x5a 1M 8k"]);
    let check = qemu_img_check(&img);
    assert_eq!(check["check-errors"], 0, "{check}");
    assert_eq!(check["corruptions"].as_u64().unwrap_or(0), 0, "{check}");
}

#[test]
fn a_second_daemon_cannot_open_an_image_another_writes() {
    let dir = TestDir::new("lock-2d");
    let dir2 = TestDir::new("lock-2d-b");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img, json!({}))]);
    let err = Daemon::start_with(&dir2, &[qcow2_spec("e0", &img, json!({}))], &[])
        .err()
        .expect("the second daemon must fail to start");
    assert_lock_error("second daemon", &err, "\"write\"", &img);
    assert!(
        !is_mounted(&dir2.join("mnt")),
        "no mount may be left behind"
    );
    // Read-only it fails too, the first daemon writes.
    let ro = qcow2_spec("e0", &img, json!({"read-only": true}));
    let err = Daemon::start_with(&dir2, &[ro], &[])
        .err()
        .expect("refused");
    assert_lock_error("reader daemon", &err, "shared \"write\"", &img);
    assert!(d.terminate().success());
    let d2 = Daemon::start(&dir2, &[qcow2_spec("e0", &img, json!({}))]);
    write_dev(&d2, "e0", 0, &[1; 4096]);
}

#[test]
fn read_only_users_coexist() {
    let dir = TestDir::new("lock-ro");
    let dir2 = TestDir::new("lock-ro-b");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    qemu_io("qcow2", Path::new(&img), &["write -P 0x11 0 64k"]);
    let ro = json!({"read-only": true});
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img, ro.clone())]);
    let d2 = Daemon::start(&dir2, &[qcow2_spec("e0", &img, ro.clone())]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("d1", &img, ro)).expect("spec"),
    );
    for (dev, id) in [(&d, "d0"), (&d, "d1"), (&d2, "e0")] {
        let data = std::fs::read(dev.dev(id)).expect("read device");
        assert!(data[..65536].iter().all(|&b| b == 0x11), "{id}");
    }
    // QEMU's readers get in without -U, its writers do not.
    qemu_io_ro("qcow2", Path::new(&img), &["read -P 0x11 0 64k"]);
    qemu_img(&["info", "-f", "qcow2", &img]);
    let (code, out, err) = blkctl(&d.sock, &["check", &img]);
    assert_eq!(code, 0, "{out}{err}");
    let msg = refused("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", &img]);
    assert_lock_error("qemu-io write", &msg, "\"write\"", &img);
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&qcow2_spec("w", &img, json!({}))).expect("spec"),
    );
    assert_lock_error("blkfs writer", &desc, "\"write\"", &img);
}

#[test]
fn blkctl_offline_commands_lock_like_qemu_img() {
    let dir = TestDir::new("lock-ctl");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img, json!({}))]);
    write_dev(&d, "d0", 0, &[7; 65536]);
    // The finding: check -r repaired an image the daemon writes.
    for args in [
        &["check", "-r", "all", &img][..],
        &["check", "-r", "leaks", &img],
    ] {
        let (code, out, err) = blkctl(&d.sock, args);
        assert_eq!(code, 1, "{args:?}: {out}");
        assert_lock_error("check -r", &err, "\"write\"", &img);
    }
    let (code, _, err) = blkctl(&d.sock, &["check", &img]);
    assert_eq!(code, 1);
    assert_lock_error("check", &err, "shared \"write\"", &img);
    let (code, _, err) = blkctl(&d.sock, &["map", &img]);
    assert_eq!(code, 1);
    assert_lock_error("map", &err, "shared \"write\"", &img);
    let (code, _, err) = blkctl(&d.sock, &["create", "-f", "qcow2", &img, "1M"]);
    assert_eq!(code, 1);
    assert_lock_error("create", &err, "\"write\"", &img);
    // The image was not touched by the refused create.
    assert!(std::fs::metadata(&img).expect("stat").len() > 65536);
    // -U: read-only inspection goes through; never with -r (qemu-img's words).
    let (code, out, err) = blkctl(&d.sock, &["check", "-U", &img]);
    assert!(code == 0 || code == 3, "check -U: {out}{err}");
    let (code, out, err) = blkctl(&d.sock, &["--json", "map", "-U", &img]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"data\": true") || out.contains("\"data\":true"),
        "{out}"
    );
    let (code, _, err) = blkctl(&d.sock, &["check", "-U", "-r", "all", &img]);
    assert_eq!(code, 1);
    assert!(
        err.contains("force-share=on can only be used with read-only images"),
        "{err}"
    );
    // Creating an overlay of an image in use reads its size with force-share.
    let ov = dir.file("ov.qcow2");
    let (code, _, err) = blkctl(&d.sock, &["create", "-b", &img, "-F", "qcow2", &ov]);
    assert_eq!(code, 0, "{err}");
    assert!(d.terminate().success());
    let (code, out, err) = blkctl(&dir.join("qmp.sock"), &["check", "-r", "all", &img]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn locking_off_takes_no_locks() {
    let dir = TestDir::new("lock-off");
    let dir2 = TestDir::new("lock-off-b");
    let img = raw_image(&dir, "a.img", "4M");
    let off = json!({"locking": "off"});
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, off.clone())]);
    // Nothing refuses: QEMU's tools, a second device, a second daemon.
    qemu_io("raw", Path::new(&img), &["write -P 0x22 0 4k"]);
    qemu_img(&["info", "-f", "raw", &img]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        serde_json::from_str(&raw_spec("d1", &img, off.clone())).expect("spec"),
    );
    let d2 = Daemon::start(&dir2, &[raw_spec("e0", &img, off)]);
    let data = std::fs::read(d2.dev("e0")).expect("read");
    assert!(data[..4096].iter().all(|&b| b == 0x22));
    // Explicit "on" and the default lock (a blkfs writer with locks refuses
    // a qemu-io writer), and a bad value is rejected by name.
    let img2 = raw_image(&dir, "b.img", "4M");
    q.ok(
        "blockdev-add",
        serde_json::from_str(&raw_spec("d2", &img2, json!({"locking": "on"}))).expect("spec"),
    );
    let msg = refused("qemu-io", &["-f", "raw", "-c", "write 0 4k", &img2]);
    assert_lock_error("locking=on", &msg, "\"write\"", &img2);
    let (_, desc) = q.err(
        "blockdev-add",
        serde_json::from_str(&raw_spec("d3", &img2, json!({"locking": "maybe"}))).expect("spec"),
    );
    assert_eq!(
        desc,
        "Parameter 'file.locking' does not accept value 'maybe'"
    );
}

#[test]
fn a_backing_file_in_use_can_be_read_but_not_written() {
    let dir = TestDir::new("lock-backing");
    let dir2 = TestDir::new("lock-backing-b");
    let base = qcow2_image(&dir, "base.qcow2", "", "16M");
    qemu_io("qcow2", Path::new(&base), &["write -P 0x33 0 64k"]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
    ]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &top, json!({}))]);
    // A second daemon: the base cannot be opened for writing, only read.
    let err = Daemon::start_with(&dir2, &[qcow2_spec("e0", &base, json!({}))], &[])
        .err()
        .expect("writer of the backing file must be refused");
    assert_lock_error("writer of base", &err, "\"write\"", &base);
    let d2 = Daemon::start(
        &dir2,
        &[qcow2_spec("e0", &base, json!({"read-only": true}))],
    );
    let data = std::fs::read(d2.dev("e0")).expect("read base");
    assert!(data[..65536].iter().all(|&b| b == 0x33));
    // QEMU agrees: readers of the base in, writers out.
    qemu_io_ro("qcow2", Path::new(&base), &["read -P 0x33 0 64k"]);
    let msg = refused("qemu-io", &["-f", "qcow2", "-c", "write 0 4k", &base]);
    assert_lock_error("qemu-io write of base", &msg, "\"write\"", &base);
    // The top is written through the daemon, the base stays as it was.
    write_dev(&d, "d0", 0, &[0x44; 4096]);
    drop(d2);
    assert!(d.terminate().success());
    qemu_io_ro(
        "qcow2",
        Path::new(&top),
        &["read -P 0x44 0 4k", "read -P 0x33 4k 60k"],
    );
    qemu_io_ro("qcow2", Path::new(&base), &["read -P 0x33 0 64k"]);
}

#[test]
fn change_backing_file_of_a_backing_image_another_process_reads_is_refused() {
    let dir = TestDir::new("lock-cbf");
    let base = qcow2_image(&dir, "base.qcow2", "", "4M");
    let mid = dir.file("mid.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid,
    ]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top,
    ]);
    let file = |f: &str| json!({"driver": "file", "filename": f});
    let spec = json!({"driver": "qcow2", "id": "d0", "node-name": "top", "file": file(&top),
        "backing": {"driver": "qcow2", "node-name": "mid", "file": file(&mid),
            "backing": {"driver": "qcow2", "node-name": "base", "file": file(&base)}}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    // qemu-storage-daemon reads mid: rewriting its header would change the
    // image under it, and QEMU refuses that.
    let qsd = Qsd::start(&dir, &mid, true);
    let args = json!({"device": "d0", "image-node-name": "mid", "backing-file": "base.qcow2"});
    let (_, desc) = q.err("change-backing-file", args.clone());
    assert_lock_error("change-backing-file", &desc, "\"write\"", &mid);
    let info = qemu_img(&["info", "-U", "--output=json", "-f", "qcow2", &mid]);
    assert!(
        info.contains(&format!("\"backing-filename\": \"{base}\"")),
        "{info}"
    );
    drop(qsd);
    q.ok("change-backing-file", args);
    // The temporary write permission went away with the write: a reader of
    // mid gets in again.
    qemu_io_ro("qcow2", Path::new(&mid), &["read 0 4k"]);
    assert!(d.terminate().success());
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", &mid]);
    assert!(
        info.contains("\"backing-filename\": \"base.qcow2\""),
        "{info}"
    );
}

#[test]
fn a_file_node_named_by_two_parents_has_at_most_one_writer() {
    let dir = TestDir::new("lock-ref");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let ro = qcow2_image(&dir, "b.qcow2", "", "16M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    for (n, f) in [("f", &img), ("g", &ro)] {
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": n, "filename": f}),
        );
    }
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d0", "file": "f"}),
    );
    // The same finding through one descriptor: both qcow2 nodes would
    // allocate at the same end of file. QEMU's permissions refuse it.
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d1", "file": "f"}),
    );
    assert!(
        desc.starts_with("Permission conflict on node 'f': 'write' is required by '")
            && desc.ends_with("(uses it as 'file') and unshared by the new 'file'"),
        "{desc}"
    );
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "raw", "id": "d1", "read-only": true, "file": "f"}),
    );
    assert!(
        desc.contains("'write' is required by '")
            && desc.ends_with("and unshared by the new 'file'"),
        "{desc}"
    );
    // Readers share a node.
    for id in ["r0", "r1"] {
        q.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "id": id, "read-only": true, "file": "g"}),
        );
    }
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "w", "file": "g"}),
    );
    assert!(
        desc.contains("'write' is required by the new 'file'"),
        "{desc}"
    );
    write_dev(&d, "d0", 0, &[9; 4096]);
    assert!(d.terminate().success());
    qemu_io_ro("qcow2", Path::new(&img), &["read -P 9 0 4k"]);
}
