//! I/O backends: `aio=native` (io_uring, [`uring`]) and `aio=threads` (a
//! thread pool, [`pool`]). Both take an [`IoReq`] and call its completion
//! from their own thread; a request always completes in full or fails.

pub mod buf;
pub mod pool;
pub mod uring;

pub use buf::Buf;

use crate::options::Aio;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// Fills `buf` from `offset`; bytes past the end of the file read as zero.
    Read,
    /// Writes all of `buf` at `offset`.
    Write,
    Fsync,
    Fdatasync,
    /// `fallocate(mode, offset, len)`.
    Fallocate(i32),
}

pub struct IoReq {
    pub fd: Arc<OwnedFd>,
    pub kind: OpKind,
    pub offset: u64,
    /// Length for fallocate; data ops use `buf.len()`.
    pub len: u64,
    pub buf: Buf,
    /// Bytes already transferred (a short read or write is continued).
    pub done: usize,
    /// Held by the thread pool around the transfer: buffered writes to one
    /// file take its inode lock anyway, and waiting here costs less than
    /// the kernel's spinning on that lock (io_uring serializes them too).
    pub serial: Option<Arc<parking_lot::Mutex<()>>>,
    /// A write that is on stable storage when it completes (`RWF_DSYNC`):
    /// only its own range is written back, where a flush writes the file.
    pub fua: bool,
}

impl IoReq {
    pub fn data(fd: Arc<OwnedFd>, kind: OpKind, offset: u64, buf: Buf) -> IoReq {
        IoReq {
            fd,
            kind,
            offset,
            len: buf.len() as u64,
            buf,
            done: 0,
            serial: None,
            fua: false,
        }
    }

    pub fn control(fd: Arc<OwnedFd>, kind: OpKind, offset: u64, len: u64) -> IoReq {
        IoReq {
            fd,
            kind,
            offset,
            len,
            buf: Buf::zeroed(0),
            done: 0,
            serial: None,
            fua: false,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether error `errno` on the continuation of a short read means the
    /// read reached the end of a regular file: a read of one is short only
    /// at its end, and an O_DIRECT descriptor refuses (EINVAL) to go on
    /// from an end that is not aligned. The rest reads as zeroes, as at the
    /// end of any file; the file may have grown since, but the read saw
    /// it end there.
    fn ended(&mut self, errno: i32) -> bool {
        if self.kind != OpKind::Read || self.done == 0 || errno != libc::EINVAL {
            return false;
        }
        // SAFETY: fstat fills a zeroed struct for a descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        let r = unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) };
        let ended = r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG;
        if ended {
            self.buf[self.done..].fill(0);
        }
        ended
    }

    /// Accounts a transfer of `n` bytes; true when the request is complete.
    /// A read that hits end of file (`n == 0`) is complete: the rest of the
    /// zeroed buffer stands for the bytes past the end.
    fn advance(&mut self, n: usize) -> io::Result<bool> {
        match self.kind {
            OpKind::Read | OpKind::Write => {
                if n == 0 {
                    return if self.kind == OpKind::Read {
                        // Buffers may be recycled: the bytes past the end must be zeroed here.
                        self.buf[self.done..].fill(0);
                        Ok(true)
                    } else {
                        Err(io::Error::from_raw_os_error(libc::EIO))
                    };
                }
                self.done += n;
                Ok(self.done >= self.buf.len())
            }
            _ => Ok(true),
        }
    }
}

pub type IoDone = Box<dyn FnOnce(IoReq, io::Result<()>) + Send>;

pub trait Backend: Send + Sync {
    fn submit(&self, req: IoReq, done: IoDone);
    fn name(&self) -> &'static str;
}

static POOL: OnceLock<Arc<pool::Pool>> = OnceLock::new();
static URING: OnceLock<Option<Arc<uring::Rings>>> = OnceLock::new();

/// The process-wide backend for an aio mode. `native` falls back to the
/// thread pool, with a warning, when the kernel refuses an io_uring.
pub fn backend(aio: Aio) -> Arc<dyn Backend> {
    let pool = || -> Arc<dyn Backend> {
        POOL.get_or_init(|| {
            Arc::new(pool::Pool::new(env_count(
                "BLKFS_POOL_THREADS",
                pool::DEFAULT_THREADS,
            )))
        })
        .clone()
    };
    match aio {
        Aio::Threads => pool(),
        Aio::Native => match URING.get_or_init(start_rings) {
            Some(r) => r.clone(),
            None => pool(),
        },
    }
}

fn start_rings() -> Option<Arc<uring::Rings>> {
    match uring::Rings::new(ring_count(), uring::DEFAULT_DEPTH) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            log::warn!("io_uring unavailable ({e}); aio=native falls back to the thread pool");
            None
        }
    }
}

/// Number of io_uring threads: BLKFS_RINGS, else 1.
fn ring_count() -> usize {
    env_count("BLKFS_RINGS", 1)
}

/// A thread count from the environment (1..=64), else `default`.
fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(default)
}

thread_local! {
    static COMPLETER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static LOCAL_RING: std::cell::RefCell<Option<std::rc::Rc<dyn LocalRing>>> =
        const { std::cell::RefCell::new(None) };
    static LOCAL_ACTIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// An io_uring that a thread owns and reaps itself (a FUSE worker): inside
/// [`with_local_ring`], that thread's `aio=native` requests go to it and
/// complete on that thread, with no hand-over to a ring thread.
pub trait LocalRing {
    fn submit(&self, req: IoReq, done: IoDone);
}

/// Gives the calling thread its own ring, for [`with_local_ring`].
pub fn install_local_ring(ring: std::rc::Rc<dyn LocalRing>) {
    LOCAL_RING.with(|r| *r.borrow_mut() = Some(ring));
}

/// Whether the calling thread has its own ring ([`install_local_ring`]).
pub fn has_local_ring() -> bool {
    LOCAL_RING.with(|r| r.borrow().is_some())
}

/// Runs `f` with the thread's `aio=native` requests sent to its own ring.
/// Only for calls that never block: the ring is reaped by this thread, so
/// a wait here for another request of that ring could never end. The
/// engine's own waits ([`crate::drivers::wait`]) step out of it.
pub fn with_local_ring<T>(f: impl FnOnce() -> T) -> T {
    local_ring_scope(true, f)
}

/// Runs `f` with the thread's requests sent to the shared rings (a
/// blocking wait inside a [`with_local_ring`] call).
pub(crate) fn without_local_ring<T>(f: impl FnOnce() -> T) -> T {
    local_ring_scope(false, f)
}

fn local_ring_scope<T>(active: bool, f: impl FnOnce() -> T) -> T {
    let was = LOCAL_ACTIVE.with(|a| a.replace(active));
    let out = f();
    LOCAL_ACTIVE.with(|a| a.set(was));
    out
}

/// Whether the calling thread's requests go to its own ring now: it must
/// not wait for I/O.
pub(crate) fn on_local_ring() -> bool {
    LOCAL_ACTIVE.with(|a| a.get()) && has_local_ring()
}

/// The calling thread's ring, when a [`with_local_ring`] call is running.
fn local_ring() -> Option<std::rc::Rc<dyn LocalRing>> {
    if !LOCAL_ACTIVE.with(|a| a.get()) {
        return None;
    }
    LOCAL_RING.with(|r| r.borrow().clone())
}

/// Marks the calling thread as one that runs I/O completions (a ring
/// thread, an `aio=threads` pool thread, the deferred-completion thread).
pub(crate) fn mark_completer() {
    COMPLETER.with(|c| c.set(true));
}

/// Whether the calling thread runs I/O completions: it must never wait for
/// I/O, since the completion it would wait for may need this very thread
/// (`drivers::wait` refuses there instead of deadlocking).
pub fn on_completer() -> bool {
    COMPLETER.with(|c| c.get())
}

pub(crate) type Job = Box<dyn FnOnce() + Send>;
static WORKERS: OnceLock<crossbeam_channel::Sender<Job>> = OnceLock::new();
const WORKER_THREADS: usize = 8;

/// Starts `threads` threads named `name-N` running the jobs sent to the
/// returned channel; `completer`: they run I/O completions
/// ([`mark_completer`]). A panicking job is a bug, but it must not take its
/// thread with it: its completion is dropped, and
/// `drivers::completes_on_drop` answers that with EIO.
pub(crate) fn job_threads(
    name: &str,
    threads: usize,
    completer: bool,
) -> crossbeam_channel::Sender<Job> {
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    for i in 0..threads {
        let rx = rx.clone();
        let r = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .spawn(move || {
                if completer {
                    mark_completer();
                }
                for job in rx.iter() {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        log::error!("a job panicked; its request fails with EIO");
                    }
                }
            });
        if let Err(e) = r {
            log::warn!("cannot start thread {name}-{i}: {e}");
        }
    }
    tx
}

/// Sends `job` to `tx`, or runs it here when no thread could start
/// rather than lose it.
pub(crate) fn send_job(tx: &crossbeam_channel::Sender<Job>, job: Job) {
    if let Err(e) = tx.send(job) {
        (e.into_inner())();
    }
}

/// Runs `job` here, or on a thread that may wait when this one reaps its
/// own ring ([`has_local_ring`]): for work that may wait for a lock whose
/// holder waits for I/O in flight on that ring.
pub fn off_local_ring(job: impl FnOnce() + Send + 'static) {
    if has_local_ring() {
        return spawn_blocking(job);
    }
    job()
}

/// Runs a slow-path job (metadata allocation, copy-on-write) on a worker
/// thread, so FUSE reader threads never wait for it.
pub fn spawn_blocking(job: impl FnOnce() + Send + 'static) {
    let tx = WORKERS.get_or_init(|| job_threads("blkfs-worker", WORKER_THREADS, false));
    send_job(tx, Box::new(job));
}

static DEFERRED: OnceLock<crossbeam_channel::Sender<Job>> = OnceLock::new();

/// Runs a completion later on a thread of its own: for completions that must
/// not run inside their submitter's call (blkdebug's injected errors).
/// Completions never block, so one thread serves them all; running them on
/// the worker pool could starve it: a worker waiting for such a completion
/// while every other worker waits for the same lock (issue 8, finding 5).
pub fn defer(completion: impl FnOnce() + Send + 'static) {
    let tx = DEFERRED.get_or_init(|| job_threads("blkfs-deferred", 1, true));
    send_job(tx, Box::new(completion));
}
