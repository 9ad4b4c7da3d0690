//! Reads and writes that the device's chain maps onto one range of one
//! file ([`crate::graph::Node::direct_extent`]), for a thread that submits
//! the transfer on an io_uring of its own (a FUSE worker). None of the
//! device's policies has anything to do for them, so they run with no
//! completion closure, no allocation and one clock read at each end. Any
//! other request, and one of these that fails, takes [`Device::read`] or
//! [`Device::write`], where the error policy meets its error.

use super::Device;
use crate::drivers::Extent;
use crate::options::DetectZeroes;
use crate::stats::Op;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A request from [`Device::direct`], in flight until [`Device::finish`].
pub struct Direct {
    pub extent: Extent,
    offset: u64,
    len: u64,
    write: bool,
    start: Instant,
}

impl Direct {
    /// Bytes to transfer (never 0).
    pub fn bytes(&self) -> usize {
        self.len as usize
    }

    pub fn is_write(&self) -> bool {
        self.write
    }
}

impl Device {
    /// The extent of a read into `data` (or a write of it) at `offset`,
    /// when the request needs nothing of the device but its statistics: in
    /// range, no throttle, the gate open, and for a write no job's hook and
    /// no zero detection. Counted in flight until [`Device::finish`].
    pub fn direct(&self, write: bool, offset: u64, data: &[u8]) -> Option<Direct> {
        let len = data.len() as u64;
        if len == 0 || !super::aligned_ptr(data.as_ptr()) || self.throttle.is_enabled() {
            return None;
        }
        // As `admit`: in flight before the gate and the hook are looked at,
        // so a graph change or a job starting now waits for this request.
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let planned = self.plan(write, offset, len);
        if planned.is_none() {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
        }
        planned
    }

    fn plan(&self, write: bool, offset: u64, len: u64) -> Option<Direct> {
        if self.blocked.load(Ordering::SeqCst) {
            return None;
        }
        let root = self.root();
        if offset.checked_add(len)? > root.size() {
            return None;
        }
        if write
            && (self.read_only()
                || root.opts.detect_zeroes != DetectZeroes::Off
                || self.hook.read().is_some())
        {
            return None;
        }
        Some(Direct {
            extent: root.direct_extent(offset, len, write)?,
            offset,
            len,
            write,
            start: Instant::now(),
        })
    }

    /// Ends a [`Device::direct`] request whose transfer has ended; `moved`:
    /// it moved every byte, and is accounted as [`Device::read`] accounts
    /// (the device and every node on its way). Otherwise the caller
    /// runs the request again through [`Device::read`] or [`Device::write`].
    pub fn finish(&self, d: Direct, moved: bool) {
        if moved {
            let op = if d.write { Op::Write } else { Op::Read };
            let ns = d.start.elapsed().as_nanos() as u64;
            self.stats.record(op, d.offset, d.len, ns);
            for (stats, offset) in &d.extent.path {
                stats.record(op, *offset, d.len, ns);
            }
        }
        // The write's lock goes before the request leaves the flight count.
        drop(d);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}
