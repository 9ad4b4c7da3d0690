//! Block jobs: starting them (block-stream, block-commit, drive-mirror,
//! drive-backup), listing and steering them, and waiting for their end
//! while showing their progress.
//!
//! A wait reads the job's events on the connection that started it (or, for
//! `job wait`, on its own), and polls query-block-jobs for progress. A job
//! ends with BLOCK_JOB_COMPLETED (a failure when it carries `error`) or
//! BLOCK_JOB_CANCELLED; mirror and active commit first emit BLOCK_JOB_READY
//! and then wait for block-job-complete.

use crate::args::{parse_size, QmpArgs};
use crate::client::Client;
use crate::format::{bool_cell, cell, human_size};
use crate::table::{Align, Table};
use crate::{emit, emit_json, list_query, Failure, Outcome};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{BinaryBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::io::{self, IsTerminal};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often query-block-jobs is asked for progress.
const POLL: Duration = Duration::from_millis(300);
/// Plain progress lines come at most this often.
const LINE_EVERY: Duration = Duration::from_secs(1);
/// How long a job may be missing from query-block-jobs before its end event
/// is given up on.
const GONE_GRACE: Duration = Duration::from_secs(3);
/// How long `job wait` listens for the end event of a job that the first
/// query-block-jobs no longer lists (the daemon may send it after the
/// reply).
const NOJOB_GRACE: Duration = Duration::from_millis(500);
/// The rate is measured over about this much recent progress.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Exit status when the job's result cannot be known.
pub const EXIT_UNKNOWN: u8 = 4;

/// What a job does when an I/O error occurs (BlockdevOnError).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Report,
    Ignore,
    Enospc,
    Stop,
}

/// What a mirror or backup copies (MirrorSyncMode).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// The top image only, the target keeping the same backing chain
    Top,
    /// The whole chain
    Full,
    /// Only what is written while the job runs
    None,
}

/// How the target image is had (NewImageMode).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The target exists already
    Existing,
    /// Create the target, naming its backing file by absolute path
    AbsolutePaths,
}

/// The name QMP knows a value by (clap's kebab-case name).
fn qmp_name<T: ValueEnum>(v: T) -> Option<String> {
    v.to_possible_value().map(|p| p.get_name().to_string())
}

fn put(args: &mut QmpArgs, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        args.insert(key.into(), v.into());
    }
}

fn device_args(device: &str) -> QmpArgs {
    let mut args = Map::new();
    args.insert("device".into(), Value::from(device));
    args
}

/// How far to wait after starting a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Until the job ends or is ready to be completed.
    ReadyOrEnd,
    /// Complete the job once it is ready, then wait for its end.
    CompleteAtReady,
}

fn until(wait: bool, complete: bool) -> Option<Until> {
    if complete {
        Some(Until::CompleteAtReady)
    } else {
        wait.then_some(Until::ReadyOrEnd)
    }
}

/// A subcommand that starts a block job.
pub trait StartJob {
    const COMMAND: &'static str;
    const KIND: &'static str;
    fn device(&self) -> &str;
    fn arguments(&self) -> QmpArgs;
    /// How far to wait; `None` returns once the job is started.
    fn until(&self) -> Option<Until>;
}

#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// Device
    device: String,
    /// Backing file to stop at: images above it are copied into the
    /// device's image, it and those below stay [default: the whole chain]
    #[arg(long, value_name = "FILE")]
    base: Option<String>,
    /// Backing file name to record in the image afterwards
    #[arg(long, value_name = "NAME")]
    backing_file: Option<String>,
    /// Speed limit in bytes per second (suffixes K, M, G; 0: none)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    speed: Option<u64>,
    /// What to do on an I/O error
    #[arg(long, value_enum, value_name = "POLICY")]
    on_error: Option<OnError>,
    /// Wait until the job ends, showing its progress (exit 1 when it fails
    /// or is cancelled)
    #[arg(long)]
    wait: bool,
}

impl StartJob for StreamArgs {
    const COMMAND: &'static str = "block-stream";
    const KIND: &'static str = "stream";
    fn device(&self) -> &str {
        &self.device
    }
    fn arguments(&self) -> QmpArgs {
        let mut a = device_args(&self.device);
        put(&mut a, "base", self.base.clone());
        put(&mut a, "backing-file", self.backing_file.clone());
        put(&mut a, "speed", self.speed);
        put(&mut a, "on-error", self.on_error.and_then(qmp_name));
        a
    }
    fn until(&self) -> Option<Until> {
        until(self.wait, false)
    }
}

#[derive(Args, Debug, Clone)]
pub struct CommitArgs {
    /// Device
    device: String,
    /// Image to commit into [default: the bottom of the chain]
    #[arg(long, value_name = "FILE")]
    base: Option<String>,
    /// Highest image to commit [default: the active image, an active
    /// commit that becomes ready and waits for `blkctl job complete`]
    #[arg(long, value_name = "FILE")]
    top: Option<String>,
    /// Backing file name to record in the image above TOP
    #[arg(long, value_name = "NAME")]
    backing_file: Option<String>,
    /// Speed limit in bytes per second (suffixes K, M, G; 0: none)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    speed: Option<u64>,
    /// Wait until the job ends, or for an active commit until it is ready,
    /// showing its progress
    #[arg(long)]
    wait: bool,
    /// For an active commit: complete the job once it is ready and wait for
    /// its end (implies --wait)
    #[arg(long)]
    complete: bool,
}

impl StartJob for CommitArgs {
    const COMMAND: &'static str = "block-commit";
    const KIND: &'static str = "commit";
    fn device(&self) -> &str {
        &self.device
    }
    fn arguments(&self) -> QmpArgs {
        let mut a = device_args(&self.device);
        put(&mut a, "base", self.base.clone());
        put(&mut a, "top", self.top.clone());
        put(&mut a, "backing-file", self.backing_file.clone());
        put(&mut a, "speed", self.speed);
        a
    }
    fn until(&self) -> Option<Until> {
        until(self.wait, self.complete)
    }
}

/// What mirror and backup share: the target and how the job copies to it.
#[derive(Args, Debug, Clone)]
pub struct CopyArgs {
    /// Target image file (a relative name is resolved here, not by the daemon)
    #[arg(value_parser = crate::paths::absolute)]
    target: String,
    /// What to copy
    #[arg(long, value_enum)]
    sync: SyncMode,
    /// Format of the target [default: the device's]
    #[arg(long, value_name = "FMT")]
    format: Option<String>,
    /// Whether the target exists or is created [default: absolute-paths]
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Speed limit in bytes per second (suffixes K, M, G; 0: none)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    speed: Option<u64>,
    /// What to do on a read error of the device
    #[arg(long, value_enum, value_name = "POLICY")]
    on_source_error: Option<OnError>,
    /// What to do on a write error of the target
    #[arg(long, value_enum, value_name = "POLICY")]
    on_target_error: Option<OnError>,
}

impl CopyArgs {
    /// The QMP arguments of `device`'s job with this target.
    fn arguments(&self, device: &str) -> QmpArgs {
        let mut a = device_args(device);
        a.insert("target".into(), Value::from(self.target.as_str()));
        put(&mut a, "format", self.format.clone());
        put(&mut a, "sync", qmp_name(self.sync));
        put(&mut a, "mode", self.mode.and_then(qmp_name));
        put(&mut a, "speed", self.speed);
        for (key, policy) in [
            ("on-source-error", self.on_source_error),
            ("on-target-error", self.on_target_error),
        ] {
            put(&mut a, key, policy.and_then(qmp_name));
        }
        a
    }
}

#[derive(Args, Debug, Clone)]
pub struct MirrorArgs {
    /// Device
    device: String,
    #[command(flatten)]
    copy: CopyArgs,
    /// node-name of the target
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// node-name of the node the target replaces when the job completes
    #[arg(long, value_name = "NODE")]
    replaces: Option<String>,
    /// Granularity of the dirty bitmap (a power of 2, 512 to 64M)
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    granularity: Option<u64>,
    /// Maximum amount of data in flight
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    buf_size: Option<u64>,
    /// Wait until the mirror is ready (the target in sync), showing its
    /// progress
    #[arg(long)]
    wait: bool,
    /// Complete the job once it is ready (the device switches to the
    /// target) and wait for its end (implies --wait)
    #[arg(long)]
    complete: bool,
}

impl StartJob for MirrorArgs {
    const COMMAND: &'static str = "drive-mirror";
    const KIND: &'static str = "mirror";
    fn device(&self) -> &str {
        &self.device
    }
    fn arguments(&self) -> QmpArgs {
        let mut a = self.copy.arguments(&self.device);
        put(&mut a, "node-name", self.node_name.clone());
        put(&mut a, "replaces", self.replaces.clone());
        put(&mut a, "granularity", self.granularity);
        put(&mut a, "buf-size", self.buf_size);
        a
    }
    fn until(&self) -> Option<Until> {
        until(self.wait, self.complete)
    }
}

#[derive(Args, Debug, Clone)]
pub struct BackupArgs {
    /// Device
    device: String,
    #[command(flatten)]
    copy: CopyArgs,
    /// Wait until the job ends, showing its progress (exit 1 when it fails
    /// or is cancelled)
    #[arg(long)]
    wait: bool,
}

impl StartJob for BackupArgs {
    const COMMAND: &'static str = "drive-backup";
    const KIND: &'static str = "backup";
    fn device(&self) -> &str {
        &self.device
    }
    fn arguments(&self) -> QmpArgs {
        self.copy.arguments(&self.device)
    }
    fn until(&self) -> Option<Until> {
        until(self.wait, false)
    }
}

/// `blkctl job ...`
#[derive(Subcommand, Debug, Clone)]
pub enum JobAction {
    /// Wait for the device's job to end, showing its progress
    ///
    /// Exits 0 when the job completes, 1 when it fails or is cancelled, 2
    /// when the device has no job (it may have ended already: its result
    /// is then unknown). A mirror or active commit never ends by itself:
    /// the wait ends (exit 0) once it is ready to be completed. With --json, prints the job's
    /// query-block-jobs entry as a JSON line about once a second while it
    /// changes, and each of the job's events.
    Wait {
        /// Device
        device: String,
    },
    /// Pause the device's job (block-job-pause)
    Pause {
        /// Device
        device: String,
    },
    /// Resume the device's paused job (block-job-resume)
    Resume {
        /// Device
        device: String,
    },
    /// Finish a ready mirror or active commit (block-job-complete)
    Complete {
        /// Device
        device: String,
    },
    /// Cancel the device's job (block-job-cancel)
    Cancel {
        /// Device
        device: String,
        /// Cancel even a paused job at once, without waiting for it to
        /// resume
        #[arg(long)]
        force: bool,
    },
    /// Change the speed limit of the device's job (block-job-set-speed)
    SetSpeed {
        /// Device
        device: String,
        /// Bytes per second (suffixes K, M, G; 0: no limit)
        #[arg(value_parser = parse_size)]
        speed: u64,
    },
}

impl JobAction {
    /// The QMP command, its arguments and the message on success; `None`
    /// for `wait`.
    pub fn command(&self) -> Option<(&'static str, QmpArgs, String)> {
        Some(match self {
            JobAction::Wait { .. } => return None,
            JobAction::Pause { device } => (
                "block-job-pause",
                device_args(device),
                format!("{device}: job pause requested"),
            ),
            JobAction::Resume { device } => (
                "block-job-resume",
                device_args(device),
                format!("{device}: job resumed"),
            ),
            JobAction::Complete { device } => (
                "block-job-complete",
                device_args(device),
                format!("{device}: job completion requested"),
            ),
            JobAction::Cancel { device, force } => {
                let mut a = device_args(device);
                if *force {
                    a.insert("force".into(), Value::Bool(true));
                }
                (
                    "block-job-cancel",
                    a,
                    format!("{device}: job cancel requested"),
                )
            }
            JobAction::SetSpeed { device, speed } => {
                let mut a = device_args(device);
                a.insert("speed".into(), Value::from(*speed));
                (
                    "block-job-set-speed",
                    a,
                    format!("{device}: job speed limit {}", speed_text(*speed)),
                )
            }
        })
    }
}

fn speed_text(speed: u64) -> String {
    if speed == 0 {
        "none".to_string()
    } else {
        format!("{}/s", human_size(speed))
    }
}

/// A job's kind and progress, from an event or a query-block-jobs entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub kind: String,
    pub offset: u64,
    pub len: u64,
}

impl Snapshot {
    pub fn of(v: &Value) -> Snapshot {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Snapshot {
            kind: plain(v.get("type").and_then(Value::as_str).unwrap_or("job")),
            offset: n("offset"),
            len: n("len"),
        }
    }
}

/// Text from the daemon, with control characters that could drive the
/// terminal replaced.
fn plain(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Whole percent done, rounded down (100 only when done).
pub fn percent(offset: u64, len: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    (u128::from(offset.min(len)) * 100 / u128::from(len)) as u64
}

/// `offset/len (pct%)`.
pub fn progress_text(s: &Snapshot) -> String {
    format!("{}/{} ({}%)", s.offset, s.len, percent(s.offset, s.len))
}

/// A plain progress line: `DEVICE: type offset/len (pct%)`, then the rate
/// and the time left when known.
pub fn progress_line(
    device: &str,
    s: &Snapshot,
    rate: Option<f64>,
    eta: Option<Duration>,
) -> String {
    let mut line = format!("{device}: {} {}", s.kind, progress_text(s));
    if let Some(rate) = rate {
        line.push_str(&format!(", {}/s", human_size(rate as u64)));
    }
    if let Some(eta) = eta {
        line.push_str(&format!(", ETA {}", duration_text(eta)));
    }
    line
}

/// `42s`, `3m07s`, `2h05m`.
pub fn duration_text(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    }
}

/// The copying rate over the recent progress samples.
#[derive(Debug, Default)]
pub struct RateMeter {
    /// (time since the wait began, offset), oldest first.
    samples: VecDeque<(Duration, u64)>,
}

impl RateMeter {
    pub fn record(&mut self, at: Duration, offset: u64) {
        // A job going back (a mirror catching up with new writes) starts a
        // new measure.
        if self.samples.back().is_some_and(|&(_, o)| offset < o) {
            self.samples.clear();
        }
        self.samples.push_back((at, offset));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t, _)| at.saturating_sub(t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second; `None` before two samples some time apart.
    pub fn rate(&self) -> Option<f64> {
        let (&(t0, o0), &(t1, o1)) = (self.samples.front()?, self.samples.back()?);
        let dt = t1.saturating_sub(t0).as_secs_f64();
        (dt > 0.0).then(|| o1.saturating_sub(o0) as f64 / dt)
    }

    /// Time left at the current rate; `None` while it is unknown or 0.
    pub fn eta(&self, offset: u64, len: u64) -> Option<Duration> {
        let rate = self.rate().filter(|&r| r > 0.0)?;
        Duration::try_from_secs_f64(len.saturating_sub(offset) as f64 / rate).ok()
    }
}

/// An event of the job waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Completed(Snapshot),
    Failed(Snapshot, String),
    Cancelled(Snapshot),
    Ready(Snapshot),
    Error { operation: String, action: String },
}

/// What `event` says about the job on `device`; `None` for other events.
pub fn classify(event: &Value, device: &str) -> Option<JobEvent> {
    let data = event.get("data")?;
    if data.get("device").and_then(Value::as_str) != Some(device) {
        return None;
    }
    let snap = Snapshot::of(data);
    let text = |k: &str| plain(data.get(k).and_then(Value::as_str).unwrap_or("?"));
    Some(match event.get("event").and_then(Value::as_str)? {
        "BLOCK_JOB_COMPLETED" => match data.get("error").and_then(Value::as_str) {
            Some(e) => JobEvent::Failed(snap, plain(e)),
            None => JobEvent::Completed(snap),
        },
        "BLOCK_JOB_CANCELLED" => JobEvent::Cancelled(snap),
        "BLOCK_JOB_READY" => JobEvent::Ready(snap),
        "BLOCK_JOB_ERROR" => JobEvent::Error {
            operation: text("operation"),
            action: text("action"),
        },
        _ => return None,
    })
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Completed(Snapshot),
    Failed(Snapshot, String),
    Cancelled(Snapshot),
    /// Ready to be completed (waits with `Until::ReadyOrEnd` stop there).
    Ready(Snapshot),
    /// query-block-jobs did not list the job when the wait began.
    NoJob,
    /// The job left query-block-jobs and no event told how it ended.
    Vanished,
}

/// What to do about an event of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Stop(End),
    /// Send block-job-complete (once).
    SendComplete,
    /// Tell the user and go on waiting.
    Note(String),
    Continue,
}

pub fn decide(device: &str, until: Until, completing: bool, event: JobEvent) -> Step {
    match event {
        JobEvent::Completed(s) => Step::Stop(End::Completed(s)),
        JobEvent::Failed(s, e) => Step::Stop(End::Failed(s, e)),
        JobEvent::Cancelled(s) => Step::Stop(End::Cancelled(s)),
        JobEvent::Ready(s) => match until {
            Until::ReadyOrEnd => Step::Stop(End::Ready(s)),
            Until::CompleteAtReady if !completing => Step::SendComplete,
            Until::CompleteAtReady => Step::Continue,
        },
        JobEvent::Error { operation, action } => {
            let mut msg = format!("{device}: {operation} error, action {action}");
            if action == "stop" {
                msg.push_str(&format!(
                    "; the job is paused, `blkctl job resume {device}` retries"
                ));
            }
            Step::Note(msg)
        }
    }
}

/// The final line on stdout (exit 0), or the error message and exit status.
pub fn verdict(device: &str, end: &End) -> Result<String, (String, u8)> {
    match end {
        End::Completed(s) => Ok(format!(
            "{device}: {} job completed, {}",
            s.kind,
            progress_text(s)
        )),
        End::Ready(s) => Ok(format!(
            "{device}: {} job ready, {}; `blkctl job complete {device}` finishes it",
            s.kind,
            progress_text(s)
        )),
        End::Failed(s, e) => Err((
            format!(
                "{device}: {} job failed at {}: {e}",
                s.kind,
                progress_text(s)
            ),
            1,
        )),
        End::Cancelled(s) => Err((
            format!(
                "{device}: {} job was cancelled at {}",
                s.kind,
                progress_text(s)
            ),
            1,
        )),
        End::NoJob => Err((
            format!("no active job on {device} (if one ran, it has ended: its result is unknown)"),
            EXIT_UNKNOWN,
        )),
        End::Vanished => Err((
            format!("the job on {device} is gone but no event told how it ended"),
            EXIT_UNKNOWN,
        )),
    }
}

/// Where progress goes: a bar on a terminal, plain lines otherwise, JSON
/// lines with --json.
enum Output {
    Bar(Option<ProgressBar>),
    Lines {
        last: Option<(Instant, Snapshot)>,
        /// Where the lines go instead of stdout (for tests).
        captured: Option<Vec<String>>,
    },
    Json {
        last: Option<(Instant, Value)>,
    },
}

impl Output {
    fn new(json: bool) -> Output {
        if json {
            Output::Json { last: None }
        } else if io::stdout().is_terminal() {
            Output::Bar(None)
        } else {
            Output::Lines {
                last: None,
                captured: None,
            }
        }
    }

    /// The bar, drawn from the first progress on (before, its length is
    /// unknown).
    fn new_bar(len: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes} ({percent}%) {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout()).with_style(style)
    }

    /// A query-block-jobs entry of the job.
    fn progress(
        &mut self,
        device: &str,
        info: &Value,
        meter: &RateMeter,
        now: Instant,
    ) -> io::Result<()> {
        let snap = Snapshot::of(info);
        let due = |at: &Instant| now.saturating_duration_since(*at) >= LINE_EVERY;
        match self {
            Output::Bar(slot) => {
                let bar = slot.get_or_insert_with(|| Output::new_bar(snap.len));
                bar.set_prefix(format!("{device}: {}", snap.kind));
                bar.set_length(snap.len);
                bar.set_position(snap.offset);
                let mut msg = meter
                    .rate()
                    .map(|r| format!("{}/s", BinaryBytes(r as u64)))
                    .unwrap_or_default();
                if let Some(eta) = meter.eta(snap.offset, snap.len) {
                    msg.push_str(&format!(" ETA {}", duration_text(eta)));
                }
                bar.set_message(msg);
            }
            Output::Lines { last, captured } => {
                if last.as_ref().is_none_or(|(at, s)| *s != snap && due(at)) {
                    let line = progress_line(
                        device,
                        &snap,
                        meter.rate(),
                        meter.eta(snap.offset, snap.len),
                    );
                    match captured {
                        Some(lines) => lines.push(line),
                        None => emit(&format!("{line}\n"))?,
                    }
                    *last = Some((now, snap));
                }
            }
            Output::Json { last } => {
                if last.as_ref().is_none_or(|(at, v)| v != info && due(at)) {
                    emit(&format!("{info}\n"))?;
                    *last = Some((now, info.clone()));
                }
            }
        }
        Ok(())
    }

    /// An event of the job, as received.
    fn event(&self, raw: &Value) -> io::Result<()> {
        match self {
            Output::Json { .. } => emit(&format!("{raw}\n")),
            _ => Ok(()),
        }
    }

    /// A remark on stderr.
    fn note(&self, msg: &str) {
        match self {
            Output::Bar(Some(bar)) => bar.suspend(|| eprintln!("blkctl: {msg}")),
            _ => eprintln!("blkctl: {msg}"),
        }
    }

    /// Clears the bar and prints the final line (not with --json, where the
    /// final event was printed).
    fn finish(&mut self, line: Option<&str>) -> io::Result<()> {
        match self {
            Output::Bar(bar) => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
            }
            Output::Lines {
                captured: Some(lines),
                ..
            } => {
                lines.extend(line.map(str::to_string));
                return Ok(());
            }
            Output::Lines { .. } => {}
            Output::Json { .. } => return Ok(()),
        }
        match line {
            Some(line) => emit(&format!("{line}\n")),
            None => Ok(()),
        }
    }
}

/// The entry of `device`'s job in a query-block-jobs reply.
fn find_job<'a>(jobs: &'a Value, device: &str) -> Option<&'a Value> {
    jobs.as_array()?
        .iter()
        .find(|j| j.get("device").and_then(Value::as_str) == Some(device))
}

/// Waits as `until` says for the job on `device`. With `must_exist`, a job
/// missing from the first query-block-jobs is `End::NoJob` (unless its end
/// event was read already).
fn wait_job(
    client: &mut Client,
    device: &str,
    until: Until,
    must_exist: bool,
    out: &mut Output,
) -> Result<End, Failure> {
    let start = Instant::now();
    let mut meter = RateMeter::default();
    let mut next_poll = start;
    let mut gone_since: Option<Instant> = None;
    let mut completing = false;
    let mut first = true;
    loop {
        let now = Instant::now();
        if now >= next_poll {
            let jobs = client.execute("query-block-jobs", None)?;
            match find_job(&jobs, device) {
                Some(info) => {
                    gone_since = None;
                    meter.record(now.duration_since(start), Snapshot::of(info).offset);
                    out.progress(device, info, &meter, now)?;
                    // Ready before the wait began (its event was missed).
                    if until == Until::ReadyOrEnd && info.get("ready") == Some(&Value::Bool(true)) {
                        return Ok(End::Ready(Snapshot::of(info)));
                    }
                }
                None if first && must_exist => {
                    // The job ended before the wait began: an end event read
                    // since the connection was made still tells how.
                    let deadline = Instant::now() + NOJOB_GRACE;
                    while let Some(raw) = client.wait_event(deadline)? {
                        if let Some(ev) = classify(&raw, device) {
                            out.event(&raw)?;
                            if let Step::Stop(end) = decide(device, until, true, ev) {
                                return Ok(end);
                            }
                        }
                    }
                    return Ok(End::NoJob);
                }
                None => {
                    let since = *gone_since.get_or_insert(now);
                    if now.duration_since(since) >= GONE_GRACE {
                        return Ok(End::Vanished);
                    }
                }
            }
            first = false;
            next_poll = now + POLL;
        }
        let Some(raw) = client.wait_event(next_poll)? else {
            continue;
        };
        let Some(ev) = classify(&raw, device) else {
            continue;
        };
        out.event(&raw)?;
        match decide(device, until, completing, ev) {
            Step::Stop(end) => return Ok(end),
            Step::SendComplete => {
                client.execute(
                    "block-job-complete",
                    Some(Value::Object(device_args(device))),
                )?;
                completing = true;
            }
            Step::Note(msg) => out.note(&msg),
            Step::Continue => {}
        }
    }
}

/// Turns how a wait ended into the output and exit status.
fn report(out: &mut Output, device: &str, end: &End) -> Outcome {
    match verdict(device, end) {
        Ok(line) => {
            out.finish(Some(&line))?;
            Ok(ExitCode::SUCCESS)
        }
        Err((message, code)) => {
            out.finish(None)?;
            Err(Failure::Exit { message, code })
        }
    }
}

/// Starts a job; with --wait, waits on the same connection, so none of the
/// job's events can be missed.
pub fn cmd_start<J: StartJob>(client: &mut Client, job: &J, json: bool) -> Outcome {
    let device = job.device();
    let ret = client.execute(J::COMMAND, Some(Value::Object(job.arguments())))?;
    let Some(until) = job.until() else {
        if json {
            emit_json(&ret)?;
        } else {
            emit(&format!("{device}: {} job started\n", J::KIND))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let mut out = Output::new(json);
    let end = wait_job(client, device, until, false, &mut out)?;
    report(&mut out, device, &end)
}

pub fn cmd_job(client: &mut Client, action: JobAction, json: bool) -> Outcome {
    if let JobAction::Wait { device } = &action {
        let mut out = Output::new(json);
        let end = wait_job(client, device, Until::ReadyOrEnd, true, &mut out)?;
        return report(&mut out, device, &end);
    }
    let Some((command, args, message)) = action.command() else {
        return Ok(ExitCode::SUCCESS);
    };
    let ret = client.execute(command, Some(Value::Object(args)))?;
    if json {
        emit_json(&ret)?;
    } else {
        emit(&format!("{message}\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One row of `blkctl jobs`.
pub fn job_row(job: &Value) -> Vec<String> {
    let s = Snapshot::of(job);
    let progress = format!(
        "{}/{} ({}%)",
        human_size(s.offset),
        human_size(s.len),
        percent(s.offset, s.len)
    );
    let speed = match job.get("speed").and_then(Value::as_u64) {
        Some(0) => "-".to_string(),
        Some(n) => format!("{}/s", human_size(n)),
        None => cell(job.get("speed")),
    };
    vec![
        cell(job.get("type")),
        cell(job.get("device")),
        progress,
        speed,
        bool_cell(job.get("busy")),
        bool_cell(job.get("paused")),
        cell(job.get("io-status")),
    ]
}

pub fn cmd_jobs(client: &mut Client, json: bool) -> Outcome {
    let table = Table::new(&[
        ("TYPE", Align::Left),
        ("DEVICE", Align::Left),
        ("PROGRESS", Align::Right),
        ("SPEED", Align::Right),
        ("BUSY", Align::Left),
        ("PAUSED", Align::Left),
        ("IO-STATUS", Align::Left),
    ]);
    list_query(client, "query-block-jobs", json, table, job_row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        Stream(StreamArgs),
        Commit(CommitArgs),
        Mirror(MirrorArgs),
        Backup(BackupArgs),
        Job {
            #[command(subcommand)]
            action: JobAction,
        },
    }

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("blkctl").chain(args.iter().copied())).map(|c| c.cmd)
    }

    /// The QMP command, arguments and wait of a starting subcommand.
    fn start(args: &[&str]) -> (&'static str, Value, Option<Until>) {
        fn of<J: StartJob>(j: &J) -> (&'static str, Value, Option<Until>) {
            (J::COMMAND, Value::Object(j.arguments()), j.until())
        }
        match parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
            Cmd::Stream(j) => of(&j),
            Cmd::Commit(j) => of(&j),
            Cmd::Mirror(j) => of(&j),
            Cmd::Backup(j) => of(&j),
            Cmd::Job { .. } => panic!("not a starting subcommand"),
        }
    }

    #[test]
    fn stream_arguments() {
        assert_eq!(
            start(&["stream", "d0"]),
            ("block-stream", json!({"device": "d0"}), None)
        );
        assert_eq!(
            start(&[
                "stream",
                "d0",
                "--base",
                "/i/base.qcow2",
                "--backing-file",
                "base.qcow2",
                "--speed",
                "1M",
                "--on-error",
                "enospc",
                "--wait",
            ]),
            (
                "block-stream",
                json!({"device": "d0", "base": "/i/base.qcow2", "backing-file": "base.qcow2",
                    "speed": 1 << 20, "on-error": "enospc"}),
                Some(Until::ReadyOrEnd)
            )
        );
        assert!(parse(&["stream"]).is_err());
        assert!(parse(&["stream", "d0", "--on-error", "explode"]).is_err());
        assert!(parse(&["stream", "d0", "--speed", "fast"]).is_err());
    }

    #[test]
    fn commit_arguments() {
        assert_eq!(
            start(&[
                "commit",
                "d0",
                "--top",
                "mid.qcow2",
                "--base",
                "b.qcow2",
                "--wait"
            ]),
            (
                "block-commit",
                json!({"device": "d0", "top": "mid.qcow2", "base": "b.qcow2"}),
                Some(Until::ReadyOrEnd)
            )
        );
        // --complete implies waiting.
        assert_eq!(
            start(&[
                "commit",
                "d0",
                "--backing-file",
                "x",
                "--speed",
                "0",
                "--complete"
            ]),
            (
                "block-commit",
                json!({"device": "d0", "backing-file": "x", "speed": 0}),
                Some(Until::CompleteAtReady)
            )
        );
    }

    #[test]
    fn mirror_arguments() {
        assert!(
            parse(&["mirror", "d0", "t.qcow2"]).is_err(),
            "--sync is needed"
        );
        assert!(
            parse(&["mirror", "d0", "--sync", "full"]).is_err(),
            "TARGET is needed"
        );
        assert!(parse(&["mirror", "d0", "t", "--sync", "some"]).is_err());
        assert_eq!(
            start(&["mirror", "d0", "/img/t.qcow2", "--sync", "full"]),
            (
                "drive-mirror",
                json!({"device": "d0", "target": "/img/t.qcow2", "sync": "full"}),
                None
            )
        );
        assert_eq!(
            start(&[
                "mirror",
                "d0",
                "/img/t.raw",
                "--sync",
                "none",
                "--format",
                "raw",
                "--node-name",
                "tn",
                "--replaces",
                "old",
                "--mode",
                "absolute-paths",
                "--speed",
                "10M",
                "--granularity",
                "64K",
                "--buf-size",
                "8M",
                "--on-source-error",
                "stop",
                "--on-target-error",
                "ignore",
                "--complete",
            ]),
            (
                "drive-mirror",
                json!({"device": "d0", "target": "/img/t.raw", "sync": "none", "format": "raw",
                    "node-name": "tn", "replaces": "old", "mode": "absolute-paths",
                    "speed": 10 << 20, "granularity": 65536, "buf-size": 8 << 20,
                    "on-source-error": "stop", "on-target-error": "ignore"}),
                Some(Until::CompleteAtReady)
            )
        );
        assert_eq!(
            start(&["mirror", "d0", "t", "--sync", "top", "--mode", "existing", "--wait"]).2,
            Some(Until::ReadyOrEnd)
        );
    }

    #[test]
    fn backup_arguments() {
        assert!(parse(&["backup", "d0", "t"]).is_err(), "--sync is needed");
        assert!(parse(&["backup", "d0", "t", "--sync", "full", "--complete"]).is_err());
        assert_eq!(
            start(&[
                "backup",
                "d0",
                "b.qcow2",
                "--sync",
                "top",
                "--format",
                "qcow2",
                "--mode",
                "existing",
                "--speed",
                "512K",
                "--on-source-error",
                "report",
                "--on-target-error",
                "enospc",
                "--wait",
            ]),
            (
                "drive-backup",
                json!({"device": "d0", "target": crate::paths::absolute("b.qcow2").unwrap(),
                    "sync": "top", "format": "qcow2",
                    "mode": "existing", "speed": 512 << 10, "on-source-error": "report",
                    "on-target-error": "enospc"}),
                Some(Until::ReadyOrEnd)
            )
        );
    }

    fn action(args: &[&str]) -> Option<(&'static str, Value)> {
        let mut full = vec!["job"];
        full.extend_from_slice(args);
        match parse(&full).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
            Cmd::Job { action } => action.command().map(|(c, a, _)| (c, Value::Object(a))),
            _ => panic!("not a job subcommand"),
        }
    }

    #[test]
    fn job_actions() {
        let d0 = json!({"device": "d0"});
        assert_eq!(action(&["wait", "d0"]), None);
        assert_eq!(
            action(&["pause", "d0"]),
            Some(("block-job-pause", d0.clone()))
        );
        assert_eq!(
            action(&["resume", "d0"]),
            Some(("block-job-resume", d0.clone()))
        );
        assert_eq!(
            action(&["complete", "d0"]),
            Some(("block-job-complete", d0.clone()))
        );
        assert_eq!(action(&["cancel", "d0"]), Some(("block-job-cancel", d0)));
        assert_eq!(
            action(&["cancel", "d0", "--force"]),
            Some(("block-job-cancel", json!({"device": "d0", "force": true})))
        );
        assert_eq!(
            action(&["set-speed", "d0", "2M"]),
            Some((
                "block-job-set-speed",
                json!({"device": "d0", "speed": 2 << 20})
            ))
        );
        assert!(parse(&["job", "set-speed", "d0"]).is_err());
        assert!(parse(&["job", "set-speed", "d0", "-1"]).is_err());
        assert!(parse(&["job", "wait"]).is_err());
        let Ok(Cmd::Job { action }) = parse(&["job", "set-speed", "d0", "0"]) else {
            panic!("set-speed 0 parses");
        };
        assert_eq!(
            action.command().map(|c| c.2),
            Some("d0: job speed limit none".to_string())
        );
    }

    fn snap(kind: &str, offset: u64, len: u64) -> Snapshot {
        Snapshot {
            kind: kind.into(),
            offset,
            len,
        }
    }

    #[test]
    fn progress_formatting() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(999, 1000), 99, "100% only when done");
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(2000, 1000), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99, "no overflow");
        let s = snap("stream", 524288, 1048576);
        assert_eq!(
            progress_line("d0", &s, None, None),
            "d0: stream 524288/1048576 (50%)"
        );
        assert_eq!(
            progress_line("d0", &s, Some(1048576.0), Some(Duration::from_millis(500))),
            "d0: stream 524288/1048576 (50%), 1.0M/s, ETA 0s"
        );
        assert_eq!(duration_text(Duration::from_secs(59)), "59s");
        assert_eq!(duration_text(Duration::from_secs(187)), "3m07s");
        assert_eq!(duration_text(Duration::from_secs(7500)), "2h05m");
        assert_eq!(
            Snapshot::of(&json!({"type": "mirror", "offset": 5, "len": 9, "device": "x"})),
            snap("mirror", 5, 9)
        );
        assert_eq!(Snapshot::of(&json!({})), snap("job", 0, 0));
        assert_eq!(Snapshot::of(&json!({"type": "a\u{1b}[2J"})).kind, "a?[2J");
    }

    #[test]
    fn rate_and_eta() {
        let s = Duration::from_secs;
        let mut m = RateMeter::default();
        assert_eq!(m.rate(), None);
        assert_eq!(m.eta(0, 100), None);
        m.record(s(0), 0);
        assert_eq!(m.rate(), None, "one sample is no rate");
        m.record(s(2), 200);
        assert_eq!(m.rate(), Some(100.0));
        assert_eq!(m.eta(200, 1000), Some(s(8)));
        assert_eq!(m.eta(1000, 1000), Some(s(0)));
        // Only the last RATE_WINDOW counts: the job sped up.
        for t in 3..=30 {
            m.record(s(t), 200 + (t - 2) * 1000);
        }
        assert_eq!(m.rate(), Some(1000.0));
        // Going back (a mirror with new dirty data) restarts the measure.
        m.record(s(31), 10);
        assert_eq!(m.rate(), None);
        // No progress: no ETA rather than an infinite one.
        m.record(s(32), 10);
        assert_eq!(m.rate(), Some(0.0));
        assert_eq!(m.eta(10, 100), None);
        // Samples at the same instant.
        let mut m = RateMeter::default();
        m.record(s(1), 0);
        m.record(s(1), 50);
        assert_eq!(m.rate(), None);
        // An ETA too long for a Duration is none.
        let mut m = RateMeter::default();
        m.record(Duration::ZERO, 0);
        m.record(Duration::from_secs(1_000_000_000), 1);
        assert_eq!(m.eta(1, u64::MAX), None);
    }

    fn event(name: &str, data: Value) -> Value {
        json!({"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 2}})
    }

    #[test]
    fn events_of_the_job() {
        let data = json!({"type": "stream", "device": "d0", "len": 100, "offset": 100, "speed": 0});
        assert_eq!(
            classify(&event("BLOCK_JOB_COMPLETED", data.clone()), "d0"),
            Some(JobEvent::Completed(snap("stream", 100, 100)))
        );
        assert_eq!(
            classify(&event("BLOCK_JOB_COMPLETED", data.clone()), "d1"),
            None
        );
        let mut failed = data.clone();
        failed["error"] = json!("Input/output error");
        failed["offset"] = json!(40);
        assert_eq!(
            classify(&event("BLOCK_JOB_COMPLETED", failed), "d0"),
            Some(JobEvent::Failed(
                snap("stream", 40, 100),
                "Input/output error".into()
            ))
        );
        assert_eq!(
            classify(&event("BLOCK_JOB_CANCELLED", data.clone()), "d0"),
            Some(JobEvent::Cancelled(snap("stream", 100, 100)))
        );
        assert_eq!(
            classify(&event("BLOCK_JOB_READY", data.clone()), "d0"),
            Some(JobEvent::Ready(snap("stream", 100, 100)))
        );
        assert_eq!(
            classify(
                &event(
                    "BLOCK_JOB_ERROR",
                    json!({"device": "d0", "operation": "write", "action": "stop"})
                ),
                "d0"
            ),
            Some(JobEvent::Error {
                operation: "write".into(),
                action: "stop".into()
            })
        );
        assert_eq!(classify(&event("STOP", json!({})), "d0"), None);
        assert_eq!(classify(&event("DEVICE_TRAY_MOVED", data), "d0"), None);
        assert_eq!(classify(&json!({"event": "BLOCK_JOB_READY"}), "d0"), None);
    }

    #[test]
    fn decisions() {
        let s = snap("mirror", 9, 9);
        let ready = || JobEvent::Ready(s.clone());
        for until in [Until::ReadyOrEnd, Until::CompleteAtReady] {
            assert_eq!(
                decide("d0", until, false, JobEvent::Completed(s.clone())),
                Step::Stop(End::Completed(s.clone()))
            );
            assert_eq!(
                decide("d0", until, true, JobEvent::Failed(s.clone(), "E".into())),
                Step::Stop(End::Failed(s.clone(), "E".into()))
            );
            assert_eq!(
                decide("d0", until, false, JobEvent::Cancelled(s.clone())),
                Step::Stop(End::Cancelled(s.clone()))
            );
        }
        assert_eq!(
            decide("d0", Until::ReadyOrEnd, false, ready()),
            Step::Stop(End::Ready(s.clone()))
        );
        assert_eq!(
            decide("d0", Until::CompleteAtReady, false, ready()),
            Step::SendComplete
        );
        assert_eq!(
            decide("d0", Until::CompleteAtReady, true, ready()),
            Step::Continue,
            "block-job-complete is sent once"
        );
        let error = |action: &str| JobEvent::Error {
            operation: "read".into(),
            action: action.into(),
        };
        assert_eq!(
            decide("d0", Until::ReadyOrEnd, false, error("ignore")),
            Step::Note("d0: read error, action ignore".into())
        );
        assert!(matches!(
            decide("d0", Until::ReadyOrEnd, false, error("stop")),
            Step::Note(m) if m.contains("blkctl job resume d0")
        ));
    }

    #[test]
    fn verdicts_and_exit_statuses() {
        let s = snap("stream", 50, 100);
        assert_eq!(
            verdict("d0", &End::Completed(snap("stream", 100, 100))),
            Ok("d0: stream job completed, 100/100 (100%)".into())
        );
        assert!(verdict("d0", &End::Ready(s.clone())).is_ok());
        assert_eq!(
            verdict(
                "d0",
                &End::Failed(s.clone(), "No space left on device".into())
            ),
            Err((
                "d0: stream job failed at 50/100 (50%): No space left on device".into(),
                1
            ))
        );
        assert_eq!(
            verdict("d0", &End::Cancelled(s)),
            Err(("d0: stream job was cancelled at 50/100 (50%)".into(), 1))
        );
        let (msg, code) = verdict("d0", &End::NoJob).unwrap_err();
        assert!(msg.starts_with("no active job on d0"), "{msg}");
        assert_eq!(code, EXIT_UNKNOWN);
        assert_eq!(verdict("d0", &End::Vanished).unwrap_err().1, EXIT_UNKNOWN);
    }

    #[test]
    fn jobs_table_rows() {
        let job = json!({"type": "backup", "device": "d0", "len": 1 << 30, "offset": 1 << 28,
            "busy": true, "paused": false, "speed": 0, "io-status": "ok"});
        assert_eq!(
            job_row(&job),
            ["backup", "d0", "256.0M/1.0G (25%)", "-", "yes", "no", "ok"]
        );
        let job = json!({"type": "mirror", "device": "d1", "len": 0, "offset": 0,
            "busy": false, "paused": true, "speed": 1 << 20, "io-status": "nospace"});
        assert_eq!(
            job_row(&job),
            [
                "mirror",
                "d1",
                "0B/0B (0%)",
                "1.0M/s",
                "no",
                "yes",
                "nospace"
            ]
        );
    }

    use crate::client::fake;
    use std::sync::{Arc, Mutex};

    fn captured() -> Output {
        Output::Lines {
            last: None,
            captured: Some(Vec::new()),
        }
    }

    fn lines(out: &Output) -> Vec<String> {
        match out {
            Output::Lines {
                captured: Some(l), ..
            } => l.clone(),
            _ => Vec::new(),
        }
    }

    fn job(offset: u64, len: u64) -> Value {
        json!({"type": "stream", "device": "d0", "len": len, "offset": offset,
            "busy": true, "paused": false, "speed": 0, "io-status": "ok"})
    }

    fn end_data(kind: &str, offset: u64, len: u64) -> Value {
        json!({"type": kind, "device": "d0", "len": len, "offset": offset, "speed": 0})
    }

    /// A server whose query-block-jobs replies come from `polls` in turn
    /// (the last one repeating), each followed by the events listed with it.
    /// Other commands are recorded in the returned log and answered `{}`.
    fn server(
        polls: Vec<(Value, Vec<Value>)>,
        on_command: impl Fn(&str) -> Vec<Value> + Send + 'static,
    ) -> (Client, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let seen = log.clone();
        let mut polls = polls.into_iter().peekable();
        let client = fake::server(move |cmd| {
            let name = cmd["execute"].as_str().unwrap_or("?").to_string();
            if name != "query-block-jobs" {
                let mut answer = vec![fake::reply(cmd, json!({}))];
                answer.extend(on_command(&name));
                seen.lock().ok()?.push(name);
                return Some(answer);
            }
            let (jobs, events) = match polls.next() {
                Some(p) if polls.peek().is_none() => {
                    // Keep answering with the last list, without its events.
                    polls = vec![(p.0.clone(), Vec::new())].into_iter().peekable();
                    p
                }
                Some(p) => p,
                None => (json!([]), Vec::new()),
            };
            let mut answer = vec![fake::reply(cmd, jobs)];
            answer.extend(events);
            Some(answer)
        });
        (client, log)
    }

    #[test]
    fn waits_for_completion_with_progress_lines() {
        let (mut c, _) = server(
            vec![
                (json!([job(0, 100)]), vec![]),
                (
                    json!([job(50, 100)]),
                    vec![
                        // Another device's end is no concern.
                        event(
                            "BLOCK_JOB_COMPLETED",
                            json!({"type": "stream", "device": "d1",
                            "len": 1, "offset": 1, "speed": 0, "error": "x"}),
                        ),
                        event("BLOCK_JOB_COMPLETED", end_data("stream", 100, 100)),
                    ],
                ),
            ],
            |_| vec![],
        );
        let mut out = captured();
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut out);
        assert_eq!(end.ok(), Some(End::Completed(snap("stream", 100, 100))));
        // The second poll came before a line was due.
        assert_eq!(lines(&out), ["d0: stream 0/100 (0%)"]);
        assert!(report(&mut out, "d0", &End::Completed(snap("stream", 100, 100))).is_ok());
        assert_eq!(
            lines(&out).last().map(String::as_str),
            Some("d0: stream job completed, 100/100 (100%)")
        );
    }

    #[test]
    fn a_job_that_ended_before_the_wait_is_unknown_unless_its_event_was_read() {
        // Nothing listed, nothing heard: exit 2.
        let (mut c, _) = server(vec![(json!([]), vec![])], |_| vec![]);
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut captured());
        assert_eq!(end.ok(), Some(End::NoJob));

        // The end event came before the reply that no longer lists the job.
        let mut c = fake::server(|cmd| {
            Some(vec![
                event("BLOCK_JOB_COMPLETED", end_data("stream", 9, 9)),
                fake::reply(cmd, json!([])),
            ])
        });
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut captured());
        assert_eq!(end.ok(), Some(End::Completed(snap("stream", 9, 9))));

        // Or just after it.
        let (mut c, _) = server(
            vec![(
                json!([]),
                vec![event("BLOCK_JOB_CANCELLED", end_data("backup", 7, 9))],
            )],
            |_| vec![],
        );
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut captured());
        assert_eq!(end.ok(), Some(End::Cancelled(snap("backup", 7, 9))));
    }

    #[test]
    fn a_started_job_missing_from_the_list_is_waited_for() {
        // The job just started is not listed yet; its events count.
        let (mut c, _) = server(
            vec![
                (json!([]), vec![]),
                (
                    json!([]),
                    vec![event(
                        "BLOCK_JOB_COMPLETED",
                        json!({"type": "stream", "device": "d0", "len": 9, "offset": 3,
                            "speed": 0, "error": "Input/output error"}),
                    )],
                ),
            ],
            |_| vec![],
        );
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, false, &mut captured());
        assert_eq!(
            end.ok(),
            Some(End::Failed(
                snap("stream", 3, 9),
                "Input/output error".into()
            ))
        );
    }

    #[test]
    fn a_job_gone_without_an_event_is_reported_after_a_grace_time() {
        let (mut c, _) = server(
            vec![(json!([job(1, 2)]), vec![]), (json!([]), vec![])],
            |_| vec![],
        );
        let start = Instant::now();
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut captured());
        assert_eq!(end.ok(), Some(End::Vanished));
        assert!(start.elapsed() >= GONE_GRACE);
    }

    #[test]
    fn mirror_wait_stops_at_ready_and_complete_sends_block_job_complete_once() {
        let mirror = |o: u64| {
            json!([{"type": "mirror", "device": "d0", "len": 8, "offset": o,
            "busy": false, "paused": false, "speed": 0, "io-status": "ok"}])
        };
        let ready = || event("BLOCK_JOB_READY", end_data("mirror", 8, 8));
        let (mut c, log) = server(vec![(mirror(8), vec![ready()])], |_| vec![]);
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, false, &mut captured());
        assert_eq!(end.ok(), Some(End::Ready(snap("mirror", 8, 8))));
        assert!(log.lock().is_ok_and(|l| l.is_empty()));

        // READY twice: block-job-complete goes out once; then COMPLETED.
        let (mut c, log) = server(vec![(mirror(8), vec![ready(), ready()])], |name| {
            if name == "block-job-complete" {
                vec![event("BLOCK_JOB_COMPLETED", end_data("mirror", 8, 8))]
            } else {
                vec![]
            }
        });
        let end = wait_job(&mut c, "d0", Until::CompleteAtReady, false, &mut captured());
        assert_eq!(end.ok(), Some(End::Completed(snap("mirror", 8, 8))));
        assert_eq!(
            log.lock().map(|l| l.clone()).unwrap_or_default(),
            ["block-job-complete"]
        );
    }

    #[test]
    fn a_closed_connection_ends_the_wait_with_an_error() {
        let mut polls = 0;
        let mut c = fake::server(move |cmd| {
            polls += 1;
            (polls < 2).then(|| vec![fake::reply(cmd, json!([job(0, 10)]))])
        });
        let end = wait_job(&mut c, "d0", Until::ReadyOrEnd, true, &mut captured());
        assert!(matches!(
            end,
            Err(Failure::Qmp(crate::client::QmpError::Closed))
        ));
    }
}
