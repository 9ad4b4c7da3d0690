//! The copy engine every job shares: a bounded window of copies in flight
//! on the completion-based I/O, each a read then a write (or a zero write
//! when the data read is all zeroes).

use crate::error::Error;
use crate::graph::Node;
use crate::io::Buf;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

/// A failed copy: which side failed, and how.
#[derive(Debug, Clone)]
pub struct CopyError {
    pub read: bool,
    pub err: Error,
}

pub type CopyResult = std::result::Result<(), CopyError>;

/// The completion of one copy.
pub type CopyDone = Box<dyn FnOnce(CopyResult) + Send + 'static>;

/// One finished copy: its tag, length and result.
pub type Finished<T> = (T, u64, CopyResult);

/// Copies in flight, at most `max_ops` of them and `max_bytes` of data.
pub struct Window<T> {
    tx: Sender<Finished<T>>,
    rx: Receiver<Finished<T>>,
    ops: usize,
    bytes: u64,
    max_ops: usize,
    max_bytes: u64,
}

impl<T: Send + 'static> Window<T> {
    pub fn new(max_ops: usize, max_bytes: u64) -> Window<T> {
        let (tx, rx) = crossbeam_channel::unbounded();
        Window {
            tx,
            rx,
            ops: 0,
            bytes: 0,
            max_ops: max_ops.max(1),
            max_bytes,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.ops
    }

    /// Bytes of the copies in flight.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Waits until a copy of `len` bytes fits; returns the copies that
    /// finished meanwhile (and any that had finished before).
    pub fn room(&mut self, len: u64) -> Vec<Finished<T>> {
        let mut out = self.finished();
        while self.ops > 0 && (self.ops >= self.max_ops || self.bytes + len > self.max_bytes) {
            out.extend(self.wait_one());
        }
        out
    }

    /// Copies that have finished, without waiting.
    pub fn finished(&mut self) -> Vec<Finished<T>> {
        let mut out = Vec::new();
        while let Ok(f) = self.rx.try_recv() {
            self.account(&f);
            out.push(f);
        }
        out
    }

    /// Waits for every copy in flight.
    pub fn drain(&mut self) -> Vec<Finished<T>> {
        let mut out = self.finished();
        while self.ops > 0 {
            out.extend(self.wait_one());
        }
        out
    }

    fn wait_one(&mut self) -> Option<Finished<T>> {
        let f = self.rx.recv().ok()?;
        self.account(&f);
        Some(f)
    }

    fn account(&mut self, f: &Finished<T>) {
        self.ops -= 1;
        self.bytes -= f.1;
    }

    /// Starts an operation of `len` bytes; `op` gets the completion to call.
    pub fn start(&mut self, tag: T, len: u64, op: impl FnOnce(CopyDone)) {
        self.ops += 1;
        self.bytes += len;
        let tx = self.tx.clone();
        op(Box::new(move |r| {
            let _ = tx.send((tag, len, r));
        }))
    }
}

/// Where a copy reads from.
#[derive(Clone)]
pub enum Source {
    /// A node, read as it is (its backing chain included).
    Node(Arc<Node>),
    /// The backing chain of a node: what it shows where it is unallocated.
    BackingOf(Arc<Node>),
}

impl Source {
    pub fn read(&self, offset: u64, buf: Buf, done: crate::drivers::Done<Buf>) {
        match self {
            Source::Node(n) => n.read(offset, buf, done),
            Source::BackingOf(n) => {
                crate::drivers::backing::read(n.driver.backing_child().as_ref(), offset, buf, done)
            }
        }
    }
}

/// Reads `offset..offset+len` from `src` and writes it to `dst` at the same
/// offset; all-zero data becomes a zero write (no allocation where the
/// target can avoid it).
pub fn copy(src: &Source, dst: &Arc<Node>, offset: u64, len: u64, done: CopyDone) {
    if crate::io::on_completer() {
        // The read may take a format's slow path too (see below).
        let (src, dst) = (src.clone(), dst.clone());
        return crate::io::spawn_blocking(move || copy(&src, &dst, offset, len, done));
    }
    let dst = dst.clone();
    src.read(
        offset,
        Buf::recycled(len as usize),
        Box::new(move |r| {
            let buf = match r {
                Ok(b) => b,
                Err(err) => return done(Err(CopyError { read: true, err })),
            };
            let wrote = move |r: crate::error::Result<()>| {
                done(r.map_err(|err| CopyError { read: false, err }))
            };
            let write = move || {
                if buf.is_zero() {
                    dst.write_zeroes(offset, len, true, Box::new(wrote));
                } else {
                    dst.write(offset, buf, Box::new(move |r| wrote(r.map(|_| ()))));
                }
            };
            // A write may take a format's slow path, which waits for
            // metadata I/O: never on the completion thread of the read.
            if crate::io::on_completer() {
                crate::io::spawn_blocking(write);
            } else {
                write();
            }
        }),
    )
}
