//! The `blkverify` filter: every request goes to the image under test and
//! to a raw reference copy, and reads are compared. Any difference, in the
//! data read or in whether the two succeeded, is a loud failure: a log
//! line with the offset and length, EIO to the caller and a
//! `BLKVERIFY_MISMATCH` event. QEMU exits the process instead; a daemon
//! serving other devices must not.

use super::fanout::{self, first_difference};
use super::{Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::qmp::EventBus;
use serde_json::json;
use std::sync::Arc;

pub struct BlkverifyDriver {
    /// The node name, for logs and events.
    name: String,
    test: Arc<Node>,
    raw: Arc<Node>,
    events: Arc<EventBus>,
}

/// How the two copies of one request ended.
struct Pair {
    name: String,
    events: Arc<EventBus>,
    op: &'static str,
    offset: u64,
    len: u64,
}

impl Pair {
    fn mismatch(&self, detail: String) -> Error {
        log::error!(
            "blkverify '{}': {} offset={} bytes={}: {detail}",
            self.name,
            self.op,
            self.offset,
            self.len
        );
        self.events.emit_limited(
            "BLKVERIFY_MISMATCH",
            &self.name,
            json!({"node-name": self.name, "type": self.op, "offset": self.offset,
                   "bytes": self.len, "detail": detail}),
        );
        Error::io(
            libc::EIO,
            format!("blkverify '{}': {} mismatch: {detail}", self.name, self.op),
        )
    }

    /// Both results agree: both succeeded (the test's value) or both
    /// failed (the test's error); anything else is a mismatch.
    fn settle<T>(&self, mut results: Vec<Result<T>>) -> Result<(T, T)> {
        let raw = results.pop();
        let test = results.pop();
        match (test, raw) {
            (Some(Ok(t)), Some(Ok(r))) => Ok((t, r)),
            (Some(Err(t)), Some(Err(_))) => Err(t),
            (Some(Ok(_)), Some(Err(r))) => {
                Err(self.mismatch(format!("test succeeded, raw failed: {r}")))
            }
            (Some(Err(t)), Some(Ok(_))) => {
                Err(self.mismatch(format!("raw succeeded, test failed: {t}")))
            }
            _ => Err(Error::io(libc::EIO, "blkverify: a request was lost")),
        }
    }
}

impl BlkverifyDriver {
    pub fn open(
        name: String,
        test: Arc<Node>,
        raw: Arc<Node>,
        events: Arc<EventBus>,
    ) -> Result<BlkverifyDriver> {
        if test.size() != raw.size() {
            return Err(Error::generic(format!(
                "blkverify: the test image '{}' has {} bytes and the raw image '{}' {}: they must be the same size",
                test.name,
                test.size(),
                raw.name,
                raw.size()
            )));
        }
        Ok(BlkverifyDriver {
            name,
            test,
            raw,
            events,
        })
    }

    fn pair(&self, op: &'static str, offset: u64, len: u64) -> Pair {
        Pair {
            name: self.name.clone(),
            events: self.events.clone(),
            op,
            offset,
            len,
        }
    }

    /// `start` on the test image and on the raw one, then `finish`.
    fn both<T: Send + 'static>(
        &self,
        pair: Pair,
        start: impl Fn(&Node, Done<T>),
        finish: impl FnOnce(&Pair, Result<(T, T)>) + Send + 'static,
    ) {
        let nodes = [&self.test, &self.raw];
        fanout::all(
            2,
            |i, d| start(nodes[i], d),
            move |results| {
                let r = pair.settle(results);
                finish(&pair, r)
            },
        );
    }
}

impl Driver for BlkverifyDriver {
    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    fn size(&self) -> u64 {
        self.test.size()
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len();
        let bufs = parking_lot::Mutex::new([Some(buf), Some(Buf::recycled(len))]);
        self.both(
            self.pair("read", offset, len as u64),
            |node, d| match bufs.lock().iter_mut().find_map(Option::take) {
                Some(b) => node.read(offset, b, d),
                None => d(Err(Error::io(libc::EIO, "blkverify: buffer lost"))),
            },
            move |pair, r| {
                done(
                    r.and_then(|(test, raw)| match first_difference(&test, &raw) {
                        None => Ok(test),
                        Some(at) => Err(pair.mismatch(format!(
                            "contents mismatch at offset {}",
                            offset + at as u64
                        ))),
                    }),
                )
            },
        );
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let pair = self.pair("write", offset, buf.len() as u64);
        let copy = Buf::from_slice(&buf);
        let bufs = parking_lot::Mutex::new([Some(buf), Some(copy)]);
        self.both(
            pair,
            |node, d| match bufs.lock().iter_mut().find_map(Option::take) {
                Some(b) => node.write(offset, b, d),
                None => d(Err(Error::io(libc::EIO, "blkverify: buffer lost"))),
            },
            move |_, r| done(r.map(|(t, _)| t)),
        );
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        self.both(
            self.pair("write", offset, len),
            |node, d| node.write_zeroes(offset, len, unmap, d),
            move |_, r| done(r.map(|_| ())),
        );
    }

    /// Not passed on: a discarded range may read back as anything, and the
    /// next read of it would be a false alarm.
    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(Ok(()))
    }

    fn flush(&self, done: Done<()>) {
        self.both(
            self.pair("flush", 0, 0),
            |node, d| node.flush(d),
            move |_, r| done(r.map(|_| ())),
        );
    }

    fn block_status(&self, _offset: u64, len: u64) -> Result<Status> {
        Ok(Status::data(len, None))
    }

    /// QEMU's form: `blkverify:RAW:TEST`.
    fn filename(&self) -> String {
        format!(
            "blkverify:{}:{}",
            self.raw.driver.filename(),
            self.test.driver.filename()
        )
    }

    fn file_child(&self) -> Option<&Arc<Node>> {
        Some(&self.raw)
    }

    fn other_children(&self) -> Vec<Arc<Node>> {
        vec![self.test.clone()]
    }
}
