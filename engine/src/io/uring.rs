//! `aio=native`: io_uring rings, each with a thread that reaps it.
//!
//! A submitter pushes its entry (under the ring's lock) and enters the
//! kernel itself, so a request reaches the disk without waking another
//! thread; the ring thread only waits for completions and runs them.

use super::{Backend, IoDone, IoReq, OpKind};
use io_uring::{opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub const DEFAULT_DEPTH: u32 = 256;
/// Writes from this size up are sent at once: waiting for the ring
/// thread's next wake-up costs more than an enter of their own.
const ENTER_NOW_LEN: usize = 128 << 10;

/// Several rings, each with its thread; requests are spread round-robin.
pub struct Rings {
    rings: Vec<Ring>,
    next: std::sync::atomic::AtomicUsize,
}

impl Rings {
    pub fn new(count: usize, depth: u32) -> io::Result<Rings> {
        let rings = (0..count.max(1))
            .map(|_| Ring::new(depth))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Rings {
            rings,
            next: Default::default(),
        })
    }
}

impl Backend for Rings {
    fn submit(&self, req: IoReq, done: IoDone) {
        if let Some(local) = super::local_ring() {
            return local.submit(req, done);
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        self.rings[i].submit(req, done)
    }

    fn name(&self) -> &'static str {
        "native"
    }
}

pub struct Ring {
    shared: Arc<Shared>,
}

struct Shared {
    ring: IoUring,
    /// The requests in flight, and the submission queue: entries are
    /// pushed only under this lock.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    slots: Slots,
    /// Slots waiting for room in the submission queue.
    backlog: VecDeque<usize>,
}

/// The requests in flight on a ring, by the `user_data` of their entries.
#[derive(Default)]
pub struct Slots {
    slots: Vec<Option<(IoReq, IoDone)>>,
    free: Vec<usize>,
}

/// What a completion means for its request.
pub enum Reaped {
    /// A short transfer or a retry: submit [`Slots::entry`] again for the rest.
    Again,
    /// Finished: run the completion (outside any lock).
    Done(IoReq, IoDone, io::Result<()>),
    /// No request has this slot.
    Unknown,
}

impl Slots {
    /// Takes a request in; its entry is [`Slots::entry`] of the slot returned.
    pub fn insert(&mut self, req: IoReq, done: IoDone) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some((req, done));
                i
            }
            None => {
                self.slots.push(Some((req, done)));
                self.slots.len() - 1
            }
        }
    }

    /// The entry that submits (the rest of) slot `idx`'s request, with
    /// `idx` as its user data.
    pub fn entry(&mut self, idx: usize) -> Option<squeue::Entry> {
        let (req, _) = self.slots.get_mut(idx)?.as_mut()?;
        Some(sqe_for(req).user_data(idx as u64))
    }

    /// Accounts the completion `res` of slot `idx`.
    pub fn reap(&mut self, idx: usize, res: i32) -> Reaped {
        let Some((mut req, cb)) = self.slots.get_mut(idx).and_then(Option::take) else {
            return Reaped::Unknown;
        };
        let outcome = if res < 0 {
            if res == -libc::EAGAIN || res == -libc::EINTR {
                Ok(false)
            } else if req.ended(-res) {
                Ok(true)
            } else {
                Err(io::Error::from_raw_os_error(-res))
            }
        } else {
            req.advance(res as usize)
        };
        match outcome {
            Ok(false) => {
                self.slots[idx] = Some((req, cb));
                Reaped::Again
            }
            Ok(true) => {
                self.free.push(idx);
                Reaped::Done(req, cb, Ok(()))
            }
            Err(e) => {
                self.free.push(idx);
                Reaped::Done(req, cb, Err(e))
            }
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Ring {
    pub fn new(depth: u32) -> io::Result<Ring> {
        let shared = Arc::new(Shared {
            ring: IoUring::new(depth)?,
            state: Mutex::default(),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("blkfs-uring".into())
            .spawn(move || {
                super::mark_completer();
                thread_shared.reap_forever()
            })?;
        Ok(Ring { shared })
    }
}

impl Backend for Ring {
    /// The caller submits its own request: no hand-over to the ring thread,
    /// which only waits for completions and runs them.
    fn submit(&self, req: IoReq, done: IoDone) {
        // A read is sent at once. Other requests ride along with the ring
        // thread's next enter when some completion is due to wake it anyway
        // (measured: writes issued one by one by the FUSE threads ran at
        // 0.7-0.9x of the ring thread's batches, reads at 1.25x).
        let now = req.kind == OpKind::Read || req.buf.len() >= ENTER_NOW_LEN;
        let (pushed, busy) = {
            let mut st = self.shared.state.lock();
            let busy = st.slots.in_flight() > 0;
            let idx = st.slots.insert(req, done);
            st.backlog.push_back(idx);
            (self.shared.flush_backlog(&mut st), busy)
        };
        if pushed && (now || !busy) {
            self.shared.enter(0);
        }
    }

    fn name(&self) -> &'static str {
        "native"
    }
}

impl Shared {
    /// Submits what is queued, waiting for `want` completions.
    fn enter(&self, want: usize) {
        if let Err(e) = self.ring.submitter().submit_and_wait(want) {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) {
                log::error!("io_uring submit failed: {e}");
            }
        }
    }

    /// Moves backlogged requests into the submission queue; true when any was.
    fn flush_backlog(&self, st: &mut State) -> bool {
        // SAFETY: the submission queue is only touched with `state` locked
        // (held by the caller), and every buffer an entry points to lives in
        // a slot that is not touched until its completion is reaped.
        let mut sq = unsafe { self.ring.submission_shared() };
        let mut pushed = false;
        while let Some(&idx) = st.backlog.front() {
            let Some(entry) = st.slots.entry(idx) else {
                st.backlog.pop_front();
                continue;
            };
            // SAFETY: as above.
            if unsafe { sq.push(&entry) }.is_err() {
                break;
            }
            st.backlog.pop_front();
            pushed = true;
        }
        sq.sync();
        pushed
    }

    /// The ring thread: waits for completions and runs them (outside the
    /// lock: a completion may submit again).
    fn reap_forever(&self) {
        let mut finished = Vec::new();
        loop {
            self.enter(1);
            let resubmit = {
                let mut st = self.state.lock();
                // SAFETY: only this thread reads the completion queue.
                for cqe in unsafe { self.ring.completion_shared() } {
                    let (idx, res) = (cqe.user_data() as usize, cqe.result());
                    match st.slots.reap(idx, res) {
                        Reaped::Again => st.backlog.push_back(idx),
                        Reaped::Done(req, cb, r) => finished.push((req, cb, r)),
                        Reaped::Unknown => {}
                    }
                }
                self.flush_backlog(&mut st)
            };
            if resubmit {
                self.enter(0);
            }
            for (req, cb, r) in finished.drain(..) {
                cb(req, r);
            }
        }
    }
}

fn sqe_for(req: &mut IoReq) -> squeue::Entry {
    let fd = types::Fd(req.raw_fd());
    let off = req.offset + req.done as u64;
    let rest = (req.buf.len() - req.done.min(req.buf.len())).min(u32::MAX as usize) as u32;
    match req.kind {
        // SAFETY (pointer arithmetic): done <= buf.len(), so the pointer stays in the buffer.
        OpKind::Read => opcode::Read::new(fd, unsafe { req.buf.as_mut_ptr().add(req.done) }, rest)
            .offset(off)
            .build(),
        OpKind::Write => opcode::Write::new(fd, unsafe { req.buf.as_ptr().add(req.done) }, rest)
            .offset(off)
            .rw_flags(if req.fua { libc::RWF_DSYNC } else { 0 })
            .build(),
        OpKind::Fsync => opcode::Fsync::new(fd).build(),
        OpKind::Fdatasync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        OpKind::Fallocate(mode) => opcode::Fallocate::new(fd, req.len)
            .offset(req.offset)
            .mode(mode)
            .build(),
    }
}
