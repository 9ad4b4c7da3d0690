//! The daemon's life cycle: start-up (mount directory, socket, --blockdev
//! specs in both syntaxes), clean refusals at start-up, and shutdown on
//! SIGTERM, SIGINT and QMP quit.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Asserts that a failed start-up said one clear line and left nothing mounted.
fn assert_clean_failure(what: &str, code: Option<i32>, stderr: &str, mnt: &Path) {
    assert!(
        matches!(code, Some(c) if c != 0),
        "{what}: must exit non-zero (not crash), got {code:?}; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: exactly one line on stderr, got {stderr:?}"
    );
    assert!(lines[0].len() > 10, "{what}: message too terse: {stderr:?}");
    assert!(
        !is_mounted(mnt),
        "{what}: {} is still mounted",
        mnt.display()
    );
}

#[test]
fn start_creates_the_mount_directory_and_a_private_socket() {
    let dir = TestDir::new("dm-start");
    let img = raw_image(&dir, "a.img", "2M");
    assert!(!dir.join("mnt").exists());
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    assert!(
        is_mounted(&d.mnt),
        "mount point must be in /proc/self/mountinfo"
    );
    let m = std::fs::symlink_metadata(&d.sock).unwrap();
    assert!(
        m.file_type().is_socket(),
        "{} is not a socket",
        d.sock.display()
    );
    assert_eq!(m.permissions().mode() & 0o7777, 0o600, "socket mode");
    assert_eq!(list_dir(&d.mnt), vec!["d0"]);
    let st = std::fs::metadata(d.dev("d0")).unwrap();
    assert!(st.is_file());
    assert_eq!(st.len(), 2 << 20);
}

#[test]
fn sigterm_flushes_unmounts_and_removes_the_socket() {
    let dir = TestDir::new("dm-term");
    let img = raw_image(&dir, "a.img", "8M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&[0x42; 300_000], 1_000_000).unwrap();
    drop(f);
    let (mnt, sock) = (d.mnt.clone(), d.sock.clone());
    let status = d.terminate();
    assert!(status.success(), "exit status on SIGTERM: {status}");
    assert!(!sock.exists(), "socket must be removed");
    assert!(!is_mounted(&mnt), "mount must be gone");
    qemu_io(
        "raw",
        img.as_ref(),
        &[
            "read -P 0 0 1000000",
            "read -P 0x42 1000000 300000",
            "read -P 0 1300000 100000",
        ],
    );
}

#[test]
fn sigint_shuts_down_cleanly_with_clients_connected() {
    let dir = TestDir::new("dm-int");
    let img = raw_image(&dir, "a.img", "4M");
    let mut d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    // A negotiated client and a client that never negotiated stay connected.
    let mut q = d.qmp();
    let _raw = Qmp::connect(&d.sock);
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&[0x17; 4096], 8192).unwrap();
    drop(f);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGINT) };
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status on SIGINT: {status}");
    assert!(!d.sock.exists(), "socket must be removed");
    assert!(!is_mounted(&d.mnt), "mount must be gone");
    // The connected client sees its stream end.
    let mut n = 0;
    while let Some(m) = q.read_msg() {
        assert!(m.get("event").is_some(), "unexpected message: {m}");
        n += 1;
        assert!(n < 100);
    }
    qemu_io(
        "raw",
        img.as_ref(),
        &["read -P 0x17 8192 4096", "read -P 0 0 8192"],
    );
}

#[test]
fn sigterm_with_a_file_open_on_the_mount_still_exits_and_unmounts() {
    let dir = TestDir::new("dm-busy");
    let img = raw_image(&dir, "a.img", "4M");
    let mut d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    f.write_all_at(&[0x99; 4096], 0).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) };
    let status = d.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status on SIGTERM with a busy mount: {status}; stderr: {}",
        d.stderr()
    );
    assert!(!d.sock.exists(), "socket must be removed");
    assert!(
        !is_mounted(&d.mnt),
        "mount must be gone (exit status {status}); daemon stderr: {}",
        d.stderr()
    );
    drop(f);
    qemu_io("raw", img.as_ref(), &["read -P 0x99 0 4096"]);
}

#[test]
fn quit_flushes_unmounts_and_removes_the_socket() {
    let dir = TestDir::new("dm-quit");
    let img = raw_image(&dir, "a.img", "4M");
    let mut d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&pattern(5, 65_536), 12_345).unwrap();
    drop(f);
    let mut q = d.qmp();
    assert_eq!(q.ok("quit", json!({})), json!({}));
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status after quit: {status}");
    assert!(!d.sock.exists(), "socket must be removed");
    assert!(!is_mounted(&d.mnt), "mount must be gone");
    let got = std::fs::read(&img).unwrap();
    assert_eq!(&got[12_345..12_345 + 65_536], &pattern(5, 65_536)[..]);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = TestDir::new("dm-stale");
    let img = raw_image(&dir, "a.img", "1M");
    let sock = dir.join("qmp.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(
        std::fs::symlink_metadata(&sock)
            .unwrap()
            .file_type()
            .is_socket(),
        "stale socket file exists"
    );
    // A process forked by a parallel test may hold the listener for a moment
    // (until its exec closes it); wait until nobody listens on the file.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the stale socket is still accepting connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    assert_eq!(d.qmp().ok("query-block", json!({}))[0]["device"], "d0");
    assert_eq!(
        std::fs::symlink_metadata(&d.sock)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o600
    );
    let status = d.terminate();
    assert!(status.success());
    assert!(!sock.exists());
}

#[test]
fn a_live_socket_is_an_error_and_the_running_daemon_is_untouched() {
    let dir = TestDir::new("dm-live");
    let img = raw_image(&dir, "a.img", "1M");
    let img2 = raw_image(&dir, "b.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mnt2 = dir.join("mnt2");
    let sock = d.sock.to_string_lossy().into_owned();
    let (code, stderr) = run_blkfs(
        &[
            "--mount",
            &mnt2.to_string_lossy(),
            "--qmp",
            &sock,
            "--blockdev",
            &raw_spec("e0", &img2, json!({})),
        ],
        START_TIMEOUT,
    );
    assert_clean_failure("live socket", code, &stderr, &mnt2);
    assert!(
        stderr.contains(&sock),
        "the message names the socket: {stderr}"
    );
    // The first daemon still owns its socket and mount.
    assert!(d.sock.exists());
    let mut q = d.qmp();
    let b = q.ok("query-block", json!({}));
    assert_eq!(b.as_array().unwrap().len(), 1);
    assert_eq!(b[0]["device"], "d0");
    assert!(is_mounted(&d.mnt));
    qemu_io("raw", &d.dev("d0"), &["write -P 3 0 4k", "read -P 3 0 4k"]);
    let status = d.terminate();
    assert!(status.success());
}

#[test]
fn bad_blockdev_specs_fail_cleanly() {
    let dir = TestDir::new("dm-bad");
    let img = raw_image(&dir, "a.img", "1M");
    let missing = dir.file("missing.img");
    let cases: Vec<(&str, Vec<String>, Option<&str>)> = vec![
        (
            "invalid JSON",
            vec![format!(
                "{{\"driver\": \"raw\", \"id\": \"d0\", \"file\": {{\"driver\": \"file\", \"filename\": \"{img}\"}}"
            )],
            None,
        ),
        (
            "missing image",
            vec![format!("driver=raw,id=d0,file.driver=file,file.filename={missing}")],
            Some(missing.as_str()),
        ),
        ("missing image (JSON)", vec![raw_spec("d0", &missing, json!({}))], Some(missing.as_str())),
        ("unknown driver", vec!["driver=nosuch,id=d0".to_string()], Some("nosuch")),
        (
            "unknown option",
            vec![format!("driver=raw,id=d0,bogus=1,file.driver=file,file.filename={img}")],
            Some("bogus"),
        ),
        ("missing file", vec!["driver=raw,id=d0".to_string()], Some("file")),
        ("not key=value", vec!["driver".to_string()], None),
        (
            "bad boolean",
            vec![format!("driver=raw,id=d0,read-only=maybe,file.driver=file,file.filename={img}")],
            Some("read-only"),
        ),
        (
            "unsupported option",
            vec![format!("driver=vvfat,id=d0,rw=on,dir={}", dir.file(""))],
            Some("vvfat: rw=on"),
        ),
        (
            "duplicate id",
            vec![raw_spec("d0", &img, json!({})), raw_spec("d0", &img, json!({}))],
            Some("Duplicate ID 'd0'"),
        ),
    ];
    for (i, (what, specs, must_contain)) in cases.iter().enumerate() {
        let mnt = dir.join(&format!("mnt{i}"));
        let sock = dir.join(&format!("s{i}.sock"));
        let mut args = vec![
            "--mount".to_string(),
            mnt.to_string_lossy().into_owned(),
            "--qmp".into(),
            sock.to_string_lossy().into_owned(),
        ];
        for s in specs {
            args.push("--blockdev".into());
            args.push(s.clone());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = run_blkfs(&refs, START_TIMEOUT);
        assert_clean_failure(what, code, &stderr, &mnt);
        if let Some(s) = must_contain {
            assert!(
                stderr.contains(s),
                "{what}: stderr should mention {s:?}: {stderr}"
            );
        }
        assert!(
            UnixStream::connect(&sock).is_err(),
            "{what}: nothing may listen on the socket"
        );
    }
    // Nothing was written to the image by any of this.
    qemu_io("raw", img.as_ref(), &["read -P 0 0 1M"]);
}

#[test]
fn keyval_specs_references_and_read_only_devices() {
    let dir = TestDir::new("dm-keyval");
    let a = raw_image(&dir, "a,b.img", "3M");
    let b = raw_image(&dir, "b.img", "5M");
    qemu_io("raw", a.as_ref(), &["write -P 0x21 0 64k"]);
    qemu_io("raw", b.as_ref(), &["write -P 0x22 1M 64k"]);
    let specs = [
        // A comma in a value is written twice.
        format!(
            "driver=raw,id=disk0,file.driver=file,file.filename={}",
            a.replace(',', ",,")
        ),
        // A protocol node without id, then a read-only device over it by reference.
        format!("driver=file,node-name=proto-b,filename={b}"),
        "driver=raw,id=disk1,read-only=on,file=proto-b".to_string(),
    ];
    let d = Daemon::start(&dir, &specs);
    assert_eq!(
        list_dir(&d.mnt),
        vec!["disk0", "disk1"],
        "nodes without id are not shown"
    );
    let m0 = std::fs::metadata(d.dev("disk0")).unwrap();
    let m1 = std::fs::metadata(d.dev("disk1")).unwrap();
    assert_eq!(
        (m0.len(), m0.permissions().mode() & 0o7777),
        (3 << 20, 0o600)
    );
    assert_eq!(
        (m1.len(), m1.permissions().mode() & 0o7777),
        (5 << 20, 0o400)
    );
    qemu_io("raw", &d.dev("disk0"), &["read -P 0x21 0 64k"]);
    qemu_io_ro("raw", &d.dev("disk1"), &["read -P 0x22 1M 64k"]);
    let e = OpenOptions::new()
        .write(true)
        .open(d.dev("disk1"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let mut q = d.qmp();
    let blocks = q.ok("query-block", json!({}));
    let dev = |id: &str| {
        blocks
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["device"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id}: {blocks}"))
    };
    assert_eq!(dev("disk0")["inserted"]["file"], json!(a));
    assert_eq!(dev("disk0")["inserted"]["ro"], false);
    assert_eq!(dev("disk1")["inserted"]["file"], json!(b));
    assert_eq!(dev("disk1")["inserted"]["ro"], true);
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "proto-b" && n["drv"] == "file"),
        "{nodes}"
    );
}
