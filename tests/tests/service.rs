//! blkfs as a service: --daemonize and --pidfile, readiness to systemd
//! (NOTIFY_SOCKET), the log levels and their refusals, a quiet log at the
//! default level (one ready line, ioctls from mkfs and friends answered
//! without noise), BLKGETSIZE64 on a device file, --allow-other.

use blkfs_tests::*;
use serde_json::json;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A daemonized blkfs, found by its pid file: killed and its mount
/// detached on drop, even when the test fails.
struct Background {
    pidfile: PathBuf,
    mnt: PathBuf,
    pid: i32,
}

impl Background {
    fn alive(&self) -> bool {
        // Never 0 or -1: kill(2) would signal a whole process group.
        // SAFETY: signal 0 only checks that the process exists.
        self.pid > 1 && unsafe { libc::kill(self.pid, 0) == 0 }
    }

    fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.alive() {
            assert!(Instant::now() < deadline, "pid {} still alive", self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.alive() {
            // SAFETY: signalling the daemon this test started.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        lazy_umount(&self.mnt);
        let _ = std::fs::remove_file(&self.pidfile);
    }
}

fn blkfs(dir: &TestDir, extra: &[&str]) -> Command {
    let mut c = Command::new(bin("blkfs"));
    c.arg("--mount")
        .arg(dir.join("mnt"))
        .arg("--qmp")
        .arg(dir.join("qmp.sock"))
        .args(extra)
        .env_remove("BLKFS_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn daemonized(dir: &TestDir, img: &str) -> (Background, std::process::Output) {
    let spec = raw_spec("d0", img, json!({}));
    let pidfile = dir.file("blkfs.pid");
    let log = dir.file("blkfs.log");
    let out = blkfs(
        dir,
        &[
            "--daemonize",
            "--pidfile",
            &pidfile,
            "--log-file",
            &log,
            "--blockdev",
            &spec,
        ],
    )
    .output()
    .unwrap();
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or(0);
    let bg = Background {
        pidfile: pidfile.into(),
        mnt: dir.join("mnt"),
        pid,
    };
    (bg, out)
}

#[test]
fn daemonize_returns_once_ready_and_the_pid_file_guards_the_instance() {
    let dir = TestDir::new("daemonize");
    let img = raw_image(&dir, "a.img", "4M");
    let (bg, out) = daemonized(&dir, &img);
    assert!(out.status.success(), "{out:?}");
    assert!(bg.pid > 1 && bg.alive(), "pid file names a live daemon");
    // Ready means ready: the socket answers and the device is there at once.
    assert!(UnixStream::connect(dir.join("qmp.sock")).is_ok());
    assert_eq!(
        std::fs::metadata(dir.join("mnt/d0")).unwrap().len(),
        4 << 20
    );
    // Its log goes to --log-file, not to the terminal it left.
    let log = std::fs::read_to_string(dir.join("blkfs.log")).unwrap();
    assert!(log.contains("ready: mount"), "{log}");
    // A second daemon with the same pid file refuses to start, and says so once.
    let other = TestDir::new("daemonize-2");
    let pidfile = bg.pidfile.to_string_lossy().into_owned();
    let out2 = blkfs(&other, &["--daemonize", "--pidfile", &pidfile])
        .output()
        .unwrap();
    assert_eq!(out2.status.code(), Some(1), "{out2:?}");
    let err = String::from_utf8_lossy(&out2.stderr);
    assert_eq!(err.matches("cannot lock the pid file").count(), 1, "{err}");
    assert!(!is_mounted(&other.join("mnt")));
    let mut q = Qmp::connect(&dir.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    q.ok("quit", json!({}));
    bg.wait_gone();
    assert!(!bg.pidfile.exists(), "the pid file goes with the daemon");
    assert!(!is_mounted(&dir.join("mnt")));
}

#[test]
fn daemonize_reports_a_start_up_failure_to_the_caller() {
    let dir = TestDir::new("daemonize-fail");
    let spec = raw_spec("d0", &dir.file("missing.img"), json!({}));
    let pidfile = dir.file("blkfs.pid");
    let out = blkfs(
        &dir,
        &["--daemonize", "--pidfile", &pidfile, "--blockdev", &spec],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("missing.img"), "{err}");
    assert!(!Path::new(&pidfile).exists());
    assert!(!is_mounted(&dir.join("mnt")));
}

#[test]
fn systemd_hears_ready_when_the_socket_is_up_and_stopping_on_quit() {
    let dir = TestDir::new("sd-notify");
    let img = raw_image(&dir, "a.img", "1M");
    let notify = dir.join("notify.sock");
    let listen = UnixDatagram::bind(&notify).unwrap();
    listen
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let spec = raw_spec("d0", &img, json!({}));
    let child = blkfs(&dir, &["--blockdev", &spec])
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Background {
        pidfile: dir.join("none"),
        mnt: dir.join("mnt"),
        pid: child.id() as i32,
    };
    let mut buf = [0u8; 256];
    let n = listen.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(UnixStream::connect(dir.join("qmp.sock")).is_ok());
    assert!(dir.join("mnt/d0").exists());
    let mut q = Qmp::connect(&dir.join("qmp.sock"));
    q.ok("qmp_capabilities", json!({}));
    q.ok("quit", json!({}));
    let n = listen.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let mut child = child;
    assert!(child.wait().unwrap().success());
    guard.pid = 0;
}

#[test]
fn unknown_log_levels_are_refused() {
    let dir = TestDir::new("log-levels");
    let out = blkfs(&dir, &["--log-level", "loud"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("loud"));
    for var in ["BLKFS_LOG", "RUST_LOG"] {
        let out = blkfs(&dir, &[]).env(var, "verbose").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains("'verbose'"), "{err}");
    }
    assert!(!is_mounted(&dir.join("mnt")));
}

/// The non-empty lines the daemon logged.
fn log_lines(d: &Daemon) -> Vec<String> {
    d.stderr()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

#[test]
fn the_default_log_is_one_ready_line_even_under_mkfs() {
    let dir = TestDir::new("log-quiet");
    let img = raw_image(&dir, "a.img", "64M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    // The ready line comes once the daemon serves; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while log_lines(&d).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dev = d.dev("d0").to_string_lossy().into_owned();
    run("mkfs.ext4", &["-q", "-F", &dev]);
    qemu_img(&["info", "-U", &dev]);
    // BLKGETSIZE64 gets a real answer, other block ioctls ENOTTY.
    let f = std::fs::File::open(&dev).unwrap();
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x8008_1272, &mut size) };
    assert_eq!((r, size), (0, 64 << 20));
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x1268, &mut ssz) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    drop(f);
    let lines = log_lines(&d);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let mnt = d.mnt.display().to_string();
    let sock = d.sock.display().to_string();
    assert!(
        lines[0].contains(" INFO ")
            && lines[0].contains(&format!("ready: mount {mnt}, socket {sock}, 1 devices")),
        "{}",
        lines[0]
    );
    // A timestamp starts the line.
    assert!(lines[0].starts_with("[20"), "{}", lines[0]);
    d.quit();
}

#[test]
fn debug_level_shows_more_and_allow_other_reaches_the_mount() {
    let dir = TestDir::new("log-debug");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start_with(
        &dir,
        &[raw_spec("d0", &img, json!({}))],
        &["--log-level", "debug", "--allow-other"],
    )
    .unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let mnt = d.mnt.canonicalize().unwrap().display().to_string();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(mnt.as_str()))
        .unwrap_or_else(|| panic!("{mnt} not in {mounts}"));
    assert!(line.contains("allow_other"), "{line}");
    let f = std::fs::File::open(d.dev("d0")).unwrap();
    // SAFETY: an unknown ioctl, answered ENOTTY and logged at debug.
    unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x1268, 0) };
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.stderr().contains("ENOTTY") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.stderr().contains(" DEBUG "), "{}", d.stderr());
    assert!(d.stderr().contains("ENOTTY"), "{}", d.stderr());
    d.quit();
}

/// Reads the first byte of `path` as `uid`: Ok, or the errno.
fn read_as(uid: u32, path: &Path) -> Result<(), String> {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "head",
            "-c1",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .output()
        .expect("setpriv (util-linux) runs");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn allow_other_with_chmod_and_chown_hands_a_device_to_another_user() {
    let dir = TestDir::new("allow-other");
    let img = raw_image(&dir, "a.img", "1M");
    // Other users must be able to reach the mount point itself.
    let mut p = Some(dir.path.as_path());
    while let Some(d) = p {
        if d.as_os_str().len() > 1 {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d).unwrap().permissions().mode();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011)).unwrap();
        }
        p = d.parent();
    }
    let d =
        Daemon::start_with(&dir, &[raw_spec("d0", &img, json!({}))], &["--allow-other"]).unwrap();
    let dev = d.dev("d0");
    let err = read_as(65534, &dev).unwrap_err();
    assert!(err.contains("Permission denied"), "0600 root's: {err}");
    std::os::unix::fs::chown(&dev, Some(65534), Some(65534)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let meta = std::fs::metadata(&dev).unwrap();
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    }
    read_as(65534, &dev).expect("the new owner reads");
    let err = read_as(65533, &dev).unwrap_err();
    assert!(err.contains("Permission denied"), "a stranger: {err}");
    d.quit();
    // Without --allow-other nobody but the daemon's user gets in.
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let err = read_as(65534, &d.dev("d0")).unwrap_err();
    assert!(err.contains("Permission denied"), "{err}");
    d.quit();
}
