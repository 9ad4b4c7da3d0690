//! The command table: name -> handler. Handlers read their arguments
//! strictly (unknown, missing and mistyped members are errors).

use super::{device_cmds, export_cmds, info, job_cmds, nbd_cmds, policy_cmds};
use crate::args::Args;
use crate::error::{Error, ErrorKind, Result};
use crate::options::BlockdevOptions;
use crate::Engine;
use serde_json::{json, Map, Value};

type Handler = fn(&Engine, Args) -> Result<Value>;

const COMMANDS: &[(&str, Handler)] = &[
    ("query-version", query_version),
    ("query-commands", query_commands),
    ("quit", quit),
    ("query-status", query_status),
    ("blockdev-add", blockdev_add),
    ("blockdev-del", export_cmds::blockdev_del),
    ("block-export-add", export_cmds::block_export_add),
    ("block-export-del", export_cmds::block_export_del),
    ("query-block-exports", export_cmds::query_block_exports),
    ("query-block", query_block),
    ("query-named-block-nodes", query_named_block_nodes),
    ("query-blockstats", query_blockstats),
    ("block_resize", device_cmds::block_resize),
    ("change-backing-file", device_cmds::change_backing_file),
    ("block_passwd", device_cmds::block_passwd),
    (
        "blockdev-snapshot-sync",
        device_cmds::blockdev_snapshot_sync,
    ),
    ("block_set_io_throttle", policy_cmds::block_set_io_throttle),
    ("cont", policy_cmds::cont),
    ("block-stream", job_cmds::block_stream),
    ("drive-mirror", job_cmds::drive_mirror),
    ("drive-backup", job_cmds::drive_backup),
    ("block-commit", job_cmds::block_commit),
    ("query-block-jobs", job_cmds::query_block_jobs),
    ("block-job-set-speed", job_cmds::block_job_set_speed),
    ("block-job-cancel", job_cmds::block_job_cancel),
    ("block-job-pause", job_cmds::block_job_pause),
    ("block-job-resume", job_cmds::block_job_resume),
    ("block-job-complete", job_cmds::block_job_complete),
    ("nbd-server-start", nbd_cmds::nbd_server_start),
    ("nbd-server-add", nbd_cmds::nbd_server_add),
    ("nbd-server-remove", nbd_cmds::nbd_server_remove),
    ("nbd-server-stop", nbd_cmds::nbd_server_stop),
];

pub fn execute(engine: &Engine, name: &str, args: Value) -> Result<Value> {
    if let Some((_, h)) = COMMANDS.iter().find(|(n, _)| *n == name) {
        return h(engine, Args::new(args, "", false)?);
    }
    Err(Error::new(
        ErrorKind::CommandNotFound,
        format!("The command {name} has not been found"),
    ))
}

/// The QEMU version whose block schema this daemon speaks.
pub fn version() -> Value {
    json!({
        "qemu": {"major": 2, "minor": 1, "micro": 0},
        "package": concat!("blkfs ", env!("CARGO_PKG_VERSION")),
    })
}

fn no_args(a: Args) -> Result<()> {
    a.finish()
}

fn query_version(_: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    Ok(version())
}

fn query_commands(_: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    let names = std::iter::once("qmp_capabilities").chain(COMMANDS.iter().map(|(n, _)| *n));
    Ok(Value::Array(names.map(|n| json!({ "name": n })).collect()))
}

/// The transport shuts down once the reply is out (see `session::Outcome::quit`).
fn quit(_: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    Ok(json!({}))
}

/// As QEMU's (management tools poll it): `io-error` while the error
/// policy holds a device stopped (until `cont`), else `running`.
fn query_status(e: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    let stopped = e.graph.all_devices().iter().any(|d| d.is_stopped());
    Ok(json!({
        "running": !stopped,
        "singlestep": false,
        "status": if stopped { "io-error" } else { "running" },
    }))
}

/// Accepts the seed form `{"options": {...}}` and, as later QEMU does, the
/// options flat as the arguments.
fn blockdev_add(e: &Engine, mut a: Args) -> Result<Value> {
    let options = match a.take("options") {
        Some(v) => {
            a.finish()?;
            BlockdevOptions::parse(Args::new(v, "options", false)?)?
        }
        None => BlockdevOptions::parse(a)?,
    };
    e.graph.add_by_user(&options)?;
    Ok(json!({}))
}

fn query_block(e: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    Ok(Value::Array(
        e.graph
            .devices()
            .iter()
            .map(|d| info::block_info(d))
            .collect(),
    ))
}

fn query_named_block_nodes(e: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    let devices = e.graph.devices();
    Ok(Value::Array(
        e.graph
            .nodes()
            .iter()
            .map(|n| {
                let mut v = info::block_device_info(n);
                // A device's limits show on its root node too, as in QEMU.
                if let Some(d) = devices
                    .iter()
                    .find(|d| std::sync::Arc::ptr_eq(&d.root(), n))
                {
                    info::add_throttle(&mut v, d);
                }
                v
            })
            .collect(),
    ))
}

fn query_blockstats(e: &Engine, a: Args) -> Result<Value> {
    no_args(a)?;
    Ok(Value::Array(
        e.graph
            .devices()
            .iter()
            .map(|d| info::device_stats(d))
            .collect(),
    ))
}

/// An empty argument object, for callers without arguments.
pub fn empty() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_commands_and_bad_arguments() {
        let e = Engine::new();
        let err = execute(&e, "frobnicate", empty()).unwrap_err();
        assert_eq!(err.class(), "CommandNotFound");
        let err = execute(&e, "block-commit", empty()).unwrap_err();
        assert_eq!(err.class(), "GenericError");
        assert_eq!(err.msg, "Parameter 'device' is missing");
        let err = execute(&e, "query-block", json!({"x": 1})).unwrap_err();
        assert_eq!(err.msg, "Parameter 'x' is unexpected");
        let cmds = execute(&e, "query-commands", empty()).unwrap();
        assert!(cmds
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "blockdev-add"));
    }

    #[test]
    fn blockdev_add_both_forms_and_duplicates() {
        let dir = std::env::temp_dir().join(format!("blkfs-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.img");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let f = img.to_str().unwrap();
        let e = Engine::new();
        let seed = json!({"options": {"driver": "raw", "id": "d0", "file": {"driver": "file", "filename": f}}});
        execute(&e, "blockdev-add", seed.clone()).unwrap();
        let err = execute(&e, "blockdev-add", seed).unwrap_err();
        assert_eq!(err.msg, "Duplicate ID 'd0' for drive");
        // A second writer of a.img would be refused by its image locks.
        let img_b = dir.join("b.img");
        std::fs::write(&img_b, vec![0u8; 1 << 20]).unwrap();
        let fb = img_b.to_str().unwrap();
        let flat = json!({"driver": "raw", "id": "d1", "node-name": "n1", "file": {"driver": "file", "filename": fb}});
        execute(&e, "blockdev-add", flat).unwrap();
        let blocks = execute(&e, "query-block", empty()).unwrap();
        assert_eq!(blocks[1]["device"], "d1");
        assert_eq!(blocks[1]["inserted"]["node-name"], "n1");
        assert_eq!(blocks[1]["inserted"]["image"]["virtual-size"], 1 << 20);
        let err = execute(
            &e,
            "blockdev-add",
            json!({"driver": "raw", "id": "d2", "node-name": "n1", "file": "n1"}),
        )
        .unwrap_err();
        assert_eq!(err.msg, "Duplicate node name 'n1'");
        let err = execute(
            &e,
            "blockdev-add",
            json!({"driver": "raw", "id": "d2", "file": "nope"}),
        )
        .unwrap_err();
        assert_eq!(err.msg, "Cannot find device=nope nor node_name=nope");
        // A failed add registers nothing.
        assert_eq!(e.graph.nodes().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
