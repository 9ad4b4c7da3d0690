//! Exports of nodes (`block-export-add`, `block-export-del`,
//! `query-block-exports`, in their modern QEMU form) and `blockdev-del`.

use crate::args::Args;
use crate::device::{ExportKind, Role};
use crate::error::{Error, Result};
use crate::Engine;
use serde_json::{json, Value};

const TYPES: &[(&str, &str)] = &[
    ("fuse", "fuse"),
    ("nbd", "nbd"),
    ("vhost-user-blk", "vhost-user-blk"),
    ("vduse-blk", "vduse-blk"),
];

/// `block-export-add`; `--export` takes the same keys.
pub fn block_export_add(e: &Engine, mut a: Args) -> Result<Value> {
    let kind = a.req("type", |a, k| a.enumeration(k, TYPES))?;
    let id = a.req("id", Args::str)?;
    let node = a.req("node-name", Args::str)?;
    let writable = a.bool("writable")?.unwrap_or(false);
    if a.bool("writethrough")? == Some(true) {
        return Err(Error::generic(
            "writethrough=on is not supported by blkfs: flush (fsync) the file instead",
        ));
    }
    if a.str("iothread")?.is_some() || a.bool("fixed-iothread")?.is_some() {
        return Err(Error::generic(
            "blkfs has no iothreads: drop 'iothread' and 'fixed-iothread'",
        ));
    }
    match kind {
        "fuse" => {
            if a.str("mountpoint")?.is_some() {
                return Err(Error::generic(format!(
                    "blkfs serves a FUSE export as the file '{id}' in its own mount (--mount): drop 'mountpoint'"
                )));
            }
            if a.bool("growable")? == Some(true) {
                return Err(Error::generic(
                    "growable=on is not supported: resize the node with block_resize",
                ));
            }
            if a.str("allow-other")?.is_some_and(|v| v == "on") {
                return Err(Error::generic(
                    "allow-other applies to the whole mount: start blkfs with --allow-other",
                ));
            }
            a.finish()?;
            e.graph.add_export(&id, &node, writable, ExportKind::Fuse)?;
            Ok(json!({}))
        }
        "nbd" => {
            // As QEMU: the NBD name defaults to the node's name.
            let name = a.str("name")?.unwrap_or_else(|| node.clone());
            if a.str("description")?.is_some() || a.list("bitmaps")?.is_some() {
                return Err(Error::generic(
                    "blkfs's NBD server has no export descriptions or bitmaps",
                ));
            }
            a.finish()?;
            if !e.nbd.is_running() {
                return Err(Error::generic("NBD server not running"));
            }
            let dev = e.graph.add_export(&id, &node, writable, ExportKind::Nbd)?;
            if let Err(err) = e.nbd.add(&name, dev.clone(), writable) {
                let _ = e.graph.delete_device(&dev, true);
                return Err(err);
            }
            Ok(json!({}))
        }
        other => Err(Error::generic(format!(
            "Export type '{other}' is not supported by blkfs (fuse is)"
        ))),
    }
}

/// `--export` on the command line: the keys of block-export-add, as JSON
/// or as key=value pairs (qemu-storage-daemon's syntax).
pub fn export_from_cli(e: &Engine, spec: &str) -> Result<()> {
    let args = if spec.trim_start().starts_with('{') {
        let v = serde_json::from_str(spec)
            .map_err(|err| Error::generic(format!("Invalid JSON in export options: {err}")))?;
        Args::new(v, "", false)?
    } else {
        Args::new(crate::args::parse_keyval(spec)?, "", true)?
    };
    block_export_add(e, args).map(|_| ())
}

/// The user's own nodes that nothing uses or exports: opened for nothing,
/// which the log should say at start-up.
pub fn unused_nodes(e: &Engine) -> Vec<String> {
    let (nodes, devices) = (e.graph.nodes(), e.graph.all_devices());
    nodes
        .iter()
        .filter(|n| e.graph.is_owned(&n.name))
        .filter(|n| crate::perm::users(&nodes, &devices, n).is_empty())
        .map(|n| n.name.clone())
        .collect()
}

/// Deletes the devices of NBD exports (block-export-add type=nbd) that no
/// NBD export serves any more (after nbd-server-remove or -stop).
pub fn sweep_nbd_exports(e: &Engine) {
    for dev in e.graph.exports() {
        if !dev.role.in_mount() && e.nbd.names_of(&dev).is_empty() {
            if let Err(err) = e.graph.delete_device(&dev, true) {
                log::warn!("export '{}': {err}", dev.id);
            }
            e.events.emit("BLOCK_EXPORT_DELETED", json!({"id": dev.id}));
        }
    }
}

/// `block-export-del`: `mode=safe` (the default) refuses while the file is
/// open; `hard` deletes it anyway and its open descriptors get ENODEV.
pub fn block_export_del(e: &Engine, mut a: Args) -> Result<Value> {
    let id = a.req("id", Args::str)?;
    let hard = a.enumeration("mode", &[("safe", false), ("hard", true)])?;
    a.finish()?;
    let dev = e.graph.export(&id)?;
    let hard = hard.unwrap_or(false);
    if let Role::Export {
        kind: ExportKind::Nbd,
        ..
    } = dev.role
    {
        for name in e.nbd.names_of(&dev) {
            e.nbd.remove(&name, hard)?;
        }
    }
    e.graph.delete_device(&dev, hard).map_err(|err| {
        Error::generic(format!("{}; use mode='hard' to delete it anyway", err.msg))
    })?;
    e.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
    Ok(json!({}))
}

pub fn query_block_exports(e: &Engine, a: Args) -> Result<Value> {
    a.finish()?;
    Ok(Value::Array(
        e.graph
            .exports()
            .iter()
            .map(|d| {
                let kind = if d.role.in_mount() { "fuse" } else { "nbd" };
                json!({"type": kind, "id": d.id, "node-name": d.root().name,
                       "shutting-down": false})
            })
            .collect(),
    ))
}

/// `blockdev-del`: `node-name` deletes a node the user added by itself
/// (nothing may use it); `id` deletes a device with the nodes only it
/// uses (refused while its file is open or a job runs on it).
pub fn blockdev_del(e: &Engine, mut a: Args) -> Result<Value> {
    let node = a.str("node-name")?;
    let id = a.str("id")?;
    a.finish()?;
    match (id, node) {
        (Some(id), None) => {
            let dev = e.graph.device(&id)?;
            if e.jobs.find(&id).is_ok() {
                return Err(Error::generic(format!(
                    "Device '{id}' is in use by a block job"
                )));
            }
            e.graph.delete_device(&dev, false)?;
        }
        (None, Some(node)) => e.graph.delete_node(&node)?,
        _ => {
            return Err(Error::generic(
                "blockdev-del takes one of 'node-name' (a node) and 'id' (a device)",
            ))
        }
    }
    Ok(json!({}))
}
