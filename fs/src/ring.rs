//! FUSE over io_uring (Linux 6.14+): the kernel hands requests to buffers
//! registered on one io_uring per queue, and takes each answer together
//! with the fetch of the next request, so there is no read(2)/writev(2)
//! round trip on /dev/fuse per request. FORGET and INTERRUPT still arrive
//! on /dev/fuse, where fuser's readers keep serving them.
//!
//! The kernel has a queue per possible CPU and routes a request to the
//! queue of the CPU its caller runs on. Entries of one queue may come from
//! any ring, so each worker thread here owns a ring with entries on every
//! queue: a single busy caller (one fio job) keeps all workers busy, not
//! only the one of its CPU. A worker registers its entries, decodes
//! requests, starts the engine I/O and submits every answer. A read or
//! write that the device maps straight onto its file is the worker's own
//! transfer on its ring ([`Device::direct`]), with no engine completion.
//! Completions that finish on other threads only push their answer under
//! the ring's lock and wake the queue thread through an eventfd: the SQE that fetches the next request must be
//! submitted by a thread that lives as long as the ring, because the kernel
//! copies the next request in that thread's context.
//!
//! An entry belongs to the kernel from its REGISTER or COMMIT until its
//! completion, then to the daemon until its answer is pushed. Its buffers
//! are touched only by the daemon-side owner of the moment.

use crate::fuse::Export;
use crate::fuse_abi::{self as abi, Op};
use blkfs_engine::device::{Device, Direct};
use blkfs_engine::drivers::completes_on_drop;
use blkfs_engine::io::uring::{Reaped, Slots};
use blkfs_engine::io::{Buf, IoDone, IoReq, LocalRing, OpKind};
use io_uring::{opcode, squeue::Entry128, types, IoUring};
use parking_lot::Mutex;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Entries per kernel queue (over all workers): one request each. A single
/// fio job at QD32 lands on one CPU's queue, so a queue must hold that many
/// on its own; machines with many CPUs get fewer per queue, and at most
/// TOTAL_ENTRIES payload buffers in all.
const QUEUE_DEPTH: usize = 32;
const TOTAL_ENTRIES: usize = 256;
const MAX_WORKERS: usize = 8;
const HEADER_STRIDE: usize = 512;
const REGISTER: u32 = 1;
const COMMIT_AND_FETCH: u32 = 2;
const WAKE: u64 = u64::MAX;
/// Tag of the disk requests a worker runs on its own ring.
const DISK: u64 = 1 << 62;
/// Tag of the transfers a worker submits for an entry itself ([`Direct`]).
const DIRECT: u64 = 1 << 61;

/// Queues created when the kernel offered the transport at INIT; they
/// start serving once the session's /dev/fuse descriptor is known.
pub struct Prepared {
    workers: Vec<Worker>,
    queues: usize,
    per_queue: usize,
}

/// How many queues the kernel expects: one per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        n = n.max(b + 1).max(a + 1);
    }
    Ok(n)
}

impl Prepared {
    /// Creates a ring, buffers and a wake-up eventfd for each possible CPU.
    pub fn new(payload_len: usize) -> io::Result<Prepared> {
        let queues = possible_cpus()?;
        if queues == 0 || queues > u16::MAX as usize {
            return Err(io::Error::other(format!("{queues} possible CPUs")));
        }
        let per_queue = (TOTAL_ENTRIES / queues).clamp(1, QUEUE_DEPTH);
        let workers = queues.min(MAX_WORKERS).min(per_queue);
        let per_worker = per_queue / workers;
        let workers = (0..workers)
            .map(|w| Worker::new(w, queues, per_worker, payload_len))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Prepared {
            per_queue: per_worker * workers.len(),
            workers,
            queues,
        })
    }

    /// Registers the entries, each worker from its own thread (the first
    /// one's first), and serves requests until the connection ends.
    pub fn start(self, dev_fd: RawFd, export: Arc<Export>) -> io::Result<()> {
        let workers = self.workers.len();
        for mut q in self.workers {
            q.dev_fd = dev_fd;
            let q = Arc::new(Running {
                q,
                export: export.clone(),
            });
            let (tx, rx) = crossbeam_channel::bounded(1);
            std::thread::Builder::new()
                .name(format!("blkfs-fuse-{}", q.q.id))
                .spawn(move || q.run(tx))?;
            rx.recv()
                .map_err(|_| io::Error::other("a FUSE worker thread ended at start"))??;
        }
        log::debug!(
            "FUSE transport: io_uring, {} queues of {} entries, {workers} worker threads",
            self.queues,
            self.per_queue
        );
        Ok(())
    }
}

struct Entry {
    qid: u16,
    /// Header and payload buffers, as REGISTER hands them to the kernel.
    iov: [libc::iovec; 2],
    commit_id: AtomicU64,
    /// A request has arrived in it: a later error is not a REGISTER's.
    registered: AtomicBool,
    /// The `unique` of the request it holds until that is answered (0: none):
    /// an entry is committed once, and one whose request panicked is
    /// answered (EIO) rather than lost with its caller waiting for good.
    unanswered: AtomicU64,
    /// Its payload is lent to the engine (a read into it, a write from
    /// it) until the request's completion runs: a panic elsewhere must
    /// not answer it while I/O may still use the payload.
    lent: AtomicBool,
}

struct Worker {
    id: usize,
    dev_fd: RawFd,
    ring: IoUring<Entry128>,
    /// Entries are pushed onto the submission queue only under this lock,
    /// which also holds those of other threads waiting for room (`push`).
    sq: Mutex<VecDeque<Entry128>>,
    entries: Vec<Entry>,
    /// The memory the kernel copies requests into; freed only with the
    /// worker, after every entry has left the kernel.
    _headers: Buf,
    _payloads: Buf,
    wake_fd: OwnedFd,
    /// A wake-up is on its way: completions need not write the eventfd.
    wake_pending: AtomicBool,
    wake_buf: Box<AtomicU64>,
}

// SAFETY: the raw buffer pointers in `entries` are used by one owner at a
// time (see the module comment); the ring's queues are shared under `sq`
// (submission) or by the queue thread alone (completion).
unsafe impl Send for Worker {}
// SAFETY: as above.
unsafe impl Sync for Worker {}

thread_local! {
    /// The worker this thread is, if it is one.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

impl Worker {
    fn new(id: usize, queues: usize, per_queue: usize, payload_len: usize) -> io::Result<Worker> {
        let n = queues * per_queue;
        // Completions (a request arriving, a disk read ending) are posted
        // by task work on this worker, the ring's only submitter, which
        // enters the ring again as soon as it has served a batch: cooperative
        // task running spares the inter-processor interrupt that would force
        // it into the kernel early (13-18k/s under 4k randread; 6% less
        // CPU per request, BENCHMARKS.md).
        let ring = IoUring::<Entry128>::builder()
            .setup_coop_taskrun()
            .build((2 * n + 2).next_power_of_two() as u32)?;
        let mut headers = Buf::zeroed(n * HEADER_STRIDE);
        let mut payloads = Buf::zeroed(n * payload_len);
        let (hp, pp) = (headers.as_mut_ptr(), payloads.as_mut_ptr());
        let entries = (0..n)
            .map(|i| Entry {
                qid: (i % queues) as u16,
                iov: [
                    libc::iovec {
                        // SAFETY: within the header mapping (n strides).
                        iov_base: unsafe { hp.add(i * HEADER_STRIDE) }.cast(),
                        iov_len: abi::RING_HEADER_LEN,
                    },
                    libc::iovec {
                        // SAFETY: within the payload mapping (n buffers).
                        iov_base: unsafe { pp.add(i * payload_len) }.cast(),
                        iov_len: payload_len,
                    },
                ],
                commit_id: AtomicU64::new(0),
                registered: AtomicBool::new(false),
                unanswered: AtomicU64::new(0),
                lent: AtomicBool::new(false),
            })
            .collect();
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Worker {
            id,
            dev_fd: -1,
            ring,
            sq: Mutex::default(),
            entries,
            _headers: headers,
            _payloads: payloads,
            // SAFETY: fd is a new descriptor owned by nobody else.
            wake_fd: unsafe { OwnedFd::from_raw_fd(fd) },
            wake_pending: AtomicBool::new(false),
            wake_buf: Box::default(),
        })
    }

    /// The header buffer of an entry the daemon owns.
    #[allow(clippy::mut_from_ref)]
    fn header(&self, idx: usize) -> &mut [u8] {
        let iov = &self.entries[idx].iov[0];
        // SAFETY: the caller owns the entry (it is not in the kernel), so
        // nothing else reads or writes these bytes until it is committed.
        unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast(), iov.iov_len) }
    }

    /// The payload buffer of an entry the daemon owns.
    #[allow(clippy::mut_from_ref)]
    fn payload(&self, idx: usize) -> &mut [u8] {
        let iov = &self.entries[idx].iov[1];
        // SAFETY: as in `header`.
        unsafe { std::slice::from_raw_parts_mut(iov.iov_base.cast(), iov.iov_len) }
    }

    fn cmd(&self, op: u32, idx: usize, commit_id: u64) -> Entry128 {
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
        cmd[16..18].copy_from_slice(&self.entries[idx].qid.to_le_bytes());
        let addr = (op == REGISTER).then(|| self.entries[idx].iov.as_ptr() as u64);
        let sqe = opcode::UringCmd80::new(types::Fd(self.dev_fd), op)
            .cmd(cmd)
            .addr(addr)
            .build()
            .user_data(idx as u64);
        if op == REGISTER {
            with_len(sqe, 2)
        } else {
            sqe
        }
    }

    /// Queues an SQE. When the submission queue is full it waits in the
    /// overflow list, which the worker moves on between its waits: no other
    /// thread enters the ring, and the worker never spins here (its own
    /// completions, which make room, are reaped only by its loop).
    fn push(&self, sqe: &Entry128) {
        let mut overflow = self.sq.lock();
        // SAFETY: pushes are serialised by `sq`; the entry refers to
        // buffers that outlive the ring (owned by this worker).
        if overflow.is_empty() && unsafe { self.ring.submission_shared().push(sqe) }.is_ok() {
            return;
        }
        overflow.push_back(sqe.clone());
    }

    /// On the worker, before it enters: moves what fits of the overflow
    /// list into the submission queue, in order.
    fn flush_overflow(&self) {
        let mut overflow = self.sq.lock();
        while let Some(sqe) = overflow.front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission_shared().push(sqe) }.is_err() {
                break;
            }
            overflow.pop_front();
        }
    }

    fn is_current(&self) -> bool {
        SERVING.get() == self as *const Worker as usize
    }

    fn arm_wake(&self) {
        let sqe = opcode::Read::new(
            types::Fd(self.wake_fd.as_raw_fd()),
            self.wake_buf.as_ptr().cast(),
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(&Entry128::from(sqe));
    }

    /// Answers the request in entry `idx` and fetches the next one.
    fn answer(&self, idx: usize, unique: u64, result: Result<usize, i32>) {
        let pending = &self.entries[idx].unanswered;
        if pending
            .compare_exchange(unique, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Already answered (a panic's EIO went first): committing again
            // would hand the kernel an entry it may be filling.
            return log::error!("FUSE worker {}: entry {idx} answered twice", self.id);
        }
        abi::put_reply(self.header(idx), unique, result);
        let commit_id = self.entries[idx].commit_id.load(Ordering::Relaxed);
        self.push(&self.cmd(COMMIT_AND_FETCH, idx, commit_id));
        if self.is_current() {
            return; // the loop submits it before it sleeps
        }
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a local to an eventfd we own.
            unsafe { libc::write(self.wake_fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// Sets `sqe.len`, which the crate's URING_CMD builder does not expose.
fn with_len(sqe: Entry128, len: u32) -> Entry128 {
    const _: () = assert!(std::mem::size_of::<Entry128>() == 128);
    // SAFETY: Entry128 is repr(C): a 64-byte io_uring_sqe of plain integers
    // followed by 64 command bytes, so every bit pattern is valid; `len` is
    // the u32 at byte 24 of io_uring_sqe.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], Entry128>(raw) }
}

struct Running {
    q: Worker,
    export: Arc<Export>,
}

/// The disk requests a worker submits on its own ring: they complete on
/// the worker, which answers at once, with no other thread woken.
struct LocalDisk {
    run: Arc<Running>,
    /// The engine's requests, each with its completion.
    slots: RefCell<Slots>,
    /// By entry: the transfer of the entry's request in flight, where the
    /// device maps it straight onto its file ([`Device::direct`]).
    flights: RefCell<Vec<Option<Flight>>>,
    flying: Cell<usize>,
}

struct Flight {
    dev: Arc<Device>,
    io: Direct,
    unique: u64,
}

impl LocalRing for LocalDisk {
    fn submit(&self, req: IoReq, done: IoDone) {
        let read = req.kind == OpKind::Read;
        let idx = self.slots.borrow_mut().insert(req, done);
        self.send(idx);
        // A read goes to the disk at once, not after the rest of the batch:
        // the disk serves what it has in rounds, and one that starts
        // earlier holds more reads (+6% 4k randread QD32, BENCHMARKS.md).
        // Writes wait for the batch's one enter: they are CPU-bound, and
        // an enter each cost them 11%.
        if read {
            self.enter_now();
        }
    }
}

impl LocalDisk {
    fn in_flight(&self) -> usize {
        self.slots.borrow().in_flight() + self.flying.get()
    }

    /// Submits entry `idx`'s transfer to or from its payload, which stays
    /// lent until [`LocalDisk::land`]; the flight keeps the file open.
    fn start(&self, idx: usize, unique: u64, dev: Arc<Device>, io: Direct) {
        let q = &self.run.q;
        let fd = types::Fd(io.extent.fd.as_raw_fd());
        let (at, len, pos) = (
            q.payload(idx).as_mut_ptr(),
            io.bytes() as u32,
            io.extent.offset,
        );
        let write = io.is_write();
        let sqe = if write {
            opcode::Write::new(fd, at, len).offset(pos).build()
        } else {
            opcode::Read::new(fd, at, len).offset(pos).build()
        };
        q.entries[idx].lent.store(true, Ordering::Release);
        self.flights.borrow_mut()[idx] = Some(Flight { dev, io, unique });
        self.flying.set(self.flying.get() + 1);
        q.push(&Entry128::from(sqe.user_data(DIRECT | idx as u64)));
        if !write {
            self.enter_now();
        }
    }

    /// Answers entry `idx` once its transfer ended with `res`; one that
    /// failed or fell short is served again through the engine.
    fn land(&self, idx: usize, res: i32) {
        let Some(f) = self
            .flights
            .borrow_mut()
            .get_mut(idx)
            .and_then(Option::take)
        else {
            return;
        };
        self.flying.set(self.flying.get() - 1);
        let q = &self.run.q;
        q.entries[idx].lent.store(false, Ordering::Release);
        let (len, write) = (f.io.bytes(), f.io.is_write());
        let moved = usize::try_from(res).is_ok_and(|n| n == len);
        f.dev.finish(f.io, moved);
        if !moved {
            return self.run.serve(idx, None);
        }
        let n = if write {
            abi::write_out(q.payload(idx), len as u32)
        } else {
            len
        };
        q.answer(idx, f.unique, Ok(n))
    }

    /// Sends what is queued to the disk now rather than after the batch.
    fn enter_now(&self) {
        if let Err(e) = self.run.q.ring.submit() {
            // The loop's next enter submits it, or reports the error.
            log::debug!("FUSE worker {}: io_uring_enter: {e}", self.run.q.id);
        }
    }

    /// Queues (the rest of) slot `idx`'s request on the worker's ring.
    fn send(&self, idx: usize) {
        let sqe = self.slots.borrow_mut().entry(idx);
        if let Some(sqe) = sqe {
            self.run
                .q
                .push(&Entry128::from(sqe.user_data(DISK | idx as u64)));
        }
    }

    fn reap(&self, idx: usize, res: i32) {
        let reaped = self.slots.borrow_mut().reap(idx, res);
        match reaped {
            Reaped::Again => self.send(idx),
            // Outside the borrow: the completion may submit again.
            Reaped::Done(req, cb, r) => cb(req, r),
            Reaped::Unknown => {}
        }
    }
}

impl Running {
    fn run(self: Arc<Self>, started: crossbeam_channel::Sender<io::Result<()>>) {
        let q = &self.q;
        SERVING.set(q as *const Worker as usize);
        let n = q.entries.len();
        let disk = Rc::new(LocalDisk {
            run: self.clone(),
            slots: RefCell::default(),
            flights: RefCell::new((0..n).map(|_| None).collect()),
            flying: Cell::new(0),
        });
        blkfs_engine::io::install_local_ring(disk.clone());
        for idx in 0..n {
            q.push(&q.cmd(REGISTER, idx, 0));
        }
        q.arm_wake();
        let first = q.ring.submit();
        let _ = started.send(first.map(|_| ()));
        let mut dead = 0;
        let mut ready = Vec::with_capacity(2 * n);
        // Disk requests still in flight hold buffers the ring writes into.
        while dead < n || disk.in_flight() > 0 {
            q.flush_overflow();
            match q.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: drain it below.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    log::error!("FUSE worker {}: io_uring_enter: {e}", q.id);
                    // Entries and disk reads may still be in the kernel:
                    // their buffers must never be freed.
                    std::mem::forget(disk);
                    std::mem::forget(self);
                    return;
                }
            }
            // SAFETY: only this thread reads the completion queue.
            ready
                .extend(unsafe { q.ring.completion_shared() }.map(|c| (c.user_data(), c.result())));
            for (tag, res) in ready.drain(..) {
                // A panic is a bug, but unwinding out of this loop would
                // free buffers the kernel still writes: the request is
                // lost instead.
                let one = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.complete(&disk, tag, res)
                }));
                match one {
                    Ok(gone) => dead += gone,
                    Err(_) => self.answer_panicked(tag),
                }
            }
        }
        log::debug!("FUSE worker {}: connection ended", q.id);
    }

    /// After a panic: the request of a FUSE entry is answered EIO if it was
    /// not yet (its asynchronous answers fail with EIO when their closures
    /// are dropped, see `completes_on_drop`).
    fn answer_panicked(&self, tag: u64) {
        let q = &self.q;
        log::error!(
            "FUSE worker {}: a request panicked (a bug); answering EIO",
            q.id
        );
        if tag == WAKE || tag & DISK != 0 {
            return;
        }
        // A direct transfer's entry is the daemon's once its completion came.
        let idx = (tag & !DIRECT) as usize;
        let Some(entry) = q.entries.get(idx) else {
            return;
        };
        if entry.lent.load(Ordering::Acquire) {
            // Its completion answers it, once the I/O on the payload ended.
            return;
        }
        let unique = entry.unanswered.load(Ordering::Acquire);
        if unique != 0 {
            q.answer(idx, unique, Err(libc::EIO));
        }
    }

    /// Handles one completion; returns 1 when it ends an entry for good.
    fn complete(self: &Arc<Self>, disk: &LocalDisk, tag: u64, res: i32) -> usize {
        let q = &self.q;
        if tag == WAKE {
            q.wake_pending.store(false, Ordering::Release);
            q.arm_wake();
            return 0;
        }
        if tag & DISK != 0 {
            disk.reap((tag & !DISK) as usize, res);
            return 0;
        }
        if tag & DIRECT != 0 {
            disk.land((tag & !DIRECT) as usize, res);
            return 0;
        }
        let idx = tag as usize;
        let registered = q.entries[idx].registered.load(Ordering::Relaxed);
        match -res {
            0 => {
                q.entries[idx].registered.store(true, Ordering::Relaxed);
                self.serve(idx, Some(disk));
                0
            }
            // A REGISTER before the INIT reply was processed.
            libc::EAGAIN | libc::EINTR if !registered => {
                q.push(&q.cmd(REGISTER, idx, 0));
                0
            }
            // The connection is gone (unmount or abort).
            libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED => 1,
            e => {
                log::error!(
                    "FUSE worker {} entry {idx}: {}",
                    q.id,
                    io::Error::from_raw_os_error(e)
                );
                1
            }
        }
    }

    /// Serves the request that just arrived in entry `idx`. `own`: the
    /// worker's ring, where a read or write may be a transfer of the
    /// worker's own ([`Device::direct`]); None sends it through the engine.
    fn serve(self: &Arc<Self>, idx: usize, own: Option<&LocalDisk>) {
        let q = &self.q;
        let hdr = q.header(idx);
        let Some(h) = abi::in_header(hdr) else {
            return log::error!("FUSE worker {}: short request header", q.id);
        };
        q.entries[idx]
            .commit_id
            .store(abi::commit_id(hdr).unwrap_or(h.unique), Ordering::Relaxed);
        q.entries[idx].unanswered.store(h.unique, Ordering::Release);
        let psz = abi::payload_size(hdr).unwrap_or(0) as usize;
        let payload = q.payload(idx);
        let Some(args) = payload.get(..psz) else {
            return q.answer(idx, h.unique, Err(libc::EIO));
        };
        let op = match abi::decode(hdr, args) {
            Ok((_, op)) => op,
            Err(e) => return q.answer(idx, h.unique, Err(e)),
        };
        let ex = &self.export;
        let ino = h.nodeid;
        let result = match op {
            Op::Lookup { name } => ex
                .lookup(ino, name)
                .map(|a| abi::entry_out(q.payload(idx), &Export::wire_attr(&a))),
            Op::Getattr => ex
                .getattr(ino)
                .map(|a| abi::attr_out(q.payload(idx), &Export::wire_attr(&a))),
            Op::Setattr {
                valid,
                size,
                mode,
                uid,
                gid,
            } => {
                let has = |bit: u32| valid & bit != 0;
                let set = crate::fuse::SetAttr {
                    size: has(abi::FATTR_SIZE).then_some(size),
                    mode: has(abi::FATTR_MODE).then_some(mode),
                    uid: has(abi::FATTR_UID).then_some(uid),
                    gid: has(abi::FATTR_GID).then_some(gid),
                };
                ex.setattr(ino, set)
                    .map(|a| abi::attr_out(q.payload(idx), &Export::wire_attr(&a)))
            }
            Op::Open { flags } => ex.open(ino, flags as i32).map(|backing| match backing {
                Some(id) => abi::open_out(q.payload(idx), abi::FOPEN_PASSTHROUGH, id),
                None => abi::open_out(
                    q.payload(idx),
                    abi::FOPEN_DIRECT_IO | abi::FOPEN_PARALLEL_DIRECT_WRITES,
                    0,
                ),
            }),
            Op::Read { offset, size } => return self.read(own, idx, h.unique, ino, offset, size),
            Op::Write { offset, data } => return self.write(own, idx, h.unique, ino, offset, data),
            Op::Fsync => {
                let unique = h.unique;
                return self.elsewhere(idx, unique, move |me| me.fsync(idx, unique, ino));
            }
            Op::Fallocate {
                offset,
                length,
                mode,
            } => {
                let unique = h.unique;
                return self.elsewhere(idx, unique, move |me| {
                    me.fallocate(idx, unique, ino, offset, length, mode)
                });
            }
            Op::Statfs => Ok(abi::statfs_out(q.payload(idx))),
            Op::Flush => ex.device(ino).map(|_| 0),
            Op::Opendir => Ok(abi::open_out(q.payload(idx), 0, 0)),
            Op::Release => {
                ex.release(ino);
                Ok(0)
            }
            Op::Releasedir | Op::Destroy => Ok(0),
            Op::Readdir { offset, size } => ex.readdir(ino).map(|entries| {
                let out = q.payload(idx);
                let limit = (size as usize).min(out.len());
                let out = &mut out[..limit];
                let mut end = 0;
                for (i, (ino, dir, name)) in entries.iter().enumerate().skip(offset as usize) {
                    let kind = if *dir { abi::DT_DIR } else { abi::DT_REG };
                    match abi::dirent(out, end, *ino, i as u64 + 1, kind, name.as_bytes()) {
                        Some(e) => end = e,
                        None => break,
                    }
                }
                end
            }),
            // No extended attributes; ENOSYS stops the kernel asking before
            // every write.
            Op::Getxattr { .. } => Err(fuser::Errno::ENOSYS),
            Op::Listxattr { size: 0 } => Ok(abi::xattr_size_out(q.payload(idx), 0)),
            Op::Listxattr { .. } => Ok(0),
            Op::Lseek { offset, whence } => {
                let unique = h.unique;
                return self.elsewhere(idx, unique, move |me| {
                    let r = me
                        .export
                        .lseek(ino, offset as i64, whence as i32)
                        .map(|pos| abi::lseek_out(me.q.payload(idx), pos));
                    me.q.answer(idx, unique, r.map_err(|e| e.code()))
                });
            }
            Op::Ioctl { cmd, out_size } => ex
                .ioctl(ino, cmd, out_size)
                .map(|data| abi::ioctl_out(q.payload(idx), &data)),
            Op::Other(_) => Err(fuser::Errno::ENOSYS),
        };
        q.answer(idx, h.unique, result.map_err(|e| e.code()))
    }

    /// Serves entry `idx` on a thread that may wait. A flush, a fallocate
    /// or a block-status lookup may wait for a lock whose holder waits for
    /// I/O in flight on this worker's ring (a metadata read-modify-write
    /// waits for the aligned data writes there), which only this thread
    /// reaps. A panic there is answered EIO, as one here is.
    fn elsewhere(
        self: &Arc<Self>,
        idx: usize,
        unique: u64,
        f: impl FnOnce(&Arc<Self>) + Send + 'static,
    ) {
        let me = self.clone();
        blkfs_engine::io::spawn_blocking(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&me)));
            if r.is_err() {
                log::error!("FUSE worker {}: a request panicked (a bug)", me.q.id);
                // Unless its completion, dropped in the unwinding, did.
                if me.q.entries[idx].unanswered.load(Ordering::Acquire) == unique {
                    me.q.answer(idx, unique, Err(libc::EIO));
                }
            }
        });
    }

    fn read(
        self: &Arc<Self>,
        own: Option<&LocalDisk>,
        idx: usize,
        unique: u64,
        ino: u64,
        offset: u64,
        size: u32,
    ) {
        let q = &self.q;
        let dev = match self.export.device(ino) {
            Ok(d) => d,
            Err(e) => return q.answer(idx, unique, Err(e.code())),
        };
        let payload = q.payload(idx);
        let size = (size as usize).min(payload.len());
        if let Some(own) = own {
            if let Some(io) = dev.direct(false, offset, &payload[..size]) {
                return own.start(idx, unique, dev, io);
            }
        }
        let at = payload.as_mut_ptr();
        // SAFETY: the entry is the daemon's until it is answered, and it is
        // answered by `done` (lent meanwhile: not by a panic's EIO), which
        // `read_into` calls with the buffer back once every I/O into it has
        // ended, or drops once nothing holds the buffer.
        let into = unsafe { Buf::borrowed(at, size) };
        let at = at as usize;
        let me = self.clone();
        q.entries[idx].lent.store(true, Ordering::Release);
        let done = completes_on_drop(move |r: blkfs_engine::Result<Buf>| {
            let q = &me.q;
            q.entries[idx].lent.store(false, Ordering::Release);
            let result = r.map(|buf| {
                // A buffer of the engine's own (a retry, a chain that
                // reads elsewhere) is copied; the payload is already there.
                if buf.as_ptr() as usize != at {
                    q.payload(idx)[..buf.len()].copy_from_slice(&buf);
                }
                buf.len()
            });
            q.answer(idx, unique, result.map_err(|e| e.errno()))
        });
        // The engine answers it from this thread's ring where it can.
        dev.read_into(offset, into, done)
    }

    fn write(
        self: &Arc<Self>,
        own: Option<&LocalDisk>,
        idx: usize,
        unique: u64,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) {
        let q = &self.q;
        let dev = match self.export.device(ino) {
            Ok(d) => d,
            Err(e) => return q.answer(idx, unique, Err(e.code())),
        };
        if let Some(own) = own {
            if let Some(io) = dev.direct(true, offset, data) {
                return own.start(idx, unique, dev, io);
            }
        }
        let len = data.len() as u32;
        let me = self.clone();
        q.entries[idx].lent.store(true, Ordering::Release);
        let done = completes_on_drop(move |r: blkfs_engine::Result<Buf>| {
            let q = &me.q;
            q.entries[idx].lent.store(false, Ordering::Release);
            let result = r.map(|_| abi::write_out(q.payload(idx), len));
            q.answer(idx, unique, result.map_err(|e| e.errno()))
        });
        // SAFETY: `data` is this entry's payload, the daemon's and unchanged
        // until the entry is answered, which `done` does (lent meanwhile).
        let data = unsafe { Buf::borrowed(data.as_ptr().cast_mut(), data.len()) };
        dev.write(offset, data, done)
    }

    fn fsync(self: &Arc<Self>, idx: usize, unique: u64, ino: u64) {
        let q = &self.q;
        let dev = match self.export.device(ino) {
            Ok(d) => d,
            Err(e) => return q.answer(idx, unique, Err(e.code())),
        };
        let me = self.clone();
        dev.flush(completes_on_drop(move |r| {
            me.q.answer(idx, unique, r.map(|()| 0).map_err(|e| e.errno()))
        }));
    }

    fn fallocate(
        self: &Arc<Self>,
        idx: usize,
        unique: u64,
        ino: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) {
        let q = &self.q;
        let dev = match self.export.device(ino) {
            Ok(d) => d,
            Err(e) => return q.answer(idx, unique, Err(e.code())),
        };
        let me = self.clone();
        crate::fuse::fallocate(
            &dev,
            offset,
            length,
            mode as i32,
            completes_on_drop(move |r| {
                me.q.answer(idx, unique, r.map(|()| 0).map_err(|e| e.errno()))
            }),
        );
    }
}
