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
    for args in [&["block"][..], &["quit"]] {
        let (code, out, err) = blkctl(&sock, args);
        assert_eq!(code, 3, "{args:?}: no connection is exit 3: {out} {err}");
        assert!(
            err.contains("no blkfs there: start blkfs (--qmp PATH) or pass --socket"),
            "{args:?}: {err}"
        );
        assert!(out.trim().is_empty(), "{args:?}: nothing on stdout: {out}");
    }
    // With --json the error is JSON, on stdout.
    let (code, out, err) = blkctl(&sock, &["--json", "version"]);
    assert_eq!(code, 3, "{err}");
    let e = parse("--json error", &out);
    assert_eq!(e["error"]["class"], "NoConnection", "{e}");
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("no blkfs there"));
    // A file that is not a socket, and a socket nobody listens on.
    let plain = dir.join("plain");
    std::fs::write(&plain, b"x").unwrap();
    let (code, _, err) = blkctl(&plain, &["block"]);
    assert_eq!(code, 3);
    assert!(err.contains("not a socket"), "{err}");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let (code, _, err) = blkctl(&stale, &["block"]);
    assert_eq!(code, 3);
    assert!(
        err.contains("no blkfs is listening (a stale socket?)"),
        "{err}"
    );
}

#[test]
fn errors_and_exit_statuses_for_scripts() {
    let dir = TestDir::new("ctl-errors");
    let img = raw_image(&dir, "a.img", "4M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let (code, out, _) = blkctl(&d.sock, &["--json", "resize", "nope", "1M"]);
    assert_eq!(code, 1);
    let e = parse("command error", &out);
    assert_eq!(e["error"]["class"], "DeviceNotFound", "{e}");
    let (code, out, _) = blkctl(&d.sock, &["--json", "frobnicate"]);
    assert_eq!(code, 2);
    assert_eq!(parse("usage error", &out)["error"]["class"], "UsageError");
    let (code, _, err) = blkctl(&d.sock, &["frobnicate"]);
    assert_eq!(code, 2, "{err}");
    let (_, help, _) = blkctl(&d.sock, &["--help"]);
    assert!(
        help.contains("Exit status: 0 done; 1 the command failed"),
        "{help}"
    );
    // Sizes as qemu-img writes them; a shrink must be asked for.
    ctl_ok(&d.sock, &["resize", "d0", "1.5G"]);
    let mut q = d.qmp();
    assert_eq!(inserted(&mut q, "d0")["image"]["virtual-size"], 3u64 << 29);
    let (code, _, err) = blkctl(&d.sock, &["resize", "d0", "1G"]);
    assert_eq!(code, 1);
    assert!(err.contains("--shrink"), "{err}");
    ctl_ok(&d.sock, &["resize", "d0", "--shrink", "1G"]);
    assert_eq!(inserted(&mut q, "d0")["image"]["virtual-size"], 1u64 << 30);
}

#[test]
fn add_takes_the_daemons_spec_syntax_and_resolves_relative_names() {
    let dir = TestDir::new("ctl-add-spec");
    qcow2_image(&dir, "a.qcow2", "", "4M");
    let d = Daemon::start(&dir, &[]);
    // Run from the image's directory, with a name relative to it.
    let out = std::process::Command::new(bin("blkctl"))
        .current_dir(&dir.path)
        .arg("--socket")
        .arg(&d.sock)
        .args([
            "add",
            "driver=qcow2,id=d0,l2-cache-size=1M,read-only=off,file.driver=file,\
             file.filename=a.qcow2,file.cache.direct=on,throttling.iops-total=100",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut q = d.qmp();
    let ins = inserted(&mut q, "d0");
    let abs = dir.path.canonicalize().unwrap().join("a.qcow2");
    let file = ins["file"].as_str().unwrap();
    assert_eq!(
        std::path::Path::new(file).canonicalize().unwrap(),
        abs,
        "{ins}"
    );
    assert!(std::path::Path::new(file).is_absolute(), "{file}");
    assert_eq!(ins["iops"], 100, "{ins}");
    // Errors come from the daemon's own parser, before anything is sent.
    let (code, _, err) = blkctl(
        &d.sock,
        &[
            "add",
            "driver=raw,id=x,file.driver=file,file.filename=a,bogus=1",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Parameter 'bogus' is unexpected"), "{err}");
    // throttle changes only the limits it names.
    ctl_ok(&d.sock, &["throttle", "d0", "--bps-wr", "1M"]);
    let ins = inserted(&mut q, "d0");
    assert_eq!(
        (ins["iops"].clone(), ins["bps_wr"].clone()),
        (json!(100), json!(1 << 20))
    );
}

#[test]
fn help_completions_and_man_page() {
    let dir = TestDir::new("ctl-help");
    let sock = dir.join("none.sock");
    for offline in ["create", "check", "map", "completions", "man"] {
        let (code, out, _) = blkctl(&sock, &[offline, "--help"]);
        assert_eq!(code, 0);
        assert!(!out.contains("--socket"), "{offline} --help: {out}");
    }
    let (_, out, _) = blkctl(&sock, &["block", "--help"]);
    assert!(out.contains("--socket"), "{out}");
    let (code, script, _) = blkctl(&sock, &["completions", "bash"]);
    assert_eq!(code, 0);
    let bin_dir = bin_dir();
    let check = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "PATH={}:$PATH; source <(blkctl completions bash) \
             && complete -p blkctl >/dev/null && COMP_WORDS=(blkctl thr) \
             && COMP_CWORD=1 && COMP_LINE='blkctl thr' && COMP_POINT=10 \
             && _blkctl blkctl thr blkctl && echo \"${{COMPREPLY[@]}}\"",
            bin_dir.display()
        ))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(shown.contains("throttle"), "completion of 'thr': {shown}");
    assert!(script.contains("_blkctl"), "{script}");
    for shell in ["zsh", "fish"] {
        let (code, out, _) = blkctl(&sock, &["completions", shell]);
        assert_eq!(code, 0);
        assert!(
            out.contains("blkctl") && out.contains("throttle"),
            "{shell}"
        );
    }
    let (code, man, _) = blkctl(&sock, &["man"]);
    assert_eq!(code, 0);
    assert!(man.contains(".TH blkctl 1"), "{man}");
    for sub in ["add", "throttle", "mirror", "completions"] {
        assert!(man.contains(sub), "the man page lists {sub}");
    }
}

/// Runs blkctl with `input` on its stdin; returns (exit code, stdout, stderr).
fn blkctl_stdin(sock: &std::path::Path, args: &[&str], input: &str) -> (i32, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin("blkctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run blkctl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// blkctl that must succeed; returns its stdout.
fn ctl_ok(sock: &std::path::Path, args: &[&str]) -> String {
    let (code, out, err) = blkctl(sock, args);
    assert_eq!(code, 0, "blkctl {args:?}: {out} {err}");
    out
}

fn inserted(q: &mut Qmp, id: &str) -> Value {
    let devs = q.ok("query-block", json!({}));
    devs.as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no device {id}: {devs}"))["inserted"]
        .clone()
}

const LIMITS: [&str; 13] = [
    "bps",
    "bps_rd",
    "bps_wr",
    "iops",
    "iops_rd",
    "iops_wr",
    "bps_max",
    "bps_rd_max",
    "bps_wr_max",
    "iops_max",
    "iops_rd_max",
    "iops_wr_max",
    "iops_size",
];

/// The 13 limits of a `BlockDeviceInfo`, the unset optional ones as 0.
fn limits(ins: &Value) -> Value {
    LIMITS
        .iter()
        .map(|k| (k.to_string(), ins.get(*k).cloned().unwrap_or(json!(0))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn qemu_img_info_any(img: &str) -> Value {
    let out = qemu_img(&["info", "--output=json", img]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info ({e}): {out}"))
}

#[test]
fn throttle_set_show_and_off() {
    let dir = TestDir::new("ctl-throttle");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    let out = ctl_ok(
        &d.sock,
        &[
            "throttle",
            "d0",
            "--bps",
            "1M",
            "--bps-max",
            "2M",
            "--iops-wr",
            "100",
            "--iops-size",
            "4K",
        ],
    );
    assert!(out.contains("d0"), "{out}");
    let ins = inserted(&mut q, "d0");
    let mut want = limits(&json!({}));
    want["bps"] = json!(1 << 20);
    want["bps_max"] = json!(2 << 20);
    want["iops_wr"] = json!(100);
    want["iops_size"] = json!(4096);
    assert_eq!(limits(&ins), want, "{ins}");
    // Unset optional limits stay unset.
    assert!(ins.get("iops_max").is_none(), "{ins}");

    // Shown as a table, as JSON, and in the device list.
    let out = ctl_ok(&d.sock, &["throttle", "d0"]);
    assert!(out.starts_with("LIMIT"), "{out}");
    let row = |name: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row: {out}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(row("bps"), "1.0M");
    assert_eq!(row("bps_max"), "2.0M");
    assert_eq!(row("iops_wr"), "100");
    assert_eq!(row("iops_size"), "4.0K");
    assert_eq!(row("iops"), "-");
    let shown = parse("throttle", &ctl_ok(&d.sock, &["--json", "throttle", "d0"]));
    assert_eq!(shown, want);
    let out = ctl_ok(&d.sock, &["block"]);
    assert!(out.contains("THROTTLE"), "{out}");
    assert!(
        out.contains("bps=1.0M,iops_wr=100,bps_max=2.0M,iops_size=4.0K"),
        "{out}"
    );

    // Limits not given are kept, but a total replaces the read/write
    // limits of its kind (QEMU refuses both at once), and the reverse.
    let r = parse(
        "throttle --json",
        &ctl_ok(&d.sock, &["--json", "throttle", "d0", "--iops", "50"]),
    );
    assert_eq!(r, json!({}));
    want["iops"] = json!(50);
    want["iops_wr"] = json!(0);
    assert_eq!(limits(&inserted(&mut q, "d0")), want);
    ctl_ok(&d.sock, &["throttle", "d0", "--bps-rd", "3M"]);
    want["bps_rd"] = json!(3 << 20);
    want["bps"] = json!(0);
    want["bps_max"] = json!(0);
    assert_eq!(limits(&inserted(&mut q, "d0")), want);

    ctl_ok(&d.sock, &["throttle", "d0", "--off"]);
    let ins = inserted(&mut q, "d0");
    assert_eq!(limits(&ins), limits(&json!({})), "{ins}");
    let out = ctl_ok(&d.sock, &["block"]);
    assert!(!out.contains("iops="), "{out}");

    // The daemon's checks come back as errors.
    let (code, out, err) = blkctl(&d.sock, &["throttle", "d0", "--iops-max", "10"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("GenericError") && err.contains("iops_max requires iops to be set"),
        "{err}"
    );
    let (code, _, err) = blkctl(&d.sock, &["throttle", "nope", "--iops", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("DeviceNotFound"), "{err}");
    let (code, _, err) = blkctl(&d.sock, &["throttle", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    // --off with a limit, and a suffix on an operation count, are usage errors.
    let (code, _, _) = blkctl(&d.sock, &["throttle", "d0", "--off", "--iops", "1"]);
    assert_eq!(code, 2);
    let (code, _, _) = blkctl(&d.sock, &["throttle", "d0", "--iops", "1K"]);
    assert_eq!(code, 2);
    assert_eq!(limits(&inserted(&mut q, "d0")), limits(&json!({})));
}

#[test]
fn resize_absolute_relative_and_by_node() {
    let dir = TestDir::new("ctl-resize");
    let img = raw_image(&dir, "a.img", "1M");
    let spec = json!({"driver": "raw", "id": "d0", "node-name": "n0",
        "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let len = || std::fs::metadata(d.dev("d0")).unwrap().len();
    let out = ctl_ok(&d.sock, &["resize", "d0", "2M"]);
    assert!(out.contains("2.0M"), "{out}");
    assert_eq!(len(), 2 << 20);
    ctl_ok(&d.sock, &["resize", "d0", "+1M"]);
    assert_eq!(len(), 3 << 20);
    ctl_ok(&d.sock, &["resize", "--shrink", "d0", "-512K"]);
    assert_eq!(len(), (5 << 20) / 2);
    // By node name, the option before or after the size.
    ctl_ok(&d.sock, &["resize", "--node", "n0", "+512K"]);
    assert_eq!(len(), 3 << 20);
    ctl_ok(&d.sock, &["resize", "4M", "--node", "n0"]);
    assert_eq!(len(), 4 << 20);
    let r = parse(
        "resize --json",
        &ctl_ok(&d.sock, &["--json", "resize", "d0", "+1M"]),
    );
    assert_eq!(r, json!({}));
    assert_eq!(len(), 5 << 20);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 5 << 20);

    // Nothing changes on errors.
    let cases: [(&[&str], i32); 5] = [
        (&["resize", "d0", "-6M"], 1),
        (&["resize", "nope", "+1M"], 1),
        (&["resize", "nope", "1M"], 1),
        (&["resize", "d0", "1X"], 2),
        (&["resize", "--node", "n0", "d0", "1M"], 2),
    ];
    for (args, want) in cases {
        let (code, out, err) = blkctl(&d.sock, args);
        assert_eq!(code, want, "{args:?}: {out} {err}");
        assert!(!err.trim().is_empty(), "{args:?}");
    }
    let (_, _, err) = blkctl(&d.sock, &["resize", "nope", "1M"]);
    assert!(err.contains("DeviceNotFound"), "{err}");
    assert_eq!(len(), 5 << 20);
}

#[test]
fn snapshot_puts_an_overlay_on_the_device() {
    let dir = TestDir::new("ctl-snap");
    let base = qcow2_image(&dir, "base.qcow2", "", "1M");
    qemu_io("qcow2", base.as_ref(), &["write -P 0x41 0 1M"]);
    let spec = json!({"driver": "qcow2", "id": "d0", "node-name": "base",
        "file": {"driver": "file", "filename": base}});
    let mut d = Daemon::start(&dir, &[spec.to_string()]);
    let ov = dir.file("ov.qcow2");
    let out = ctl_ok(&d.sock, &["snapshot", "d0", &ov, "--node-name", "ov"]);
    assert!(out.contains(&ov), "{out}");
    // An overlay made beforehand, put on top by node name.
    let ov2 = dir.file("ov2.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &ov, "-F", "qcow2", &ov2, "1M",
    ]);
    let r = parse(
        "snapshot --json",
        &ctl_ok(
            &d.sock,
            &[
                "--json",
                "snapshot",
                "--node",
                "ov",
                &ov2,
                "--existing",
                "--format",
                "qcow2",
                "--node-name",
                "ov2",
            ],
        ),
    );
    assert_eq!(r, json!({}));
    let mut q = d.qmp();
    let ins = inserted(&mut q, "d0");
    assert_eq!(ins["node-name"], "ov2", "{ins}");
    assert_eq!(ins["backing_file_depth"], 2, "{ins}");
    // Writes go to the top overlay; the base keeps its data.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x42; 4096], 0).unwrap();
    drop(f);
    // Snapshots of a node below the top are refused.
    let (code, _, err) = blkctl(
        &d.sock,
        &["snapshot", "--node", "base", &dir.file("x.qcow2")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("GenericError"), "{err}");
    ctl_ok(&d.sock, &["quit"]);
    assert!(d.wait(Duration::from_secs(20)).success());

    let canonical = |p: &str| {
        std::fs::canonicalize(p)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let i = qemu_img_info_any(&ov);
    assert_eq!(i["backing-filename"], json!(canonical(&base)), "{i}");
    assert_eq!(i["backing-filename-format"], "qcow2", "{i}");
    assert_eq!(qemu_img_info_any(&ov2)["backing-filename"], json!(ov));
    qemu_io(
        "qcow2",
        ov2.as_ref(),
        &["read -P 0x42 0 4k", "read -P 0x41 4k 1020k"],
    );
    qemu_io("qcow2", base.as_ref(), &["read -P 0x41 0 1M"]);
}

#[test]
fn change_backing_rewrites_the_name_in_the_image() {
    let dir = TestDir::new("ctl-cbf");
    let base = qcow2_image(&dir, "base.qcow2", "", "1M");
    let mid = dir.file("mid.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &mid, "1M",
    ]);
    let top = dir.file("top.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top, "1M",
    ]);
    let file = |f: &str| json!({"driver": "file", "filename": f});
    let spec = json!({"driver": "qcow2", "id": "d0", "node-name": "top", "file": file(&top),
        "backing": {"driver": "qcow2", "node-name": "mid", "file": file(&mid),
            "backing": {"driver": "qcow2", "node-name": "base", "file": file(&base)}}});
    let mut d = Daemon::start(&dir, &[spec.to_string()]);
    let out = ctl_ok(&d.sock, &["change-backing", "d0", "mid", "base.qcow2"]);
    assert!(out.contains("base.qcow2"), "{out}");
    let r = parse(
        "change-backing --json",
        &ctl_ok(
            &d.sock,
            &["--json", "change-backing", "d0", "top", "mid.qcow2"],
        ),
    );
    assert_eq!(r, json!({}));
    let (code, _, err) = blkctl(&d.sock, &["change-backing", "d0", "base", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("without a backing file"), "{err}");
    ctl_ok(&d.sock, &["quit"]);
    assert!(d.wait(Duration::from_secs(20)).success());
    assert_eq!(qemu_img_info_any(&mid)["backing-filename"], "base.qcow2");
    assert_eq!(qemu_img_info_any(&top)["backing-filename"], "mid.qcow2");
}

#[test]
fn passwd_on_a_plain_device_fails() {
    let dir = TestDir::new("ctl-pw-plain");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let (code, out, err) = blkctl(&d.sock, &["passwd", "d0", "secret"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("GenericError") && err.contains("Device 'd0' is not encrypted"),
        "{err}"
    );
    // From stdin too; no password at all is refused before asking the daemon.
    let (code, _, err) = blkctl_stdin(&d.sock, &["passwd", "d0"], "secret\n");
    assert_eq!(code, 1);
    assert!(err.contains("is not encrypted"), "{err}");
    let (code, _, err) = blkctl_stdin(&d.sock, &["passwd", "d0"], "");
    assert_eq!(code, 1);
    assert!(err.contains("no password"), "{err}");
}

#[test]
fn passwd_from_stdin_and_file_unlocks_aes_images_then_cont() {
    let dir = TestDir::new("ctl-pw-aes");
    let mk = |name: &str| {
        let f = dir.file(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=PW",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            &f,
            "1M",
        ]);
        f
    };
    let (a, b) = (mk("a.qcow2"), mk("b.qcow2"));
    let spec = |id: &str, node: &str, f: &str| {
        json!({"driver": "qcow2", "id": id, "node-name": node,
            "file": {"driver": "file", "filename": f}})
        .to_string()
    };
    let d = Daemon::start(&dir, &[spec("d0", "n0", &a), spec("d1", "n1", &b)]);
    let mut q = d.qmp();
    for id in ["d0", "d1"] {
        let ins = inserted(&mut q, id);
        assert_eq!(ins["encryption_key_missing"], true, "{ins}");
    }
    // cont is refused while a key is missing.
    let (code, _, err) = blkctl(&d.sock, &["cont"]);
    assert_eq!(code, 1);
    assert!(err.contains("DeviceEncrypted"), "{err}");

    let (code, out, err) = blkctl_stdin(&d.sock, &["passwd", "d0"], "PW\nnot this\n");
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("d0"), "{out}");
    assert_eq!(inserted(&mut q, "d0")["encryption_key_missing"], false);
    assert_eq!(inserted(&mut q, "d1")["encryption_key_missing"], true);

    let pwfile = dir.file("pw.txt");
    std::fs::write(&pwfile, "PW\n").unwrap();
    let r = parse(
        "passwd --json",
        &ctl_ok(
            &d.sock,
            &[
                "--json",
                "passwd",
                "--node",
                "n1",
                "--password-file",
                &pwfile,
            ],
        ),
    );
    assert_eq!(r, json!({}));
    assert_eq!(inserted(&mut q, "d1")["encryption_key_missing"], false);

    // The keys work: data written through the mount reads back with qemu-io.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.dev("d1"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 65536], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let opts = format!("driver=qcow2,file.filename={b},encrypt.key-secret=sec0");
    let out = run(
        "qemu-io",
        &[
            "-r",
            "-U",
            "--object",
            "secret,id=sec0,data=PW",
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x5a 0 64k",
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    assert!(ctl_ok(&d.sock, &["cont"]).contains("resumed"));
    let r = parse("cont --json", &ctl_ok(&d.sock, &["--json", "cont"]));
    assert_eq!(r, json!({}));
    // PASSWORD and --password-file together are a usage error.
    let (code, _, _) = blkctl(&d.sock, &["passwd", "d0", "PW", "--password-file", &pwfile]);
    assert_eq!(code, 2);
}
