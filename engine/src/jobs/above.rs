//! The copy stream and commit share: everything a backing chain shows
//! above a base node, copied into one image of the chain (stream: into the
//! top, from its backing chain; commit: into the base, from the top).
//!
//! When guests write the image being filled (stream), a copy holds its
//! range in a [`RangeLock`] and looks again, under the lock, whether the
//! range is still unallocated there, so old data never lands over a write.

use super::copy::{copy, Source, Window};
use super::ranges::RangeLock;
use super::{allocated_above, Failures, Job};
use crate::error::Result;
use crate::graph::Node;
use crate::options::OnError;
use std::sync::Arc;

/// The largest single copy (QEMU copies 512 KiB at a time, one at a time).
const CHUNK: u64 = 1 << 20;
const MAX_OPS: usize = 8;

pub struct Above {
    /// Where the data is read (and through which it is seen).
    pub src: Source,
    /// The chain whose allocation above `base` says what to copy.
    pub chain: Option<Arc<Node>>,
    pub base: Option<Arc<Node>>,
    pub dst: Arc<Node>,
    /// Guests write `dst` (stream): skip what it holds, copy under the lock.
    pub guarded: Option<Arc<RangeLock>>,
    pub on_error: OnError,
}

enum Next {
    Skip(u64),
    /// A copy, its range locked when guarded.
    Copy(u64),
    /// The range changed under us: look again.
    Again,
    Cancelled,
}

impl Above {
    /// Copies everything; false when cancelled. Failures (and what the
    /// `stop` policy left to retry) are in `f`.
    pub fn run(&self, job: &Arc<Job>, f: &mut Failures) -> bool {
        let mut from = 0;
        loop {
            let done = self.copy_from(job, from, f);
            match f.retry_from.take() {
                // A stop after the last copy: go again from there once resumed.
                Some(at) if f.failed.is_none() && done => from = at,
                _ => return done,
            }
        }
    }

    fn copy_from(&self, job: &Arc<Job>, mut pos: u64, f: &mut Failures) -> bool {
        let len = self.dst.size();
        job.set_len(len);
        let policy = (self.on_error, self.on_error);
        let mut window: Window<u64> = Window::new(MAX_OPS, MAX_OPS as u64 * CHUNK);
        let mut cancelled = false;
        while pos < len && f.failed.is_none() {
            if !f.step(job, &mut window, policy, &mut pos) {
                cancelled = true;
                break;
            }
            match self.next_copy(job, pos, len) {
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
                    let (lock, at) = (self.guarded.clone(), pos);
                    window.start(pos, n, |done| {
                        copy(
                            &self.src,
                            &self.dst,
                            at,
                            n,
                            Box::new(move |r| {
                                if let Some(l) = lock {
                                    l.job_unlock(at, n);
                                }
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

    /// What to do at `pos`.
    fn next_copy(&self, job: &Job, pos: u64, len: u64) -> Result<Next> {
        let want = CHUNK.min(len - pos);
        let want = match &self.guarded {
            Some(_) => {
                let st = self.dst.block_status(pos, want)?;
                if st.allocated {
                    return Ok(Next::Skip(st.len));
                }
                st.len.min(want)
            }
            None => want,
        };
        let (above, n) = allocated_above(self.chain.clone(), self.base.as_ref(), pos, want)?;
        if above.is_none() {
            return Ok(Next::Skip(n));
        }
        if !job.throttle(n) {
            return Ok(Next::Cancelled);
        }
        let Some(lock) = &self.guarded else {
            return Ok(Next::Copy(n));
        };
        if !lock.job_lock(pos, n, || job.is_cancelled()) {
            return Ok(Next::Cancelled);
        }
        // A guest write may have allocated part of the range meanwhile.
        let now = self.dst.block_status(pos, n);
        if !matches!(now, Ok(s) if !s.allocated && s.len >= n) {
            lock.job_unlock(pos, n);
            return now.map(|_| Next::Again);
        }
        Ok(Next::Copy(n))
    }
}
