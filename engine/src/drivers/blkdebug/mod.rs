//! The `blkdebug` filter: passes I/O through to its `image` child and
//! fails requests on command, as QEMU's block/blkdebug.c does, to test how
//! the layers above handle I/O errors.
//!
//! - [`rules`]: the state machine and the armed error rules.
//! - [`config`]: the config file (QemuOpts ini) parser.
//! - this module: the driver, and the `align` emulation.
//!
//! Events are raised by the parents on their file child
//! ([`crate::graph::Node::debug_event`]) at the points their names say:
//! `raw` raises `read_aio`/`write_aio`, `qcow2` its metadata and data
//! events, and every node's flush raises `flush_to_os` and
//! `flush_to_disk` on its file child. Events that nothing in blkfs can
//! raise are accepted in rules and never fire: `vmstate_load`,
//! `vmstate_save`, `write_compressed`, `l2_update_compressed` and
//! `cluster_alloc_bytes` (no compressed writes, no VM state). `l1_grow.*`
//! fire when `block_resize` grows a qcow2 L1 table.
//!
//! Reads, writes, write-zeroes and discards (not flushes) are checked
//! against the armed rules; the range checked is the one that reaches the
//! image (widened to `align`). A failure is reported in the submitting call
//! when the rule says `immediately`, otherwise from a worker thread.
//!
//! With `align`, every request to the image is aligned: reads are widened
//! and cut, unaligned writes (and the unaligned edges of write-zeroes)
//! become read-modify-write cycles, kept apart from overlapping writes by
//! [`Serial`] so none loses data; a discard shrinks to the aligned blocks it
//! covers (it is only a hint).

pub mod config;
pub mod rules;

use super::{Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::{BlkdebugEvent, InjectError, SetState};
use parking_lot::Mutex;
use rules::Rules;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct BlkdebugDriver {
    image: Arc<Node>,
    rules: Rules,
    /// 1 when requests need no alignment.
    align: u64,
    serial: Arc<Serial>,
}

/// The `align` option: a power of two below 2 GiB, or 0/absent for none.
pub fn parse_align(align: Option<i64>) -> Result<u64> {
    match align {
        None | Some(0) => Ok(1),
        Some(a) if a > 0 && a < i32::MAX as i64 && (a as u64).is_power_of_two() => Ok(a as u64),
        Some(_) => Err(Error::generic("Invalid alignment")),
    }
}

/// The aligned range `(start, len)` covering `offset..offset+len`; its end
/// stops at `size` (an image need not end on the alignment).
pub fn widen(offset: u64, len: u64, align: u64, size: u64) -> (u64, u64) {
    let start = offset / align * align;
    let end = offset + len;
    let wide_end = end.next_multiple_of(align).min(size.max(end));
    (start, wide_end - start)
}

/// The aligned blocks inside `offset..offset+len`, as `(start, len)`, if any.
pub fn shrink(offset: u64, len: u64, align: u64) -> Option<(u64, u64)> {
    let start = offset.next_multiple_of(align);
    let end = (offset + len) / align * align;
    (end > start).then(|| (start, end - start))
}

impl BlkdebugDriver {
    /// Rules from the config file come first, then those of the options.
    pub fn open(
        image: Arc<Node>,
        config: Option<&str>,
        align: Option<i64>,
        inject_error: &[InjectError],
        set_state: &[SetState],
    ) -> Result<BlkdebugDriver> {
        let align = parse_align(align)?;
        let mut cfg = match config {
            Some(path) => config::read(path)?,
            None => config::Config::default(),
        };
        cfg.inject_error.extend_from_slice(inject_error);
        cfg.set_state.extend_from_slice(set_state);
        Ok(BlkdebugDriver {
            image,
            rules: Rules::new(&cfg.inject_error, &cfg.set_state)?,
            align,
            serial: Arc::default(),
        })
    }

    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        widen(offset, len, self.align, self.image.size())
    }

    /// Fails the request when an armed rule matches `offset..offset+len`;
    /// otherwise hands `done` back so the request goes on.
    fn pass<T: Send + 'static>(
        &self,
        op: &str,
        offset: u64,
        len: u64,
        done: Done<T>,
    ) -> Option<Done<T>> {
        let Some(inj) = self.rules.check(offset, len) else {
            return Some(done);
        };
        let e = Error::from_errno(
            inj.errno,
            format!("blkdebug: injected error on {op} at {offset}+{len}"),
        );
        if inj.immediately {
            done(Err(e));
        } else {
            crate::io::defer(move || done(Err(e)));
        }
        None
    }

    /// A write that passed the rules: straight down when aligned, else a
    /// read-modify-write of the aligned blocks; serialised when `align` is set.
    fn write_through(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        if self.align == 1 {
            return self.image.write(offset, buf, done);
        }
        let len = buf.len() as u64;
        let (start, wlen) = self.widen(offset, len);
        let rmw = start != offset || wlen != len;
        let (image, serial) = (self.image.clone(), self.serial.clone());
        self.serial.run(
            start,
            start + wlen,
            rmw,
            Box::new(move |id| {
                let done: Done<Buf> = Box::new(move |r| {
                    serial.finish(id);
                    done(r)
                });
                if !rmw {
                    return image.write(offset, buf, done);
                }
                let skip = (offset - start) as usize;
                let img = image.clone();
                image.read(
                    start,
                    Buf::recycled(wlen as usize),
                    Box::new(move |r| match r {
                        Err(e) => done(Err(e)),
                        Ok(mut block) => {
                            block[skip..skip + buf.len()].copy_from_slice(&buf);
                            img.write(start, block, Box::new(move |r| done(r.map(|_| buf))));
                        }
                    }),
                );
            }),
        );
    }
}

impl Driver for BlkdebugDriver {
    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        let (start, wlen) = self.widen(offset, len);
        let Some(done) = self.pass("read", start, wlen, done) else {
            return;
        };
        if (start, wlen) == (offset, len) {
            return self.image.read(offset, buf, done);
        }
        let skip = (offset - start) as usize;
        let mut out = buf;
        self.image.read(
            start,
            Buf::recycled(wlen as usize),
            Box::new(move |r| {
                done(r.map(|wide| {
                    let n = out.len();
                    out.copy_from_slice(&wide[skip..skip + n]);
                    out
                }))
            }),
        );
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let (start, wlen) = self.widen(offset, buf.len() as u64);
        if let Some(done) = self.pass("write", start, wlen, done) {
            self.write_through(offset, buf, done);
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        let (start, wlen) = self.widen(offset, len);
        let Some(done) = self.pass("write_zeroes", start, wlen, done) else {
            return;
        };
        if self.align == 1 {
            return self.image.write_zeroes(offset, len, unmap, done);
        }
        // Unaligned edges are written as zeroed buffers (read-modify-write),
        // the aligned middle goes down as write-zeroes.
        let end = offset + len;
        let middle = shrink(offset, len, self.align);
        let edges: Vec<(u64, u64)> = match middle {
            None => vec![(offset, end)],
            Some((m, mlen)) => [(offset, m), (m + mlen, end)]
                .into_iter()
                .filter(|(s, e)| e > s)
                .collect(),
        };
        let gather = Gather::new(edges.len() + usize::from(middle.is_some()), done);
        for (s, e) in edges {
            let part = gather.part();
            self.write_through(
                s,
                Buf::zeroed((e - s) as usize),
                Box::new(move |r| part(r.map(drop))),
            );
        }
        if let Some((m, mlen)) = middle {
            let (image, serial, part) = (self.image.clone(), self.serial.clone(), gather.part());
            self.serial.run(
                m,
                m + mlen,
                false,
                Box::new(move |id| {
                    image.write_zeroes(
                        m,
                        mlen,
                        unmap,
                        Box::new(move |r| {
                            serial.finish(id);
                            part(r)
                        }),
                    )
                }),
            );
        }
    }

    fn discard(&self, offset: u64, len: u64, done: Done<()>) {
        let (start, wlen) = self.widen(offset, len);
        let Some(done) = self.pass("discard", start, wlen, done) else {
            return;
        };
        match shrink(offset, len, self.align) {
            Some((s, l)) => self.image.discard(s, l, done),
            None => done(Ok(())),
        }
    }

    fn flush(&self, done: Done<()>) {
        self.image.flush(done)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        self.image.block_status(offset, len)
    }

    fn file_child(&self) -> Option<&Arc<Node>> {
        Some(&self.image)
    }

    /// A pass-through: its size is its file's.
    fn shares_file_resize(&self) -> bool {
        true
    }

    /// Events stop here (QEMU does not pass them on either).
    fn debug_event(&self, ev: BlkdebugEvent) {
        self.rules.event(ev);
    }
}

type Job = Box<dyn FnOnce(u64) + Send>;

/// Keeps read-modify-write cycles apart from overlapping writes without
/// blocking a thread: a write that overlaps a running or queued RMW (or an
/// RMW that overlaps any running or queued write) is queued, and started by
/// the completion that removes the conflict.
#[derive(Default)]
struct Serial {
    st: Mutex<SerialState>,
}

#[derive(Default)]
struct SerialState {
    next_id: u64,
    running: Vec<Span>,
    waiting: VecDeque<(Span, Job)>,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    id: u64,
    start: u64,
    end: u64,
    rmw: bool,
}

impl Span {
    fn conflicts(&self, o: &Span) -> bool {
        (self.rmw || o.rmw) && self.start < o.end && o.start < self.end
    }
}

impl Serial {
    /// Runs `job` (given its id, to pass to `finish` when done) now or once
    /// no conflicting request is ahead of it.
    fn run(&self, start: u64, end: u64, rmw: bool, job: Job) {
        let mut st = self.st.lock();
        let span = Span {
            id: st.next_id,
            start,
            end,
            rmw,
        };
        st.next_id += 1;
        let blocked = st
            .running
            .iter()
            .chain(st.waiting.iter().map(|(s, _)| s))
            .any(|o| o.conflicts(&span));
        if blocked {
            st.waiting.push_back((span, job));
            return;
        }
        st.running.push(span);
        drop(st);
        job(span.id);
    }

    /// Ends request `id` and starts the queued ones it was holding back.
    fn finish(&self, id: u64) {
        let mut ready = Vec::new();
        {
            let mut st = self.st.lock();
            st.running.retain(|s| s.id != id);
            let mut still = VecDeque::new();
            while let Some((span, job)) = st.waiting.pop_front() {
                let blocked = st
                    .running
                    .iter()
                    .chain(still.iter().map(|(s, _)| s))
                    .any(|o| o.conflicts(&span));
                if blocked {
                    still.push_back((span, job));
                } else {
                    st.running.push(span);
                    ready.push((span.id, job));
                }
            }
            st.waiting = still;
        }
        for (id, job) in ready {
            job(id);
        }
    }
}

/// Completes `done` once every part has, with the first error if any.
struct Gather {
    left: AtomicUsize,
    err: Mutex<Option<Error>>,
    done: Mutex<Option<Done<()>>>,
}

impl Gather {
    fn new(parts: usize, done: Done<()>) -> Arc<Gather> {
        let g = Arc::new(Gather {
            left: AtomicUsize::new(parts),
            err: Mutex::new(None),
            done: Mutex::new(Some(done)),
        });
        if parts == 0 {
            g.left.store(1, Ordering::SeqCst);
            g.complete(Ok(()));
        }
        g
    }

    fn part(self: &Arc<Self>) -> Done<()> {
        let g = self.clone();
        Box::new(move |r| g.complete(r))
    }

    fn complete(&self, r: Result<()>) {
        if let Err(e) = r {
            self.err.lock().get_or_insert(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let done = self.done.lock().take();
            let r = self.err.lock().take().map_or(Ok(()), Err);
            if let Some(done) = done {
                done(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_option() {
        assert_eq!(parse_align(None).unwrap(), 1);
        assert_eq!(parse_align(Some(0)).unwrap(), 1);
        assert_eq!(parse_align(Some(512)).unwrap(), 512);
        assert_eq!(parse_align(Some(1)).unwrap(), 1);
        assert_eq!(parse_align(Some(1 << 20)).unwrap(), 1 << 20);
        for bad in [-512, 3, 4097, 1 << 31, i64::MAX] {
            assert_eq!(
                parse_align(Some(bad)).unwrap_err().msg,
                "Invalid alignment",
                "{bad}"
            );
        }
    }

    #[test]
    fn widen_math() {
        const S: u64 = 1 << 20;
        assert_eq!(widen(0, 4096, 4096, S), (0, 4096));
        assert_eq!(widen(100, 10, 4096, S), (0, 4096));
        assert_eq!(widen(4000, 200, 4096, S), (0, 8192));
        assert_eq!(widen(8192, 1, 4096, S), (8192, 4096));
        assert_eq!(widen(5, 7, 1, S), (5, 7));
        // An image that does not end on the alignment: the tail is cut at its end.
        assert_eq!(widen(10_000, 100, 4096, 10_240), (8192, 2048));
        // A request already running to the end stays there.
        assert_eq!(widen(10_200, 40, 4096, 10_240), (8192, 2048));
    }

    #[test]
    fn shrink_math() {
        assert_eq!(shrink(0, 8192, 4096), Some((0, 8192)));
        assert_eq!(shrink(1, 8192, 4096), Some((4096, 4096)));
        assert_eq!(shrink(1, 8190, 4096), None);
        assert_eq!(shrink(100, 10, 4096), None);
        assert_eq!(shrink(100, 10, 1), Some((100, 10)));
    }

    #[test]
    fn serial_holds_back_conflicts_only() {
        let s = Arc::new(Serial::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let job = |name: &'static str| -> Job {
            let (log, ids) = (log.clone(), ids.clone());
            Box::new(move |id| {
                log.lock().push(name);
                ids.lock().push((name, id));
            })
        };
        let id_of = |name: &str| ids.lock().iter().find(|(n, _)| *n == name).map(|p| p.1);
        s.run(0, 4096, true, job("rmw1"));
        s.run(4096, 8192, false, job("other block"));
        s.run(0, 4096, false, job("aligned over rmw1"));
        s.run(0, 4096, true, job("rmw2"));
        s.run(8192, 12288, true, job("rmw elsewhere"));
        assert_eq!(*log.lock(), ["rmw1", "other block", "rmw elsewhere"]);
        s.finish(id_of("rmw1").unwrap());
        // The aligned write runs; rmw2 must wait for it (and keeps its place).
        assert_eq!(log.lock().len(), 4);
        assert_eq!(log.lock()[3], "aligned over rmw1");
        s.finish(id_of("aligned over rmw1").unwrap());
        assert_eq!(log.lock()[4], "rmw2");
        // Two plain writes never wait for each other.
        s.run(4096, 8192, false, job("plain"));
        assert_eq!(log.lock()[5], "plain");
    }

    #[test]
    fn gather_reports_the_first_error_once() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g2 = got.clone();
        let g = Gather::new(3, Box::new(move |r| g2.lock().push(r)));
        g.part()(Ok(()));
        g.part()(Err(Error::io(libc::EIO, "a")));
        assert!(got.lock().is_empty());
        g.part()(Err(Error::io(libc::ENOSPC, "b")));
        assert_eq!(*got.lock(), vec![Err(Error::io(libc::EIO, "a"))]);
        let got = Arc::new(Mutex::new(Vec::new()));
        let g2 = got.clone();
        let _ = Gather::new(0, Box::new(move |r| g2.lock().push(r)));
        assert_eq!(*got.lock(), vec![Ok(())]);
    }
}
