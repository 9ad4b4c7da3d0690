//! Crash safety: the daemon is killed with SIGKILL in the middle of
//! allocating writes, again and again. `qemu-img check` may find leaked
//! clusters but never corruption, and every write acknowledged by an fsync
//! that returned is in the image.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const BLOCK: u64 = 6000;

fn check_no_corruption(img: &str) {
    let v = qemu_img_check(img);
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(
        v.get("corruptions").is_none_or(|c| c == 0),
        "corruption after kill -9: {v}"
    );
}

#[test]
fn kill_9_during_writes_never_corrupts() {
    let dir = TestDir::new("q2-crash");
    let img = dir.file("c.qcow2");
    let base = dir.file("base.raw");
    qemu_img(&["create", "-q", "-f", "raw", &base, "64M"]);
    qemu_io("raw", base.as_ref(), &["write -P 0x7e 0 64M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        &base,
        "-F",
        "raw",
        &img,
        "64M",
    ]);
    let spec = json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": img}})
        .to_string();
    // Each round writes its own 8 MiB region, block after block, so every
    // block is written once; (round, blocks acknowledged by fsync).
    const REGION: u64 = 8 << 20;
    let mut durable: Vec<(u64, u64)> = Vec::new();
    for round in 0..8u64 {
        let d = Daemon::start(&dir, std::slice::from_ref(&spec));
        let dev = d.dev("d0");
        let acked = Arc::new(AtomicU64::new(0));
        let writer = {
            let (dev, acked) = (dev.clone(), acked.clone());
            std::thread::spawn(move || {
                let Ok(f) = OpenOptions::new().write(true).open(&dev) else {
                    return;
                };
                for i in 0..REGION / BLOCK {
                    // 6000-byte blocks: every write is a partial-cluster copy-on-write
                    // whose cluster is shared with its neighbours.
                    if f.write_all_at(&block_data(round, i), round * REGION + i * BLOCK)
                        .is_err()
                    {
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
        std::thread::sleep(Duration::from_millis(100 + round * 23));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
        let n = acked.load(Ordering::SeqCst);
        drop(d); // reaps and lazily unmounts
        let _ = writer.join();
        check_no_corruption(&img);
        durable.push((round, n));
    }
    assert!(
        durable.iter().any(|&(_, n)| n > 0),
        "the writer made no progress before any kill"
    );
    let raw = dir.file("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &raw]);
    let out = OpenOptions::new().read(true).open(&raw).unwrap();
    let mut buf = vec![0u8; BLOCK as usize];
    for (round, n) in durable {
        for i in 0..n {
            out.read_exact_at(&mut buf, round * REGION + i * BLOCK)
                .unwrap();
            assert!(
                buf == block_data(round, i),
                "round {round}: acknowledged block {i} is not in the image"
            );
        }
    }
}

fn block_data(round: u64, i: u64) -> Vec<u8> {
    vec![((round * 31 + i) % 251) as u8 + 1; BLOCK as usize]
}
