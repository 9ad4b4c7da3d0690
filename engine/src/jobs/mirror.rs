//! `drive-mirror`, and the active-layer `block-commit` (a mirror into the
//! base, as in QEMU): copies the device to a target while a dirty bitmap
//! records the guest's writes; once in sync it sends BLOCK_JOB_READY and
//! keeps copying until `block-job-complete` switches the device to the
//! target, or a cancel leaves both equal and the device on its source.
//!
//! The last dirty chunks are copied with the device quiesced, so the switch
//! (or the cancel after READY) leaves nothing behind.

use super::bitmap::Bitmap;
use super::copy::{copy, Source, Window};
use super::{allocated_above, Ending, Failures, Job};
use crate::device::WriteHook;
use crate::drivers::{wait, Done};
use crate::error::{Error, Result};
use crate::graph::{Graph, Node};
use crate::options::OnError;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Most copies in flight. QEMU's MAX_IN_FLIGHT is 16; into a new qcow2 with
/// cache.direct=on each copy waits for its clusters' allocation, and 32
/// measured faster (0.90x qsd -> 1.01-1.08x, interleaved runs).
const MAX_OPS: usize = 32;
/// Largest single copy.
const MAX_COPY: u64 = 1 << 20;
/// Data in flight without `buf-size`: enough for every copy to be in
/// flight at full size (QEMU 2.1 allowed 10 MiB).
pub const DEFAULT_BUF_SIZE: u64 = MAX_OPS as u64 * MAX_COPY;

/// What the first pass copies.
pub enum Scan {
    /// What the chain shows above this node (None: the whole chain).
    Above(Option<Arc<Node>>),
    /// Nothing (`sync=none`): only the guest's new writes.
    Nothing,
}

/// What the device runs on once the job completes.
pub enum Switch {
    /// `drive-mirror`: the target (its backing chain attached when it opened).
    Target,
    /// Active commit: the base (the target), with the layers above it dropped.
    Base,
}

pub struct Mirror {
    pub graph: Arc<Graph>,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub scan: Scan,
    /// The target reads as zeroes where nothing was copied (a new image):
    /// zeroes need no copy in the first pass.
    pub zero_init: bool,
    pub granularity: u64,
    pub buf_size: u64,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// Also what becomes of the target when the job ends without switching:
    /// a mirror's is closed, a commit's base is read-only again.
    pub switch: Switch,
    /// `replaces` naming a child of the source (a quorum's broken copy):
    /// the target takes that child's place instead of the device's root.
    pub replaces: Option<Arc<Node>>,
    /// Filled by the device's write hook.
    pub dirty: Arc<Dirty>,
}

/// The guest's writes since the copy of a chunk began.
pub struct Dirty(Mutex<Bitmap>);

impl Dirty {
    /// A clean bitmap of `size` bytes in chunks of `granularity`.
    pub fn new(size: u64, granularity: u64) -> Arc<Dirty> {
        Arc::new(Dirty(Mutex::new(Bitmap::new(size, granularity))))
    }
}

impl WriteHook for Dirty {
    fn before(&self, _offset: u64, _len: u64, go: Done<()>) {
        go(Ok(()))
    }

    fn after(&self, offset: u64, len: u64) {
        self.0.lock().set_range(offset, len, true)
    }
}

enum Exit {
    Complete,
    Cancelled,
    /// Cancelled after READY: source and target are left equal.
    CancelledInSync,
}

impl Mirror {
    /// What guest writes go through while the job runs.
    pub fn hook(&self) -> Arc<dyn WriteHook> {
        self.dirty.clone()
    }

    pub fn run(self, job: &Arc<Job>) -> Ending {
        // No guest writes the target until the switch, which flushes it first.
        self.target.driver.defer_metadata(true);
        let dirty = self.dirty.clone();
        let ending = self
            .scan(job, &dirty)
            .and_then(|()| self.copy_loop(job, &dirty));
        let mut switched = false;
        let ending = match ending {
            Ok(Exit::Complete) => self.switch_over(job, &dirty).map(|()| {
                switched = true;
                Ending::Completed
            }),
            Ok(Exit::CancelledInSync) => job
                .device
                .quiesced(|| self.last_copies(&dirty))
                .map(|()| Ending::Completed),
            Ok(Exit::Cancelled) => Ok(Ending::Cancelled),
            Err(e) => Err(e),
        };
        if !switched {
            match self.switch {
                Switch::Target => self.graph.forget_chain(Some(self.target.clone()), None),
                // The base was reopened read-write for the commit.
                Switch::Base => {
                    if let Err(e) = self.graph.reopen(&self.target, true, &job.device) {
                        log::warn!("commit on '{}': base stays read-write: {e}", job.device.id);
                    }
                }
            }
        }
        ending.unwrap_or_else(Ending::Failed)
    }

    /// Marks what the first pass copies.
    fn scan(&self, job: &Job, dirty: &Dirty) -> Result<()> {
        let Scan::Above(base) = &self.scan else {
            return Ok(());
        };
        let len = self.source.size();
        let mut pos = 0;
        // A cancel stops the scan too (the copy loop then ends the job).
        while pos < len && job.pause_point() {
            let want = (len - pos).min(1 << 30);
            let (above, n) = allocated_above(Some(self.source.clone()), base.as_ref(), pos, want)?;
            match above {
                Some(zero) if !(zero && self.zero_init) => dirty.0.lock().set_range(pos, n, true),
                None if !self.zero_init && base.is_none() => dirty.0.lock().set_range(pos, n, true),
                _ => {}
            }
            pos += n.max(1);
        }
        Ok(())
    }

    /// Takes the next run of dirty chunks from `cursor` on (wrapping),
    /// clearing them: (offset, length).
    fn take_dirty(&self, dirty: &Dirty, cursor: u64) -> Option<(u64, u64)> {
        let mut map = dirty.0.lock();
        let g = map.granularity();
        let first = map.next_set(cursor / g).or_else(|| map.next_set(0))?;
        let max = (MAX_COPY.min(self.buf_size) / g).max(1);
        let mut n = 0;
        while n < max && map.get(first + n) {
            map.set(first + n, false);
            n += 1;
        }
        let offset = first * g;
        let len = (n * g).min(self.source.size() - offset);
        Some((offset, len))
    }

    fn copy_loop(&self, job: &Arc<Job>, dirty: &Dirty) -> Result<Exit> {
        let src = Source::Node(self.source.clone());
        let policy = (self.on_source_error, self.on_target_error);
        let mut window: Window<u64> = Window::new(MAX_OPS, self.buf_size);
        let mut f = Failures::default();
        let mut copied = 0u64;
        let mut cursor = 0;
        // Ranges being copied. A chunk dirtied again while its copy is in
        // flight is copied again only after it: two copies of one range in
        // flight could land out of order, the older data last.
        let mut busy: Vec<(u64, u64)> = Vec::new();
        let settle = |done: Vec<(u64, u64, super::copy::CopyResult)>,
                      f: &mut Failures,
                      copied: &mut u64,
                      busy: &mut Vec<(u64, u64)>| {
            for (at, n, r) in done {
                busy.retain(|b| *b != (at, n));
                if r.is_ok() {
                    *copied += n;
                } else {
                    // Copied again later, whatever the policy says now.
                    dirty.0.lock().set_range(at, n, true);
                }
                f.settle(job, policy, at, r);
            }
            f.retry_from = None;
        };
        let exit = loop {
            settle(window.finished(), &mut f, &mut copied, &mut busy);
            if let Some(e) = f.failed.take() {
                settle(window.drain(), &mut f, &mut copied, &mut busy);
                return Err(e);
            }
            let pending = dirty.0.lock().count() * self.granularity;
            job.set_len(copied + pending + window.bytes());
            job.set_offset(copied);
            if !job.pause_point() {
                break if job.is_ready() {
                    Exit::CancelledInSync
                } else {
                    Exit::Cancelled
                };
            }
            // What is still dirty is copied with the device quiesced: a
            // guest that keeps writing cannot hold the switch off.
            if job.completion_requested() {
                break Exit::Complete;
            }
            match self.take_dirty(dirty, cursor) {
                Some((at, n)) => {
                    if !job.throttle(n) {
                        dirty.0.lock().set_range(at, n, true);
                        continue;
                    }
                    settle(window.room(n), &mut f, &mut copied, &mut busy);
                    if busy.iter().any(|&(b, m)| b < at + n && at < b + m) {
                        settle(window.drain(), &mut f, &mut copied, &mut busy);
                    }
                    let target = self.target.clone();
                    window.start(at, n, |done| copy(&src, &target, at, n, done));
                    busy.push((at, n));
                    cursor = at + n;
                }
                None if window.in_flight() > 0 => {
                    settle(window.drain(), &mut f, &mut copied, &mut busy)
                }
                None => {
                    if !job.is_ready() {
                        // In sync: on disk before the job says so (QEMU 2.1).
                        if let Err(err) = wait(|d| self.target.flush(d)) {
                            let r = Err(super::copy::CopyError { read: false, err });
                            f.settle(job, policy, 0, r);
                            f.retry_from = None;
                            continue;
                        }
                        job.set_ready();
                    }
                    job.sleep(Duration::from_millis(10));
                }
            }
        };
        settle(window.drain(), &mut f, &mut copied, &mut busy);
        job.set_offset(copied);
        Ok(exit)
    }

    /// With the device quiesced: copies what is still dirty and flushes
    /// the target, so it equals the source.
    fn last_copies(&self, dirty: &Dirty) -> Result<()> {
        let src = Source::Node(self.source.clone());
        let mut window: Window<u64> = Window::new(MAX_OPS, self.buf_size);
        while let Some((at, n)) = self.take_dirty(dirty, 0) {
            let target = self.target.clone();
            window.start(at, n, |done| copy(&src, &target, at, n, done));
            for (_, _, r) in window.room(0) {
                r.map_err(|e| e.err)?;
            }
        }
        for (_, _, r) in window.drain() {
            r.map_err(|e| e.err)?;
        }
        wait(|d| self.target.flush(d))
    }

    /// The device moves onto the target with nothing left to copy.
    fn switch_over(&self, job: &Job, dirty: &Dirty) -> Result<()> {
        job.device.quiesced(|| {
            self.last_copies(dirty)?;
            // Flushed: every change is on disk; guests commit their own from now.
            self.target.driver.defer_metadata(false);
            match &self.replaces {
                Some(child) => self
                    .source
                    .driver
                    .replace_child(child, self.target.clone())?,
                None => job.device.replace_root(self.target.clone()),
            }
            Ok(())
        })?;
        match (&self.switch, &self.replaces) {
            (_, Some(child)) => self.graph.forget_chain(Some(child.clone()), None),
            (Switch::Base, None) => self
                .graph
                .forget_chain(Some(self.source.clone()), Some(&self.target)),
            (Switch::Target, None) => self.graph.forget_chain(Some(self.source.clone()), None),
        }
        Ok(())
    }
}

/// `granularity` as QEMU 2.1 checks it, or the default for `target`:
/// its cluster size within 4 KiB..64 KiB.
pub fn granularity(arg: Option<u64>, target_cluster: Option<u64>) -> Result<u64> {
    match arg {
        None | Some(0) => Ok(target_cluster.unwrap_or(65536).clamp(4096, 65536)),
        Some(g) if !(512..=64 << 20).contains(&g) => Err(Error::generic(
            "Parameter 'granularity' expects a value in range [512B, 64MB]",
        )),
        Some(g) if !g.is_power_of_two() => {
            Err(Error::generic("Parameter 'granularity' expects power of 2"))
        }
        Some(g) => Ok(g),
    }
}
