//! Harness for the integration tests: each test owns a temporary directory,
//! a daemon, its mount and its socket. Dropping a [`Daemon`] kills it and
//! lazily unmounts, even when the test panics, so a dead mount never hangs.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Directory holding the blkfs and blkctl binaries (built by scripts/test.sh).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BLKFS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join(profile)
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A fresh directory on a real disk filesystem (O_DIRECT works there),
/// removed on drop.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!(
                "{name}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    pub fn file(&self, p: &str) -> String {
        self.join(p).to_string_lossy().into_owned()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        lazy_umount(&self.path.join("mnt"));
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub fn lazy_umount(p: &Path) {
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) {
        // SAFETY: plain syscall on a valid C string; failure (not mounted) is fine.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

pub struct Daemon {
    child: Option<Child>,
    pub mnt: PathBuf,
    pub sock: PathBuf,
    pub stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `blkfs` on `dir/mnt` and `dir/qmp.sock`, waiting until ready.
    pub fn start(dir: &TestDir, blockdevs: &[String]) -> Daemon {
        Self::start_with(dir, blockdevs, &[])
            .unwrap_or_else(|e| panic!("daemon failed to start: {e}"))
    }

    pub fn start_with(
        dir: &TestDir,
        blockdevs: &[String],
        extra: &[&str],
    ) -> Result<Daemon, String> {
        let mnt = dir.join("mnt");
        let sock = dir.join("qmp.sock");
        let stderr_path = dir.join("blkfs.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin("blkfs"));
        cmd.arg("--mount")
            .arg(&mnt)
            .arg("--qmp")
            .arg(&sock)
            .args(extra);
        for b in blockdevs {
            cmd.arg("--blockdev").arg(b);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut d = Daemon {
            child: Some(child),
            mnt,
            sock,
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("exited with {status}: {}", d.stderr()));
            }
            if UnixStream::connect(&d.sock).is_ok() {
                return Ok(d);
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 20 s: {}", d.stderr()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn dev(&self, id: &str) -> PathBuf {
        self.mnt.join(id)
    }

    pub fn qmp(&self) -> Qmp {
        let mut q = Qmp::connect(&self.sock);
        q.ok("qmp_capabilities", json!({}));
        q
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `quit` over QMP and waits for a clean exit (at most 30 s).
    pub fn quit(mut self) {
        self.qmp().ok("quit", json!({}));
        let status = self.wait(Duration::from_secs(30));
        assert!(status.success(), "exit status: {status}\n{}", self.stderr());
    }

    /// Sends SIGTERM and waits for a clean exit (at most 20 s).
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(20))
    }

    /// Waits for the daemon to exit on its own (e.g. after `quit`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon already reaped");
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        lazy_umount(&self.mnt);
    }
}

/// A QMP client that keeps events aside while waiting for replies.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    pub events: VecDeque<Value>,
    pub greeting: Value,
}

impl Qmp {
    /// Connects and reads the greeting (no negotiation).
    pub fn connect(sock: &Path) -> Qmp {
        let s = UnixStream::connect(sock).expect("connect to QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("set timeout");
        let mut q = Qmp {
            writer: s.try_clone().expect("clone stream"),
            reader: BufReader::new(s),
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        q.greeting = q.read_msg().expect("greeting");
        q
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to QMP socket");
    }

    /// Reads the next message of any kind; None at end of stream.
    pub fn read_msg(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON from server ({e}): {line}")),
            ),
            Err(e) => panic!("reading QMP socket: {e}"),
        }
    }

    /// Reads until a reply (not an event) arrives.
    pub fn reply(&mut self) -> Value {
        loop {
            let m = self
                .read_msg()
                .expect("connection closed while waiting for a reply");
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return m;
            }
        }
    }

    pub fn execute(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.send_raw(format!("{msg}\n").as_bytes());
        self.reply()
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.execute(name, args);
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{name} failed: {r}"),
        }
    }

    /// Runs a command that must fail; returns (class, desc).
    pub fn err(&mut self, name: &str, args: Value) -> (String, String) {
        let r = self.execute(name, args);
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{name} unexpectedly succeeded: {r}"));
        (
            e["class"].as_str().unwrap_or_default().to_string(),
            e["desc"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// Waits for an event by name (events seen earlier count too).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Value {
        self.wait_event_where(timeout, |e| e["event"] == name)
    }

    /// Waits for the first event `pick` accepts (events seen earlier count too).
    pub fn wait_event_where(&mut self, timeout: Duration, pick: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.events.iter().position(&pick) {
            return self.events.remove(i).unwrap_or_default();
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .expect("set timeout");
        loop {
            let m = self
                .read_msg()
                .unwrap_or_else(|| panic!("connection closed waiting for an event"));
            if pick(&m) {
                return m;
            }
            if m.get("event").is_some() {
                self.events.push_back(m);
            }
        }
    }

    /// Waits for the end of the block job on `device`: its
    /// BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED event.
    pub fn wait_job_end(&mut self, device: &str) -> Value {
        self.wait_event_where(Duration::from_secs(120), |e| {
            (e["event"] == "BLOCK_JOB_COMPLETED" || e["event"] == "BLOCK_JOB_CANCELLED")
                && e["data"]["device"] == device
        })
    }

    /// The names of the BLOCK_JOB_* events of `device`, in the order they
    /// came, up to and including the job's end (COMPLETED or CANCELLED).
    pub fn job_events(&mut self, device: &str) -> Vec<String> {
        let mine = |e: &Value| {
            e["event"]
                .as_str()
                .is_some_and(|n| n.starts_with("BLOCK_JOB_"))
                && e["data"]["device"] == device
        };
        let mut names = Vec::new();
        loop {
            let e = self.wait_event_where(Duration::from_secs(120), mine);
            let name = e["event"].as_str().unwrap_or_default().to_string();
            let end = name == "BLOCK_JOB_COMPLETED" || name == "BLOCK_JOB_CANCELLED";
            names.push(name);
            if end {
                return names;
            }
        }
    }

    /// The events received so far with this name, in order (taken out).
    pub fn take_events(&mut self, name: &str) -> Vec<Value> {
        let (hit, rest): (Vec<_>, Vec<_>) = self.events.drain(..).partition(|e| e["event"] == name);
        self.events = rest.into();
        hit
    }
}

/// Runs a command that must succeed and returns its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Runs qemu-io commands on a file; fails the test on any I/O or pattern error.
pub fn qemu_io(fmt: &str, file: &Path, cmds: &[&str]) -> String {
    qemu_io_with(&[], fmt, file, cmds)
}

fn qemu_io_with(flags: &[&str], fmt: &str, file: &Path, cmds: &[&str]) -> String {
    let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    args.push("-f".into());
    args.push(fmt.into());
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(file.to_string_lossy().into_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &refs);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io {flags:?} {cmds:?} on {}: {out}",
        file.display()
    );
    out
}

/// `qemu-img check --output=json` of an image (whatever its verdict).
pub fn qemu_img_check(img: &str) -> Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img])
        .output()
        .expect("run qemu-img");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {img}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `qemu-img compare` of two images; true when identical. With `-U`
/// (force share): either may be an image a running daemon has open.
pub fn images_identical(a: &Path, fmt_a: &str, b: &Path, fmt_b: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-f", fmt_a, "-F", fmt_b])
        .arg(a)
        .arg(b)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A raw image of `size` bytes made by qemu-img.
pub fn raw_image(dir: &TestDir, name: &str, size: &str) -> String {
    let f = dir.file(name);
    qemu_img(&["create", "-q", "-f", "raw", &f, size]);
    f
}

/// A qcow2 image made by qemu-img (`opts` for `-o`, may be empty).
pub fn qcow2_image(dir: &TestDir, name: &str, opts: &str, size: &str) -> String {
    let f = dir.file(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([f.as_str(), size]);
    qemu_img(&args);
    f
}

/// `--blockdev` JSON for a raw device over a file.
pub fn raw_spec(id: &str, file: &str, extra_file_opts: Value) -> String {
    let mut file_opts = json!({"driver": "file", "filename": file});
    if let (Some(f), Some(extra)) = (file_opts.as_object_mut(), extra_file_opts.as_object()) {
        for (k, v) in extra {
            f.insert(k.clone(), v.clone());
        }
    }
    json!({"driver": "raw", "id": id, "file": file_opts}).to_string()
}

/// `--blockdev` JSON for a qcow2 device over a file.
pub fn qcow2_spec(id: &str, file: &str) -> String {
    json!({"driver": "qcow2", "id": id, "file": {"driver": "file", "filename": file}}).to_string()
}

/// A device file of `d` opened for reading and writing.
pub fn rw(d: &Daemon, id: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev(id))
        .expect("open the device file")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A xorshift generator for seeded random operation sequences (a failing
/// seed reproduces); the seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Runs blkctl with arguments; returns (exit code, stdout, stderr).
pub fn blkctl(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("blkctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .expect("run blkctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// True when `path` is a mount point listed in /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines().any(|l| {
        // Field 5 is the mount point, with spaces and the like escaped as \ooo.
        l.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|m| Path::new(&m) == want || Path::new(&m) == path)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `blkfs` with `args` to completion (it is expected to fail or exit on
/// its own); kills it and panics after `timeout`. Returns (exit code, stderr).
pub fn run_blkfs(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(bin("blkfs"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkfs");
    let mut stderr = child.stderr.take().expect("stderr pipe");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for blkfs") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("blkfs {args:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap_or_default())
}

/// Runs `f` on its own thread and panics if it has not finished within
/// `timeout` (a hung FUSE request must fail the test, not hang the suite;
/// the test's Daemon guard then kills the daemon, which releases the thread).
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("worker ended without a result"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("operation did not finish within {timeout:?}")
        }
    }
}

/// `qemu-img map -U --output=json -f raw` of a file (which a running daemon
/// may have open): the list of extents.
pub fn qemu_img_map(file: &Path) -> Vec<Value> {
    let out = qemu_img(&[
        "map",
        "-U",
        "--output=json",
        "-f",
        "raw",
        &file.to_string_lossy(),
    ]);
    match serde_json::from_str(&out) {
        Ok(Value::Array(v)) => v,
        other => panic!("qemu-img map output is not a JSON list ({other:?}): {out}"),
    }
}

/// `qemu-img info -U --output=json -f raw` of a file (which a running
/// daemon may have open).
pub fn qemu_img_info(file: &Path) -> Value {
    let out = qemu_img(&[
        "info",
        "-U",
        "--output=json",
        "-f",
        "raw",
        &file.to_string_lossy(),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img info output ({e}): {out}"))
}

/// lseek(2) on an open file; Err(errno) on failure.
pub fn lseek(f: &std::fs::File, offset: i64, whence: i32) -> Result<i64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as i64)
    }
}

/// fallocate(2) on an open file; Err(errno) on failure.
pub fn fallocate(f: &std::fs::File, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

/// Names in a directory, sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// A JSON object's members, as a map (panics when `v` is not an object).
pub fn obj(v: &Value) -> &serde_json::Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("expected a JSON object, got {v}"))
}

/// Like [`qemu_io`], but opens the file read-only (`qemu-io -r`).
pub fn qemu_io_ro(fmt: &str, file: &Path, cmds: &[&str]) -> String {
    qemu_io_with(&["-r"], fmt, file, cmds)
}

/// Like [`qemu_io_ro`], with `-U` (force share): reads an image a running
/// daemon writes, which QEMU's image locks otherwise refuse.
pub fn qemu_io_shared(fmt: &str, file: &Path, cmds: &[&str]) -> String {
    qemu_io_with(&["-r", "-U"], fmt, file, cmds)
}

/// A device's entry in `query-block`.
pub fn query_block(q: &mut Qmp, id: &str) -> Value {
    device_entry(q, "query-block", id)
}

/// A device's counters (`BlockDeviceStats`) from `query-blockstats`.
pub fn device_stats(q: &mut Qmp, id: &str) -> Value {
    device_entry(q, "query-blockstats", id)["stats"].clone()
}

fn device_entry(q: &mut Qmp, cmd: &str, id: &str) -> Value {
    let all = q.ok(cmd, json!({}));
    all.as_array()
        .and_then(|a| a.iter().find(|b| b["device"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no device {id} in {cmd}: {all}"))
}

/// A qcow2 overlay made by qemu-img, backed by `backing` (format given).
pub fn qcow2_overlay(dir: &TestDir, name: &str, backing: &str, backing_fmt: &str) -> String {
    let f = dir.file(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        backing_fmt,
        &f,
    ]);
    f
}

/// `qemu-img convert` of an image to raw: the bytes a guest sees, to compare later.
pub fn snapshot_raw(dir: &TestDir, img: &str, fmt: &str, name: &str) -> String {
    let out = dir.file(name);
    qemu_img(&["convert", "-U", "-f", fmt, "-O", "raw", img, &out]);
    out
}

/// Asserts `qemu-img check` finds neither corruption nor leaks.
pub fn assert_check_clean(img: &str) {
    let c = qemu_img_check(img);
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{img}: {c}");
    assert_eq!(c["leaks"].as_u64().unwrap_or(0), 0, "{img}: {c}");
    assert!(c.get("check-errors").is_none_or(|e| e == 0), "{img}: {c}");
}

/// Asserts `qemu-img check` finds no corruption (leaks are allowed: a
/// crash may leave them).
pub fn assert_no_corruption(img: &str) {
    let c = qemu_img_check(img);
    assert_eq!(c["check-errors"], 0, "{img}: {c}");
    assert_eq!(c["corruptions"].as_u64().unwrap_or(0), 0, "{img}: {c}");
}

/// Asserts two byte strings are equal; on a mismatch says where, not the bytes.
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        let end = (at..got.len())
            .find(|&i| got[i] == want[i])
            .unwrap_or(got.len());
        panic!(
            "{what}: bytes differ from {at:#x} to {end:#x} (got {:#04x}.., want {:#04x}..)",
            got[at], want[at]
        );
    }
}

/// Crash rounds: blocks of `block` bytes, each written once.
pub const CRASH_BLOCK: u64 = 6000;

/// The content of block `i` of crash round `round`.
pub fn crash_block_data(round: u64, i: u64) -> Vec<u8> {
    vec![((round * 31 + i) % 251) as u8 + 1; CRASH_BLOCK as usize]
}

/// One crash round: the daemon opens `spec` (device d0) and a writer fills
/// `region` bytes from `round * region` block after block, fsyncing every
/// eighth; after `after` the daemon gets SIGKILL. Returns how many blocks
/// an fsync that returned acknowledged.
pub fn write_until_killed(
    dir: &TestDir,
    spec: &str,
    round: u64,
    region: u64,
    after: Duration,
) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    let d = Daemon::start(dir, &[spec.to_string()]);
    let dev = d.dev("d0");
    let acked = std::sync::Arc::new(AtomicU64::new(0));
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(&dev) else {
                return;
            };
            for i in 0..region / CRASH_BLOCK {
                let at = round * region + i * CRASH_BLOCK;
                if f.write_all_at(&crash_block_data(round, i), at).is_err() {
                    return;
                }
                if i % 8 == 7 {
                    if f.sync_all().is_err() {
                        return;
                    }
                    acked.store(i + 1, Ordering::SeqCst);
                }
            }
        })
    };
    std::thread::sleep(after);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    let n = acked.load(Ordering::SeqCst);
    drop(d); // reaps and lazily unmounts
    let _ = writer.join();
    n
}

/// Every block acknowledged in the crash rounds `durable` ((round, blocks))
/// is in `raw`, an image converted to raw after the rounds.
pub fn assert_durable(raw: &str, region: u64, durable: &[(u64, u64)], what: &str) {
    use std::os::unix::fs::FileExt;
    assert!(
        durable.iter().any(|&(_, n)| n > 0),
        "{what}: the writer made no progress before any kill"
    );
    let out = std::fs::File::open(raw).unwrap();
    let mut buf = vec![0u8; CRASH_BLOCK as usize];
    for &(round, n) in durable {
        for i in 0..n {
            out.read_exact_at(&mut buf, round * region + i * CRASH_BLOCK)
                .unwrap();
            assert!(
                buf == crash_block_data(round, i),
                "{what}: round {round}: acknowledged block {i} is not in the image"
            );
        }
    }
}
