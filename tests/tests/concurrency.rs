//! Many threads doing pread/pwrite on a device at once. The result is
//! checked with qemu-img compare against an expected image built here.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Duration;

const SIZE: usize = 32 << 20;
const TIMEOUT: Duration = Duration::from_secs(60);

/// One write of a test: offset and data.
#[derive(Clone)]
struct Write {
    offset: u64,
    data: Vec<u8>,
}

/// Runs every thread's writes at once (each thread: its writes in order,
/// reading each one back right away), then checks the device and the image
/// against `base` with the writes applied.
fn run(dir: &TestDir, d: Daemon, img: &str, base: Vec<u8>, plan: Vec<Vec<Write>>) {
    run_as(dir, d, img, "raw", base, plan)
}

/// As [`run`], for an image of format `fmt`.
fn run_as(dir: &TestDir, d: Daemon, img: &str, fmt: &str, base: Vec<u8>, plan: Vec<Vec<Write>>) {
    let dev = d.dev("d0");
    let threads = plan.len();
    let barrier = Arc::new(Barrier::new(threads));
    let plan2 = plan.clone();
    let dev2: PathBuf = dev.clone();
    with_timeout(TIMEOUT, move || {
        let hs: Vec<_> = plan2
            .into_iter()
            .enumerate()
            .map(|(t, writes)| {
                let (barrier, dev) = (barrier.clone(), dev2.clone());
                std::thread::spawn(move || {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&dev)
                        .unwrap();
                    barrier.wait();
                    for w in &writes {
                        f.write_all_at(&w.data, w.offset)
                            .unwrap_or_else(|e| panic!("thread {t}: pwrite at {}: {e}", w.offset));
                        let mut back = vec![0u8; w.data.len()];
                        f.read_exact_at(&mut back, w.offset)
                            .unwrap_or_else(|e| panic!("thread {t}: pread at {}: {e}", w.offset));
                        assert!(
                            back == w.data,
                            "thread {t}: data read back at {} differs",
                            w.offset
                        );
                    }
                    f.sync_all().unwrap();
                })
            })
            .collect();
        for h in hs {
            h.join().expect("I/O thread failed");
        }
    });
    // Parallel readers over everything, while nothing writes.
    let mut expected = base;
    for w in plan.iter().flatten() {
        expected[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
    }
    let expected = Arc::new(expected);
    let (exp2, dev3) = (expected.clone(), dev.clone());
    with_timeout(TIMEOUT, move || {
        let hs: Vec<_> = (0..8)
            .map(|t| {
                let (exp, dev) = (exp2.clone(), dev3.clone());
                std::thread::spawn(move || {
                    let f = OpenOptions::new().read(true).open(&dev).unwrap();
                    let chunk = 777_777usize;
                    let mut off = t * 123_457 % SIZE;
                    let mut buf = vec![0u8; chunk];
                    for _ in 0..24 {
                        let n = chunk.min(SIZE - off);
                        f.read_exact_at(&mut buf[..n], off as u64).unwrap();
                        assert!(
                            buf[..n] == exp[off..off + n],
                            "reader {t}: wrong data at {off}"
                        );
                        off = (off + 1_318_237) % SIZE;
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("reader thread failed");
        }
    });
    let exp_path = dir.file("expected.img");
    std::fs::write(&exp_path, &*expected).unwrap();
    assert!(
        images_identical(&dev, "raw", exp_path.as_ref(), "raw"),
        "mount differs from expected"
    );
    let status = d.terminate();
    assert!(status.success(), "daemon exit: {status}");
    assert!(
        images_identical(img.as_ref(), fmt, exp_path.as_ref(), "raw"),
        "image differs from expected"
    );
}

/// A 32 MiB image with some data already in it; returns its path and bytes.
fn base_image(dir: &TestDir) -> (String, Vec<u8>) {
    let img = raw_image(dir, "a.img", "32M");
    qemu_io(
        "raw",
        img.as_ref(),
        &["write -P 0x33 0 4M", "write -P 0x44 20M 2M"],
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes.len(), SIZE);
    (img, bytes)
}

/// Each thread owns a stripe of 1 MiB slots: thread t gets slots t, t+T, ...;
/// inside a slot, writes of assorted (often unaligned) sizes and offsets.
fn striped_plan(threads: usize, per_thread: usize) -> Vec<Vec<Write>> {
    let slot = 1usize << 20;
    (0..threads)
        .map(|t| {
            (0..per_thread)
                .map(|i| {
                    let s = (t + i * threads) % (SIZE / slot);
                    let r = pattern((t * 1000 + i) as u64, 8);
                    let len = [4096, 65_536, 1000, 131_072 + 17, 4095, 300_001][i % 6];
                    let within =
                        (u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize) % (slot - len);
                    Write {
                        offset: (s * slot + within) as u64,
                        data: pattern((t * 7919 + i) as u64, len),
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn parallel_io_at_distinct_offsets_threads_backend() {
    let dir = TestDir::new("cc-threads");
    let (img, base) = base_image(&dir);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({"aio": "threads"}))]);
    run(&dir, d, &img, base, striped_plan(16, 2));
}

#[test]
fn parallel_io_at_distinct_offsets_native_backend_more_fuse_threads() {
    let dir = TestDir::new("cc-native");
    let (img, base) = base_image(&dir);
    let d = Daemon::start_with(
        &dir,
        &[raw_spec("d0", &img, json!({"aio": "native"}))],
        &["--threads", "8"],
    )
    .unwrap_or_else(|e| panic!("daemon: {e}"));
    run(&dir, d, &img, base, striped_plan(16, 2));
}

#[test]
fn parallel_io_with_a_single_fuse_thread() {
    let dir = TestDir::new("cc-one");
    let (img, base) = base_image(&dir);
    let d = Daemon::start_with(
        &dir,
        &[raw_spec("d0", &img, json!({}))],
        &["--threads", "1"],
    )
    .unwrap_or_else(|e| panic!("daemon: {e}"));
    run(&dir, d, &img, base, striped_plan(8, 3));
}

/// Unaligned writes whose neighbours share 4 KiB blocks, on a device opened
/// with O_DIRECT (so the daemon must read-modify-write without losing a
/// neighbour's bytes).
fn adjacent_plan(threads: usize, per_thread: usize, len: usize, base: usize) -> Vec<Vec<Write>> {
    (0..threads)
        .map(|t| {
            (0..per_thread)
                .map(|i| Write {
                    offset: (base + (i * threads + t) * len) as u64,
                    data: pattern((1 + t * 31 + i) as u64, len),
                })
                .collect()
        })
        .collect()
}

#[test]
fn parallel_unaligned_adjacent_writes_on_a_direct_device() {
    for aio in ["threads", "native"] {
        let dir = TestDir::new(&format!("cc-adjacent-{aio}"));
        let (img, base) = base_image(&dir);
        let spec = json!({"driver": "raw", "id": "d0", "cache": {"direct": true},
                          "file": {"driver": "file", "filename": img, "aio": aio}});
        let d = Daemon::start(&dir, &[spec.to_string()]);
        // 12 threads x 40 writes of 1000 bytes, interleaved: every 4 KiB block
        // is shared by writes of several threads.
        run(
            &dir,
            d,
            &img,
            base,
            adjacent_plan(12, 40, 1000, 3 << 20 | 123),
        );
    }
}

/// Aligned 4 KiB writes and unaligned ones at once, on an O_DIRECT device:
/// a read-modify-write waits for the aligned writes in flight, which on the
/// io_uring transport run on the FUSE workers' own rings; a worker must
/// never wait for it in turn (it would stop reaping the writes it waits on).
fn mixed_plan(
    threads: usize,
    per_thread: usize,
    aligned: usize,
    unaligned: usize,
) -> Vec<Vec<Write>> {
    (0..threads)
        .map(|t| {
            (0..per_thread)
                .map(|i| {
                    let n = i * threads + t;
                    let (offset, len) = if (i + t) % 2 == 0 {
                        (aligned + n * 4096, 4096)
                    } else {
                        (unaligned + n * 1000, 1000)
                    };
                    Write {
                        offset: offset as u64,
                        data: pattern((7 + t * 131 + i) as u64, len),
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn parallel_aligned_and_unaligned_writes_on_a_direct_device() {
    let dir = TestDir::new("cc-mixed");
    let (img, base) = base_image(&dir);
    let spec = json!({"driver": "raw", "id": "d0", "cache": {"direct": true},
                      "file": {"driver": "file", "filename": img, "aio": "native"}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    run(
        &dir,
        d,
        &img,
        base,
        mixed_plan(16, 60, 8 << 20, 3 << 20 | 123),
    );
}

/// A 32 MiB qcow2 image at `img` with clusters of `cluster_size` bytes and
/// some data in it, served with `cache.direct=on` and `aio=native`; returns
/// the daemon and the image's bytes.
fn direct_qcow2(dir: &TestDir, img: &str, cluster_size: &str) -> (Daemon, Vec<u8>) {
    let opts = format!("cluster_size={cluster_size}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, img, "32M"]);
    qemu_io(
        "qcow2",
        img.as_ref(),
        &["write -P 0x33 0 4M", "write -P 0x44 20M 2M"],
    );
    let mut base = vec![0u8; SIZE];
    base[..4 << 20].fill(0x33);
    base[20 << 20..22 << 20].fill(0x44);
    let spec = json!({"driver": "qcow2", "id": "d0", "cache": {"direct": true},
                      "file": {"driver": "file", "filename": img, "aio": "native"}});
    (Daemon::start(dir, &[spec.to_string()]), base)
}

/// The same on qcow2: aligned writes to allocated clusters go to the
/// workers' rings, others allocate (metadata written meanwhile), unaligned
/// ones read-modify-write their blocks in allocated clusters.
#[test]
fn parallel_aligned_and_unaligned_writes_on_a_direct_qcow2_device() {
    let dir = TestDir::new("cc-mixed-qcow2");
    let img = dir.file("a.qcow2");
    let (d, base) = direct_qcow2(&dir, &img, "65536");
    // Aligned writes from 2 MiB on: the first half land in allocated
    // clusters, the rest allocate; unaligned ones inside the 0x44 run.
    let plan = mixed_plan(16, 60, 2 << 20, 20 << 20 | 123);
    run_as(&dir, d, &img, "qcow2", base, plan);
}

/// An ext4 filesystem on a loop device with 4 KiB sectors, so O_DIRECT on
/// its files needs 4 KiB alignment; unmounted and detached on drop.
struct Fs4k {
    dev: String,
    mnt: String,
}

impl Fs4k {
    fn mount(dir: &TestDir) -> Fs4k {
        let img = dir.file("fs4k.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(256 << 20))
            .unwrap();
        let losetup = ["--find", "--show", "--sector-size", "4096", &img];
        let dev = blkfs_tests::run("losetup", &losetup).trim().to_string();
        let fs = Fs4k {
            dev,
            mnt: dir.file("fs4k"),
        };
        blkfs_tests::run("mkfs.ext4", &["-q", &fs.dev]);
        std::fs::create_dir_all(&fs.mnt).unwrap();
        blkfs_tests::run("mount", &[&fs.dev, &fs.mnt]);
        fs
    }
}

impl Drop for Fs4k {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", &self.mnt])
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// qcow2 with 512-byte clusters where O_DIRECT needs 4 KiB: every metadata
/// write of an allocation is a read-modify-write, which waits (under the
/// metadata lock) for the aligned data writes in flight on the FUSE
/// workers' rings, while those workers plan their next requests.
#[test]
fn parallel_writes_on_qcow2_whose_metadata_writes_read_modify_write() {
    let dir = TestDir::new("cc-mixed-4k");
    let fs = Fs4k::mount(&dir);
    let img = format!("{}/a.qcow2", fs.mnt);
    let (d, base) = direct_qcow2(&dir, &img, "512");
    let plan = mixed_plan(16, 120, 2 << 20, 20 << 20 | 123);
    run_as(&dir, d, &img, "qcow2", base, plan);
    assert_check_clean(&img);
}

#[test]
fn parallel_io_on_several_devices_and_qmp_at_once() {
    let dir = TestDir::new("cc-multi");
    let a = raw_image(&dir, "a.img", "8M");
    let b = raw_image(&dir, "b.img", "8M");
    let d = Daemon::start(
        &dir,
        &[raw_spec("a", &a, json!({})), raw_spec("b", &b, json!({}))],
    );
    let (mnt, sock) = (d.mnt.clone(), d.sock.clone());
    let done = with_timeout(TIMEOUT, move || {
        let mut hs = Vec::new();
        for (t, dev) in ["a", "b", "a", "b", "a", "b"].iter().enumerate() {
            let p = mnt.join(dev);
            hs.push(std::thread::spawn(move || {
                let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
                for i in 0..16u64 {
                    let off = (t as u64 / 2) * (2 << 20) + i * 65_536;
                    let data = pattern(t as u64 * 100 + i, 65_536);
                    f.write_all_at(&data, off).unwrap();
                    let mut back = vec![0u8; data.len()];
                    f.read_exact_at(&mut back, off).unwrap();
                    assert!(back == data, "device thread {t}: readback at {off}");
                }
                0u64
            }));
        }
        // Meanwhile, QMP queries keep being answered.
        let s = sock.clone();
        hs.push(std::thread::spawn(move || {
            let mut q = Qmp::connect(&s);
            q.ok("qmp_capabilities", json!({}));
            let mut n = 0;
            for _ in 0..40 {
                let st = q.ok("query-blockstats", json!({}));
                assert_eq!(st.as_array().unwrap().len(), 2);
                n += q.ok("query-block", json!({})).as_array().unwrap().len() as u64;
            }
            n
        }));
        hs.into_iter()
            .map(|h| h.join().expect("thread failed"))
            .sum::<u64>()
    });
    assert_eq!(done, 80, "every query-block saw both devices");
    // Final counters: each device got 3 threads x 16 writes of 64 KiB.
    let mut q = d.qmp();
    let st = q.ok("query-blockstats", json!({}));
    for s in st.as_array().unwrap() {
        assert!(
            s["stats"]["wr_bytes"].as_u64().unwrap() >= 3 * 16 * 65_536,
            "{s}"
        );
        assert_eq!(
            s["stats"]["wr_highest_offset"],
            2 * (2 << 20) + 15 * 65_536 + 65_536,
            "{s}"
        );
    }
    for (img, first) in [(&a, 0u64), (&b, 1)] {
        let mut exp = vec![0u8; 8 << 20];
        for t in (first as usize..6).step_by(2) {
            for i in 0..16u64 {
                let off = (t / 2) * (2 << 20) + i as usize * 65_536;
                exp[off..off + 65_536].copy_from_slice(&pattern(t as u64 * 100 + i, 65_536));
            }
        }
        let e = dir.file(&format!("exp-{first}.img"));
        std::fs::write(&e, &exp).unwrap();
        assert!(
            images_identical(img.as_ref(), "raw", e.as_ref(), "raw"),
            "{img} differs from expected"
        );
    }
}
