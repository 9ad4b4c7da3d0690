//! Issue 8's findings that live outside the image formats, each reproduced
//! first: close() behind a stopped device, device ids that cannot be file
//! names, fallocate past the end, resize without guard rails, backing loops
//! and deep chains, the QMP connection cap, SEEK_DATA over a huge empty
//! image, injected errors under load, and a quit that leaks nothing.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const IO: Duration = Duration::from_secs(30);

/// A 64 MiB qcow2 as device d0 over a file node named `proto`.
fn qcow2_over_named_file(dir: &TestDir) -> (String, Daemon) {
    let img = qcow2_image(dir, "a.qcow2", "", "64M");
    let d = Daemon::start(
        dir,
        &[json!({"driver": "qcow2", "id": "d0",
            "file": {"driver": "file", "node-name": "proto", "filename": img}})
        .to_string()],
    );
    (img, d)
}

/// A write held by a stopped device does not hold up close(): a process
/// that forks while it has the file open (its child closes the inherited
/// descriptor on exec, which sends FUSE FLUSH) returns at once.
#[test]
fn close_and_fork_do_not_wait_for_a_stopped_device() {
    let dir = TestDir::new("sf-stopped");
    let img = raw_image(&dir, "a.raw", "4M");
    let spec = json!({"driver": "raw", "id": "d0", "werror": "stop",
        "file": {"driver": "blkdebug",
                 "inject-error": [{"event": "write_aio", "errno": 28, "once": true}],
                 "image": {"driver": "file", "filename": img}}})
    .to_string();
    let d = Daemon::start(&dir, &[spec]);
    let mut q = d.qmp();
    let dev = d.dev("d0");
    let f = OpenOptions::new().write(true).open(&dev).expect("open");
    let writer = {
        let f = f.try_clone().expect("dup");
        std::thread::spawn(move || f.write_all_at(&pattern(1, 4096), 8192))
    };
    q.wait_event("STOP", IO);
    // Fork + exec with the descriptor open, then close it: neither waits.
    with_timeout(Duration::from_secs(10), || {
        let st = Command::new("true").status().expect("run true");
        assert!(st.success());
    });
    let other = OpenOptions::new().write(true).open(&dev).expect("open");
    with_timeout(Duration::from_secs(10), move || drop(other));
    // The held write is still there and lands on cont.
    q.ok("cont", json!({}));
    with_timeout(IO, move || writer.join().expect("writer").expect("write"));
    drop(f);
    drop(q);
    assert_eq!(d.terminate().code(), Some(0));
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&img)
        .and_then(|f| f.read_exact_at(&mut got, 8192))
        .expect("read image");
    assert_eq!(got, pattern(1, 4096));
}

/// An id is a file name in the mount: at most 255 bytes.
#[test]
fn device_ids_longer_than_a_file_name_are_refused() {
    let dir = TestDir::new("sf-ids");
    let img = raw_image(&dir, "a.raw", "1M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let long = format!("d{}", "x".repeat(255));
    let (class, desc) = q.err(
        "blockdev-add",
        json!({"driver": "raw", "id": long, "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("256 bytes") && desc.contains("255"), "{desc}");
    let ok = format!("d{}", "x".repeat(254));
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": ok, "file": {"driver": "file", "filename": img}}),
    );
    assert_eq!(list_dir(&d.mnt), vec![ok.clone()]);
    assert!(std::fs::metadata(d.dev(&ok)).is_ok());
}

/// Punching or zeroing across the device's end is EINVAL (was ENOSPC), and
/// nothing inside the device changes.
#[test]
fn fallocate_across_the_end_is_einval() {
    let dir = TestDir::new("sf-punch");
    let img = raw_image(&dir, "a.raw", "1M");
    std::fs::write(&img, vec![0xaa; 1 << 20]).expect("fill");
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .expect("open");
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        fallocate(&f, punch, (1 << 20) - 4096, 8192),
        Err(libc::EINVAL)
    );
    assert_eq!(
        fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 1 << 20, 4096),
        Err(libc::EINVAL)
    );
    assert_eq!(fallocate(&f, punch, (1 << 20) - 4096, 4096), Ok(()));
    let mut b = vec![0u8; 8192];
    f.read_exact_at(&mut b, (1 << 20) - 8192).expect("read");
    assert!(b[..4096].iter().all(|&x| x == 0xaa));
    assert!(b[4096..].iter().all(|&x| x == 0));
}

/// `blkctl resize` shrinks only with --shrink; the protocol node below a
/// qcow2 in use cannot be resized (qcow2 does not share 'resize' on its file).
#[test]
fn resize_has_guard_rails() {
    let dir = TestDir::new("sf-resize");
    let (img, d) = qcow2_over_named_file(&dir);
    let (code, _, err) = blkctl(&d.sock, &["resize", "d0", "-16M"]);
    assert_ne!(code, 0);
    assert!(err.contains("--shrink"), "{err}");
    let (code, _, err) = blkctl(&d.sock, &["resize", "d0", "32M"]);
    assert_ne!(code, 0, "an absolute smaller size needs --shrink too");
    assert!(err.contains("--shrink"), "{err}");
    let mut q = d.qmp();
    assert_eq!(
        query_block(&mut q, "d0")["inserted"]["image"]["virtual-size"],
        64 << 20
    );
    let (code, _, err) = blkctl(&d.sock, &["resize", "--shrink", "d0", "-16M"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = blkctl(&d.sock, &["resize", "d0", "+16M"]);
    assert_eq!(code, 0, "growing needs no flag: {err}");
    assert_eq!(
        query_block(&mut q, "d0")["inserted"]["image"]["virtual-size"],
        64 << 20
    );

    let file_size = std::fs::metadata(&img).expect("stat").len();
    let (class, desc) = q.err(
        "block_resize",
        json!({"node-name": "proto", "size": 1 << 30}),
    );
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains("Permission conflict")
            && desc.contains("'resize'")
            && desc.contains("'file'"),
        "{desc}"
    );
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), file_size);
    drop(q);
    assert_eq!(d.terminate().code(), Some(0));
    let check = qemu_img_check(&img);
    assert!(check.get("corruptions").is_none(), "{check}");
}

/// A chain that leads back to itself is refused with one short line.
#[test]
fn backing_loops_are_caught_by_file_identity() {
    let dir = TestDir::new("sf-loop");
    let a = qcow2_image(&dir, "a.qcow2", "", "1M");
    let b = dir.file("b.qcow2");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-u", "-b", &a, "-F", "qcow2", &b, "1M",
    ]);
    // a -> b -> a, through a symlink so the names differ.
    let link = dir.file("link-to-b.qcow2");
    std::os::unix::fs::symlink(&b, &link).expect("symlink");
    qemu_img(&[
        "rebase", "-u", "-f", "qcow2", "-b", &link, "-F", "qcow2", &a,
    ]);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": a}}),
    );
    assert!(desc.contains("backing file loop"), "{desc}");
    assert!(desc.len() < 400 && !desc.contains('\n'), "{desc}");
    assert_eq!(
        desc.matches("Could not open backing file").count(),
        1,
        "{desc}"
    );
}

/// 1000 backing files open (and read through); past 1024 the error is one
/// short line, not a message nested once per layer.
#[test]
fn deep_chains_open_and_the_cap_says_so_once() {
    let dir = TestDir::new("sf-deep");
    let base = dir.file("l0.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]);
    qemu_io("qcow2", Path::new(&base), &["write -P 0x5c 0 64k"]);
    let name = |i: usize| dir.file(&format!("l{i}.qcow2"));
    for i in 1..=1025 {
        let back = format!("l{}.qcow2", i - 1);
        let top = name(i);
        qemu_img(&[
            "create", "-q", "-f", "qcow2", "-u", "-b", &back, "-F", "qcow2", &top, "1M",
        ]);
    }
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "too-deep",
               "file": {"driver": "file", "filename": name(1025)}}),
    );
    assert!(desc.contains("deeper than 1024"), "{desc}");
    assert!(desc.len() < 400, "{} bytes: {desc}", desc.len());
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "deep", "read-only": true,
               "file": {"driver": "file", "filename": name(1000)}}),
    );
    let dev = d.dev("deep");
    let got = with_timeout(IO, move || {
        let mut b = vec![0u8; 65536];
        std::fs::File::open(dev)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .map(|()| b)
    })
    .expect("read through 1000 layers");
    assert!(got.iter().all(|&x| x == 0x5c));
    drop(q);
    assert_eq!(d.terminate().code(), Some(0));
}

/// Past the cap a QMP client gets a clear error and is closed; a slot that
/// frees up is usable again.
#[test]
fn qmp_connections_are_capped() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let dir = TestDir::new("sf-qmpcap");
    let d = Daemon::start(&dir, &[]);
    let first_line = |s: &UnixStream| -> Value {
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or(Value::Null)
    };
    let mut clients: Vec<UnixStream> = Vec::new();
    for _ in 0..128 {
        let s = UnixStream::connect(&d.sock).expect("connect");
        s.set_read_timeout(Some(IO)).expect("timeout");
        assert!(first_line(&s).get("QMP").is_some());
        clients.push(s);
    }
    let extra = UnixStream::connect(&d.sock).expect("connect");
    extra.set_read_timeout(Some(IO)).expect("timeout");
    let mut r = BufReader::new(&extra);
    let mut line = String::new();
    r.read_line(&mut line).expect("read");
    let refused: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(refused["error"]["class"], "GenericError", "{refused}");
    let desc = refused["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("Too many QMP connections"), "{desc}");
    line.clear();
    assert_eq!(
        r.read_line(&mut line).expect("read"),
        0,
        "closed after the error"
    );
    drop(clients.pop());
    // The slot is given back once the server has seen the close.
    let mut admitted = None;
    for _ in 0..500 {
        let s = UnixStream::connect(&d.sock).expect("connect");
        s.set_read_timeout(Some(IO)).expect("timeout");
        if first_line(&s).get("QMP").is_some() {
            admitted = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut s = admitted.expect("a freed slot accepts a new client");
    // The admitted client is served (a new connection now could still be
    // refused: the server may not have seen the other clients close yet).
    drop(clients);
    s.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-version\"}\n")
        .expect("write");
    let mut r = BufReader::new(&s);
    for _ in 0..2 {
        line.clear();
        r.read_line(&mut line).expect("read");
        let v: Value = serde_json::from_str(&line).expect("JSON");
        assert!(v.get("return").is_some(), "{v}");
    }
}

/// SEEK_DATA/SEEK_HOLE over an empty 64 TiB qcow2 skip unallocated L1
/// ranges whole (was 11 s, one lookup per cluster).
#[test]
fn seek_over_a_huge_empty_qcow2_is_immediate() {
    let dir = TestDir::new("sf-seek");
    let img = qcow2_image(&dir, "big.qcow2", "", "64T");
    qemu_io("qcow2", Path::new(&img), &["write 40T 64k"]);
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let dev = d.dev("d0");
    // Hang guard only: the old walk took 11 s for the first lseek alone.
    let (data, hole) = with_timeout(Duration::from_secs(5), move || {
        let f = std::fs::File::open(dev).expect("open");
        (
            lseek(&f, 0, libc::SEEK_DATA),
            lseek(&f, 40 << 40, libc::SEEK_HOLE),
        )
    });
    assert_eq!(data, Ok(40 << 40));
    assert_eq!(hole, Ok((40 << 40) + 65536));
}

/// fio 4k QD32 with two jobs, libaio, O_DIRECT, for `secs` seconds.
fn fio_args(name: &str, dev: &str, rw: &str, secs: u32, size: &str) -> Vec<String> {
    [
        format!("--name={name}"),
        format!("--filename={dev}"),
        format!("--rw={rw}"),
        "--bs=4k".into(),
        "--iodepth=32".into(),
        "--numjobs=2".into(),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        "--time_based".into(),
        format!("--runtime={secs}"),
        format!("--size={size}"),
    ]
    .into()
}

fn fio_available() -> bool {
    Command::new("fio").arg("--version").output().is_ok()
}

/// Every event qcow2 raises on the I/O path (reftable_load only fires at
/// open), for [`injected_errors_under_load_never_hang`].
const QCOW2_IO_EVENTS: &[&str] = &[
    "l1_update",
    "l2_load",
    "l2_update",
    "l2_alloc.cow_read",
    "l2_alloc.write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "cow_read",
    "cow_write",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc.hookup",
    "refblock_alloc.write",
    "refblock_alloc.write_blocks",
    "refblock_alloc.write_table",
    "refblock_alloc.switch_table",
    "cluster_alloc",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
];

/// A qcow2 on which fio reaches every event of [`QCOW2_IO_EVENTS`]: 512-byte
/// clusters with 64-bit refcounts (refcount blocks and the table fill up
/// fast), a raw backing file, compressed clusters and an internal snapshot
/// (its L2 tables are copied on write).
fn eventful_image(dir: &TestDir) -> String {
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "32M"]);
    qemu_io("raw", Path::new(&base), &["write -P 0x22 0 32M"]);
    let img = dir.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512,refcount_bits=64",
        "-b",
        &base,
        "-F",
        "raw",
        &img,
        "32M",
    ]);
    qemu_io(
        "qcow2",
        Path::new(&img),
        &["write -c -P 0x33 0 64k", "write -P 0x11 1M 1M"],
    );
    qemu_img(&["snapshot", "-c", "s1", &img]);
    img
}

/// An error injected at any qcow2 blkdebug event under fio QD32 (two jobs)
/// fails requests with EIO, never hangs a device: fio ends, the daemon
/// answers QMP and exits on SIGTERM, and the image is not corrupted. (A
/// lock held across a wait on the worker pool once deadlocked here.)
#[test]
fn injected_errors_under_load_never_hang() {
    assert!(fio_available(), "fio is required (apt-get install fio)");
    for &event in QCOW2_IO_EVENTS {
        eprintln!("event {event}");
        let dir = TestDir::new("sf-inject");
        let img = eventful_image(&dir);
        let spec = json!({"driver": "qcow2", "id": "d0", "discard": "unmap",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": event, "errno": 5}],
                     "image": {"driver": "file", "filename": img}}})
        .to_string();
        let d = Daemon::start(&dir, &[spec]);
        let dev = d.dev("d0").to_string_lossy().into_owned();
        let out = with_timeout(Duration::from_secs(60), move || {
            Command::new("fio")
                .args(fio_args("inject", &dev, "randrw", 1, "32M"))
                .args([
                    "--continue_on_error=all",
                    "--fsync=64",
                    "--output-format=terse",
                ])
                .output()
                .expect("run fio")
        });
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Terse lines: version;fio;job;group;error;... The data events fail
        // every request they reach: fio saw EIO.
        let errors: Vec<&str> = said.lines().filter_map(|l| l.split(';').nth(4)).collect();
        assert_eq!(errors.len(), 2, "{event}: two fio jobs: {said}");
        if matches!(event, "write_aio" | "read_aio") {
            assert!(errors.iter().all(|&e| e == "5"), "{event}: {said}");
        }
        let mut q = d.qmp();
        q.ok("query-block", json!({}));
        let trim = d.dev("d0");
        with_timeout(IO, move || {
            let f = OpenOptions::new().write(true).open(trim).expect("open");
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let _ = fallocate(&f, punch, 1 << 20, 1 << 20);
        });
        drop(q);
        assert_eq!(d.terminate().code(), Some(0), "{event}: fio said {said}");
        let check = qemu_img_check(&img);
        assert!(
            check.get("corruptions").is_none(),
            "{event}: an injected error corrupted the image: {check}"
        );
    }
}

/// `quit` (and SIGTERM) while writers allocate: in-flight requests finish
/// before the images close, so nothing leaks (was 1-4 leaked clusters).
#[test]
fn quit_during_writes_leaks_nothing() {
    assert!(fio_available(), "fio is required (apt-get install fio)");
    for (round, by_signal) in [(0, false), (1, true), (2, false)] {
        let dir = TestDir::new("sf-quit");
        let img = qcow2_image(&dir, "a.qcow2", "cluster_size=65536", "1G");
        let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
        let dev = d.dev("d0").to_string_lossy().into_owned();
        let fio = Command::new("fio")
            .args(fio_args("alloc", &dev, "randwrite", 30, "1G"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run fio");
        let mut fio = KillOnDrop(fio);
        // Quit once allocations are under way.
        let mut q = d.qmp();
        wait_for_writes(&mut q, 200);
        let mut d = d;
        if by_signal {
            drop(q);
            assert_eq!(d.terminate().code(), Some(0), "round {round}");
        } else {
            q.ok("quit", json!({}));
            assert!(d.wait(IO).success(), "round {round}");
        }
        let _ = fio.0.wait();
        let check = qemu_img_check(&img);
        assert!(check.get("corruptions").is_none(), "round {round}: {check}");
        assert!(check.get("leaks").is_none(), "round {round}: {check}");
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the device has completed `n` writes.
fn wait_for_writes(q: &mut Qmp, n: u64) {
    for _ in 0..3000 {
        let s: Value = device_stats(q, "d0");
        if s["wr_operations"].as_u64().unwrap_or(0) >= n {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("fio did not start writing");
}

/// A node that a qcow2 writes has no other user but a force-share reader:
/// a raw device or a second qcow2 over the same file node is refused (two
/// nodes on one image lost fsync'ed data), as QEMU's permissions refuse it.
#[test]
fn a_written_node_has_no_other_writer_or_reader() {
    let dir = TestDir::new("sf-perm");
    let (_img, d) = qcow2_over_named_file(&dir);
    let mut q = d.qmp();
    for add in [
        json!({"driver": "raw", "id": "d1", "file": "proto"}),
        json!({"driver": "qcow2", "id": "d2", "file": "proto"}),
        json!({"driver": "raw", "id": "d1", "read-only": true, "file": "proto"}),
    ] {
        let (_, desc) = q.err("blockdev-add", add.clone());
        assert!(
            desc.starts_with("Permission conflict on node 'proto': 'write' is required by "),
            "{add}: {desc}"
        );
    }
    // A force-share reader may look; nothing of the refused adds stayed.
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "id": "d1", "read-only": true, "force-share": true,
               "file": "proto"}),
    );
    let mut names: Vec<String> = list_dir(&d.mnt);
    names.sort();
    assert_eq!(names, ["d0", "d1"]);
    // One add cannot use a node both as a writer and as a backing file.
    let b = qcow2_image(&dir, "b.qcow2", "", "64M");
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "free", "filename": b}),
    );
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d3",
               "file": {"driver": "blkdebug", "image": "free"},
               "backing": {"driver": "qcow2", "file": "free"}}),
    );
    assert!(
        desc.starts_with("Permission conflict on node 'free'"),
        "{desc}"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "id": "d3", "file": "free"}),
    );
}

/// close() of a descriptor (here a forked child's, closed on exec) raises
/// no flush event: it once armed an injected error for an unrelated write,
/// which made `blkdebug::qcow2_raises_its_events` fail under a parallel test
/// that spawned a process. fsync still raises it.
#[test]
fn close_raises_no_flush_event() {
    let dir = TestDir::new("sf-flushev");
    let img = qcow2_image(&dir, "a.qcow2", "", "4M");
    // Allocated already: an allocating write makes its refcount durable,
    // which blkdebug sees as a flush.
    qemu_io("qcow2", img.as_ref(), &["write -P 0 0 64k"]);
    let spec = json!({"driver": "qcow2", "id": "d0",
        "file": {"driver": "blkdebug",
                 "inject-error": [{"event": "flush_to_disk", "errno": 5, "once": true}],
                 "image": {"driver": "file", "filename": img}}})
    .to_string();
    let d = Daemon::start(&dir, &[spec]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .expect("open");
    for _ in 0..3 {
        assert!(Command::new("true").status().expect("run true").success());
        drop(
            OpenOptions::new()
                .read(true)
                .open(d.dev("d0"))
                .expect("open"),
        );
    }
    f.write_all_at(&pattern(7, 4096), 0)
        .expect("no flush event was raised by a close");
    // fsync raises it: the flush itself passes, the error hits the next write.
    f.sync_all().expect("fsync");
    let e = f.write_all_at(&pattern(8, 4096), 8192).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    f.write_all_at(&pattern(8, 4096), 8192).expect("once");
}
