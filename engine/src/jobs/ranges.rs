//! Keeps guest writes and a job's copies off each other's ranges: stream
//! must not write backing data over a guest write to the same cluster.
//!
//! Guest writes share the lock among themselves; a job's range is exclusive.
//! A guest write that meets a job range waits in a queue (it is never
//! blocked: it runs later from the job's completion); a job waits on its own
//! thread for the guest writes in flight on its range.

use crate::drivers::Done;
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::Duration;

type Range = (u64, u64);

fn overlap(a: Range, b: Range) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

#[derive(Default)]
struct Inner {
    guest: Vec<Range>,
    job: Vec<Range>,
    queued: Vec<(Range, Done<()>)>,
}

#[derive(Default)]
pub struct RangeLock {
    inner: Mutex<Inner>,
    freed: Condvar,
}

impl RangeLock {
    /// Runs `go` once no job range overlaps the guest write.
    pub fn guest_begin(&self, offset: u64, len: u64, go: Done<()>) {
        let r = (offset, len);
        let mut g = self.inner.lock();
        if g.job.iter().any(|j| overlap(*j, r)) {
            g.queued.push((r, go));
            return;
        }
        g.guest.push(r);
        drop(g);
        go(Ok(()))
    }

    pub fn guest_end(&self, offset: u64, len: u64) {
        let mut g = self.inner.lock();
        if let Some(i) = g.guest.iter().position(|r| *r == (offset, len)) {
            g.guest.swap_remove(i);
        }
        drop(g);
        self.freed.notify_all();
    }

    /// Takes `offset..offset+len` for the job once no guest write is in
    /// flight on it; gives up (false) when `stop` says so while waiting.
    pub fn job_lock(&self, offset: u64, len: u64, stop: impl Fn() -> bool) -> bool {
        let r = (offset, len);
        let mut g = self.inner.lock();
        while g.guest.iter().any(|x| overlap(*x, r)) {
            if stop() {
                return false;
            }
            self.freed.wait_for(&mut g, Duration::from_millis(50));
        }
        g.job.push(r);
        true
    }

    /// Releases a job range and lets the guest writes it held go.
    pub fn job_unlock(&self, offset: u64, len: u64) {
        let ready: Vec<Done<()>> = {
            let mut g = self.inner.lock();
            if let Some(i) = g.job.iter().position(|r| *r == (offset, len)) {
                g.job.swap_remove(i);
            }
            let (go, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut g.queued)
                .into_iter()
                .partition(|(r, _)| !g.job.iter().any(|j| overlap(*j, *r)));
            g.queued = wait;
            g.guest.extend(go.iter().map(|(r, _)| *r));
            go.into_iter().map(|(_, d)| d).collect()
        };
        for go in ready {
            go(Ok(()))
        }
    }

    /// A guard that lets every held guest write go when dropped, also when
    /// the job's body panics.
    pub fn released_on_drop(self: &Arc<Self>) -> ReleaseOnDrop {
        ReleaseOnDrop(self.clone())
    }

    /// Lets every held guest write go (the job ends).
    pub fn release_all(&self) {
        let ranges: Vec<Range> = self.inner.lock().job.clone();
        for (o, l) in ranges {
            self.job_unlock(o, l);
        }
    }
}

pub struct ReleaseOnDrop(Arc<RangeLock>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn guest_waits_for_job_and_job_for_guest() {
        let l = Arc::new(RangeLock::default());
        let ran = Arc::new(AtomicUsize::new(0));
        assert!(l.job_lock(0, 100, || false));
        let r = ran.clone();
        l.guest_begin(
            50,
            10,
            Box::new(move |_| _ = r.fetch_add(1, Ordering::SeqCst)),
        );
        let r = ran.clone();
        l.guest_begin(
            100,
            10,
            Box::new(move |_| _ = r.fetch_add(10, Ordering::SeqCst)),
        );
        assert_eq!(ran.load(Ordering::SeqCst), 10);
        l.job_unlock(0, 100);
        assert_eq!(ran.load(Ordering::SeqCst), 11);
        // Guest writes in flight on 50..60 and 100..110: the job waits or gives up.
        assert!(!l.job_lock(55, 1, || true));
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.job_lock(0, 200, || false));
        std::thread::sleep(Duration::from_millis(20));
        l.guest_end(50, 10);
        l.guest_end(100, 10);
        assert!(t.join().unwrap());
    }
}
