//! I/O accounting for `query-blockstats`.

use crate::drivers::Done;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Wraps a completion so that the request, if it succeeds, is accounted
/// in `stats` (timed from now).
pub fn accounted<T: Send + 'static>(
    stats: &Arc<Stats>,
    op: Op,
    offset: u64,
    bytes: u64,
    done: Done<T>,
) -> Done<T> {
    let (stats, start) = (stats.clone(), Instant::now());
    Box::new(move |r| {
        if r.is_ok() {
            stats.account(op, offset, bytes, start);
        }
        done(r)
    })
}

#[derive(Debug, Default)]
pub struct Stats {
    rd_bytes: AtomicU64,
    wr_bytes: AtomicU64,
    rd_ops: AtomicU64,
    wr_ops: AtomicU64,
    flush_ops: AtomicU64,
    rd_ns: AtomicU64,
    wr_ns: AtomicU64,
    flush_ns: AtomicU64,
    wr_highest: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl Stats {
    /// Records a completed request that started at `start`. Failed requests
    /// are not counted, as in QEMU.
    pub fn account(&self, op: Op, offset: u64, bytes: u64, start: Instant) {
        self.record(op, offset, bytes, start.elapsed().as_nanos() as u64)
    }

    /// As [`Stats::account`], of a request that took `ns`.
    pub fn record(&self, op: Op, offset: u64, bytes: u64, ns: u64) {
        match op {
            Op::Read => {
                self.rd_ops.fetch_add(1, Relaxed);
                self.rd_bytes.fetch_add(bytes, Relaxed);
                self.rd_ns.fetch_add(ns, Relaxed);
            }
            Op::Write => {
                self.wr_ops.fetch_add(1, Relaxed);
                self.wr_bytes.fetch_add(bytes, Relaxed);
                self.wr_ns.fetch_add(ns, Relaxed);
                self.wr_highest.fetch_max(offset + bytes, Relaxed);
            }
            Op::Flush => {
                self.flush_ops.fetch_add(1, Relaxed);
                self.flush_ns.fetch_add(ns, Relaxed);
            }
        }
    }

    /// `BlockDeviceStats`.
    pub fn to_json(&self) -> Value {
        json!({
            "rd_bytes": self.rd_bytes.load(Relaxed),
            "wr_bytes": self.wr_bytes.load(Relaxed),
            "rd_operations": self.rd_ops.load(Relaxed),
            "wr_operations": self.wr_ops.load(Relaxed),
            "flush_operations": self.flush_ops.load(Relaxed),
            "flush_total_time_ns": self.flush_ns.load(Relaxed),
            "wr_total_time_ns": self.wr_ns.load(Relaxed),
            "rd_total_time_ns": self.rd_ns.load(Relaxed),
            "wr_highest_offset": self.wr_highest.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_highest_offset() {
        let s = Stats::default();
        let t = Instant::now();
        s.account(Op::Write, 4096, 512, t);
        s.account(Op::Write, 0, 512, t);
        s.account(Op::Read, 0, 100, t);
        s.account(Op::Flush, 0, 0, t);
        let j = s.to_json();
        assert_eq!(j["wr_operations"], 2);
        assert_eq!(j["wr_bytes"], 1024);
        assert_eq!(j["wr_highest_offset"], 4608);
        assert_eq!(j["rd_bytes"], 100);
        assert_eq!(j["flush_operations"], 1);
    }
}
