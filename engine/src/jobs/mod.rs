//! Block jobs: long copies on live devices, as QEMU 2.1's block jobs.
//!
//! - [`stream`], [`commit`] (intermediate layers), [`mirror`] (also the
//!   active commit), [`backup`]: one module per job.
//! - [`copy`]: the window of copies in flight every job uses; [`above`]:
//!   the copy of what a chain shows above a base (stream and commit).
//! - [`rate`]: the `speed` limit. [`bitmap`]: dirty / copied chunks.
//! - [`ranges`]: keeps guest writes off the range a stream is copying.
//! - [`target`]: opening or creating a mirror's or backup's target.
//!
//! A job runs on a thread of its own, where it may wait for I/O (it is no
//! completion thread); its copies run on the engine's completion-based I/O.
//! It reaches the device's writes through the device's write hook. The
//! registry here answers the control commands and sends the events.

pub mod above;
pub mod backup;
pub mod bitmap;
pub mod commit;
pub mod copy;
pub mod mirror;
pub mod ranges;
pub mod rate;
pub mod stream;
pub mod target;

use crate::device::{Device, WriteHook};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use crate::options::OnError;
use crate::policy::errors::{Action, IoStatus};
use crate::qmp::EventBus;
use copy::CopyError;
use parking_lot::{Condvar, Mutex};
use rate::RateLimit;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `BlockJobType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
    Backup,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
        }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Ending {
    Completed,
    Failed(Error),
    Cancelled,
}

#[derive(Default)]
struct State {
    speed: u64,
    rate: RateLimit,
    /// Paused by `block-job-pause` or a `stop` error policy: the job pauses
    /// at its next pause point.
    paused: bool,
    /// The job sits in a pause point (`busy` is false).
    idle: bool,
    cancelled: bool,
    /// `block-job-cancel` with `force`.
    forced: bool,
    /// BLOCK_JOB_READY was sent: `block-job-complete` is accepted.
    ready: bool,
    complete: bool,
    io_status: Option<IoStatus>,
}

pub struct Job {
    pub kind: JobType,
    pub device: Arc<Device>,
    len: AtomicU64,
    offset: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    events: Arc<EventBus>,
}

impl Job {
    pub fn set_len(&self, len: u64) {
        self.len.store(len, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    pub fn set_offset(&self, offset: u64) {
        self.offset.store(offset, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.state.lock().cancelled
    }

    /// Pauses here while the job is paused; false once it is cancelled.
    pub fn pause_point(&self) -> bool {
        let mut s = self.state.lock();
        while s.paused && !s.cancelled {
            s.idle = true;
            self.wake.wait(&mut s);
        }
        s.idle = false;
        !s.cancelled
    }

    /// Waits until `bytes` more may be copied at the job's speed; false
    /// once the job is cancelled.
    pub fn throttle(&self, bytes: u64) -> bool {
        let mut s = self.state.lock();
        loop {
            if s.cancelled {
                return false;
            }
            let speed = s.speed;
            let d = s.rate.delay(Instant::now(), speed, bytes);
            if d.is_zero() {
                return true;
            }
            self.wake.wait_for(&mut s, d);
        }
    }

    /// Sleeps up to `d`, or until the job is woken (cancel, complete,
    /// resume); false once it is cancelled.
    pub fn sleep(&self, d: Duration) -> bool {
        let mut s = self.state.lock();
        if !s.cancelled && !s.complete {
            self.wake.wait_for(&mut s, d);
        }
        !s.cancelled
    }

    /// The error policy for a failed copy: BLOCK_JOB_ERROR is sent; `stop`
    /// pauses the job (user visible, `block-job-resume` retries) with the
    /// io-status set.
    pub fn error_action(&self, policy: OnError, e: &CopyError) -> Action {
        let action = crate::policy::errors::action(policy, &e.err).unwrap_or(Action::Report);
        log::warn!(
            "block job on '{}': {} error, action {}: {}",
            self.device.id,
            if e.read { "read" } else { "write" },
            action.as_str(),
            e.err
        );
        self.events.emit(
            "BLOCK_JOB_ERROR",
            json!({
                "device": self.device.id,
                "operation": if e.read { "read" } else { "write" },
                "action": action.as_str(),
            }),
        );
        if action == Action::Stop {
            let mut s = self.state.lock();
            s.paused = true;
            s.io_status = Some(IoStatus::of(&e.err));
        }
        action
    }

    /// Sends BLOCK_JOB_READY: the job may now be completed.
    pub fn set_ready(&self) {
        let data = {
            let mut s = self.state.lock();
            if s.ready {
                return;
            }
            s.ready = true;
            self.event_data(&s)
        };
        self.events.emit("BLOCK_JOB_READY", data);
    }

    pub fn is_ready(&self) -> bool {
        self.state.lock().ready
    }

    pub fn completion_requested(&self) -> bool {
        self.state.lock().complete
    }

    fn event_data(&self, s: &State) -> Value {
        json!({
            "type": self.kind.as_str(),
            "device": self.device.id,
            "len": self.total(),
            "offset": self.offset.load(Ordering::Relaxed),
            "speed": s.speed,
        })
    }

    /// `BlockJobInfo`.
    fn info(&self) -> Value {
        let s = self.state.lock();
        let mut v = self.event_data(&s);
        v["busy"] = json!(!s.idle);
        v["paused"] = json!(s.paused);
        // Not in QEMU 2.1's schema; QEMU 2.2 added it: a client that joins
        // after BLOCK_JOB_READY still knows the job can be completed.
        v["ready"] = json!(s.ready);
        v["io-status"] = json!(match s.io_status.unwrap_or(IoStatus::Ok) {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        });
        v
    }
}

/// The running jobs, at most one per device.
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
    ended: Condvar,
    events: Arc<EventBus>,
}

/// What a job runs on its thread, with the job to report to.
pub type Body = Box<dyn FnOnce(&Arc<Job>) -> Ending + Send + 'static>;

impl Jobs {
    pub fn new(events: Arc<EventBus>) -> Jobs {
        Jobs {
            list: Mutex::new(Vec::new()),
            ended: Condvar::new(),
            events,
        }
    }

    /// Refuses a second job, or a graph change, on a device a job uses.
    pub fn check_idle(&self, device: &str) -> Result<()> {
        if self.list.lock().iter().any(|j| j.device.id == device) {
            return Err(Error::generic(format!("Device '{device}' is in use")));
        }
        Ok(())
    }

    /// Refuses a change of `node` while a job runs on a device whose chain
    /// holds it.
    pub fn check_node_idle(&self, node: &Arc<Node>) -> Result<()> {
        for j in self.list.lock().iter() {
            let root = j.device.root();
            if crate::qmp::device_cmds::chain(&root).any(|n| Arc::ptr_eq(&n, node)) {
                return Err(Error::generic(format!(
                    "Device '{}' is busy: block device is in use by block job: {}",
                    j.device.id,
                    j.kind.as_str()
                )));
            }
        }
        Ok(())
    }

    /// Starts a job on `device`; `body` runs on a thread of its own. The
    /// job's write hook is in place before this returns, so no guest write
    /// the client makes after the command escapes the job; it goes once
    /// the body has returned.
    pub fn start(
        self: &Arc<Self>,
        kind: JobType,
        device: Arc<Device>,
        speed: u64,
        hook: Option<Arc<dyn WriteHook>>,
        body: Body,
    ) -> Result<()> {
        let job = Arc::new(Job {
            kind,
            // The device's size until the job knows better: a query right
            // after the start sees the work ahead, not 0.
            len: AtomicU64::new(device.size()),
            device: device.clone(),
            offset: AtomicU64::new(0),
            state: Mutex::new(State {
                speed,
                ..State::default()
            }),
            wake: Condvar::new(),
            events: self.events.clone(),
        });
        {
            let mut list = self.list.lock();
            if list.iter().any(|j| j.device.id == device.id) {
                return Err(Error::generic(format!("Device '{}' is in use", device.id)));
            }
            list.push(job.clone());
        }
        let hooked = hook.is_some();
        if let Err(e) = device.set_write_hook(hook) {
            self.list.lock().retain(|x| !Arc::ptr_eq(x, &job));
            return Err(e);
        }
        let jobs = self.clone();
        let j = job.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{}", kind.as_str()))
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| body(&j));
                let ending = std::panic::catch_unwind(run).unwrap_or_else(|_| {
                    // A bug, not an I/O error: the job still ends.
                    log::error!("block job on '{}' panicked", j.device.id);
                    Ending::Failed(Error::generic("the block job failed unexpectedly"))
                });
                if hooked {
                    if let Err(e) = j.device.set_write_hook(None) {
                        log::error!("block job on '{}': {e}", j.device.id);
                    }
                }
                jobs.finish(&j, ending);
            });
        if let Err(e) = spawned {
            self.list.lock().retain(|x| !Arc::ptr_eq(x, &job));
            if hooked {
                let _ = device.set_write_hook(None);
            }
            return Err(Error::from_io(&e, "Could not start the block job thread"));
        }
        Ok(())
    }

    /// The job leaves the list before its event goes out: a client that
    /// sees the event no longer finds the job.
    fn finish(&self, job: &Arc<Job>, ending: Ending) {
        let data = job.event_data(&job.state.lock());
        self.list.lock().retain(|x| !Arc::ptr_eq(x, job));
        self.ended.notify_all();
        match ending {
            Ending::Completed => {
                log::info!(
                    "block job {} on '{}' completed",
                    job.kind.as_str(),
                    job.device.id
                );
                self.events.emit("BLOCK_JOB_COMPLETED", data);
            }
            Ending::Failed(e) => {
                log::warn!(
                    "block job {} on '{}' failed: {e}",
                    job.kind.as_str(),
                    job.device.id
                );
                let mut data = data;
                data["error"] = json!(error_text(&e));
                self.events.emit("BLOCK_JOB_COMPLETED", data);
            }
            Ending::Cancelled => {
                log::info!(
                    "block job {} on '{}' cancelled",
                    job.kind.as_str(),
                    job.device.id
                );
                self.events.emit("BLOCK_JOB_CANCELLED", data);
            }
        }
    }

    /// The job of `device`, or DeviceNotActive.
    pub fn find(&self, device: &str) -> Result<Arc<Job>> {
        self.list
            .lock()
            .iter()
            .find(|j| j.device.id == device)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::DeviceNotActive,
                    format!("No active block job on device '{device}'"),
                )
            })
    }

    pub fn query(&self) -> Value {
        Value::Array(self.list.lock().iter().map(|j| j.info()).collect())
    }

    pub fn set_speed(&self, device: &str, speed: i64) -> Result<()> {
        let job = self.find(device)?;
        let speed = check_speed(Some(speed))?;
        job.state.lock().speed = speed;
        job.wake.notify_all();
        Ok(())
    }

    pub fn pause(&self, device: &str) -> Result<()> {
        let job = self.find(device)?;
        job.state.lock().paused = true;
        Ok(())
    }

    /// Resumes a paused job and clears its error state.
    pub fn resume(&self, device: &str) -> Result<()> {
        let job = self.find(device)?;
        let mut s = job.state.lock();
        s.paused = false;
        s.io_status = None;
        job.wake.notify_all();
        Ok(())
    }

    /// A paused job is cancelled only with `force`, as in QEMU 2.1.
    pub fn cancel(&self, device: &str, force: bool) -> Result<()> {
        let job = self.find(device)?;
        let mut s = job.state.lock();
        if s.paused && !force {
            return Err(Error::generic(format!(
                "The block job for device '{device}' is currently paused"
            )));
        }
        s.cancelled = true;
        s.forced |= force;
        s.io_status = None;
        job.wake.notify_all();
        Ok(())
    }

    pub fn complete(&self, device: &str) -> Result<()> {
        let job = self.find(device)?;
        let mut s = job.state.lock();
        if !s.ready || s.paused || s.cancelled {
            return Err(Error::generic(format!(
                "The active block job for device '{device}' cannot be completed"
            )));
        }
        s.complete = true;
        job.wake.notify_all();
        Ok(())
    }

    /// Cancels every job and waits (bounded) for them to end: `quit`.
    pub fn cancel_all(&self, timeout: Duration) {
        let jobs: Vec<Arc<Job>> = self.list.lock().clone();
        for j in &jobs {
            j.state.lock().cancelled = true;
            j.wake.notify_all();
        }
        let deadline = Instant::now() + timeout;
        let mut list = self.list.lock();
        while !list.is_empty() {
            if self.ended.wait_until(&mut list, deadline).timed_out() {
                log::warn!("{} block jobs still running at shutdown", list.len());
                return;
            }
        }
    }
}

/// What a job's failed copies leave behind, by its error policy.
#[derive(Default)]
pub struct Failures {
    /// A `report`ed error (or any other failure): the job ends with it.
    pub failed: Option<Error>,
    /// An `ignore`d error: the job goes on but ends with it (QEMU 2.1).
    pub ignored: Option<Error>,
    /// `stop`: the job paused; where to copy again once it is resumed.
    pub retry_from: Option<u64>,
}

impl Failures {
    /// Applies the policy for reads (`on_read`) or writes (`on_write`) to a
    /// finished copy at `at`.
    pub fn settle(
        &mut self,
        job: &Job,
        (on_read, on_write): (OnError, OnError),
        at: u64,
        r: copy::CopyResult,
    ) {
        let Err(e) = r else { return };
        let policy = if e.read { on_read } else { on_write };
        match job.error_action(policy, &e) {
            Action::Report => {
                self.failed.get_or_insert(e.err);
            }
            Action::Ignore => {
                self.ignored.get_or_insert(e.err);
            }
            Action::Stop => {
                self.retry_from = Some(self.retry_from.map_or(at, |r| r.min(at)));
            }
        }
    }

    pub fn fail(&mut self, e: Error) {
        self.failed.get_or_insert(e);
    }

    /// Between two copies of a job that walks the device from `pos` on:
    /// settles the finished copies; after a `stop`, waits for the rest and
    /// moves `pos` back to the first failure (copied again once resumed);
    /// reports progress and pauses while paused. False once cancelled.
    pub fn step(
        &mut self,
        job: &Job,
        window: &mut copy::Window<u64>,
        policy: (OnError, OnError),
        pos: &mut u64,
    ) -> bool {
        for (at, _, r) in window.finished() {
            self.settle(job, policy, at, r);
        }
        if let Some(at) = self.retry_from.take() {
            for (at2, _, r) in window.drain() {
                self.settle(job, policy, at2, r);
            }
            *pos = (*pos).min(self.retry_from.take().map_or(at, |r| r.min(at)));
        }
        job.set_offset(*pos);
        job.pause_point()
    }
}

/// `speed` as QEMU checks it.
pub fn check_speed(speed: Option<i64>) -> Result<u64> {
    match speed {
        None => Ok(0),
        Some(s) if s >= 0 => Ok(s as u64),
        Some(_) => Err(Error::generic("Invalid parameter 'speed'")),
    }
}

/// The `error` of BLOCK_JOB_COMPLETED: strerror of an I/O failure, as QEMU
/// sends it, else the message.
fn error_text(e: &Error) -> String {
    match e.kind {
        ErrorKind::Io(errno) => {
            let s = std::io::Error::from_raw_os_error(errno).to_string();
            match s.find(" (os error") {
                Some(i) => s[..i].to_string(),
                None => s,
            }
        }
        _ => e.msg.clone(),
    }
}

/// Whether data above `base` (exclusive) in the chain from `top` is
/// allocated at `offset` (Some, saying whether it reads as zeroes), and for
/// how many bytes (at most `len`) that holds.
pub fn allocated_above(
    top: Option<Arc<Node>>,
    base: Option<&Arc<Node>>,
    offset: u64,
    len: u64,
) -> Result<(Option<bool>, u64)> {
    let mut n = len;
    let mut cur = top;
    while let Some(node) = cur {
        if base.is_some_and(|b| Arc::ptr_eq(b, &node)) || offset >= node.size() {
            break;
        }
        let st = node.block_status(offset, n.min(node.size() - offset))?;
        if st.allocated {
            return Ok((Some(st.zero), st.len.min(n)));
        }
        n = n.min(st.len);
        cur = node.driver.backing_child();
    }
    Ok((None, n))
}

/// The node of `top`'s backing chain (below `top`) that `name` names, by
/// node name or by file name as given or resolved, as QEMU 2.1 finds `base`.
pub fn find_in_chain(top: &Arc<Node>, name: &str) -> Option<Arc<Node>> {
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    // A relative name is relative to the top image, as QEMU resolves it.
    let top_dir = std::path::PathBuf::from(top.driver.filename());
    let wanted = canon(name).or_else(|| {
        let p = top_dir.parent()?.join(name);
        canon(&p.to_string_lossy())
    });
    crate::qmp::device_cmds::chain(top).skip(1).find(|n| {
        n.name == name
            || n.driver.filename() == name
            || (wanted.is_some() && canon(&n.driver.filename()) == wanted)
    })
}
