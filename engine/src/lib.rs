//! blkfs engine: the block layer, independent of FUSE and sockets.
//!
//! - [`options`]: `BlockdevOptions` parsed strictly from JSON or key=value ([`args`]).
//! - [`graph`]: nodes and their registry; every request is accounted ([`stats`]).
//! - [`device`]: devices and their policies ([`policy`]: throttle, error policy).
//! - [`drivers`]: the completion-based driver trait, one module per driver.
//! - [`io`]: backends for `aio=native` (io_uring) and `aio=threads`, aligned buffers.
//! - [`qmp`]: framing, sessions, the command table and the event bus.
//! - [`jobs`]: block jobs (stream, commit, mirror, backup) and their control.
//! - [`nbd`]: the NBD server exporting devices (`nbd-server-*` commands).
//! - [`perm`]: may an operation change a node under its users (resize).
//! - [`error`]: one error type, mapped to QMP error classes and errnos.
//! - `testutil` (tests only): helpers shared by the unit tests.

pub mod args;
pub mod device;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod io;
pub mod jobs;
pub mod map;
pub mod nbd;
pub mod options;
pub mod perm;
pub mod policy;
pub mod qmp;
pub mod stats;
#[cfg(test)]
mod testutil;

pub use error::{Error, ErrorKind, Result};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;
use std::sync::Arc;

pub struct Engine {
    pub graph: Arc<graph::Graph>,
    pub jobs: Arc<jobs::Jobs>,
    pub events: Arc<qmp::EventBus>,
    pub nbd: Arc<nbd::Server>,
    quit_tx: Sender<()>,
    quit_rx: Receiver<()>,
}

impl Engine {
    pub fn new() -> Arc<Engine> {
        let (quit_tx, quit_rx) = crossbeam_channel::unbounded();
        let events = Arc::new(qmp::EventBus::default());
        let graph = Arc::new(graph::Graph::new(events.clone()));
        let nbd = Arc::new(nbd::Server::default());
        let exported = nbd.clone();
        // A device an NBD export serves is not deleted under its clients.
        graph.on_busy_check(move |dev| {
            let names = exported.names_of(dev);
            (!names.is_empty()).then(|| {
                format!(
                    "it is exported over NBD as '{}' (nbd-server-remove first)",
                    names.join("', '")
                )
            })
        });
        Arc::new(Engine {
            graph,
            jobs: Arc::new(jobs::Jobs::new(events.clone())),
            events,
            nbd,
            quit_tx,
            quit_rx,
        })
    }

    /// Runs one QMP command (after capabilities negotiation).
    pub fn execute(&self, name: &str, args: Value) -> Result<Value> {
        qmp::commands::execute(self, name, args)
    }

    /// Asks the daemon to shut down (the `quit` command).
    pub fn request_quit(&self) {
        let _ = self.quit_tx.send(());
    }

    /// Receives once per quit request.
    pub fn quit_requests(&self) -> Receiver<()> {
        self.quit_rx.clone()
    }
}
