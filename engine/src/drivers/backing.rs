//! Reads that fall through to a backing file, shared by the copy-on-write formats.

use super::Done;
use crate::graph::Node;
use crate::io::Buf;
use parking_lot::RwLock;
use std::sync::Arc;

/// A format's backing node; block jobs change it on a live node (stream
/// and commit drop layers), so it is read per request.
#[derive(Default)]
pub struct Slot(RwLock<Option<Arc<Node>>>);

impl Slot {
    pub fn new(node: Option<Arc<Node>>) -> Slot {
        Slot(RwLock::new(node))
    }

    pub fn get(&self) -> Option<Arc<Node>> {
        self.0.read().clone()
    }

    pub fn is_some(&self) -> bool {
        self.0.read().is_some()
    }

    pub fn set(&self, node: Option<Arc<Node>>) {
        *self.0.write() = node;
    }

    /// [`read`] from the current backing node.
    pub fn read(&self, guest: u64, buf: Buf, done: Done<Buf>) {
        read(self.get().as_ref(), guest, buf, done)
    }
}

/// Reads the guest range from the backing chain; zeroes where there is no
/// backing file or past its end.
pub fn read(backing: Option<&Arc<Node>>, guest: u64, buf: Buf, done: Done<Buf>) {
    let Some(b) = backing else {
        let mut buf = buf;
        buf.fill(0);
        return done(Ok(buf));
    };
    let bsize = b.size();
    if guest >= bsize {
        let mut buf = buf;
        buf.fill(0);
        return done(Ok(buf));
    }
    let avail = (bsize - guest).min(buf.len() as u64) as usize;
    if avail == buf.len() {
        return b.read(guest, buf, done);
    }
    let mut out = buf;
    b.read(
        guest,
        Buf::recycled(avail),
        Box::new(move |r| {
            done(r.map(|part| {
                out[..avail].copy_from_slice(&part);
                out[avail..].fill(0);
                out
            }))
        }),
    );
}
