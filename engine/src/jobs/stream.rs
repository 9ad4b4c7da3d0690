//! `block-stream`: copies what the backing chain above `base` shows into
//! the device's top image, then makes `base` the top's backing file.
//!
//! Guest writes keep going to the top: the copies are guarded (see
//! [`super::above`]) by a range lock the device's write hook shares.

use super::above::Above;
use super::copy::Source;
use super::ranges::RangeLock;
use super::{Ending, Failures, Job};
use crate::device::WriteHook;
use crate::drivers::Done;
use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::options::OnError;
use std::sync::Arc;

pub struct Stream {
    pub graph: Arc<Graph>,
    pub top: Arc<Node>,
    pub base: Option<Arc<Node>>,
    /// The backing file name written into the top's header ("" for none).
    pub backing_name: String,
    pub on_error: OnError,
    /// Shared with the device's write hook.
    pub lock: Arc<RangeLock>,
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
    /// What guest writes go through while the job runs.
    pub fn hook(&self) -> Arc<dyn WriteHook> {
        Arc::new(Hook(self.lock.clone()))
    }

    pub fn run(self, job: &Arc<Job>) -> Ending {
        let lock = &self.lock;
        let release = lock.released_on_drop();
        let above = Above {
            src: Source::BackingOf(self.top.clone()),
            chain: self.top.driver.backing_child(),
            base: self.base.clone(),
            dst: self.top.clone(),
            guarded: Some(lock.clone()),
            on_error: self.on_error,
        };
        let mut f = Failures::default();
        let done = above.run(job, &mut f);
        drop(release);
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

    /// The top's backing becomes `base`, in the graph and in its header.
    fn finish(&self, job: &Job) -> Result<()> {
        let old = self.top.driver.backing_child();
        if old.is_none() {
            // Nothing was below the top: nothing to change (QEMU completes too).
            return Ok(());
        }
        // The copied data is on disk before the header stops pointing at
        // where it came from: a crash in between must not lose it.
        crate::drivers::wait(|d| self.top.flush(d))?;
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
