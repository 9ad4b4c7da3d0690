//! Churn: random writes, discards (punch hole) and zero ranges through the
//! mount of a 256 MiB qcow2 with `discard: unmap`, against an in-memory
//! model of the guest's disk. Freed clusters must be discarded and reused:
//! at the end the image file holds at most 1.25x the clusters the guest
//! has allocated (plus the fixed metadata), `qemu-img check` is clean and
//! agrees on the allocated cluster count, and every byte reads back as the
//! model says.
//!
//! The CI run is a fixed, deterministic sequence of operations. For long
//! runs (`scripts/churn.sh`): `BLKFS_CHURN_SECS` runs the sequence for that
//! long instead, `BLKFS_CHURN_SEED` picks another sequence,
//! `BLKFS_CHURN_OPS` another length.

use blkfs_tests::*;
use serde_json::json;
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

const SIZE: u64 = 256 << 20;
const CS: u64 = 65536;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cluster {
    Free,
    Data,
    /// Zeroed without unmap: reads as zeroes, keeps its host cluster.
    ZeroKept,
}

/// The guest's view: its bytes and the state of each cluster.
struct Model {
    data: Vec<u8>,
    clusters: Vec<Cluster>,
}

impl Model {
    /// Whole clusters are freed (`unmap`) or keep their allocation under the
    /// zero flag; a partly zeroed cluster stays as it is, except that an
    /// unmapping request frees a data cluster that is all zero afterwards.
    fn zero(&mut self, off: u64, len: u64, unmap: bool) {
        self.data[off as usize..(off + len) as usize].fill(0);
        let first = off.div_ceil(CS);
        let last = (off + len) / CS;
        for c in first..last.max(first) {
            let st = &mut self.clusters[c as usize];
            *st = match (*st, unmap) {
                (_, true) => Cluster::Free,
                (Cluster::Data, false) => Cluster::ZeroKept,
                (other, false) => other,
            };
        }
        if unmap {
            for c in [off / CS, (off + len - 1) / CS] {
                let s = (c * CS) as usize;
                if self.clusters[c as usize] == Cluster::Data
                    && self.data[s..s + CS as usize].iter().all(|&b| b == 0)
                {
                    self.clusters[c as usize] = Cluster::Free;
                }
            }
        }
    }
}

#[test]
fn churn_keeps_the_image_small_and_correct() {
    let seed = env_u64("BLKFS_CHURN_SEED").unwrap_or(0x0C4E_57A1_D15C_A4D5);
    let secs = env_u64("BLKFS_CHURN_SECS");
    let ops = env_u64("BLKFS_CHURN_OPS").unwrap_or(if secs.is_some() { u64::MAX } else { 1500 });
    let deadline = secs.map(|s| Instant::now() + Duration::from_secs(s));

    let dir = TestDir::new("churn");
    let img = qcow2_image(&dir, "churn.qcow2", "", "256M");
    let spec = json!({"driver": "qcow2", "id": "d0", "discard": "unmap",
                      "file": {"driver": "file", "filename": img}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .unwrap();
    let mut m = Model {
        data: vec![0; SIZE as usize],
        clusters: vec![Cluster::Free; (SIZE / CS) as usize],
    };
    let mut rng = Rng(seed | 1);
    let start = Instant::now();
    let (mut done, mut peak_file, mut peak_rss) = (0u64, 0u64, 0u64);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    while done < ops && deadline.is_none_or(|t| Instant::now() < t) {
        // Sector-aligned ranges of up to 2 MiB, mostly cluster-sized pieces.
        let len = match rng.below(4) {
            0 => (1 + rng.below(8)) * 512,
            1 => (1 + rng.below(32)) * CS,
            _ => (1 + rng.below(4096)) * 512,
        };
        let off = rng.below((SIZE - len) / 512 + 1) * 512;
        match rng.below(10) {
            0..=4 => {
                let data = pattern(rng.next(), len as usize);
                f.write_all_at(&data, off).unwrap();
                m.data[off as usize..(off + len) as usize].copy_from_slice(&data);
                for c in off / CS..=(off + len - 1) / CS {
                    m.clusters[c as usize] = Cluster::Data;
                }
            }
            5..=6 => {
                fallocate(&f, punch, off, len).unwrap();
                m.zero(off, len, true);
            }
            7..=8 => {
                fallocate(
                    &f,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    off,
                    len,
                )
                .unwrap();
                m.zero(off, len, false);
            }
            _ => {
                let mut got = vec![0u8; len as usize];
                f.read_exact_at(&mut got, off).unwrap();
                assert!(
                    got == m.data[off as usize..(off + len) as usize],
                    "op {done}: read {off}+{len} differs from the model"
                );
            }
        }
        done += 1;
        if done.is_multiple_of(256) {
            peak_file = peak_file.max(std::fs::metadata(&img).unwrap().blocks() * 512);
            peak_rss = peak_rss.max(rss_kib(d.pid()));
        }
    }
    f.sync_all().unwrap();
    let elapsed = start.elapsed();
    // Every byte as the model says.
    let mut got = vec![0u8; 4 << 20];
    for at in (0..SIZE).step_by(got.len()) {
        f.read_exact_at(&mut got, at).unwrap();
        assert!(
            got == m.data[at as usize..at as usize + got.len()],
            "content at {at}.. differs from the model after {done} ops"
        );
    }
    let rss = rss_kib(d.pid());
    drop(f);
    d.terminate();
    let meta = std::fs::metadata(&img).unwrap();
    let (file, file_len) = (meta.blocks() * 512, meta.len());
    let guest = m.clusters.iter().filter(|&&c| c != Cluster::Free).count() as u64 * CS;
    // Header, refcount table, refcount block, L1 table, L2 table.
    let fixed = 5 * CS;
    eprintln!(
        "churn: seed {seed:#x}, {done} ops in {:.1} s ({:.0} ops/s); image file {} KiB \
         (peak {} KiB, length {} KiB), guest allocated {} KiB, ratio {:.3}; daemon VmRSS {rss} KiB (peak {} KiB)",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64(),
        file >> 10,
        peak_file >> 10,
        file_len >> 10,
        guest >> 10,
        file as f64 / guest.max(1) as f64,
        peak_rss.max(rss)
    );
    let check = qemu_img_check(&img);
    assert_eq!(check["check-errors"], 0, "{check}");
    assert!(check.get("corruptions").is_none_or(|c| c == 0), "{check}");
    assert!(check.get("leaks").is_none_or(|c| c == 0), "{check}");
    assert_eq!(
        check.get("allocated-clusters").cloned().unwrap_or(json!(0)),
        guest / CS,
        "allocated clusters: {check}"
    );
    // Freed clusters are reused: the file never outgrows the guest disk.
    assert!(
        file_len <= SIZE + fixed + (1 << 20),
        "image file length {file_len} for a {SIZE}-byte disk"
    );
    assert!(
        file <= guest + guest / 4 + fixed,
        "image file {file} bytes for {guest} bytes allocated by the guest"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Killed with SIGKILL in the middle of a write/punch churn (so in the
/// middle of releases, discards and reuses), again and again: `qemu-img
/// check` may find leaked clusters, never corruption, and what was
/// acknowledged by the last fsync before the kill is in the image.
#[test]
fn kill_9_during_churn_never_corrupts() {
    let dir = TestDir::new("churn-kill");
    let img = qcow2_image(&dir, "k.qcow2", "cluster_size=4096", "32M");
    let spec = json!({"driver": "qcow2", "id": "d0", "discard": "unmap",
                      "file": {"driver": "file", "filename": img}})
    .to_string();
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let mut rng = Rng(0x6B11_1900_DEAD_BEEF);
    for round in 0..6u64 {
        let d = Daemon::start(&dir, std::slice::from_ref(&spec));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.dev("d0"))
            .unwrap();
        // A durable marker: written and fsynced before the churn starts.
        let marker = vec![0x40 + round as u8; 8192];
        f.write_all_at(&marker, (31 << 20) - 8192 * (round + 1))
            .unwrap();
        f.sync_all().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let seed = rng.next();
        let churn = std::thread::spawn(move || {
            let mut r = Rng(seed | 1);
            for i in 0u64.. {
                let len = (1 + r.below(64)) * 2048;
                let off = r.below((30 << 20) / 2048 - 64) * 2048;
                let res = if r.below(2) == 0 {
                    f.write_all_at(&pattern(r.next(), len as usize), off)
                        .map_err(|_| ())
                } else {
                    fallocate(&f, punch, off, len).map_err(|_| ())
                };
                if res.is_err() {
                    return;
                }
                if i == 200 + round * 50 {
                    let _ = tx.send(());
                }
            }
        });
        // Kill once the churn is well under way (it keeps going meanwhile).
        rx.recv().unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
        drop(d);
        let _ = churn.join();
        let v = qemu_img_check(&img);
        assert_eq!(v["check-errors"], 0, "round {round}: {v}");
        assert!(
            v.get("corruptions").is_none_or(|c| c == 0),
            "round {round}: corruption after kill -9: {v}"
        );
        // Fails the test on a pattern mismatch.
        qemu_io_ro(
            "qcow2",
            img.as_ref(),
            &[&format!(
                "read -P {} {} 8192",
                marker[0],
                (31 << 20) - 8192 * (round + 1)
            )],
        );
    }
    // Only leaks, which repair fixes.
    qemu_img(&["check", "-q", "-r", "leaks", &img]);
    let v = qemu_img_check(&img);
    assert!(v.get("leaks").is_none_or(|c| c == 0), "{v}");
}
