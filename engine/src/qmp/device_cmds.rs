//! Device commands that change an image: `block_resize`,
//! `change-backing-file` and `block_passwd`.

use crate::args::Args;
use crate::drivers::Encryption;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
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
    if size < 0 {
        return Err(Error::generic("Parameter 'size' expects a >0 size"));
    }
    if node.opts.read_only {
        return Err(Error::generic(format!("Device '{name}' is read only")));
    }
    e.graph.resize(&node, size as u64)?;
    Ok(json!({}))
}

pub fn change_backing_file(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let image = a.req("image-node-name", Args::str)?;
    let backing_file = a.req("backing-file", Args::str)?;
    a.finish()?;
    let root = e.graph.device(&device)?.root();
    let node = e
        .graph
        .node(&image)
        .ok_or_else(|| Error::generic("image file not found"))?;
    let Some(backing) = node.driver.backing_child() else {
        return Err(Error::generic(
            "not allowing backing file change on an image without a backing file",
        ));
    };
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
    std::iter::successors(Some(top.clone()), |n| n.driver.backing_child().cloned())
}
