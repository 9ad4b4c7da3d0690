//! A device: the file a user sees in the mount and the target of device
//! commands. Every request passes, in order: the range check, the throttle,
//! the gate (held while the device is stopped or quiesced), zero detection,
//! the root node; a failure then meets the device's error policy.

mod direct;

pub use direct::Direct;

use crate::drivers::Done;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::{DetectZeroes, OnError};
use crate::policy::errors::{self, Action, IoStatus};
use crate::policy::throttle::{Job, Throttle, ThrottleConfig};
use crate::qmp::EventBus;
use crate::stats::{accounted, Op, Stats};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for in-flight requests before a graph change gives up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Gate {
    /// Stopped by the error policy until `cont`.
    stopped: bool,
    /// Quiesced by a graph change (resize, snapshot) in progress.
    paused: u32,
    /// Deleted (blockdev-del, block-export-del): requests fail with ENODEV.
    removed: bool,
    /// The daemon is shutting down: nobody will `cont` any more, so the
    /// error policy no longer stops (see [`Device::shut_down`]).
    closing: bool,
    /// Failed requests to retry first, then requests that arrived while held.
    retry: VecDeque<Box<dyn Pending>>,
    held: VecDeque<Box<dyn Pending>>,
}

/// A request waiting at the gate: run later, or failed at shutdown.
trait Pending: Send {
    fn run(self: Box<Self>);
    fn fail(self: Box<Self>, e: Error);
}

struct Queued<T> {
    dev: Arc<Device>,
    req: Request<T>,
}

impl<T: Send + 'static> Pending for Queued<T> {
    fn run(self: Box<Self>) {
        self.dev.attempt(self.req)
    }

    fn fail(self: Box<Self>, e: Error) {
        (self.req.done)(Err(e))
    }
}

/// What a block job sees of the device's writes: mirror marks them dirty,
/// backup copies the old data first, stream keeps them off the range it copies.
pub trait WriteHook: Send + Sync {
    /// Calls `go` once the write (or discard) of `offset..offset+len` may
    /// proceed, or with the error that fails it.
    fn before(&self, offset: u64, len: u64, go: Done<()>);
    /// The write has finished, successfully or not.
    fn after(&self, offset: u64, len: u64);
}

/// What a device is to its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A QMP device: a blockdev with an `id`.
    Device,
    /// The device of an export of a node (block-export-add, `--export`):
    /// no QMP device, named by the export's id.
    Export { writable: bool, kind: ExportKind },
}

/// Where an export's device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A file of the FUSE mount.
    Fuse,
    /// The NBD server, under the export's NBD name.
    Nbd,
}

impl Role {
    /// Whether the device is a file of the mount.
    pub fn in_mount(self) -> bool {
        !matches!(
            self,
            Role::Export {
                kind: ExportKind::Nbd,
                ..
            }
        )
    }
}

pub struct Device {
    pub id: String,
    pub role: Role,
    root: RwLock<Arc<Node>>,
    pub stats: Arc<Stats>,
    pub rerror: OnError,
    pub werror: OnError,
    events: Arc<EventBus>,
    throttle: Arc<Throttle>,
    /// Fast check of `gate.stopped || gate.paused > 0`.
    blocked: AtomicBool,
    gate: Mutex<Gate>,
    io_status: AtomicU8,
    /// Requests past the gate and not completed; counted before the gate is
    /// checked (see [`Device::admit`]).
    inflight: AtomicUsize,
    hook: RwLock<Option<Arc<dyn WriteHook>>>,
    /// `x-passthrough`: the export hands the file to the kernel, so nothing
    /// that must see the device's I/O may be set on it.
    passthrough: bool,
}

/// A re-runnable request: called again when a stopped request is retried.
type Attempt<T> = Arc<dyn Fn(&Arc<Node>, Done<T>) + Send + Sync>;

impl Device {
    pub fn new(
        id: String,
        role: Role,
        root: Arc<Node>,
        rerror: OnError,
        werror: OnError,
        events: Arc<EventBus>,
        passthrough: bool,
    ) -> Arc<Device> {
        Arc::new(Device {
            id,
            role,
            root: RwLock::new(root),
            stats: Arc::default(),
            rerror,
            werror,
            events,
            throttle: Throttle::new(ThrottleConfig::default()),
            blocked: AtomicBool::new(false),
            gate: Mutex::default(),
            io_status: AtomicU8::new(IoStatus::Ok as u8),
            inflight: AtomicUsize::new(0),
            hook: RwLock::new(None),
            passthrough,
        })
    }

    /// Whether the export lets the kernel do this device's I/O.
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// Refuses `what` on a passthrough device: its I/O bypasses the daemon.
    pub fn refuse_passthrough(&self, what: &str) -> Result<()> {
        if !self.passthrough {
            return Ok(());
        }
        Err(Error::generic(format!(
            "Device '{}' is exported with x-passthrough: the kernel does its I/O, \
             so {what} cannot apply to it (add it again without x-passthrough)",
            self.id
        )))
    }

    pub fn root(&self) -> Arc<Node> {
        self.root.read().clone()
    }

    pub fn size(&self) -> u64 {
        self.root.read().size()
    }

    pub fn read_only(&self) -> bool {
        self.root.read().opts.read_only
            || matches!(
                self.role,
                Role::Export {
                    writable: false,
                    ..
                }
            )
    }

    pub fn io_status(&self) -> IoStatus {
        IoStatus::from_u8(self.io_status.load(Ordering::Relaxed))
    }

    pub fn throttle_config(&self) -> ThrottleConfig {
        self.throttle.config()
    }

    pub fn set_throttle(&self, cfg: ThrottleConfig) -> Result<()> {
        if cfg != ThrottleConfig::default() {
            self.refuse_passthrough("I/O throttling")?;
        }
        self.throttle.set_config(cfg);
        Ok(())
    }

    pub fn is_stopped(&self) -> bool {
        self.gate.lock().stopped
    }

    /// Reads up to `len` bytes; a read that crosses the end is cut short.
    pub fn read(self: &Arc<Self>, offset: u64, len: usize, done: Done<Buf>) {
        self.read_to(offset, len, None, done)
    }

    /// As [`Device::read`] of `into.len()` bytes, read into `into` (a FUSE
    /// ring entry's payload, [`Buf::borrowed`]) where the chain allows
    /// ([`in_place`]); `done` then gets `into` back. Elsewhere, and on a
    /// retry, it gets a buffer of its own.
    pub fn read_into(self: &Arc<Self>, offset: u64, into: Buf, done: Done<Buf>) {
        self.read_to(offset, into.len(), Some(into), done)
    }

    fn read_to(self: &Arc<Self>, offset: u64, len: usize, into: Option<Buf>, done: Done<Buf>) {
        let len = self.size().saturating_sub(offset).min(len as u64) as usize;
        if len == 0 {
            return done(Ok(Buf::zeroed(0)));
        }
        let done = accounted(&self.stats, Op::Read, offset, len as u64, done);
        let into = Mutex::new(into.map(|mut b| {
            b.truncate(len);
            b
        }));
        let attempt: Attempt<Buf> = Arc::new(move |root, d| {
            // On a thread with its own ring (a FUSE worker), a read whose
            // chain never blocks is answered from that ring. Decided on the
            // root this attempt runs on: a switch may change the chain.
            let never_blocks = reads_never_block(root);
            let into = into.lock().take().filter(|b| never_blocks && aligned(b));
            let buf = into.unwrap_or_else(|| Buf::recycled(len));
            if never_blocks && crate::io::has_local_ring() {
                crate::io::with_local_ring(|| root.read(offset, buf, d))
            } else {
                root.read(offset, buf, d)
            }
        });
        self.submit(
            Kind::Read,
            None,
            len as u64,
            attempt,
            |n| Buf::zeroed(n as usize),
            done,
        );
    }

    /// Writes `buf` at `offset`; `done` gets `buf` back. `buf` is kept for
    /// a retry by the error policy; where the chain allows ([`in_place`])
    /// every attempt writes from `buf` itself, else from a copy. So `buf`
    /// may be [`Buf::borrowed`] (a FUSE ring entry's payload) when its
    /// memory stays unchanged until `done` has run.
    pub fn write(self: &Arc<Self>, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        if let Err(e) = self.check_write(offset, len) {
            return done(Err(e));
        }
        let done = accounted(&self.stats, Op::Write, offset, len, done);
        let data = Arc::new(Kept(Mutex::new(Some(buf))));
        let attempt: Attempt<Buf> = Arc::new(move |root, d| {
            let Some(buf) = data.take(root) else {
                return d(Err(Error::io(libc::EIO, "write data was not kept")));
            };
            // The caller's buffer goes back on success; until then it lives
            // here, under the view this attempt may be writing from.
            let data = data.clone();
            let d: Done<Buf> = Box::new(move |r| d(r.map(|b| data.hand_back().unwrap_or(b))));
            let dz = root.opts.detect_zeroes;
            if dz == DetectZeroes::Off || !buf.is_zero() {
                // As reads: a FUSE worker answers it from its own ring.
                if crate::io::has_local_ring() && writes_never_block(root) {
                    return crate::io::with_local_ring(|| root.write(offset, buf, d));
                }
                return root.write(offset, buf, d);
            }
            let unmap = dz == DetectZeroes::Unmap;
            let root = root.clone();
            // A zero write may wait (a fallocate, its fallback's plain
            // writes): never on a thread that reaps its own ring.
            crate::io::off_local_ring(move || {
                root.write_zeroes(offset, len, unmap, Box::new(move |r| d(r.map(|()| buf))))
            })
        });
        let changes = Some((offset, len));
        self.submit(Kind::Write, changes, len, attempt, |_| Buf::zeroed(0), done);
    }

    pub fn write_zeroes(self: &Arc<Self>, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        if let Err(e) = self.check_write(offset, len) {
            return done(Err(e));
        }
        let done = accounted(&self.stats, Op::Write, offset, len, done);
        let attempt: Attempt<()> =
            Arc::new(move |root, d| root.write_zeroes(offset, len, unmap, d));
        let changes = Some((offset, len));
        self.submit(Kind::Write, changes, len, attempt, |_| (), done);
    }

    pub fn discard(self: &Arc<Self>, offset: u64, len: u64, done: Done<()>) {
        if let Err(e) = self.check_write(offset, len) {
            return done(Err(e));
        }
        let attempt: Attempt<()> = Arc::new(move |root, d| root.discard(offset, len, d));
        let changes = Some((offset, len));
        self.submit(Kind::Other, changes, 0, attempt, |_| (), done);
    }

    pub fn flush(self: &Arc<Self>, done: Done<()>) {
        let done = accounted(&self.stats, Op::Flush, 0, 0, done);
        let attempt: Attempt<()> = Arc::new(|root, d| root.flush(d));
        self.submit(Kind::Other, None, 0, attempt, |_| (), done);
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        let root = self.root();
        if root.opts.read_only {
            return Err(Error::io(
                libc::EROFS,
                format!("Node '{}' is read-only", root.name),
            ));
        }
        if self.read_only() {
            return Err(Error::io(
                libc::EROFS,
                format!("Export '{}' is not writable", self.id),
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= root.size() => Ok(()),
            _ => Err(Error::io(
                libc::ENOSPC,
                format!("Request at {offset}+{len} is beyond the end of the device"),
            )),
        }
    }

    /// Throttle, then gate, then the attempt itself.
    #[allow(clippy::too_many_arguments)]
    fn submit<T: Send + 'static>(
        self: &Arc<Self>,
        kind: Kind,
        changes: Option<(u64, u64)>,
        bytes: u64,
        attempt: Attempt<T>,
        ignored: fn(u64) -> T,
        done: Done<T>,
    ) {
        let req = Request {
            kind,
            changes,
            bytes,
            attempt,
            ignored,
            done,
        };
        let queued: Box<dyn Pending> = Box::new(Queued {
            dev: self.clone(),
            req,
        });
        let write = match kind {
            Kind::Read => false,
            Kind::Write => true,
            Kind::Other => return self.admit(queued),
        };
        if !self.throttle.is_enabled() {
            return self.admit(queued);
        }
        let dev = self.clone();
        let job: Job = Box::new(move || dev.admit(queued));
        self.throttle.submit(write, bytes, job);
    }

    /// Runs `req` unless the device is held.
    fn admit(&self, req: Box<dyn Pending>) {
        // Counted in flight before the gate is looked at: `quiesced` closes
        // the gate, then waits for nothing in flight. Counting after the
        // check let a request slip past a closing gate uncounted and run on
        // the old root after a snapshot switched it (SeqCst on both sides:
        // each sees the other's write).
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.blocked.load(Ordering::SeqCst) {
            let mut g = self.gate.lock();
            if g.removed {
                drop(g);
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                return req.fail(self.removed_error());
            }
            if g.stopped || g.paused > 0 {
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                g.held.push_back(req);
                return;
            }
        }
        req.run()
    }

    fn attempt<T: Send + 'static>(self: Arc<Self>, req: Request<T>) {
        let run = req.attempt.clone();
        let root = self.root();
        let hook = req
            .changes
            .and_then(|c| Some((c, self.hook.read().clone()?)));
        // The request stays whole for a retry (the error policy's stop).
        let completion = crate::drivers::completes_on_drop(move |r: Result<T>| {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            let e = match r {
                Ok(v) => return (req.done)(Ok(v)),
                Err(e) => e,
            };
            // Looked up only on an error: a request allocates no copy of them.
            let (events, id) = (&self.events, &self.id);
            if e.kind == ErrorKind::Corrupt {
                let mut data = json!({"device": id, "msg": e.msg});
                if let Some(c) = e.corruption {
                    data["offset"] = json!(c.offset);
                    data["size"] = json!(c.size);
                    data["fatal"] = json!(c.fatal);
                }
                events.emit("BLOCK_IMAGE_CORRUPTED", data);
            }
            let (policy, op) = match req.kind {
                Kind::Read => (self.rerror, "read"),
                Kind::Write => (self.werror, "write"),
                Kind::Other => return (req.done)(Err(e)),
            };
            let Some(mut action) = errors::action(policy, &e) else {
                return (req.done)(Err(e));
            };
            if action == Action::Stop && self.gate.lock().closing {
                action = Action::Report;
            }
            events.emit(
                "BLOCK_IO_ERROR",
                json!({"device": id, "operation": op, "action": action.as_str()}),
            );
            match action {
                Action::Report => {
                    self.io_status
                        .store(IoStatus::of(&e) as u8, Ordering::Relaxed);
                    (req.done)(Err(e))
                }
                Action::Ignore => (req.done)(Ok((req.ignored)(req.bytes))),
                Action::Stop => {
                    self.io_status
                        .store(IoStatus::of(&e) as u8, Ordering::Relaxed);
                    log::warn!("device '{id}' stopped after a {op} error: {e}");
                    let dev = self.clone();
                    if let Some(req) = self.stop(Box::new(Queued { dev, req })) {
                        req.fail(e);
                    }
                }
            }
        });
        let Some(((offset, len), hook)) = hook else {
            return run(&root, completion);
        };
        // A job's hook may read or wait for metadata locks, whose holders
        // may wait for writes in flight on a thread's own ring: never there.
        crate::io::off_local_ring(move || Self::hooked(hook, offset, len, root, run, completion))
    }

    /// Runs a write through a block job's hook: `before` it, then `after`.
    fn hooked<T: Send + 'static>(
        hook: Arc<dyn WriteHook>,
        offset: u64,
        len: u64,
        root: Arc<Node>,
        run: Attempt<T>,
        completion: Done<T>,
    ) {
        hook.clone().before(
            offset,
            len,
            Box::new(move |r| {
                let done: Done<T> = Box::new(move |r| {
                    hook.after(offset, len);
                    completion(r)
                });
                match r {
                    // Released by a job's copy, this may be an I/O
                    // completion thread: the write may wait for metadata.
                    Ok(()) if crate::io::on_completer() => {
                        crate::io::spawn_blocking(move || run(&root, done))
                    }
                    Ok(()) => run(&root, done),
                    Err(e) => done(Err(e)),
                }
            }),
        )
    }

    /// Installs (or removes) a block job's write hook, with no request in
    /// flight, so that no write slips past it.
    /// A hook is removed even when requests are still in flight after the
    /// quiesce timeout (they keep the hook they started with).
    pub fn set_write_hook(&self, hook: Option<Arc<dyn WriteHook>>) -> Result<()> {
        let removing = hook.is_none();
        let r = self.quiesced(|| {
            *self.hook.write() = hook;
            Ok(())
        });
        if r.is_err() && removing {
            *self.hook.write() = None;
        }
        r
    }

    /// Stops the device and holds `req` to be retried first on `cont`.
    /// Hands it back when the device is shutting down (no `cont` will come).
    fn stop(&self, req: Box<dyn Pending>) -> Option<Box<dyn Pending>> {
        let mut g = self.gate.lock();
        // Nobody will `cont` a device that is going away: report instead.
        if g.closing || g.removed {
            return Some(req);
        }
        g.retry.push_back(req);
        if !g.stopped {
            g.stopped = true;
            self.blocked.store(true, Ordering::SeqCst);
            drop(g);
            self.events.emit("STOP", json!({}));
        }
        None
    }

    /// Before the daemon exits: fails with EIO every request the error
    /// policy holds, and reports later errors instead of stopping. Without
    /// it, the final flush waited behind a stopped gate and quit hung.
    pub fn shut_down(&self) {
        let held: Vec<_> = {
            let mut g = self.gate.lock();
            g.closing = true;
            if !g.stopped {
                return;
            }
            g.stopped = false;
            let (retry, held) = (std::mem::take(&mut g.retry), std::mem::take(&mut g.held));
            if g.paused == 0 {
                self.blocked.store(false, Ordering::SeqCst);
            }
            retry.into_iter().chain(held).collect()
        };
        if !held.is_empty() {
            log::warn!(
                "device '{}': failing {} requests held by the error policy",
                self.id,
                held.len()
            );
        }
        for req in held {
            req.fail(Error::io(
                libc::EIO,
                format!("device '{}' shut down while stopped", self.id),
            ));
        }
    }

    fn removed_error(&self) -> Error {
        Error::io(libc::ENODEV, format!("device '{}' was removed", self.id))
    }

    /// A deletion that could not drain the device is undone: requests run
    /// again.
    pub fn restore(&self) {
        self.gate.lock().removed = false;
        self.release();
    }

    /// The device is deleted: held requests and every later one fail with
    /// ENODEV, and the ones in flight finish (at most the quiesce timeout).
    /// Returns whether nothing is left in flight.
    pub fn remove(&self) -> bool {
        let held: Vec<_> = {
            let mut g = self.gate.lock();
            g.removed = true;
            g.stopped = false;
            self.blocked.store(true, Ordering::SeqCst);
            let (retry, held) = (std::mem::take(&mut g.retry), std::mem::take(&mut g.held));
            retry.into_iter().chain(held).collect()
        };
        for req in held {
            req.fail(self.removed_error());
        }
        self.wait_idle()
    }

    /// At shutdown, after [`Device::shut_down`]: new requests wait at the
    /// gate for good and the ones in flight finish, so images are closed
    /// with no allocation half done (QEMU drains before it closes; exiting
    /// mid-request leaked clusters). Bounded by the quiesce timeout.
    pub fn drain(&self) {
        if !self.pause_until_idle() {
            log::warn!(
                "device '{}': {} requests still in flight at shutdown",
                self.id,
                self.inflight.load(Ordering::SeqCst)
            );
        }
    }

    /// Closes the gate (new requests wait) and waits, at most the quiesce
    /// timeout, for the requests in flight; false when some are left.
    fn pause_until_idle(&self) -> bool {
        {
            let mut g = self.gate.lock();
            g.paused += 1;
            self.blocked.store(true, Ordering::SeqCst);
        }
        self.wait_idle()
    }

    /// Waits, at most the quiesce timeout, for the requests in flight;
    /// false when some are left.
    fn wait_idle(&self) -> bool {
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Resumes a stopped device: io-status is reset and held requests run
    /// again, failed ones first. Returns whether it was stopped.
    pub fn cont(&self) -> bool {
        let was = {
            let mut g = self.gate.lock();
            std::mem::replace(&mut g.stopped, false)
        };
        self.io_status.store(IoStatus::Ok as u8, Ordering::Relaxed);
        self.release();
        was
    }

    /// Runs held requests while the gate is open.
    fn release(&self) {
        loop {
            let job = {
                let mut g = self.gate.lock();
                if g.stopped || g.paused > 0 || g.removed {
                    return;
                }
                match g.retry.pop_front().or_else(|| g.held.pop_front()) {
                    // In flight before the gate lock is dropped, so a
                    // `quiesced` starting now waits for it.
                    Some(j) => {
                        self.inflight.fetch_add(1, Ordering::SeqCst);
                        j
                    }
                    None => {
                        self.blocked.store(false, Ordering::SeqCst);
                        return;
                    }
                }
            };
            job.run();
        }
    }

    /// Runs `f` with no request of this device in flight; new requests wait.
    pub fn quiesced<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let r = if self.pause_until_idle() {
            f()
        } else {
            Err(Error::generic(format!(
                "Device '{}' still has requests in flight",
                self.id
            )))
        };
        self.gate.lock().paused -= 1;
        self.release();
        r
    }

    /// Makes `node` the device's root (its old root is below it).
    pub fn replace_root(&self, node: Arc<Node>) {
        *self.root.write() = node;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// Flush and discard: neither throttled nor under the error policy.
    Other,
}

/// One device request, kept whole so a stopped request can run again.
struct Request<T> {
    kind: Kind,
    /// The range a write or discard changes (for the write hook).
    changes: Option<(u64, u64)>,
    bytes: u64,
    attempt: Attempt<T>,
    /// The result an ignored failure gives the caller (zeroes for a read).
    ignored: fn(u64) -> T,
    done: Done<T>,
}

/// A write's data, kept for retries until the write succeeds.
struct Kept(Mutex<Option<Buf>>);

impl Kept {
    /// The data for an attempt on `root`: a view of the kept buffer where
    /// [`in_place`] allows, else a copy.
    fn take(&self, root: &Node) -> Option<Buf> {
        let mut kept = self.0.lock();
        let b = kept.as_mut()?;
        if in_place(root, b) {
            // SAFETY: the kept buffer (and the memory a borrowed one views,
            // by `Device::write`'s contract) stays valid and unchanged until
            // the attempt ends: it is handed back only after success, and
            // `in_place` chains neither change a buffer nor hold it past
            // its completion.
            return Some(unsafe { Buf::borrowed(b.as_mut_ptr(), b.len()) });
        }
        Some(Buf::from_slice(b))
    }

    /// The caller's buffer, once the write succeeded.
    fn hand_back(&self) -> Option<Buf> {
        self.0.lock().take()
    }
}

/// Whether an attempt on `root` may read into, or write from, the caller's
/// buffer itself (page-aligned, as O_DIRECT needs): the chain hands a buffer
/// back only once every I/O on it has ended and never changes write data.
fn in_place(root: &Node, buf: &Buf) -> bool {
    reads_never_block(root) && aligned(buf)
}

fn aligned(buf: &Buf) -> bool {
    aligned_ptr(buf.as_ptr())
}

/// Memory that O_DIRECT may transfer to or from.
fn aligned_ptr(at: *const u8) -> bool {
    (at as usize).is_multiple_of(crate::io::buf::ALIGN)
}

/// As [`reads_never_block`] for writes: raw and qcow2 nodes down to a file
/// or a host device (a qcow2 write never reads its backing file on the
/// submitting thread). Where one would wait, it moves to a thread that may
/// wait instead: a file write for a read-modify-write under way, a qcow2
/// write for the metadata lock, an uncached L2 slice or an allocation.
fn writes_never_block(node: &Node) -> bool {
    never_blocks(node, false)
}

/// Whether no read of `node` waits, on the submitting thread, for another
/// request's I/O, so its reads may go to that thread's own ring
/// ([`crate::io::with_local_ring`]): raw, qcow2 and file nodes, all the way
/// down. Their reads wait only for their own metadata I/O (through
/// `drivers::wait`, which steps out of a thread's own ring) and for short
/// metadata locks never held while a read of theirs is waited for. Other
/// drivers (blkdebug's rules, quorum votes) are not vouched for.
fn reads_never_block(node: &Node) -> bool {
    never_blocks(node, true)
}

/// The chain of `node` holds only the drivers vouched for above, down its
/// file children and, when `backing`, its backing files.
fn never_blocks(node: &Node, backing: bool) -> bool {
    matches!(
        node.driver.format_name(),
        "raw" | "qcow2" | "file" | "host_device"
    ) && node
        .driver
        .file_child()
        .is_none_or(|f| never_blocks(f, backing))
        && (!backing
            || node
                .driver
                .backing_child()
                .is_none_or(|b| never_blocks(&b, true)))
}
