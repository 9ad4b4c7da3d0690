//! Device policies through the real mount and socket: throttling,
//! detect-zeroes, discard and the rerror/werror error policies with a real
//! ENOSPC (a small tmpfs), proven with events and query-blockstats.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tmpfs of a fixed size, unmounted (lazily) when dropped.
struct SmallFs {
    path: PathBuf,
}

impl SmallFs {
    fn new(dir: &TestDir, size: &str) -> SmallFs {
        let path = dir.join("small");
        std::fs::create_dir_all(&path).unwrap();
        let fs = SmallFs { path };
        fs.mount(0, size);
        fs
    }

    /// Grows the filesystem so the held writes fit.
    fn resize(&self, size: &str) {
        self.mount(libc::MS_REMOUNT, size);
    }

    /// mount(2) directly: the mount tool may stat other mounts, and a test
    /// holding requests in its own FUSE mount must not wait on that.
    fn mount(&self, flags: libc::c_ulong, size: &str) {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, target) = (c("tmpfs"), c(self.path.to_str().unwrap()));
        let data = c(&format!("size={size}"));
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        lazy_umount(&self.path);
    }
}

fn throttle_args(id: &str, set: Value) -> Value {
    let mut a = json!({"device": id, "bps": 0, "bps_rd": 0, "bps_wr": 0,
                       "iops": 0, "iops_rd": 0, "iops_wr": 0});
    for (k, v) in set.as_object().unwrap() {
        a[k] = v.clone();
    }
    a
}

/// Reads `n` blocks of `bs` bytes one after another; returns the elapsed time.
fn timed_reads(dev: &Path, n: u64, bs: usize) -> Duration {
    let f = std::fs::File::open(dev).unwrap();
    let mut buf = vec![0u8; bs];
    let t = Instant::now();
    for i in 0..n {
        f.read_exact_at(&mut buf, (i * bs as u64) % (1 << 20))
            .unwrap();
    }
    t.elapsed()
}

#[test]
fn iops_limit_holds_and_shows_in_query_block() {
    iops_limit_holds("threads");
}

/// With `aio=native` a FUSE worker of the io_uring transport reads on its
/// own ring, past the engine, unless something must see the request: a
/// throttle set while the device runs takes effect there too.
#[test]
fn iops_limit_holds_on_a_workers_ring() {
    iops_limit_holds("native");
}

fn iops_limit_holds(aio: &str) {
    let dir = TestDir::new(&format!("pol-iops-{aio}"));
    let img = raw_image(&dir, "a.img", "4M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({"aio": aio}))]);
    // Unthrottled reads first, so a worker has served the device already.
    timed_reads(&d.dev("d0"), 64, 4096);
    let mut q = d.qmp();
    q.ok(
        "block_set_io_throttle",
        throttle_args("d0", json!({"iops": 50, "iops_max": 60, "iops_size": 8192})),
    );
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["iops"], 50, "{ins}");
    assert_eq!(ins["iops_max"], 60, "{ins}");
    assert_eq!(ins["iops_size"], 8192, "{ins}");
    assert_eq!(ins["bps"], 0, "{ins}");
    assert!(
        ins.get("bps_max").is_none(),
        "unset maxima are absent: {ins}"
    );
    let before = device_stats(&mut q, "d0")["rd_operations"]
        .as_u64()
        .unwrap();
    // 60 may start at once (the burst), the other 100 at 50/s: at least 2 s.
    let took = timed_reads(&d.dev("d0"), 160, 4096);
    assert!(
        took >= Duration::from_millis(1900),
        "160 reads took {took:?}"
    );
    let after = device_stats(&mut q, "d0")["rd_operations"]
        .as_u64()
        .unwrap();
    assert_eq!(after - before, 160, "every throttled read completed once");
    // All zero switches throttling off.
    q.ok("block_set_io_throttle", throttle_args("d0", json!({})));
    assert_eq!(query_block(&mut q, "d0")["inserted"]["iops"], 0);
    assert!(query_block(&mut q, "d0")["inserted"]
        .get("iops_max")
        .is_none());
}

#[test]
fn bps_limit_with_burst_from_the_command_line() {
    let dir = TestDir::new("pol-bps");
    let img = raw_image(&dir, "a.img", "8M");
    let spec = format!(
        "driver=raw,id=d0,file.driver=file,file.filename={img},throttling.bps-write=1048576,throttling.bps-write-max=2097152"
    );
    let d = Daemon::start(&dir, &[spec]);
    let mut q = d.qmp();
    let ins = query_block(&mut q, "d0")["inserted"].clone();
    assert_eq!(ins["bps_wr"], 1 << 20, "{ins}");
    assert_eq!(ins["bps_wr_max"], 2 << 20, "{ins}");
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    let chunk = pattern(1, 64 << 10);
    let t = Instant::now();
    // 2 MiB of burst, then 2 MiB more at 1 MiB/s: at least ~2 s.
    for i in 0..64u64 {
        f.write_all_at(&chunk, i * (64 << 10)).unwrap();
    }
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1800), "4 MiB took {took:?}");
    // Reads are not limited by a write limit.
    let took = timed_reads(&d.dev("d0"), 64, 64 << 10);
    assert!(took < Duration::from_millis(1500), "reads took {took:?}");
    assert_eq!(device_stats(&mut q, "d0")["wr_bytes"], 4 << 20);
}

#[test]
fn throttle_argument_errors() {
    let dir = TestDir::new("pol-terr");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    let cases = [
        (
            json!({"bps": -1}),
            "bps/iops/max values must be 0 or greater",
        ),
        (
            json!({"bps": 10, "bps_rd": 5}),
            "bps/iops/max total values and read/write values cannot be used at the same time",
        ),
        (
            json!({"iops": 100, "iops_max": 50}),
            "iops_max cannot be lower than iops",
        ),
        (
            json!({"bps_wr_max": 5}),
            "bps_wr_max requires bps_wr to be set",
        ),
    ];
    for (set, want) in cases {
        let (class, desc) = q.err("block_set_io_throttle", throttle_args("d0", set));
        assert_eq!((class.as_str(), desc.as_str()), ("GenericError", want));
    }
    let (class, _) = q.err("block_set_io_throttle", throttle_args("nope", json!({})));
    assert_eq!(class, "DeviceNotFound");
    let (class, desc) = q.err("block_set_io_throttle", json!({"device": "d0"}));
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "Parameter 'bps' is missing");
    let (_, desc) = q.err(
        "block_set_io_throttle",
        throttle_args("d0", json!({"iops": "many"})),
    );
    assert_eq!(desc, "Invalid parameter type for 'iops', expected: integer");
    // The daemon still serves I/O unthrottled.
    assert!(timed_reads(&d.dev("d0"), 100, 4096) < Duration::from_secs(2));
}

#[test]
fn detect_zeroes_keeps_qcow2_clusters_unallocated() {
    let dir = TestDir::new("pol-dz");
    let img = qcow2_image(&dir, "a.qcow2", "cluster_size=65536", "4M");
    let spec = json!({"driver": "qcow2", "id": "d0", "detect-zeroes": "on",
                      "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    assert_eq!(query_block(&mut q, "d0")["inserted"]["detect_zeroes"], "on");
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
    f.write_all_at(&pattern(3, 64 << 10), 2 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    q.ok("quit", json!({}));
    drop(q);
    let mut d = d;
    assert!(d.wait(Duration::from_secs(20)).success());
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", &img])).unwrap();
    let data: Vec<&Value> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .collect();
    assert_eq!(data.len(), 1, "only the pattern is allocated: {map}");
    assert_eq!(data[0]["start"], 2 << 20);
    assert_eq!(data[0]["length"], 64 << 10);
    qemu_io(
        "qcow2",
        Path::new(&img),
        &["read -P 0 0 1M", "read -P 0 1M 1M"],
    );
    assert_eq!(qemu_img_check(&img)["check-errors"], 0);
}

#[test]
fn detect_zeroes_unmap_deallocates_raw_and_needs_discard_unmap() {
    let dir = TestDir::new("pol-dzu");
    let img = dir.file("a.img");
    std::fs::write(&img, pattern(4, 2 << 20)).unwrap();
    let spec = json!({"driver": "raw", "id": "d0", "detect-zeroes": "unmap", "discard": "unmap",
                      "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let mut q = d.qmp();
    let blocks = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks()
    };
    let before = blocks(&img);
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 0).unwrap();
    f.sync_all().unwrap();
    // The kernel may split the write at a page of the user buffer: allow that page.
    assert!(
        blocks(&img) * 512 <= before * 512 - (1 << 20) + 4096,
        "1 MiB of zeroes must be unmapped: {before} -> {} blocks",
        blocks(&img)
    );
    let mut expect = pattern(4, 2 << 20);
    expect[..1 << 20].fill(0);
    assert_eq!(std::fs::read(d.dev("d0")).unwrap(), expect);
    // unmap without discard=unmap is refused, naming the rule.
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "raw", "id": "d1", "detect-zeroes": "unmap",
               "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(
        desc,
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    );
}

/// A raw device on a 1 MiB tmpfs whose image claims 8 MiB: writes past the
/// free space fail with a real ENOSPC.
fn enospc_setup(dir: &TestDir, werror: &str) -> (SmallFs, Daemon, String) {
    enospc_setup_aio(dir, werror, "threads")
}

fn enospc_setup_aio(dir: &TestDir, werror: &str, aio: &str) -> (SmallFs, Daemon, String) {
    let small = SmallFs::new(dir, "1M");
    let img = small.path.join("a.img").to_string_lossy().into_owned();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let spec = json!({"driver": "raw", "id": "d0", "werror": werror,
                      "file": {"driver": "file", "filename": img, "aio": aio}});
    let d = Daemon::start(dir, &[spec.to_string()]);
    (small, d, img)
}

fn write_blocks(dev: &Path, from: u64, count: u64) -> std::io::Result<()> {
    let f = OpenOptions::new().write(true).open(dev)?;
    for i in from..from + count {
        f.write_all_at(&pattern(i, 256 << 10), i * (256 << 10))?;
    }
    f.sync_all()
}

#[test]
fn werror_report_returns_enospc_and_sets_io_status() {
    let dir = TestDir::new("pol-report");
    let (_small, d, _img) = enospc_setup(&dir, "report");
    let mut q = d.qmp();
    let dev = d.dev("d0");
    let r = with_timeout(Duration::from_secs(30), move || write_blocks(&dev, 0, 16));
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    let ev = q.wait_event("BLOCK_IO_ERROR", Duration::from_secs(10));
    assert_eq!(
        ev["data"],
        json!({"device": "d0", "operation": "write", "action": "report"})
    );
    assert_eq!(query_block(&mut q, "d0")["io-status"], "nospace");
    // Reads still work and the daemon is up.
    assert_eq!(std::fs::read(d.dev("d0")).unwrap().len(), 8 << 20);
}

#[test]
fn werror_ignore_pretends_success() {
    let dir = TestDir::new("pol-ignore");
    let (_small, d, _img) = enospc_setup(&dir, "ignore");
    let mut q = d.qmp();
    let dev = d.dev("d0");
    with_timeout(Duration::from_secs(30), move || write_blocks(&dev, 0, 16)).unwrap();
    let ev = q.wait_event("BLOCK_IO_ERROR", Duration::from_secs(10));
    assert_eq!(ev["data"]["action"], "ignore");
    assert_eq!(query_block(&mut q, "d0")["io-status"], "ok");
}

/// werror=enospc (the default) and stop: the failing write and every later
/// one wait; `cont` after freeing space completes them all, nothing lost.
fn stop_and_cont(werror: Option<&str>, aio: &str) {
    let dir = TestDir::new("pol-stop");
    let (small, d, img) = enospc_setup_aio(&dir, werror.unwrap_or("enospc"), aio);
    let mut q = d.qmp();
    let dev = d.dev("d0");
    let writer = std::thread::spawn(move || write_blocks(&dev, 0, 16));
    let ev = q.wait_event("BLOCK_IO_ERROR", Duration::from_secs(20));
    assert_eq!(
        ev["data"],
        json!({"device": "d0", "operation": "write", "action": "stop"})
    );
    q.wait_event("STOP", Duration::from_secs(5));
    assert_eq!(query_block(&mut q, "d0")["io-status"], "nospace");
    // Held, not failed: the writer is still waiting.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writer.is_finished(), "held requests must not complete");
    let reader = {
        let dev = d.dev("d0");
        std::thread::spawn(move || {
            let f = std::fs::File::open(dev).unwrap();
            let mut b = vec![0u8; 4096];
            f.read_exact_at(&mut b, 0).map(|()| b)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!reader.is_finished(), "later requests wait too");
    small.resize("16M");
    q.ok("cont", json!({}));
    q.wait_event("RESUME", Duration::from_secs(5));
    with_timeout(Duration::from_secs(30), move || writer.join().unwrap()).unwrap();
    assert_eq!(&reader.join().unwrap().unwrap()[..], &pattern(0, 4096)[..]);
    assert_eq!(query_block(&mut q, "d0")["io-status"], "ok");
    assert_eq!(device_stats(&mut q, "d0")["wr_bytes"], 16 * (256 << 10));
    let data = std::fs::read(&img).unwrap();
    for i in 0..16u64 {
        let at = (i * (256 << 10)) as usize;
        assert_eq!(
            &data[at..at + (256 << 10)],
            &pattern(i, 256 << 10)[..],
            "block {i}"
        );
    }
    // cont on a running daemon is harmless.
    q.ok("cont", json!({}));
    drop(q);
    drop(d);
}

#[test]
fn werror_enospc_default_stops_and_cont_resumes() {
    stop_and_cont(None, "threads");
}

#[test]
fn werror_stop_holds_and_cont_retries() {
    stop_and_cont(Some("stop"), "threads");
}

/// With `aio=native` a FUSE worker of the io_uring transport writes on its
/// own ring: the failed write completes there, and `cont` retries it from
/// the QMP thread.
#[test]
fn werror_stop_on_a_workers_ring_holds_and_cont_retries() {
    stop_and_cont(Some("stop"), "native");
}

#[test]
fn rerror_enospc_is_refused() {
    let dir = TestDir::new("pol-rerr");
    let img = raw_image(&dir, "a.img", "1M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "raw", "id": "d0", "rerror": "enospc",
               "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(class, "GenericError");
    assert_eq!(desc, "rerror=enospc is not a valid read error policy");
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "raw", "id": "d0", "werror": "sometimes",
               "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(desc, "Parameter 'werror' does not accept value 'sometimes'");
}
