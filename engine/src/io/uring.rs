//! `aio=native`: one io_uring owned by one ring thread.
//!
//! Submitters hand requests over a channel and poke an eventfd only when the
//! ring thread sleeps in the kernel; the ring thread keeps a read of that
//! eventfd armed on the ring, so new work and completions wake it alike.
//! Completions run on the ring thread.

use super::{Backend, IoDone, IoReq, OpKind};
use crossbeam_channel::{unbounded, Receiver, Sender};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

pub const DEFAULT_DEPTH: u32 = 256;
/// user_data of the eventfd read; request slots use their index.
const WAKE_TOKEN: u64 = u64::MAX;

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
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.rings.len();
        self.rings[i].submit(req, done)
    }

    fn name(&self) -> &'static str {
        "native"
    }
}

pub struct Ring {
    tx: Sender<(IoReq, IoDone)>,
    shared: Arc<Shared>,
}

struct Shared {
    eventfd: OwnedFd,
    sleeping: AtomicBool,
}

impl Ring {
    pub fn new(depth: u32) -> io::Result<Ring> {
        let ring = IoUring::new(depth)?;
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            eventfd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = unbounded();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("blkfs-uring".into())
            .spawn(move || {
                super::mark_completer();
                RingThread::new(ring, rx, thread_shared, depth as usize).run()
            })?;
        Ok(Ring { tx, shared })
    }
}

impl Backend for Ring {
    fn submit(&self, req: IoReq, done: IoDone) {
        if let Err(e) = self.tx.send((req, done)) {
            let (req, done) = e.into_inner();
            done(req, Err(io::Error::other("io_uring thread is gone")));
            return;
        }
        fence(Ordering::SeqCst);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            let _ = unsafe {
                libc::write(
                    self.shared.eventfd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    8,
                )
            };
        }
    }

    fn name(&self) -> &'static str {
        "native"
    }
}

struct RingThread {
    ring: IoUring,
    rx: Receiver<(IoReq, IoDone)>,
    shared: Arc<Shared>,
    slots: Vec<Option<(IoReq, IoDone)>>,
    free: Vec<usize>,
    backlog: VecDeque<usize>,
    wake_buf: Box<u64>,
    wake_armed: bool,
}

impl RingThread {
    fn new(
        ring: IoUring,
        rx: Receiver<(IoReq, IoDone)>,
        shared: Arc<Shared>,
        depth: usize,
    ) -> Self {
        RingThread {
            ring,
            rx,
            shared,
            slots: Vec::with_capacity(depth),
            free: Vec::new(),
            backlog: VecDeque::new(),
            wake_buf: Box::new(0),
            wake_armed: false,
        }
    }

    fn run(mut self) {
        loop {
            if !self.wake_armed {
                let e = opcode::Read::new(
                    types::Fd(self.shared.eventfd.as_raw_fd()),
                    (&mut *self.wake_buf as *mut u64).cast(),
                    8,
                )
                .build()
                .user_data(WAKE_TOKEN);
                if self.push(&e) {
                    self.wake_armed = true;
                }
            }
            let mut disconnected = false;
            loop {
                match self.rx.try_recv() {
                    Ok(item) => self.start(item),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            self.flush_backlog();
            if disconnected && self.slots.iter().all(Option::is_none) {
                return;
            }
            self.shared.sleeping.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let want = if self.rx.is_empty() { 1 } else { 0 };
            if want == 0 {
                self.shared.sleeping.store(false, Ordering::SeqCst);
            }
            if let Err(e) = self.ring.submit_and_wait(want) {
                if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                    log::error!("io_uring submit failed: {e}");
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            self.reap();
        }
    }

    fn start(&mut self, item: (IoReq, IoDone)) {
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(item);
                i
            }
            None => {
                self.slots.push(Some(item));
                self.slots.len() - 1
            }
        };
        self.backlog.push_back(idx);
    }

    fn flush_backlog(&mut self) {
        while let Some(&idx) = self.backlog.front() {
            let Some((req, _)) = self.slots[idx].as_mut() else {
                self.backlog.pop_front();
                continue;
            };
            let entry = sqe_for(req).user_data(idx as u64);
            if !self.push(&entry) {
                return;
            }
            self.backlog.pop_front();
        }
    }

    fn push(&mut self, e: &squeue::Entry) -> bool {
        let mut sq = self.ring.submission();
        // SAFETY: every buffer an entry points to lives in a slot (or wake_buf)
        // that is not touched until its completion is reaped.
        unsafe { sq.push(e).is_ok() }
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            if token == WAKE_TOKEN {
                self.wake_armed = false;
                continue;
            }
            let idx = token as usize;
            let Some((mut req, cb)) = self.slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            let outcome = if res < 0 {
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    Ok(false)
                } else {
                    Err(io::Error::from_raw_os_error(-res))
                }
            } else {
                req.advance(res as usize)
            };
            match outcome {
                Ok(false) => {
                    self.slots[idx] = Some((req, cb));
                    self.backlog.push_back(idx);
                }
                Ok(true) => {
                    self.free.push(idx);
                    cb(req, Ok(()));
                }
                Err(e) => {
                    self.free.push(idx);
                    cb(req, Err(e));
                }
            }
        }
        self.flush_backlog();
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
