//! Device commands that change an image or the graph: `block_resize`,
//! `change-backing-file`, `block_passwd` and `blockdev-snapshot-sync`.

use crate::args::Args;
use crate::drivers::qcow2::create::{create, CreateOptions};
use crate::drivers::Encryption;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use crate::options::{BlockdevOptions, DriverName};
use crate::Engine;
use serde_json::{json, Value};
use std::sync::Arc;

/// The node a command names by `device` or `node-name` (exactly one of them).
pub fn device_or_node(e: &Engine, a: &mut Args) -> Result<(String, Arc<Node>)> {
    match (a.str("device")?, a.str("node-name")?) {
        (Some(d), None) => Ok((d.clone(), e.graph.device(&d)?.root())),
        (None, Some(n)) => match e.graph.node(&n) {
            Some(node) => Ok((n, node)),
            None => Err(Error::new(
                ErrorKind::DeviceNotFound,
                format!("Cannot find device= nor node_name={n}"),
            )),
        },
        (Some(_), Some(_)) => Err(Error::generic(
            "Only one of 'device' and 'node-name' may be set",
        )),
        (None, None) => Err(Error::generic("Either 'device' or 'node-name' must be set")),
    }
}

pub fn block_resize(e: &Engine, mut a: Args) -> Result<Value> {
    let (name, node) = device_or_node(e, &mut a)?;
    let size = a.req("size", Args::int)?;
    a.finish()?;
    e.jobs.check_node_idle(&node)?;
    if size < 0 {
        return Err(Error::generic("Parameter 'size' expects a >0 size"));
    }
    if node.opts.read_only {
        return Err(Error::generic(format!("Device '{name}' is read only")));
    }
    crate::perm::check_resize(&e.graph.nodes(), &e.graph.all_devices(), &node)?;
    e.graph.resize(&node, size as u64)?;
    Ok(json!({}))
}

pub fn change_backing_file(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let image = a.req("image-node-name", Args::str)?;
    let backing_file = a.req("backing-file", Args::str)?;
    a.finish()?;
    let root = e.graph.device(&device)?.root();
    if backing_file.is_empty() {
        return Err(Error::generic("the backing file name is empty"));
    }
    let node = e
        .graph
        .node(&image)
        .ok_or_else(|| Error::generic("image file not found"))?;
    let Some(backing) = node.driver.backing_child() else {
        return Err(Error::generic(
            "not allowing backing file change on an image without a backing file",
        ));
    };
    e.jobs.check_node_idle(&node)?;
    if !chain(&root).any(|n| Arc::ptr_eq(&n, &node)) {
        return Err(Error::generic(format!(
            "'{device}' and image file are not in the same chain"
        )));
    }
    node.driver
        .change_backing_file(&backing_file, Some(backing.driver.format_name()))
        .map_err(|err| {
            Error::new(
                err.kind,
                format!("Could not change backing file to '{backing_file}': {err}"),
            )
        })?;
    Ok(json!({}))
}

/// Sets the password on every encrypted layer of the chain, as QEMU does.
pub fn block_passwd(e: &Engine, mut a: Args) -> Result<Value> {
    let (name, node) = device_or_node(e, &mut a)?;
    let password = a.req("password", Args::str)?;
    a.finish()?;
    let mut any = false;
    for n in chain(&node) {
        if n.driver.encryption() != Encryption::None {
            n.driver.set_password(&password)?;
            any = true;
        }
    }
    if !any {
        return Err(Error::generic(format!("Device '{name}' is not encrypted")));
    }
    Ok(json!({}))
}

/// A node and its backing nodes, top first.
pub fn chain(top: &Arc<Node>) -> impl Iterator<Item = Arc<Node>> {
    std::iter::successors(Some(top.clone()), |n| n.driver.backing_child())
}

/// `blockdev-snapshot-sync`: a new overlay on top of a device, whose old
/// top becomes its backing node; the device serves I/O throughout.
pub fn blockdev_snapshot_sync(e: &Engine, mut a: Args) -> Result<Value> {
    let (name, top) = device_or_node(e, &mut a)?;
    let file = a.req("snapshot-file", Args::str)?;
    let node_name = a.str("snapshot-node-name")?;
    let format = a.str("format")?.unwrap_or_else(|| "qcow2".into());
    let mode = a.enumeration("mode", &[("existing", false), ("absolute-paths", true)])?;
    a.finish()?;
    e.jobs.check_node_idle(&top)?;
    let device = e
        .graph
        .devices()
        .into_iter()
        .find(|d| Arc::ptr_eq(&d.root(), &top))
        .ok_or_else(|| {
            Error::generic(format!(
                "Snapshots are taken of a device's top node; '{name}' is not one"
            ))
        })?;
    if top.opts.read_only {
        return Err(Error::generic(format!("Device '{name}' is read only")));
    }
    device.refuse_passthrough("a snapshot overlay")?;
    if let Some(n) = &node_name {
        if e.graph.node(n).is_some() || e.graph.device(n).is_ok() {
            return Err(Error::generic(format!("Duplicate node name '{n}'")));
        }
    }
    let driver = DriverName::ALL
        .iter()
        .find(|(n, _)| *n == format)
        .map(|(_, d)| *d)
        .ok_or_else(|| Error::generic(format!("Invalid block format '{format}'")))?;
    // Checked here, before any file is touched: opening the overlay would
    // only say "Parameter 'backing' is unexpected".
    if !matches!(
        driver,
        DriverName::Cow | DriverName::Qcow | DriverName::Qcow2 | DriverName::Qed | DriverName::Vmdk
    ) {
        return Err(Error::generic(format!(
            "Format '{format}' cannot have a backing file, so it cannot be a snapshot overlay"
        )));
    }
    // Creating (or opening a second time for writing) an image a node has
    // open would destroy it: QEMU refuses through its image locks.
    if let Some(n) = crate::jobs::target::node_using(&e.graph, &file) {
        return Err(Error::generic(format!(
            "Could not use '{file}' as the snapshot file: it is in use by node '{n}'"
        )));
    }
    let create_file = mode.unwrap_or(true);
    if create_file {
        if driver != DriverName::Qcow2 {
            return Err(Error::generic(format!(
                "Creating '{format}' snapshot images is not supported by blkfs (qcow2 is)"
            )));
        }
        let backing = std::fs::canonicalize(top.driver.filename())
            .map_err(|err| Error::from_io(&err, top.driver.filename()))?;
        let o = CreateOptions {
            size: top.size(),
            backing_file: Some(backing.to_string_lossy().into_owned()),
            backing_format: Some(top.driver.format_name().into()),
            ..CreateOptions::default()
        };
        create(&file, &o)?;
    }
    // The overlay serves the device as its old top did: same cache, aio,
    // discard and detect-zeroes options.
    let o = &top.opts;
    let mut spec = json!({
        "driver": format,
        "file": top.io_opts().file_spec(&file),
        "backing": top.name,
        "discard": o.discard.as_str(),
        "detect-zeroes": o.detect_zeroes.as_str(),
    });
    o.put_io_keys(&mut spec);
    if let Some(n) = node_name {
        spec["node-name"] = json!(n);
    }
    let added = BlockdevOptions::from_json(spec).and_then(|o| e.graph.add_overlay(&o, &device));
    let added = match added {
        Ok(a) => a,
        Err(err) => {
            // A refused snapshot leaves nothing behind: not the image it created.
            if create_file {
                let _ = std::fs::remove_file(&file);
            }
            return Err(err);
        }
    };
    device.quiesced(|| {
        device.replace_root(added.node.clone());
        Ok(())
    })?;
    // The old top is a backing file now: read-only, its write lock given
    // back, as QEMU reopens it (other tools may read it again).
    if let Err(err) = e.graph.reopen(&top, true, &device) {
        log::warn!("snapshot of '{name}': the old top stays read-write: {err}");
    }
    Ok(json!({}))
}
