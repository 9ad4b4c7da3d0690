//! Exports of nodes (`--export`, block-export-add/-del,
//! query-block-exports) and deletion (blockdev-del of devices and nodes):
//! the file appears and goes, permissions between users hold, an open
//! file keeps its device, and descriptors and memory return to their level.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const M: u64 = 1 << 20;

fn qcow2_node(name: &str, img: &str) -> String {
    json!({"driver": "qcow2", "node-name": name,
           "file": {"driver": "file", "filename": img}})
    .to_string()
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// The daemon's descriptors open on `file` (other descriptors come and go
/// with the threads and rings it starts on demand). The last one closes
/// when the last completion of the deletion's flush lets go of it, just
/// after the reply: a leak stays past the second this waits.
fn fds_on(pid: u32, file: &str) -> usize {
    let want = std::fs::canonicalize(file).unwrap();
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|p| *p == want)
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let mut n = count();
    while n > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        n = count();
    }
    n
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_node_exported_on_the_command_line_as_qsd_does() {
    let dir = TestDir::new("export-cli");
    let img = qcow2_image(&dir, "a.qcow2", "", "8M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x21 0 1M"]);
    let other = qcow2_image(&dir, "b.qcow2", "", "1M");
    let d = Daemon::start_with(
        &dir,
        &[qcow2_node("n0", &img), qcow2_node("lonely", &other)],
        &["--export", "type=fuse,id=e0,node-name=n0,writable=on"],
    )
    .unwrap();
    assert_eq!(list_dir(&d.mnt), vec!["e0"]);
    let f = rw(&d, "e0");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0x21; 4096]);
    f.write_all_at(&pattern(3, 65536), 2 * M).unwrap();
    drop(f);
    let mut q = d.qmp();
    assert_eq!(
        q.ok("query-block-exports", json!({})),
        json!([{"type": "fuse", "id": "e0", "node-name": "n0", "shutting-down": false}])
    );
    // Exports are not QMP devices.
    assert_eq!(q.ok("query-block", json!({})), json!([]));
    let (class, _) = q.err("block_resize", json!({"device": "e0", "size": 16 * M}));
    assert_eq!(class, "DeviceNotFound");
    assert!(
        d.stderr()
            .contains("node 'lonely' is opened but not exported"),
        "{}",
        d.stderr()
    );
    assert!(!d.stderr().contains("'n0' is opened"), "{}", d.stderr());
    d.quit();
    let out = qemu_io_ro("qcow2", img.as_ref(), &["read -P 0x21 0 1M"]);
    assert!(!out.contains("failed"), "{out}");
    assert_check_clean(&img);
}

#[test]
fn block_export_add_checks_and_refusals() {
    let dir = TestDir::new("export-qmp");
    let img = qcow2_image(&dir, "a.qcow2", "", "4M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        serde_json::from_str(&qcow2_node("n0", &img)).unwrap(),
    );
    let add = |q: &mut Qmp, args: Value| q.err("block-export-add", args);
    let (class, desc) = add(
        &mut q,
        json!({"type": "fuse", "id": "e0", "node-name": "nope"}),
    );
    assert_eq!(class, "DeviceNotFound", "{desc}");
    let (_, desc) = add(
        &mut q,
        json!({"type": "fuse", "id": "e0", "node-name": "n0", "mountpoint": "/tmp/x"}),
    );
    assert!(desc.contains("drop 'mountpoint'"), "{desc}");
    let (_, desc) = add(
        &mut q,
        json!({"type": "vhost-user-blk", "id": "e0", "node-name": "n0"}),
    );
    assert!(desc.contains("not supported"), "{desc}");
    let (_, desc) = add(
        &mut q,
        json!({"type": "fuse", "id": "a/b", "node-name": "n0"}),
    );
    assert!(desc.contains("a/b"), "{desc}");
    // Read-only by default; a second read-only export of the node is fine.
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "ro1", "node-name": "n0"}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "ro2", "node-name": "n0"}),
    );
    let (_, desc) = add(
        &mut q,
        json!({"type": "fuse", "id": "ro1", "node-name": "n0"}),
    );
    assert!(desc.contains("already in use"), "{desc}");
    assert_eq!(list_dir(&d.mnt), vec!["ro1", "ro2"]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("ro1"));
    assert_eq!(errno_of(f), Some(libc::EROFS));
    // One writer at a time, and not beside readers that refuse writers.
    let (_, desc) = add(
        &mut q,
        json!({"type": "fuse", "id": "rw", "node-name": "n0", "writable": true}),
    );
    assert!(desc.contains("Permission conflict"), "{desc}");
    q.ok("block-export-del", json!({"id": "ro1"}));
    q.ok("block-export-del", json!({"id": "ro2"}));
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "rw", "node-name": "n0", "writable": true}),
    );
    rw(&d, "rw").write_all_at(&[7; 512], 0).unwrap();
    d.quit();
}

#[test]
fn block_export_del_waits_for_the_file_to_close_unless_hard() {
    let dir = TestDir::new("export-del");
    let img = qcow2_image(&dir, "a.qcow2", "", "4M");
    let d = Daemon::start_with(
        &dir,
        &[qcow2_node("n0", &img)],
        &["--export", "type=fuse,id=e0,node-name=n0,writable=on"],
    )
    .unwrap();
    let mut q = d.qmp();
    let f = rw(&d, "e0");
    let (_, desc) = q.err("block-export-del", json!({"id": "e0"}));
    assert!(
        desc.contains("Export 'e0' is in use: its file in the mount is open")
            && desc.contains("mode='hard'"),
        "{desc}"
    );
    drop(f);
    q.ok("block-export-del", json!({"id": "e0"}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5));
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert!(list_dir(&d.mnt).is_empty());
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    // The node stays (the user added it) until blockdev-del names it.
    let names = |q: &mut Qmp| -> Vec<Value> {
        q.ok("query-named-block-nodes", json!({}))
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node-name"].clone())
            .collect()
    };
    assert!(names(&mut q).contains(&json!("n0")));
    // Hard: the open descriptor gets ENODEV, the daemon goes on.
    q.ok(
        "block-export-add",
        json!({"type": "fuse", "id": "e1", "node-name": "n0", "writable": true}),
    );
    let f = rw(&d, "e1");
    q.ok("block-export-del", json!({"id": "e1", "mode": "hard"}));
    let mut buf = [0u8; 512];
    assert_eq!(errno_of(f.read_exact_at(&mut buf, 0)), Some(libc::ENODEV));
    assert_eq!(errno_of(f.write_all_at(&buf, 0)), Some(libc::ENODEV));
    drop(f);
    // The file child is not the user's; the node goes, and with it the lock.
    let file_node = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "file")
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .unwrap();
    let (_, desc) = q.err("blockdev-del", json!({"node-name": file_node}));
    assert!(desc.contains("not owned by the monitor"), "{desc}");
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    assert!(names(&mut q).is_empty());
    qemu_io("qcow2", img.as_ref(), &["write -P 9 0 4k"]);
    let (_, desc) = q.err("blockdev-del", json!({"node-name": "n0"}));
    assert!(
        desc.contains("Failed to find node with node-name='n0'"),
        "{desc}"
    );
    d.quit();
}

#[test]
fn blockdev_del_of_a_device_gives_back_descriptors_and_memory() {
    let dir = TestDir::new("device-del");
    let img = qcow2_image(&dir, "a.qcow2", "", "64M");
    let base = raw_image(&dir, "base.img", "64M");
    qemu_io("raw", base.as_ref(), &["write -P 0x44 0 8M"]);
    qemu_img(&["rebase", "-u", "-F", "raw", "-b", &base, &img]);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let spec = json!({"driver": "qcow2", "id": "d0",
                      "file": {"driver": "file", "filename": img, "aio": "native"}});
    let cycle = |q: &mut Qmp, first: bool| {
        q.ok("blockdev-add", spec.clone());
        let f = rw(&d, "d0");
        let mut buf = vec![0u8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x44));
        f.write_all_at(&buf[..65536], 16 << 20).unwrap();
        if first {
            let (_, desc) = q.err("blockdev-del", json!({"id": "d0"}));
            assert!(desc.contains("Device 'd0' is in use"), "{desc}");
        }
        drop(f);
        q.ok("blockdev-del", json!({"id": "d0"}));
        assert!(list_dir(&d.mnt).is_empty());
        assert_eq!(q.ok("query-named-block-nodes", json!({})), json!([]));
    };
    // Warm up the pools and threads a first device starts.
    cycle(&mut q, true);
    let rss = rss_kib(d.pid());
    for _ in 0..30 {
        cycle(&mut q, false);
    }
    assert_eq!(
        fds_on(d.pid(), &img),
        0,
        "descriptors of the image left open"
    );
    assert_eq!(
        fds_on(d.pid(), &base),
        0,
        "descriptors of the base left open"
    );
    // Leaked nodes show in the descriptor checks above; this bounds the
    // rest (the buffer pool keeps up to 16 MiB, the allocator some slack).
    let grown = rss_kib(d.pid()).saturating_sub(rss);
    assert!(grown < 32 << 10, "RSS grew by {grown} KiB over 30 add/del");
    // The images are free again: another process may write them.
    qemu_io("qcow2", img.as_ref(), &["write -P 1 0 4k"]);
    let (class, _) = q.err("blockdev-del", json!({"id": "d0"}));
    assert_eq!(class, "DeviceNotFound");
    d.quit();
}

#[test]
fn blockdev_del_refusals() {
    let dir = TestDir::new("del-refuse");
    let img = raw_image(&dir, "a.img", "64M");
    // Data to copy: a backup of zeroes has nothing to copy and may end at once.
    qemu_io("raw", img.as_ref(), &["write -P 0x55 0 64M"]);
    let t = dir.file("t.img");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    let root = query_block(&mut q, "d0")["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, desc) = q.err("blockdev-del", json!({"node-name": root}));
    assert!(desc.contains("in use by device 'd0'"), "{desc}");
    let (_, desc) = q.err("blockdev-del", json!({}));
    assert!(desc.contains("one of 'node-name'"), "{desc}");
    // A job holds its device.
    q.ok(
        "drive-backup",
        json!({"device": "d0", "target": t, "format": "raw", "sync": "full", "speed": 1}),
    );
    let (_, desc) = q.err("blockdev-del", json!({"id": "d0"}));
    assert!(desc.contains("in use by a block job"), "{desc}");
    q.ok("block-job-cancel", json!({"device": "d0"}));
    q.wait_job_end("d0");
    q.ok("blockdev-del", json!({"id": "d0"}));
    d.quit();
}

#[test]
fn deleting_a_passthrough_device_gives_its_backing_file_back() {
    let dir = TestDir::new("del-passthrough");
    let img = raw_image(&dir, "a.img", "4M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let spec = json!({"driver": "raw", "id": "p0", "x-passthrough": true,
                      "file": {"driver": "file", "filename": img}});
    let cycle = |q: &mut Qmp| {
        q.ok("blockdev-add", spec.clone());
        let f = rw(&d, "p0");
        f.write_all_at(&[3; 4096], 0).unwrap();
        drop(f);
        q.ok("blockdev-del", json!({"id": "p0"}));
    };
    for _ in 0..10 {
        cycle(&mut q);
    }
    assert_eq!(fds_on(d.pid(), &img), 0);
    // The kernel's reference (the backing id) holds the image locks too:
    // an exclusive writer gets the file while the daemon still runs.
    qemu_io("raw", img.as_ref(), &["write -P 5 0 4k"]);
    d.quit();
}

#[test]
fn nbd_exports_of_nodes_and_devices_held_by_nbd() {
    let dir = TestDir::new("export-nbd");
    let img = qcow2_image(&dir, "a.qcow2", "", "4M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x6b 0 1M"]);
    let raw = raw_image(&dir, "d.img", "1M");
    let d = Daemon::start(
        &dir,
        &[qcow2_node("n0", &img), raw_spec("d0", &raw, json!({}))],
    );
    let mut q = d.qmp();
    let nbd_sock = dir.join("nbd.sock");
    let url = |name: &str| format!("nbd+unix:///{name}?socket={}", nbd_sock.display());
    let (_, desc) = q.err(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "n0"}),
    );
    assert_eq!(desc, "NBD server not running");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd_sock}}}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "n0", "writable": true}),
    );
    // Served over NBD under the node's name, not a file of the mount.
    assert!(list_dir(&d.mnt).iter().all(|f| f != "x0"));
    let exports = q.ok("query-block-exports", json!({}));
    assert_eq!(
        exports,
        json!([{"type": "nbd", "id": "x0", "node-name": "n0", "shutting-down": false}])
    );
    qemu_io("raw", url("n0").as_ref(), &["write -P 0x6c 1M 64k"]);
    let out = qemu_io_ro(
        "raw",
        url("n0").as_ref(),
        &["read -P 0x6b 0 1M", "read -P 0x6c 1M 64k"],
    );
    assert!(!out.contains("failed"), "{out}");
    // A device exported by nbd-server-add is kept from deletion.
    q.ok("nbd-server-add", json!({"device": "d0"}));
    let (_, desc) = q.err("blockdev-del", json!({"id": "d0"}));
    assert!(desc.contains("exported over NBD as 'd0'"), "{desc}");
    q.ok("nbd-server-remove", json!({"name": "d0"}));
    q.ok("blockdev-del", json!({"id": "d0"}));
    // Stopping the server ends the NBD exports of nodes too.
    q.ok("nbd-server-stop", json!({}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5));
    assert_eq!(ev["data"], json!({"id": "x0"}));
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    d.quit();
    assert_check_clean(&img);
    let out = qemu_io_ro("qcow2", img.as_ref(), &["read -P 0x6c 1M 64k"]);
    assert!(!out.contains("failed"), "{out}");
}
