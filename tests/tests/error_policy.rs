//! The rerror/werror error policies with errors injected by `blkdebug`:
//! report, ignore, stop (the request and every later one held, `cont`
//! retries them in order) and enospc, proven by what the caller sees, the
//! events, io-status and query-blockstats, and by the images afterwards.
//!
//! Held requests block their thread in the kernel: such I/O always runs on
//! a spawned thread that is joined with a timeout only. Dropping the Daemon
//! kills it, which releases them.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

const EV: Duration = Duration::from_secs(10);
const IO: Duration = Duration::from_secs(30);

/// A device of `format` over blkdebug over `file`, with the given policies
/// and `inject-error` rules.
fn spec(format: &str, id: &str, file: &str, rerror: &str, werror: &str, rules: Value) -> String {
    json!({"driver": format, "id": id, "rerror": rerror, "werror": werror,
           "file": {"driver": "blkdebug", "inject-error": rules,
                    "image": {"driver": "file", "filename": file}}})
    .to_string()
}

fn once(event: &str, errno: i32) -> Value {
    json!([{"event": event, "errno": errno, "once": true}])
}

fn io_status(q: &mut Qmp, id: &str) -> String {
    query_block(q, id)["io-status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// (rd_operations, wr_operations) of a device.
fn ops(q: &mut Qmp, id: &str) -> (u64, u64) {
    let s = device_stats(q, id);
    (
        s["rd_operations"].as_u64().unwrap(),
        s["wr_operations"].as_u64().unwrap(),
    )
}

/// Waits for BLOCK_IO_ERROR and checks its data.
fn expect_io_error(q: &mut Qmp, id: &str, op: &str, action: &str) {
    let ev = q.wait_event("BLOCK_IO_ERROR", EV);
    assert_eq!(
        ev["data"],
        json!({"device": id, "operation": op, "action": action}),
        "{ev}"
    );
}

/// No event of that name has arrived (events already read included).
fn assert_no_event(q: &mut Qmp, name: &str) {
    // A round trip collects every event emitted before the reply.
    q.ok("query-version", json!({}));
    assert!(
        q.events.iter().all(|e| e["event"] != name),
        "unexpected {name}: {:?}",
        q.events
    );
}

fn read_at(dev: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let f = File::open(dev)?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).map(|()| b)
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(dev)?
        .write_all_at(data, offset)
}

fn errno(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => panic!("the request succeeded"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("not an OS error: {e}")),
    }
}

/// Runs I/O that may be held on its own thread.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

/// The thread is still waiting (its request is held) after a while.
fn assert_held<T>(h: &JoinHandle<T>, what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(!h.is_finished(), "{what} must be held, not completed");
}

fn join<T: Send + 'static>(h: JoinHandle<T>) -> T {
    with_timeout(IO, move || h.join().unwrap())
}

/// A raw image of `len` bytes filled with `byte` (by qemu-io).
fn filled_image(dir: &TestDir, name: &str, len: &str, byte: u8) -> String {
    let img = raw_image(dir, name, len);
    qemu_io("raw", img.as_ref(), &[&format!("write -P {byte} 0 {len}")]);
    img
}

fn dev(d: &Daemon) -> PathBuf {
    d.dev("d0")
}

#[test]
fn rerror_report_fails_the_read_with_eio() {
    let dir = TestDir::new("ep-rreport");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[spec(
            "raw",
            "d0",
            &img,
            "report",
            "report",
            once("read_aio", 5),
        )],
    );
    let mut q = d.qmp();
    assert_eq!(io_status(&mut q, "d0"), "ok");
    let p = dev(&d);
    assert_eq!(
        errno(with_timeout(IO, move || read_at(&p, 0, 4096))),
        libc::EIO
    );
    expect_io_error(&mut q, "d0", "read", "report");
    assert_eq!(io_status(&mut q, "d0"), "failed");
    assert_no_event(&mut q, "STOP");
    // The rule fired once: the next read returns the data.
    let p = dev(&d);
    let data = with_timeout(IO, move || read_at(&p, 0, 4096)).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    // Only the successful read is counted.
    assert_eq!(ops(&mut q, "d0"), (1, 0));
    assert_eq!(device_stats(&mut q, "d0")["rd_bytes"], 4096);
    // cont with nothing stopped resets io-status (as QEMU's does) and
    // resumes nothing.
    q.ok("cont", json!({}));
    assert_eq!(io_status(&mut q, "d0"), "ok");
    assert_no_event(&mut q, "RESUME");
}

#[test]
fn rerror_ignore_reads_zeroes_and_counts_the_read() {
    let dir = TestDir::new("ep-rignore");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[spec(
            "raw",
            "d0",
            &img,
            "ignore",
            "report",
            once("read_aio", 5),
        )],
    );
    let mut q = d.qmp();
    let p = dev(&d);
    let data = with_timeout(IO, move || read_at(&p, 8192, 4096)).unwrap();
    assert!(data.iter().all(|&b| b == 0), "an ignored read gives zeroes");
    expect_io_error(&mut q, "d0", "read", "ignore");
    assert_eq!(io_status(&mut q, "d0"), "ok");
    let p = dev(&d);
    let data = with_timeout(IO, move || read_at(&p, 8192, 4096)).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    // The ignored read completed (successfully, as far as the caller knows).
    assert_eq!(ops(&mut q, "d0"), (2, 0));
    assert_eq!(device_stats(&mut q, "d0")["rd_bytes"], 8192);
}

#[test]
fn rerror_stop_holds_the_read_and_later_writes_until_cont() {
    let dir = TestDir::new("ep-rstop");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[spec("raw", "d0", &img, "stop", "stop", once("read_aio", 5))],
    );
    let mut q = d.qmp();
    let p = dev(&d);
    let reader = spawn(move || read_at(&p, 4096, 4096));
    expect_io_error(&mut q, "d0", "read", "stop");
    q.wait_event("STOP", EV);
    assert_eq!(io_status(&mut q, "d0"), "failed");
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": false, "singlestep": false, "status": "io-error"})
    );
    assert_held(&reader, "the failed read");
    let p = dev(&d);
    let writer = spawn(move || write_at(&p, 65536, &pattern(7, 8192)));
    assert_held(&writer, "a write after the stop");
    assert_eq!(ops(&mut q, "d0"), (0, 0), "nothing completed yet");
    assert_no_event(&mut q, "RESUME");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"running": true, "singlestep": false, "status": "running"})
    );
    // The retry succeeds (the rule fired once) and returns the real data.
    let data = join(reader).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a), "retried read data");
    join(writer).unwrap();
    assert_eq!(io_status(&mut q, "d0"), "ok");
    assert_eq!(ops(&mut q, "d0"), (1, 1), "each counted once");
    // Only one error happened.
    q.ok("query-version", json!({}));
    assert!(q.events.iter().all(|e| e["event"] != "BLOCK_IO_ERROR"));
    drop(q);
    d.quit();
    let data = std::fs::read(&img).unwrap();
    assert!(data[65536..65536 + 8192] == pattern(7, 8192)[..]);
    assert!(data[..65536].iter().all(|&b| b == 0x5a));
}

#[test]
fn werror_stop_retries_the_write_on_cont() {
    let dir = TestDir::new("ep-wstop");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[spec(
            "raw",
            "d0",
            &img,
            "report",
            "stop",
            once("write_aio", 5),
        )],
    );
    let mut q = d.qmp();
    let p = dev(&d);
    let writer = spawn(move || write_at(&p, 128 << 10, &[0xab; 64 << 10]));
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_eq!(io_status(&mut q, "d0"), "failed");
    assert_held(&writer, "the failed write");
    // A read arriving now waits too. (It is not ordered after the retried
    // write: both are outstanding at once, so it reads elsewhere.)
    let p = dev(&d);
    let reader = spawn(move || read_at(&p, 0, 4096));
    assert_held(&reader, "a read after the stop");
    // A flush waits too.
    let p = dev(&d);
    let syncer = spawn(move || OpenOptions::new().write(true).open(p)?.sync_all());
    assert_held(&syncer, "a flush after the stop");
    assert_eq!(device_stats(&mut q, "d0")["flush_operations"], 0);
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(writer).unwrap();
    assert_eq!(join(reader).unwrap(), vec![0x5a; 4096]);
    join(syncer).unwrap();
    assert_eq!(io_status(&mut q, "d0"), "ok");
    assert_eq!(ops(&mut q, "d0"), (1, 1));
    assert!(device_stats(&mut q, "d0")["flush_operations"].as_u64() >= Some(1));
    assert_eq!(device_stats(&mut q, "d0")["wr_bytes"], 64 << 10);
    drop(q);
    d.quit();
    qemu_io_ro(
        "raw",
        img.as_ref(),
        &[
            "read -P 0x5a 0 128k",
            "read -P 0xab 128k 64k",
            "read -P 0x5a 192k 832k",
        ],
    );
}

#[test]
fn werror_enospc_reports_eio_and_stops_on_enospc() {
    let dir = TestDir::new("ep-wenospc");
    let a = filled_image(&dir, "a.img", "1M", 0x5a);
    let b = filled_image(&dir, "b.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[
            spec("raw", "d0", &a, "report", "enospc", once("write_aio", 5)),
            spec("raw", "d1", &b, "report", "enospc", once("write_aio", 28)),
        ],
    );
    let mut q = d.qmp();
    // EIO under werror=enospc: reported.
    let p = d.dev("d0");
    let r = with_timeout(IO, move || write_at(&p, 0, &[1; 4096]));
    assert_eq!(errno(r), libc::EIO);
    expect_io_error(&mut q, "d0", "write", "report");
    assert_eq!(io_status(&mut q, "d0"), "failed");
    assert_no_event(&mut q, "STOP");
    // ENOSPC under werror=enospc: stopped.
    let p = d.dev("d1");
    let writer = spawn(move || write_at(&p, 0, &[2; 4096]));
    expect_io_error(&mut q, "d1", "write", "stop");
    q.wait_event("STOP", EV);
    assert_eq!(io_status(&mut q, "d1"), "nospace");
    assert_held(&writer, "the ENOSPC write");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(writer).unwrap();
    // cont resets every device's io-status.
    assert_eq!(io_status(&mut q, "d1"), "ok");
    assert_eq!(io_status(&mut q, "d0"), "ok");
    assert_eq!(ops(&mut q, "d0"), (0, 0));
    assert_eq!(ops(&mut q, "d1"), (0, 1));
    drop(q);
    d.quit();
    qemu_io_ro("raw", a.as_ref(), &["read -P 0x5a 0 1M"]);
    qemu_io_ro(
        "raw",
        b.as_ref(),
        &["read -P 2 0 4k", "read -P 0x5a 4k 1020k"],
    );
}

#[test]
fn qcow2_l2_update_error_with_werror_stop_is_retried_cleanly() {
    let dir = TestDir::new("ep-l2");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=65536", "16M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x33 0 64k"]);
    let d = Daemon::start(
        &dir,
        &[spec(
            "qcow2",
            "d0",
            &img,
            "report",
            "stop",
            once("l2_update", 5),
        )],
    );
    let mut q = d.qmp();
    let p = dev(&d);
    // An allocating write: its L2 update fails.
    let writer = spawn(move || write_at(&p, 4 << 20, &pattern(8, 100_000)));
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_held(&writer, "the write whose L2 update failed");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(writer).unwrap();
    assert_eq!(io_status(&mut q, "d0"), "ok");
    let p = dev(&d);
    let back = with_timeout(IO, move || read_at(&p, 4 << 20, 100_000)).unwrap();
    assert!(back == pattern(8, 100_000), "read back through the mount");
    drop(q);
    d.quit();
    let check = qemu_img_check(&img);
    assert_eq!(check["check-errors"], 0, "{check}");
    assert!(check.get("corruptions").is_none_or(|c| c == 0), "{check}");
    // The retry reuses what the failed attempt allocated: nothing leaks.
    assert!(check.get("leaks").is_none_or(|c| c == 0), "{check}");
    assert_eq!(check["allocated-clusters"], 3, "{check}");
    let raw = dir.file("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &raw]);
    let data = std::fs::read(&raw).unwrap();
    assert!(data[..65536].iter().all(|&b| b == 0x33));
    assert!(data[4 << 20..(4 << 20) + 100_000] == pattern(8, 100_000)[..]);
    assert!(data[65536..4 << 20].iter().all(|&b| b == 0));
}

/// A rule without `once` fails every retry: each `cont` stops again.
fn stop_forever(dir: &TestDir, img: &str) -> (Daemon, Qmp, JoinHandle<std::io::Result<()>>) {
    let rules = json!([{"event": "write_aio", "errno": 5}]);
    let d = Daemon::start(dir, &[spec("raw", "d0", img, "report", "stop", rules)]);
    let mut q = d.qmp();
    let p = dev(&d);
    let writer = spawn(move || write_at(&p, 0, &[0xcd; 4096]));
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_held(&writer, "the failed write");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    // The retry fails again: a second error, a second stop.
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_held(&writer, "the write failing again");
    assert_eq!(io_status(&mut q, "d0"), "failed");
    (d, q, writer)
}

#[test]
fn never_ending_error_stops_again_and_quit_fails_the_held_requests() {
    let dir = TestDir::new("ep-forever");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let (mut d, mut q, writer) = stop_forever(&dir, &img);
    // The daemon stays responsive while requests are held.
    q.ok(
        "block_set_io_throttle",
        json!({"device": "d0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
               "iops": 1000, "iops_rd": 0, "iops_wr": 0}),
    );
    assert_eq!(query_block(&mut q, "d0")["inserted"]["iops"], 1000);
    let p = dev(&d);
    let reader = spawn(move || read_at(&p, 0, 4096));
    assert_held(&reader, "a read while stopped");
    assert_eq!(ops(&mut q, "d0"), (0, 0));
    // quit does not wait for a cont that never comes: held requests fail.
    q.ok("quit", json!({}));
    let status = d.wait(Duration::from_secs(20));
    assert!(status.success(), "exit status: {status}\n{}", d.stderr());
    assert_eq!(errno(join(writer)), libc::EIO);
    assert_eq!(errno(join(reader)), libc::EIO);
    drop(q);
    drop(d);
    qemu_io_ro("raw", img.as_ref(), &["read -P 0x5a 0 1M"]);
}

#[test]
fn sigterm_while_stopped_exits_too() {
    let dir = TestDir::new("ep-term");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let (d, q, writer) = stop_forever(&dir, &img);
    drop(q);
    let status = d.terminate();
    assert!(status.success(), "exit status: {status}");
    assert_eq!(errno(join(writer)), libc::EIO);
}

#[test]
fn snapshot_while_stopped_retries_into_the_overlay() {
    let dir = TestDir::new("ep-snap");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let overlay = dir.file("ov.qcow2");
    let d = Daemon::start(
        &dir,
        &[spec(
            "raw",
            "d0",
            &img,
            "report",
            "stop",
            once("write_aio", 5),
        )],
    );
    let mut q = d.qmp();
    let p = dev(&d);
    let writer = spawn(move || write_at(&p, 4096, &[0xee; 8192]));
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_held(&writer, "the failed write");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": overlay, "snapshot-node-name": "ov"}),
    );
    assert_held(&writer, "the failed write, after the snapshot");
    assert_eq!(query_block(&mut q, "d0")["inserted"]["node-name"], "ov");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(writer).unwrap();
    drop(q);
    d.quit();
    // The retry went to the new top; the base kept its data.
    qemu_io_ro("raw", img.as_ref(), &["read -P 0x5a 0 1M"]);
    qemu_io_ro(
        "qcow2",
        overlay.as_ref(),
        &[
            "read -P 0x5a 0 4k",
            "read -P 0xee 4k 8k",
            "read -P 0x5a 12k 1012k",
        ],
    );
    assert_eq!(qemu_img_check(&overlay)["check-errors"], 0);
}

/// An error reported in the submitting call (`immediately`) is held the
/// same way, and a write of zeroes (fallocate zero range) is retried too.
#[test]
fn immediate_errors_and_zero_writes_are_held_and_retried() {
    let dir = TestDir::new("ep-immediate");
    let img = filled_image(&dir, "a.img", "1M", 0x5a);
    let rules = json!([{"event": "read_aio", "errno": 5, "once": true, "immediately": true},
                       {"event": "write_aio", "errno": 28, "once": true, "immediately": true,
                        "sector": 16}]);
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, "stop", "enospc", rules)]);
    let mut q = d.qmp();
    let p = dev(&d);
    let reader = spawn(move || read_at(&p, 0, 4096));
    expect_io_error(&mut q, "d0", "read", "stop");
    q.wait_event("STOP", EV);
    assert_held(&reader, "the failed read");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    assert_eq!(join(reader).unwrap(), vec![0x5a; 4096]);
    // raw raises write_aio for plain writes only: this one arms the rule,
    // which fails the first request covering sector 16, a zero write.
    let p = dev(&d);
    with_timeout(IO, move || write_at(&p, 0, &[0x77; 4096])).unwrap();
    let p = dev(&d);
    let zeroer = spawn(move || {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 8192, 16384)
    });
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    assert_eq!(io_status(&mut q, "d0"), "nospace");
    assert_held(&zeroer, "the failed zero write");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(zeroer).unwrap();
    assert_eq!(io_status(&mut q, "d0"), "ok");
    drop(q);
    d.quit();
    qemu_io_ro(
        "raw",
        img.as_ref(),
        &[
            "read -P 0x77 0 4k",
            "read -P 0x5a 4k 4k",
            "read -P 0 8k 16k",
            "read -P 0x5a 24k 1000k",
        ],
    );
}

/// Two devices stopped by their own errors: one `cont` resumes both.
#[test]
fn one_cont_resumes_every_stopped_device() {
    let dir = TestDir::new("ep-two");
    let a = filled_image(&dir, "a.img", "1M", 0x5a);
    let b = filled_image(&dir, "b.img", "1M", 0x5a);
    let d = Daemon::start(
        &dir,
        &[
            spec("raw", "d0", &a, "report", "stop", once("write_aio", 5)),
            spec("raw", "d1", &b, "report", "stop", once("write_aio", 5)),
        ],
    );
    let mut q = d.qmp();
    let p = d.dev("d0");
    let w0 = spawn(move || write_at(&p, 0, &[1; 4096]));
    expect_io_error(&mut q, "d0", "write", "stop");
    q.wait_event("STOP", EV);
    let p = d.dev("d1");
    let w1 = spawn(move || write_at(&p, 0, &[2; 4096]));
    expect_io_error(&mut q, "d1", "write", "stop");
    assert_held(&w0, "d0's write");
    assert_held(&w1, "d1's write");
    assert_eq!(io_status(&mut q, "d0"), "failed");
    assert_eq!(io_status(&mut q, "d1"), "failed");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", EV);
    join(w0).unwrap();
    join(w1).unwrap();
    assert_eq!(ops(&mut q, "d0"), (0, 1));
    assert_eq!(ops(&mut q, "d1"), (0, 1));
    drop(q);
    d.quit();
    qemu_io_ro("raw", a.as_ref(), &["read -P 1 0 4k"]);
    qemu_io_ro("raw", b.as_ref(), &["read -P 2 0 4k"]);
}
