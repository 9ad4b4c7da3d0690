//! The block job commands: starting each job, and `query-block-jobs` and
//! `block-job-*` to steer them.

use crate::args::Args;
use crate::error::{Error, Result};
use crate::jobs::{self, check_speed, find_in_chain, JobType};
use crate::options::OnError;
use crate::Engine;
use serde_json::{json, Value};

pub const ON_ERROR: &[(&str, OnError)] = &[
    ("report", OnError::Report),
    ("ignore", OnError::Ignore),
    ("enospc", OnError::Enospc),
    ("stop", OnError::Stop),
];

pub fn block_stream(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let base = a.str("base")?;
    let backing_file = a.str("backing-file")?;
    let speed = check_speed(a.int("speed")?)?;
    let on_error = a
        .enumeration("on-error", ON_ERROR)?
        .unwrap_or(OnError::Report);
    a.finish()?;
    let dev = e.graph.device(&device)?;
    e.jobs.check_idle(&device)?;
    let top = dev.root();
    if top.opts.read_only {
        return Err(Error::generic(format!("Device '{device}' is read only")));
    }
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
    };
    e.jobs.start(
        JobType::Stream,
        dev,
        speed,
        Box::new(move |job| body.run(job)),
    )?;
    Ok(json!({}))
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
