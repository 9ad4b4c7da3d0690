//! The block job commands: starting each job, and `query-block-jobs` and
//! `block-job-*` to steer them.

use crate::args::Args;
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::jobs::backup::{self, Backup};
use crate::jobs::commit::Commit;
use crate::jobs::mirror::{self, Mirror, Scan, Switch};
use crate::jobs::{self, check_speed, find_in_chain, target, JobType};
use crate::options::OnError;
use crate::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

pub const ON_ERROR: &[(&str, OnError)] = &[
    ("report", OnError::Report),
    ("ignore", OnError::Ignore),
    ("enospc", OnError::Enospc),
    ("stop", OnError::Stop),
];

/// A `BlockdevOnError` argument (default `report`).
fn on_error(a: &mut Args, key: &str) -> Result<OnError> {
    Ok(a.enumeration(key, ON_ERROR)?.unwrap_or(OnError::Report))
}

pub fn block_stream(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let base = a.str("base")?;
    let backing_file = a.str("backing-file")?;
    let speed = check_speed(a.int("speed")?)?;
    let on_error = on_error(&mut a, "on-error")?;
    a.finish()?;
    let (dev, top) = writable_idle_device(e, &device)?;
    let base = match &base {
        Some(b) => Some(
            find_in_chain(&top, b)
                .ok_or_else(|| Error::generic(format!("Base '{b}' not found")))?,
        ),
        None => None,
    };
    if base.is_none() && backing_file.is_some() {
        return Err(Error::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let backing_name = backing_file
        .or_else(|| base.as_ref().map(|b| b.driver.filename()))
        .unwrap_or_default();
    let body = jobs::stream::Stream {
        graph: e.graph.clone(),
        top,
        base,
        backing_name,
        on_error,
        lock: Default::default(),
    };
    let hook = Some(body.hook());
    e.jobs.start(
        JobType::Stream,
        dev,
        speed,
        hook,
        Box::new(move |job| body.run(job)),
    )?;
    Ok(json!({}))
}

/// A device with no job whose image chain a job may change, and its root.
fn writable_idle_device(
    e: &Engine,
    device: &str,
) -> Result<(Arc<crate::device::Device>, Arc<Node>)> {
    let (dev, root) = idle_device(e, device)?;
    if root.opts.read_only {
        return Err(Error::generic(format!("Device '{device}' is read only")));
    }
    Ok((dev, root))
}

/// A device no job uses, and its root node.
fn idle_device(e: &Engine, device: &str) -> Result<(Arc<crate::device::Device>, Arc<Node>)> {
    let dev = e.graph.device(device)?;
    e.jobs.check_idle(device)?;
    // Every job starts here, before it creates anything.
    dev.refuse_passthrough("a block job")?;
    let root = dev.root();
    Ok((dev, root))
}

pub fn query_block_jobs(e: &Engine, a: Args) -> Result<Value> {
    a.finish()?;
    Ok(e.jobs.query())
}

pub fn block_job_set_speed(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let speed = a.req("speed", Args::int)?;
    a.finish()?;
    e.jobs.set_speed(&device, speed)?;
    Ok(json!({}))
}

pub fn block_job_cancel(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let force = a.bool("force")?.unwrap_or(false);
    a.finish()?;
    e.jobs.cancel(&device, force)?;
    Ok(json!({}))
}

/// A command naming only a device.
fn device_arg(mut a: Args) -> Result<String> {
    let device = a.req("device", Args::str)?;
    a.finish()?;
    Ok(device)
}

pub fn block_job_pause(e: &Engine, a: Args) -> Result<Value> {
    e.jobs.pause(&device_arg(a)?)?;
    Ok(json!({}))
}

pub fn block_job_resume(e: &Engine, a: Args) -> Result<Value> {
    e.jobs.resume(&device_arg(a)?)?;
    Ok(json!({}))
}

pub fn block_job_complete(e: &Engine, a: Args) -> Result<Value> {
    e.jobs.complete(&device_arg(a)?)?;
    Ok(json!({}))
}

const SYNC: &[(&str, Sync)] = &[
    ("top", Sync::Top),
    ("full", Sync::Full),
    ("none", Sync::None),
];
const MODE: &[(&str, bool)] = &[("existing", false), ("absolute-paths", true)];

/// `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Top,
    Full,
    None,
}

/// A job target named by the command: its path, format, and whether blkfs
/// creates it (`mode=absolute-paths`, the default).
struct TargetArgs {
    path: String,
    format: Option<String>,
    create: bool,
}

impl TargetArgs {
    /// `target`, `format` and `mode` of a job command.
    fn parse(a: &mut Args) -> Result<TargetArgs> {
        Ok(TargetArgs {
            path: a.req("target", Args::str)?,
            format: a.str("format")?,
            create: a.enumeration("mode", MODE)?.unwrap_or(true),
        })
    }

    /// Creates (when asked) and opens the target for a copy of `source`
    /// with `sync`; returns the node and whether it reads as zeroes where
    /// nothing was copied. A new target's backing file is the node the
    /// source already has open (its backing for `top`, itself for `none`).
    fn open(
        &self,
        e: &Engine,
        source: &Arc<Node>,
        sync: Sync,
        node_name: Option<&str>,
    ) -> Result<(Arc<Node>, bool)> {
        if let Some(n) = target::node_using(&e.graph, &self.path) {
            return Err(Error::generic(format!(
                "Could not use '{}' as the target: it is in use by node '{n}'",
                self.path
            )));
        }
        if let Some(n) = node_name {
            if e.graph.node(n).is_some() || e.graph.device(n).is_ok() {
                return Err(Error::generic(format!("Duplicate node name '{n}'")));
            }
        }
        // sync=top of an image without backing file is a full copy.
        let backing = match sync {
            Sync::Full => None,
            Sync::Top => source.driver.backing_child(),
            Sync::None => Some(source.clone()),
        };
        if !self.create {
            let format = match &self.format {
                Some(f) => f.clone(),
                None => crate::drivers::probe::probe(&self.path)?.to_string(),
            };
            let node = target::open(&e.graph, source, &self.path, &format, node_name, true)?;
            if node.size() != source.size() {
                e.graph.forget_chain(Some(node), None);
                return Err(Error::generic(
                    "Source and target image have different sizes",
                ));
            }
            return Ok((node, false));
        }
        let format = self
            .format
            .clone()
            .unwrap_or_else(|| source.driver.format_name().to_string());
        let backing_file = match &backing {
            Some(b) if crate::drivers::has_backing_file(&format) => {
                let path = std::fs::canonicalize(b.driver.filename())
                    .map_err(|err| Error::from_io(&err, b.driver.filename()))?;
                Some((
                    path.to_string_lossy().into_owned(),
                    b.driver.format_name().to_string(),
                ))
            }
            Some(_) => {
                return Err(Error::generic(format!(
                    "Format '{format}' cannot have a backing file: use sync=full"
                )))
            }
            None => None,
        };
        let zero_init = backing_file.is_none();
        target::create_image(&self.path, &format, source.size(), backing_file)?;
        let node = target::open(&e.graph, source, &self.path, &format, node_name, false).and_then(
            |node| {
                if backing.is_some() {
                    node.driver.set_backing(backing)?;
                }
                Ok(node)
            },
        );
        if node.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        Ok((node?, zero_init))
    }
}

pub fn drive_mirror(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let t = TargetArgs::parse(&mut a)?;
    let node_name = a.str("node-name")?;
    let replaces = a.str("replaces")?;
    let sync = a.req("sync", |a, k| a.enumeration(k, SYNC))?;
    let speed = check_speed(a.int("speed")?)?;
    let granularity = a.uint("granularity")?;
    let buf_size = a.int("buf-size")?;
    let on_source_error = on_error(&mut a, "on-source-error")?;
    let on_target_error = on_error(&mut a, "on-target-error")?;
    a.finish()?;
    let (dev, source) = idle_device(e, &device)?;
    if let Some(g) = granularity {
        mirror::granularity(Some(g), None)?;
    }
    let buf_size = match buf_size {
        None => mirror::DEFAULT_BUF_SIZE,
        Some(b) if b > 0 => b as u64,
        Some(_) => return Err(Error::generic("Invalid parameter 'buf-size'")),
    };
    let mut replaces_child = None;
    if let Some(r) = &replaces {
        if node_name.is_none() {
            return Err(Error::generic(
                "a node-name must be provided when replacing a named node of the graph",
            ));
        }
        let node = e.graph.node(r).ok_or_else(|| {
            Error::new(
                crate::error::ErrorKind::DeviceNotFound,
                format!("Cannot find device= nor node_name={r}"),
            )
        })?;
        // A quorum's child may be replaced: the quorum's vote keeps the
        // data the guest sees the same (QEMU's recursive can-replace).
        let child_of_quorum = source.driver.format_name() == "quorum"
            && source
                .driver
                .other_children()
                .iter()
                .any(|c| Arc::ptr_eq(c, &node));
        if child_of_quorum {
            if sync != Sync::Full {
                return Err(Error::generic(
                    "replacing a quorum child needs sync=full: the new child must hold all the data",
                ));
            }
            replaces_child = Some(node);
        } else if !Arc::ptr_eq(&node, &source) {
            return Err(Error::generic("Only top most non filter can be replaced"));
        }
    }
    let (target, zero_init) = t.open(e, &source, sync, node_name.as_deref())?;
    let granularity = mirror::granularity(granularity, target::cluster_size(&target))?;
    let scan = match sync {
        Sync::Full => Scan::Above(None),
        Sync::Top => Scan::Above(source.driver.backing_child()),
        Sync::None => Scan::Nothing,
    };
    let body = Mirror {
        graph: e.graph.clone(),
        dirty: mirror::Dirty::new(source.size(), granularity),
        source,
        target: target.clone(),
        scan,
        zero_init,
        granularity,
        buf_size: buf_size.max(granularity),
        on_source_error,
        on_target_error,
        switch: Switch::Target,
        replaces: replaces_child,
    };
    let hook = Some(body.hook());
    let body: jobs::Body = Box::new(move |job| body.run(job));
    start_with_target(e, JobType::Mirror, dev, speed, hook, body, target)
}

/// Starts a job that copies to `target`, which is closed again if the job
/// cannot start.
fn start_with_target(
    e: &Engine,
    kind: JobType,
    dev: Arc<crate::device::Device>,
    speed: u64,
    hook: Option<Arc<dyn crate::device::WriteHook>>,
    body: jobs::Body,
    target: Arc<Node>,
) -> Result<Value> {
    if let Err(err) = e.jobs.start(kind, dev, speed, hook, body) {
        e.graph.forget_chain(Some(target), None);
        return Err(err);
    }
    Ok(json!({}))
}

pub fn drive_backup(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let t = TargetArgs::parse(&mut a)?;
    let sync = a.req("sync", |a, k| a.enumeration(k, SYNC))?;
    let speed = check_speed(a.int("speed")?)?;
    let on_source_error = on_error(&mut a, "on-source-error")?;
    let on_target_error = on_error(&mut a, "on-target-error")?;
    a.finish()?;
    let (dev, source) = idle_device(e, &device)?;
    let (target, zero_init) = t.open(e, &source, sync, None)?;
    let cluster = target::cluster_size(&target)
        .unwrap_or(0)
        .max(backup::CLUSTER);
    let body = Backup {
        graph: e.graph.clone(),
        sync: match sync {
            Sync::Full => backup::Sync::Above(None),
            Sync::Top => backup::Sync::Above(source.driver.backing_child()),
            Sync::None => backup::Sync::Nothing,
        },
        cbw: backup::Cbw::new(source.clone(), target.clone(), cluster),
        source,
        target: target.clone(),
        zero_init,
        cluster,
        on_source_error,
        on_target_error,
    };
    let hook = Some(body.hook());
    let body: jobs::Body = Box::new(move |job| body.run(job));
    start_with_target(e, JobType::Backup, dev, speed, hook, body, target)
}

/// `block-commit`: of an intermediate image (a commit job), or of the
/// active layer (a mirror into the base that waits for `block-job-complete`).
pub fn block_commit(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let base = a.str("base")?;
    let top = a.str("top")?;
    let backing_file = a.str("backing-file")?;
    let speed = check_speed(a.int("speed")?)?;
    a.finish()?;
    let (dev, active) = writable_idle_device(e, &device)?;
    let top_node = match &top {
        Some(t) if *t != active.name && !target::same_file(t, &active.driver.filename()) => {
            find_in_chain(&active, t)
                .ok_or_else(|| Error::generic(format!("Top image file {t} not found")))?
        }
        _ => active.clone(),
    };
    let base_node = match &base {
        Some(b) => find_in_chain(&top_node, b)
            .ok_or_else(|| Error::generic(format!("Base '{b}' not found")))?,
        None => crate::qmp::device_cmds::chain(&top_node)
            .last()
            .unwrap_or_else(|| top_node.clone()),
    };
    if Arc::ptr_eq(&top_node, &base_node) {
        return Err(Error::generic("cannot commit an image into itself"));
    }
    let is_active = Arc::ptr_eq(&top_node, &active);
    if is_active && backing_file.is_some() {
        return Err(Error::generic(
            "'backing-file' specified, but 'top' is the active layer",
        ));
    }
    let overlay = crate::qmp::device_cmds::chain(&active).find(|n| {
        n.driver
            .backing_child()
            .is_some_and(|b| Arc::ptr_eq(&b, &top_node))
    });
    let base_node = e.graph.reopen(&base_node, false, &dev)?;
    let restore = |err: Error| {
        if let Err(r) = e.graph.reopen(&base_node, true, &dev) {
            log::warn!("commit on '{device}': base stays read-write: {r}");
        }
        err
    };
    // A smaller base grows to the top's size.
    if base_node.size() < top_node.size() {
        base_node.driver.resize(top_node.size()).map_err(|err| {
            restore(Error::generic(format!(
                "Top image {} is larger than base image {}, and resize of base image failed: {err}",
                top_node.driver.filename(),
                base_node.driver.filename()
            )))
        })?;
    }
    let (hook, body): (_, jobs::Body) = if is_active {
        let granularity = mirror::granularity(None, target::cluster_size(&base_node))?;
        let m = Mirror {
            graph: e.graph.clone(),
            dirty: mirror::Dirty::new(active.size(), granularity),
            source: active,
            target: base_node.clone(),
            scan: Scan::Above(Some(base_node.clone())),
            zero_init: false,
            granularity,
            buf_size: mirror::DEFAULT_BUF_SIZE,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            switch: Switch::Base,
            replaces: None,
        };
        (Some(m.hook()), Box::new(move |job| m.run(job)))
    } else {
        let Some(overlay) = overlay else {
            return Err(restore(Error::generic(format!(
                "Could not find the image above '{}'",
                top_node.name
            ))));
        };
        let c = Commit {
            graph: e.graph.clone(),
            backing_name: backing_file.unwrap_or_else(|| base_node.driver.filename()),
            top: top_node,
            base: base_node.clone(),
            overlay,
        };
        (None, Box::new(move |job| c.run(job)))
    };
    e.jobs
        .start(JobType::Commit, dev.clone(), speed, hook, body)
        .map_err(restore)?;
    Ok(json!({}))
}
