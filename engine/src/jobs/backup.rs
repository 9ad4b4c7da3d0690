//! `drive-backup`: a point-in-time copy of the device. The job copies
//! every cluster the sync mode names; a guest write to a cluster not
//! copied yet first copies its old data to the target (copy-before-write),
//! so the target holds the device as it was when the job started.
//!
//! A cluster is copied once: whoever copies it (the job or a guest write)
//! holds it busy; others wait for it, then find it done.

use super::bitmap::Bitmap;
use super::copy::{copy, CopyDone, CopyResult, Source, Window};
use super::{allocated_above, Ending, Failures, Job};
use crate::device::WriteHook;
use crate::drivers::Done;
use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::options::OnError;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

/// QEMU's backup cluster size (at least the target's cluster size).
pub const CLUSTER: u64 = 64 << 10;
/// Copies in flight: into a new qcow2 with cache.direct=on each waits for
/// its clusters' allocation, and 32 measured faster than 16 (QEMU's
/// block-copy allows 64).
const MAX_OPS: usize = 32;
/// Largest single copy of the job.
const MAX_COPY: u64 = 1 << 20;

/// What the job copies besides the clusters the guest overwrites.
pub enum Sync {
    /// What the chain shows above this node (None: all of it).
    Above(Option<Arc<Node>>),
    Nothing,
}

pub struct Backup {
    pub graph: Arc<Graph>,
    pub source: Arc<Node>,
    pub target: Arc<Node>,
    pub sync: Sync,
    /// The target reads as zeroes where nothing was copied.
    pub zero_init: bool,
    pub cluster: u64,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// Shared with the device's write hook (copy-before-write).
    pub cbw: Arc<Cbw>,
}

type Waiter = Box<dyn FnOnce() + Send>;

struct State {
    done: Bitmap,
    busy: HashMap<u64, Vec<Waiter>>,
}

/// The clusters copied so far, and those being copied.
pub struct Cbw {
    source: Arc<Node>,
    target: Arc<Node>,
    cluster: u64,
    state: Mutex<State>,
}

enum Claim {
    /// These clusters (a run, maybe empty) are now ours to copy.
    Go(std::ops::Range<u64>),
    /// Another copy holds this cluster.
    Busy(u64),
}

impl Cbw {
    pub fn new(source: Arc<Node>, target: Arc<Node>, cluster: u64) -> Arc<Cbw> {
        let done = Bitmap::new(source.size(), cluster);
        Arc::new(Cbw {
            source,
            target,
            cluster,
            state: Mutex::new(State {
                done,
                busy: HashMap::new(),
            }),
        })
    }

    /// Claims the first run of clusters of `offset..offset+len` not copied yet.
    fn claim(&self, offset: u64, len: u64) -> Claim {
        let mut s = self.state.lock();
        let range = s.done.chunk_range(offset, len);
        let Some(first) = range.clone().find(|c| !s.done.get(*c)) else {
            return Claim::Go(0..0);
        };
        let end = (first..range.end)
            .find(|c| s.done.get(*c))
            .unwrap_or(range.end);
        if let Some(c) = (first..end).find(|c| s.busy.contains_key(c)) {
            return Claim::Busy(c);
        }
        for c in first..end {
            s.busy.insert(c, Vec::new());
        }
        Claim::Go(first..end)
    }

    /// Runs `waiter` once cluster `c` is released; hands it back when `c`
    /// is no longer busy (claim again at once).
    fn wait_on(&self, c: u64, waiter: Waiter) -> Option<Waiter> {
        match self.state.lock().busy.get_mut(&c) {
            Some(w) => {
                w.push(waiter);
                None
            }
            None => Some(waiter),
        }
    }

    /// The run is copied (or failed): done on success; its waiters go.
    fn release(&self, run: std::ops::Range<u64>, ok: bool) {
        let waiters: Vec<Waiter> = {
            let mut s = self.state.lock();
            let mut w = Vec::new();
            for c in run {
                if ok {
                    s.done.set(c, true);
                }
                w.extend(s.busy.remove(&c).unwrap_or_default());
            }
            w
        };
        for w in waiters {
            w()
        }
    }

    /// Copies a claimed run to the target, then releases it.
    fn copy_run(self: &Arc<Self>, run: std::ops::Range<u64>, done: CopyDone) {
        let offset = run.start * self.cluster;
        let len = (run.end * self.cluster).min(self.source.size()) - offset;
        let me = self.clone();
        copy(
            &Source::Node(self.source.clone()),
            &self.target,
            offset,
            len,
            Box::new(move |r: CopyResult| {
                me.release(run, r.is_ok());
                done(r)
            }),
        );
    }

    /// Copy-before-write for a guest write: copies every cluster of the
    /// range not copied yet, then lets the write go.
    fn before_write(self: Arc<Self>, offset: u64, len: u64, go: Done<()>) {
        match self.claim(offset, len) {
            // Every cluster is copied: its metadata must be on disk too
            // (the job's own copies defer it) before the write goes on.
            Claim::Go(run) if run.is_empty() => self.target.driver.commit_metadata(go),
            Claim::Go(run) => {
                let me = self.clone();
                self.copy_run(
                    run,
                    Box::new(move |r| match r {
                        // More runs of the range may be left.
                        Ok(()) => me.before_write(offset, len, go),
                        Err(e) => go(Err(e.err)),
                    }),
                )
            }
            Claim::Busy(c) => {
                let me = self.clone();
                let retry: Waiter = Box::new(move || me.before_write(offset, len, go));
                if let Some(retry) = self.wait_on(c, retry) {
                    retry()
                }
            }
        }
    }
}

struct Hook(Arc<Cbw>);

impl WriteHook for Hook {
    fn before(&self, offset: u64, len: u64, go: Done<()>) {
        self.0.clone().before_write(offset, len, go)
    }

    fn after(&self, _offset: u64, _len: u64) {}
}

impl Backup {
    /// What guest writes go through while the job runs.
    pub fn hook(&self) -> Arc<dyn WriteHook> {
        Arc::new(Hook(self.cbw.clone()))
    }

    pub fn run(self, job: &Arc<Job>) -> Ending {
        job.set_len(self.source.size());
        // The job's own copies write the target's metadata in batches; a
        // copy-before-write commits it before its guest write goes on, and
        // the job's end writes the rest (the image stays consistent in
        // between, as a mirror target does).
        self.target.driver.defer_metadata(true);
        let ending = self.copy_all(job, &self.cbw);
        // No copy-before-write may reach the target once it is closed.
        if let Err(e) = job.device.set_write_hook(None) {
            log::error!("backup on '{}': {e}", job.device.id);
        }
        self.target.driver.defer_metadata(false);
        // Flushed on every ending, so a failed or cancelled backup's target
        // is left consistent too.
        let flushed = crate::drivers::wait(|d| self.target.flush(d));
        let ending = ending.and_then(|done| flushed.map(|()| done));
        self.graph.forget_chain(Some(self.target.clone()), None);
        match ending {
            Ok(true) => Ending::Completed,
            Ok(false) => Ending::Cancelled,
            Err(e) => Ending::Failed(e),
        }
    }

    /// Whether the job itself copies `offset..`, and for how many bytes.
    fn wanted(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let Sync::Above(base) = &self.sync else {
            return Ok((false, len));
        };
        let (above, n) = allocated_above(Some(self.source.clone()), base.as_ref(), offset, len)?;
        Ok(match above {
            Some(zero) => (!(zero && self.zero_init), n),
            // Unallocated in the whole chain reads as zeroes.
            None => (base.is_none() && !self.zero_init, n),
        })
    }

    /// Ok(false) when cancelled.
    fn copy_all(&self, job: &Arc<Job>, cbw: &Arc<Cbw>) -> Result<bool> {
        if let Sync::Nothing = self.sync {
            // Only the guest's writes copy: the job lasts until cancelled (QEMU 2.1).
            while job.pause_point() && job.sleep(std::time::Duration::from_secs(1)) {}
            return Ok(false);
        }
        let size = self.source.size();
        let cs = self.cluster;
        let policy = (self.on_source_error, self.on_target_error);
        let mut window: Window<u64> = Window::new(MAX_OPS, MAX_OPS as u64 * MAX_COPY);
        let mut f = Failures::default();
        let mut pos = 0;
        let mut cancelled = false;
        while pos < size && f.failed.is_none() {
            if !f.step(job, &mut window, policy, &mut pos) {
                cancelled = true;
                break;
            }
            let (wanted, n) = match self.wanted(pos, MAX_COPY.min(size - pos)) {
                Ok(w) => w,
                Err(e) => {
                    f.fail(e);
                    break;
                }
            };
            if !wanted {
                // Only that extent: the rest of its cluster may hold data
                // (the claim below takes the whole cluster).
                pos += n.max(1);
                continue;
            }
            // Whole clusters: a partial one is copied with its run.
            let end = (pos + n.max(1)).next_multiple_of(cs).min(size);
            if !job.throttle(end - pos) {
                cancelled = true;
                break;
            }
            match cbw.claim(pos, end - pos) {
                Claim::Busy(c) => {
                    // A guest write is copying it: wait, then look again.
                    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
                    let wake: Waiter = Box::new(move || _ = tx.send(()));
                    if cbw.wait_on(c, wake).is_none() {
                        let _ = rx.recv();
                    }
                }
                Claim::Go(run) if run.is_empty() => pos = end,
                Claim::Go(run) => {
                    let next = (run.end * cs).min(size);
                    for (at, _, r) in window.room(next - run.start * cs) {
                        f.settle(job, policy, at, r);
                    }
                    let at = run.start * cs;
                    window.start(at, next - at, |done| cbw.copy_run(run, done));
                    pos = next;
                }
            }
        }
        for (at, _, r) in window.drain() {
            f.settle(job, policy, at, r);
        }
        // An ignored error went on, but the target lacks those clusters.
        if let Some(e) = f.failed.or(f.ignored) {
            return Err(e);
        }
        if cancelled {
            return Ok(false);
        }
        if f.retry_from.is_some() {
            // A stop in the last copies: go over it again (what is done is skipped).
            return self.copy_all(job, cbw);
        }
        job.set_offset(size);
        Ok(true)
    }
}
