//! `block-stream`: copies what the backing chain above `base` shows into
//! the device's top image, then makes `base` the top's backing file.
//!
//! Guest writes keep going to the top; a copy holds its range in a
//! [`RangeLock`] and looks again, under the lock, whether the range is still
//! unallocated in the top, so backing data never lands over a guest write.

use super::copy::{copy, Source, Window};
use super::ranges::RangeLock;
use super::{allocated_above, Ending, Failures, Job};
use crate::device::WriteHook;
use crate::drivers::Done;
use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::options::OnError;
use std::sync::Arc;

/// QEMU's stream buffer: the largest single copy.
const CHUNK: u64 = 512 << 10;
const MAX_OPS: usize = 8;

pub struct Stream {
    pub graph: Arc<Graph>,
    pub top: Arc<Node>,
    pub base: Option<Arc<Node>>,
    /// The backing file name written into the top's header ("" for none).
    pub backing_name: String,
    pub on_error: OnError,
}

struct Hook(Arc<RangeLock>);

impl WriteHook for Hook {
    fn before(&self, offset: u64, len: u64, go: Done<()>) {
        self.0.guest_begin(offset, len, go)
    }

    fn after(&self, offset: u64, len: u64) {
        self.0.guest_end(offset, len)
    }
}

impl Stream {
    pub fn run(self, job: &Arc<Job>) -> Ending {
        let lock = Arc::new(RangeLock::default());
        if let Err(e) = job
            .device
            .set_write_hook(Some(Arc::new(Hook(lock.clone()))))
        {
            return Ending::Failed(e);
        }
        let mut f = Failures::default();
        let mut from = 0;
        let done = loop {
            let done = self.copy_from(job, &lock, from, &mut f);
            match f.retry_from.take() {
                // A stop after the last copy: go again from there once resumed.
                Some(at) if f.failed.is_none() && done => from = at,
                _ => break done,
            }
        };
        lock.release_all();
        if let Err(e) = job.device.set_write_hook(None) {
            log::error!("stream on '{}': {e}", job.device.id);
        }
        if let Some(e) = f.failed.or(f.ignored) {
            return Ending::Failed(e);
        }
        if !done {
            return Ending::Cancelled;
        }
        match self.finish(job) {
            Ok(()) => Ending::Completed,
            Err(e) => Ending::Failed(e),
        }
    }

    /// Copies every range from `pos` on; false when cancelled.
    fn copy_from(
        &self,
        job: &Arc<Job>,
        lock: &Arc<RangeLock>,
        mut pos: u64,
        f: &mut Failures,
    ) -> bool {
        let top = &self.top;
        let len = top.size();
        job.set_len(len);
        let policy = (self.on_error, self.on_error);
        let src = Source::BackingOf(top.clone());
        let mut window: Window<u64> = Window::new(MAX_OPS, MAX_OPS as u64 * CHUNK);
        let mut cancelled = false;
        while pos < len && f.failed.is_none() {
            for (at, _, r) in window.finished() {
                f.settle(job, policy, at, r);
            }
            if let Some(at) = f.retry_from.take() {
                for (at2, _, r) in window.drain() {
                    f.settle(job, policy, at2, r);
                }
                pos = pos.min(f.retry_from.take().map_or(at, |r| r.min(at)));
            }
            job.set_offset(pos);
            if !job.pause_point() {
                cancelled = true;
                break;
            }
            match self.next_copy(job, lock, pos, len) {
                Err(e) => f.fail(e),
                Ok(Next::Cancelled) => {
                    cancelled = true;
                    break;
                }
                Ok(Next::Skip(n)) => pos += n,
                Ok(Next::Again) => {}
                Ok(Next::Copy(n)) => {
                    for (at, _, r) in window.room(n) {
                        f.settle(job, policy, at, r);
                    }
                    let (lk, at) = (lock.clone(), pos);
                    window.start(pos, n, |done| {
                        copy(
                            &src,
                            top,
                            at,
                            n,
                            Box::new(move |r| {
                                lk.job_unlock(at, n);
                                done(r)
                            }),
                        )
                    });
                    pos += n;
                }
            }
        }
        for (at, _, r) in window.drain() {
            f.settle(job, policy, at, r);
        }
        if !cancelled && f.retry_from.is_none() {
            job.set_offset(len);
        }
        !cancelled
    }

    /// What to do at `pos`: a copy is returned with its range locked.
    fn next_copy(&self, job: &Job, lock: &RangeLock, pos: u64, len: u64) -> Result<Next> {
        let top = &self.top;
        let want = CHUNK.min(len - pos);
        let st = top.block_status(pos, want)?;
        if st.allocated {
            return Ok(Next::Skip(st.len));
        }
        let backing = top.driver.backing_child();
        let (above, n) = allocated_above(backing, self.base.as_ref(), pos, st.len.min(want))?;
        if above.is_none() {
            return Ok(Next::Skip(n));
        }
        if !job.throttle(n) || !lock.job_lock(pos, n, || job.is_cancelled()) {
            return Ok(Next::Cancelled);
        }
        // A guest write may have allocated part of the range meanwhile.
        let now = top.block_status(pos, n);
        if !matches!(now, Ok(s) if !s.allocated && s.len >= n) {
            lock.job_unlock(pos, n);
            return now.map(|_| Next::Again);
        }
        Ok(Next::Copy(n))
    }

    /// The top's backing becomes `base`, in the graph and in its header.
    fn finish(&self, job: &Job) -> Result<()> {
        let old = self.top.driver.backing_child();
        let format = self.base.as_ref().map(|b| b.driver.format_name());
        job.device.quiesced(|| {
            self.top
                .driver
                .change_backing_file(&self.backing_name, format)?;
            self.top.driver.set_backing(self.base.clone())
        })?;
        self.graph.forget_chain(old, self.base.as_ref());
        Ok(())
    }
}

enum Next {
    Skip(u64),
    Copy(u64),
    /// The range changed under us: look again.
    Again,
    Cancelled,
}
