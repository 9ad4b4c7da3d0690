//! The blkctl command-line client against a real daemon.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::time::Duration;

fn parse(what: &str, out: &str) -> Value {
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{what}: output is not JSON ({e}): {out:?}"))
}

#[test]
fn json_block_nodes_stats_and_version_match_the_queries() {
    let dir = TestDir::new("ctl-json");
    let img = raw_image(&dir, "a.img", "4M");
    let img2 = raw_image(&dir, "b.img", "2M");
    let ro = json!({"driver": "raw", "id": "d1", "read-only": true, "file": {"driver": "file", "filename": img2}});
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({})), ro.to_string()]);
    let mut q = d.qmp();
    for (cmd, query) in [
        ("block", "query-block"),
        ("nodes", "query-named-block-nodes"),
        ("stats", "query-blockstats"),
        ("version", "query-version"),
    ] {
        let (code, out, err) = blkctl(&d.sock, &["--json", cmd]);
        assert_eq!(code, 0, "blkctl --json {cmd}: {err}");
        let got = parse(cmd, &out);
        assert_eq!(
            got,
            q.ok(query, json!({})),
            "blkctl --json {cmd} vs {query}"
        );
    }
    // The table form names the devices.
    let (code, out, err) = blkctl(&d.sock, &["block"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("d0") && out.contains("d1"), "{out}");
}

#[test]
fn raw_qmp_command_prints_the_reply() {
    let dir = TestDir::new("ctl-qmp");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let (code, out, err) = blkctl(&d.sock, &["--json", "qmp", r#"{"execute": "query-block"}"#]);
    assert_eq!(code, 0, "{err}");
    let r = parse("qmp", &out);
    assert_eq!(r["return"], d.qmp().ok("query-block", json!({})), "{r}");
    // A failing command: the error is shown and the exit status is non-zero.
    let (code, out, err) = blkctl(
        &d.sock,
        &["--json", "qmp", r#"{"execute": "no-such-command"}"#],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("CommandNotFound") || err.contains("CommandNotFound"),
        "stdout {out:?} stderr {err:?}"
    );
}

#[test]
fn add_with_a_keyval_spec_makes_a_device_appear() {
    let dir = TestDir::new("ctl-add");
    let img = raw_image(&dir, "a.img", "3M");
    qemu_io("raw", img.as_ref(), &["write -P 0x71 64k 64k"]);
    let d = Daemon::start(&dir, &[]);
    let spec = format!("driver=raw,id=k0,file.driver=file,file.filename={img}");
    let (code, out, err) = blkctl(&d.sock, &["add", &spec]);
    assert_eq!(code, 0, "blkctl add: {out} {err}");
    assert_eq!(list_dir(&d.mnt), vec!["k0"]);
    assert_eq!(std::fs::metadata(d.dev("k0")).unwrap().len(), 3 << 20);
    qemu_io(
        "raw",
        &d.dev("k0"),
        &["read -P 0x71 64k 64k", "read -P 0 0 64k"],
    );
    // The same id again fails, with the daemon's reason on stderr.
    let (code, _out, err) = blkctl(&d.sock, &["add", &spec]);
    assert_ne!(code, 0);
    assert!(err.contains("Duplicate ID 'k0'"), "stderr: {err}");
    assert_eq!(list_dir(&d.mnt), vec!["k0"]);
    // A JSON spec works too.
    let img2 = raw_image(&dir, "b.img", "1M");
    let (code, out, err) = blkctl(&d.sock, &["add", &raw_spec("j0", &img2, json!({}))]);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(list_dir(&d.mnt), vec!["j0", "k0"]);
    // Booleans in keyval form, as on the daemon's command line.
    let img3 = raw_image(&dir, "c.img", "1M");
    let spec = format!("driver=raw,id=r0,read-only=on,file.driver=file,file.filename={img3}");
    let (code, out, err) = blkctl(&d.sock, &["add", &spec]);
    assert_eq!(code, 0, "{out} {err}");
    let m = std::fs::metadata(d.dev("r0")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        0o400
    );
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(d.dev("r0"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn quit_stops_the_daemon() {
    let dir = TestDir::new("ctl-quit");
    let img = raw_image(&dir, "a.img", "1M");
    let mut d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let (code, out, err) = blkctl(&d.sock, &["quit"]);
    assert_eq!(code, 0, "blkctl quit: {out} {err}");
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "daemon exit: {status}");
    assert!(!d.sock.exists());
    assert!(!is_mounted(&d.mnt));
}

#[test]
fn a_missing_socket_is_an_error() {
    let dir = TestDir::new("ctl-nosock");
    let sock = dir.join("nobody.sock");
    for args in [&["block"][..], &["--json", "version"], &["quit"]] {
        let (code, out, err) = blkctl(&sock, args);
        assert_ne!(code, 0, "{args:?} must fail: {out}");
        assert!(code > 0, "{args:?} must exit with a status, not a signal");
        assert!(
            !err.trim().is_empty(),
            "{args:?}: an error message on stderr"
        );
        assert!(out.trim().is_empty(), "{args:?}: nothing on stdout: {out}");
    }
}
