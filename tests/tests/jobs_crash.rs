//! Crash safety of the block jobs: the daemon is killed with SIGKILL at a
//! seeded moment while a speed-limited job runs and a guest writes through
//! the mount. Afterwards `qemu-img check` finds no corruption in any image
//! (leaks are allowed), the top's guest-visible content holds every write
//! acknowledged by fsync (unacknowledged ones are old or new, sector by
//! sector), and each image the job writes holds only data it may hold:
//! a base under commit is its old content or the content committed into
//! it, a mirror or backup target is unwritten (zeroes) or a copy of what
//! the source had.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const M: u64 = 1 << 20;
const SIZE: u64 = 32 * M;
/// The guest writes during the job land in [SCRATCH, SIZE), each block once.
const SCRATCH: u64 = 28 * M;
const WBLOCK: u64 = 32 << 10;
const WBLOCKS: u64 = (SIZE - SCRATCH) / WBLOCK;
const SECTOR: usize = 4096;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Job {
    Stream,
    Mirror,
    Backup,
    Commit,
    ActiveCommit,
    /// Mirror and backup with sync=top: the target is backed by the base.
    MirrorTop,
    BackupTop,
    /// Backup with sync=none: only copy-before-write, the target backed by
    /// the source; it runs until cancelled.
    BackupNone,
}

impl Job {
    fn has_target(self) -> bool {
        !matches!(self, Job::Stream | Job::Commit | Job::ActiveCommit)
    }

    fn is_mirror(self) -> bool {
        matches!(self, Job::Mirror | Job::MirrorTop)
    }
}

#[derive(Clone, Copy, Debug)]
enum Kill {
    /// When the job's offset reaches this many thousandths of its length.
    Progress(u64),
    /// A while after BLOCK_JOB_READY (mirror, active commit).
    Ready,
    /// Right after sending block-job-complete, without waiting for its reply.
    Completing,
    /// As soon as the offset reaches the length: the job is finishing
    /// (stream and commit rewrite a backing string then), or has just ended.
    AtEnd,
    /// This many milliseconds after the job started (a sync=none backup
    /// has no progress to wait for).
    After(u64),
}

struct Images {
    base: String,
    mid: Option<String>,
    top: String,
    target: Option<String>,
}

fn build(dir: &TestDir, job: Job) -> Images {
    let base = qcow2_image(dir, "base.qcow2", "", "32M");
    qemu_io(
        "qcow2",
        base.as_ref(),
        &[
            "write -P 0x11 0 12M",
            "write -P 0x12 16M 4M",
            "write -P 0x13 26M 4M",
        ],
    );
    let with_mid = matches!(job, Job::Stream | Job::Commit);
    let mid = with_mid.then(|| {
        let mid = qcow2_overlay(dir, "mid.qcow2", &base, "qcow2");
        qemu_io(
            "qcow2",
            mid.as_ref(),
            &[
                "write -P 0x33 2M 4M",
                "write -z 10M 1M",
                "write -P 0x34 18M 2M",
                "write -P 0x35 27M 2M",
            ],
        );
        mid
    });
    let below = mid.as_deref().unwrap_or(&base);
    let top = qcow2_overlay(dir, "top.qcow2", below, "qcow2");
    let top_data: &[&str] = if job == Job::ActiveCommit {
        // The active layer holds most of the data: that is what is committed.
        &[
            "write -P 0x44 1M 9M",
            "write -P 0x45 14M 6M",
            "write -P 0x46 28M 1M",
        ]
    } else {
        &[
            "write -P 0x44 4M 2M",
            "write -P 0x45 20M 2M",
            "write -P 0x46 29M 512k",
        ]
    };
    qemu_io("qcow2", top.as_ref(), top_data);
    let target = job.has_target().then(|| dir.file("target.qcow2"));
    Images {
        base,
        mid,
        top,
        target,
    }
}

/// The QMP command starting `job` on device d0 at `speed` bytes/s.
fn start_cmd(job: Job, im: &Images, speed: u64) -> (&'static str, Value) {
    match job {
        Job::Stream => ("block-stream", json!({"device": "d0", "speed": speed})),
        Job::Mirror | Job::MirrorTop | Job::Backup | Job::BackupTop | Job::BackupNone => {
            let sync = match job {
                Job::Mirror | Job::Backup => "full",
                Job::BackupNone => "none",
                _ => "top",
            };
            let cmd = if job.is_mirror() {
                "drive-mirror"
            } else {
                "drive-backup"
            };
            (
                cmd,
                json!({"device": "d0", "target": im.target, "format": "qcow2",
                       "sync": sync, "speed": speed}),
            )
        }
        Job::Commit => (
            "block-commit",
            json!({"device": "d0", "top": im.mid, "base": im.base, "speed": speed}),
        ),
        Job::ActiveCommit => (
            "block-commit",
            json!({"device": "d0", "base": im.base, "speed": speed}),
        ),
    }
}

fn read_raw(dir: &TestDir, img: &str, name: &str) -> Vec<u8> {
    let raw = snapshot_raw(dir, img, "qcow2", name);
    let v = std::fs::read(&raw).expect("read converted image");
    assert_eq!(v.len() as u64, SIZE, "{img}: guest size");
    v
}

/// Every 4 KiB sector of `got` equals the same sector of one of `allowed`.
/// `known` are other references a bad sector is compared with, to name it.
fn assert_sectors_among(
    what: &str,
    got: &[u8],
    allowed: &[(&str, &[u8])],
    known: &[(&str, &[u8])],
) {
    let bad: Vec<usize> = got
        .chunks(SECTOR)
        .enumerate()
        .filter(|(i, s)| {
            let r = i * SECTOR..(i + 1) * SECTOR;
            !allowed.iter().any(|(_, a)| a[r.clone()] == **s)
        })
        .map(|(i, _)| i * SECTOR)
        .collect();
    if let Some(&at) = bad.first() {
        let r = at..at + SECTOR;
        let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
        let like: Vec<&str> = known
            .iter()
            .filter(|(_, k)| k[r.clone()] == got[r.clone()])
            .map(|(n, _)| *n)
            .collect();
        panic!(
            "{what}: {} sectors are none of {names:?}; the first, at {at:#x} \
             (first byte {:#04x}), equals {like:?}",
            bad.len(),
            got[at],
        );
    }
}

fn assert_no_corruption(img: &str, ctx: &str) {
    let c = qemu_img_check(img);
    assert!(
        c.get("check-errors").is_none_or(|e| e == 0),
        "{ctx}: {img}: {c}"
    );
    assert!(
        c.get("corruptions").is_none_or(|e| e == 0),
        "{ctx}: corruption in {img} after kill -9: {c}"
    );
}

fn block_data(seed: u64, i: u64) -> Vec<u8> {
    pattern(seed * 1000 + i + 1, WBLOCK as usize)
}

/// The guest: writes scratch blocks in order, each once, fsyncs every 4;
/// `attempted` counts blocks whose write began, `acked` blocks covered by an
/// fsync that returned. Ends at the first error (the daemon died) or on stop.
fn spawn_writer(
    f: File,
    seed: u64,
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for i in 0..WBLOCKS {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            attempted.store(i + 1, Ordering::SeqCst);
            if f.write_all_at(&block_data(seed, i), SCRATCH + i * WBLOCK)
                .is_err()
            {
                return;
            }
            if i % 4 == 3 {
                if f.sync_all().is_err() {
                    return;
                }
                acked.store(i + 1, Ordering::SeqCst);
            }
            // Pacing, so the writes spread over the job's run.
            std::thread::sleep(Duration::from_millis(12));
        }
    })
}

fn with_blocks(img: &[u8], seed: u64, n: u64) -> Vec<u8> {
    let mut v = img.to_vec();
    for i in 0..n {
        let off = (SCRATCH + i * WBLOCK) as usize;
        v[off..off + WBLOCK as usize].copy_from_slice(&block_data(seed, i));
    }
    v
}

/// The job on d0 in query-block-jobs: (offset, len), None when there is none.
fn job_progress(q: &mut Qmp) -> Option<(u64, u64)> {
    let jobs = q.ok("query-block-jobs", json!({}));
    let j = jobs.as_array()?.iter().find(|j| j["device"] == "d0")?;
    Some((j["offset"].as_u64()?, j["len"].as_u64()?))
}

/// What one iteration saw at the kill.
struct Outcome {
    job_listed: bool,
    acked: u64,
}

fn one_round(job: Job, seed: u64, kill: Kill, speed: u64) -> Outcome {
    let ctx = format!("{job:?} seed {seed} kill {kill:?}");
    let dir = TestDir::new(&format!("jobs-crash-{job:?}-{seed}"));
    let im = build(&dir, job);
    let base_before = read_raw(&dir, &im.base, "base-before.raw");
    let mid_before = im.mid.as_ref().map(|m| read_raw(&dir, m, "mid-before.raw"));
    let mut start = read_raw(&dir, &im.top, "top-before.raw");
    let mut rng = Rng(seed);

    let d = Daemon::start(&dir, &[qcow2_spec("d0", &im.top)]);
    let mut q = d.qmp();
    // Writes acknowledged before the job starts: part of the expected view.
    let f = rw(&d, "d0");
    for _ in 0..8 {
        let len = (1 + rng.below(16)) * 4096;
        let off = rng.below(SCRATCH - len) & !4095;
        let data = pattern(rng.next(), len as usize);
        f.write_all_at(&data, off).expect("pre-job write");
        start[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    f.sync_all().expect("pre-job fsync");

    let (cmd, args) = start_cmd(job, &im, speed);
    q.ok(cmd, args);
    let t_job = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let attempted = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let mut writer = Some(spawn_writer(
        f,
        seed,
        stop.clone(),
        attempted.clone(),
        acked.clone(),
    ));

    let job_listed = match kill {
        Kill::Progress(permille) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match job_progress(&mut q) {
                    None => break false,
                    Some((off, len)) if len > 0 && off * 1000 >= permille * len => {
                        eprintln!("{ctx}: kill at offset {off} of {len}");
                        break true;
                    }
                    Some(_) => {}
                }
                assert!(Instant::now() < deadline, "{ctx}: job did not progress");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Kill::After(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            job_progress(&mut q).is_some()
        }
        Kill::AtEnd => loop {
            match job_progress(&mut q) {
                None => break false,
                Some((off, len)) if len > 0 && off >= len => break true,
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        },
        Kill::Ready | Kill::Completing => {
            let ev = q.wait_event_where(Duration::from_secs(30), |e| {
                e["data"]["device"] == "d0"
                    && e["event"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("BLOCK_JOB_") && n != "BLOCK_JOB_ERROR")
            });
            assert_eq!(ev["event"], "BLOCK_JOB_READY", "{ctx}: {ev}");
            let listed = job_progress(&mut q).is_some();
            if matches!(kill, Kill::Ready) {
                std::thread::sleep(Duration::from_millis(rng.below(150)));
            } else {
                // No guest writes after the switch: they would go to the new
                // image only, and the old top would no longer be the reference.
                stop.store(true, Ordering::SeqCst);
                if let Some(w) = writer.take() {
                    w.join().expect("writer thread");
                }
                q.send_raw(
                    b"{\"execute\": \"block-job-complete\", \"arguments\": {\"device\": \"d0\"}}\n",
                );
                std::thread::sleep(Duration::from_micros(rng.below(4000)));
            }
            listed
        }
    };
    let killed_after = t_job.elapsed();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(q);
    drop(d); // reaps it and lazily unmounts
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer.take() {
        w.join().expect("writer thread");
    }
    let acked = acked.load(Ordering::SeqCst);
    let attempted = attempted.load(Ordering::SeqCst);
    eprintln!(
        "{ctx}: killed {killed_after:?} after the job started (job listed: {job_listed}); \
         scratch blocks attempted {attempted}, acked {acked}"
    );
    let ctx = format!("{ctx} (scratch blocks attempted {attempted}, acked {acked})");

    let mut images = vec![im.base.clone(), im.top.clone()];
    images.extend(im.mid.clone());
    if let Some(t) = &im.target {
        assert!(
            std::path::Path::new(t).exists(),
            "{ctx}: the target was not created"
        );
        images.push(t.clone());
    }
    for img in &images {
        assert_no_corruption(img, &ctx);
    }

    let acked_view = with_blocks(&start, seed, acked);
    let attempted_view = with_blocks(&start, seed, attempted);
    let top_after = read_raw(&dir, &im.top, "top-after.raw");
    assert_sectors_among(
        &format!("{ctx}: top"),
        &top_after,
        &[("acked", &acked_view), ("attempted", &attempted_view)],
        &[("base before", &base_before), ("top at start", &start)],
    );
    let base_after = read_raw(&dir, &im.base, "base-after.raw");
    match job {
        Job::Stream
        | Job::Mirror
        | Job::Backup
        | Job::MirrorTop
        | Job::BackupTop
        | Job::BackupNone => {
            assert!(base_after == base_before, "{ctx}: the base changed");
        }
        Job::Commit => {
            let mid_before = mid_before.as_deref().expect("a commit chain has a mid");
            assert_sectors_among(
                &format!("{ctx}: base"),
                &base_after,
                &[("base before", &base_before), ("mid before", mid_before)],
                &[("top with writes", &attempted_view)],
            );
        }
        Job::ActiveCommit => assert_sectors_among(
            &format!("{ctx}: base"),
            &base_after,
            &[
                ("base before", &base_before),
                ("top at start", &start),
                ("top with writes", &attempted_view),
            ],
            &[],
        ),
    }
    if let (Some(mid), Some(before)) = (&im.mid, &mid_before) {
        let mid_after = read_raw(&dir, mid, "mid-after.raw");
        assert!(
            mid_after == *before,
            "{ctx}: the intermediate image changed"
        );
    }
    let zeroes = vec![0u8; SIZE as usize];
    let target_after = im
        .target
        .as_ref()
        .map(|t| read_raw(&dir, t, "target-after.raw"));
    if let Some(target_after) = &target_after {
        // What the target shows where nothing was copied: zeroes (a new
        // image), the base (sync=top: backed by it), the source itself
        // (sync=none).
        let unwritten: (&str, &[u8]) = match job {
            Job::Mirror | Job::Backup => ("zeroes", &zeroes),
            Job::BackupNone => ("source with writes", &attempted_view),
            _ => ("base before", &base_before),
        };
        let mut allowed: Vec<(&str, &[u8])> = vec![unwritten, ("source at start", &start)];
        // A backup copies the point in time of its start; a mirror also
        // copies the guest's later writes.
        if job.is_mirror() {
            allowed.push(("source with writes", &attempted_view));
        }
        assert_sectors_among(
            &format!("{ctx}: target"),
            target_after,
            &allowed,
            &[
                ("source with writes", &attempted_view),
                ("base before", &base_before),
            ],
        );
    }
    // READY means a whole copy, flushed (QEMU flushes the target before the
    // event): after it, the mirror's target (the active commit's base) holds
    // everything the guest had before the job; only the scratch region moves.
    if matches!(kill, Kill::Ready | Kill::Completing) {
        let copy = match job {
            Job::Mirror | Job::MirrorTop => target_after.as_deref(),
            Job::ActiveCommit => Some(&base_after[..]),
            _ => None,
        };
        let copy = copy.expect("only mirror and active commit become READY");
        let s = SCRATCH as usize;
        assert_sectors_among(
            &format!("{ctx}: copy after READY"),
            &copy[..s],
            &[("top at start", &start[..s])],
            &[("zeroes", &zeroes[..s]), ("base before", &base_before[..s])],
        );
    }
    // Copy-before-write: a guest write acknowledged by fsync had its old
    // data in the target first, on disk as much as the write itself.
    if let (Job::BackupNone, Some(target_after)) = (job, &target_after) {
        let acked_end = (SCRATCH + acked * WBLOCK) as usize;
        let s = SCRATCH as usize;
        assert_sectors_among(
            &format!("{ctx}: target under acknowledged writes"),
            &target_after[s..acked_end],
            &[("source at start", &start[s..acked_end])],
            &[("source with writes", &attempted_view[s..acked_end])],
        );
    }
    Outcome { job_listed, acked }
}

fn crash_loop(job: Job, speed: u64, kills: &[Kill]) {
    let mut acked_total = 0;
    for (i, &kill) in kills.iter().enumerate() {
        let seed = (job as u64 + 1) * 100 + i as u64 + 1;
        let out = one_round(job, seed, kill, speed);
        // The kill must have hit a running job (Completing and AtEnd race
        // the job's last steps on purpose).
        if !matches!(kill, Kill::Completing | Kill::AtEnd) {
            assert!(
                out.job_listed,
                "{job:?} seed {seed} {kill:?}: the job had ended before the kill"
            );
        }
        acked_total += out.acked;
    }
    assert!(
        acked_total > 0,
        "{job:?}: no guest write was acknowledged during any job"
    );
}

/// `n` kill points spread over the copy (from a seeded generator), then `then`.
fn kills(seed: u64, n: usize, then: &[Kill]) -> Vec<Kill> {
    let mut rng = Rng(seed);
    let mut v: Vec<Kill> = (0..n)
        .map(|_| Kill::Progress(50 + rng.below(700)))
        .collect();
    v.extend_from_slice(then);
    v
}

#[test]
fn kill_9_during_stream() {
    crash_loop(Job::Stream, 12 * M, &kills(11, 4, &[Kill::AtEnd]));
}

#[test]
fn kill_9_during_mirror() {
    let then = [Kill::Ready, Kill::Completing];
    crash_loop(Job::Mirror, 16 * M, &kills(12, 3, &then));
}

#[test]
fn kill_9_during_backup() {
    crash_loop(Job::Backup, 16 * M, &kills(13, 4, &[Kill::AtEnd]));
}

#[test]
fn kill_9_during_intermediate_commit() {
    crash_loop(Job::Commit, 8 * M, &kills(14, 4, &[Kill::AtEnd]));
}

#[test]
fn kill_9_during_active_commit() {
    let then = [Kill::Ready, Kill::Completing];
    crash_loop(Job::ActiveCommit, 16 * M, &kills(15, 3, &then));
}

#[test]
fn kill_9_during_mirror_sync_top() {
    let then = [Kill::Ready, Kill::Completing];
    crash_loop(Job::MirrorTop, 16 * M, &kills(16, 2, &then));
}

#[test]
fn kill_9_during_backup_sync_top() {
    crash_loop(Job::BackupTop, 16 * M, &kills(17, 3, &[Kill::AtEnd]));
}

#[test]
fn kill_9_during_backup_sync_none() {
    let mut rng = Rng(18);
    let then: Vec<Kill> = (0..4).map(|_| Kill::After(100 + rng.below(400))).collect();
    crash_loop(Job::BackupNone, 16 * M, &kills(0, 0, &then));
}
