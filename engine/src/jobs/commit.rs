//! `block-commit` of an intermediate image: the data of `top` and the
//! layers down to `base` is copied into `base`, then the image above `top`
//! takes `base` as its backing file and the committed layers leave the
//! chain. The guest writes the active layer above, so no copy races a
//! guest write. (The active layer's commit is a mirror: see [`super::mirror`].)

use super::above::Above;
use super::copy::Source;
use super::{Ending, Failures, Job};
use crate::error::Result;
use crate::graph::{Graph, Node};
use crate::options::OnError;
use std::sync::Arc;

pub struct Commit {
    pub graph: Arc<Graph>,
    pub top: Arc<Node>,
    /// Reopened read-write for the job; read-only again at its end.
    pub base: Arc<Node>,
    /// The image whose backing file is `top`.
    pub overlay: Arc<Node>,
    /// The backing file name written into the overlay's header.
    pub backing_name: String,
}

impl Commit {
    pub fn run(self, job: &Arc<Job>) -> Ending {
        let above = Above {
            src: Source::Node(self.top.clone()),
            chain: Some(self.top.clone()),
            base: Some(self.base.clone()),
            dst: self.base.clone(),
            guarded: None,
            on_error: OnError::Report,
        };
        let mut f = Failures::default();
        let done = above.run(job, &mut f);
        let ending = match (f.failed.or(f.ignored), done) {
            (Some(e), _) => Ending::Failed(e),
            (None, false) => Ending::Cancelled,
            (None, true) => match self.finish(job) {
                Ok(()) => Ending::Completed,
                Err(e) => Ending::Failed(e),
            },
        };
        if let Err(e) = self.graph.reopen(&self.base, true, &job.device) {
            log::warn!("commit on '{}': base stays read-write: {e}", job.device.id);
        }
        ending
    }

    /// The overlay's backing becomes `base`, in the graph and in its header.
    fn finish(&self, job: &Job) -> Result<()> {
        // The committed data is on disk before the overlay's header stops
        // pointing at the layers that held it.
        crate::drivers::wait(|d| self.base.flush(d))?;
        let format = self.base.driver.format_name();
        job.device.quiesced(|| {
            self.overlay
                .driver
                .change_backing_file(&self.backing_name, Some(format))?;
            self.overlay.driver.set_backing(Some(self.base.clone()))
        })?;
        self.graph
            .forget_chain(Some(self.top.clone()), Some(&self.base));
        Ok(())
    }
}
