//! The target of a mirror or backup: created (`mode=absolute-paths`) or
//! opened as it is (`mode=existing`), and registered as a node the job
//! writes directly.

use crate::drivers::create::NewImage;
use crate::error::Result;
use crate::graph::{file_identity, Graph, Node};
use crate::options::BlockdevOptions;
use serde_json::json;
use std::sync::Arc;

/// Creates the image at `path` as `qemu-img create` would for a job's
/// target: `size` bytes, backed by `backing` (file name, format) if given.
pub fn create_image(
    path: &str,
    format: &str,
    size: u64,
    backing: Option<(String, String)>,
) -> Result<()> {
    let (backing_file, backing_format) = backing.unzip();
    let img = NewImage {
        size,
        backing_file,
        backing_format,
        options: Vec::new(),
    };
    crate::drivers::create::create(path, format, &img)
}

/// Opens the target image as a registered node with `source`'s cache and
/// aio options. A new image opens without its backing file (the job
/// attaches the source's node when it completes); an existing one
/// (`with_backing`) with the chain its header names. Zero writes punch
/// holes in it.
pub fn open(
    graph: &Graph,
    source: &Node,
    path: &str,
    format: &str,
    node_name: Option<&str>,
    with_backing: bool,
) -> Result<Arc<Node>> {
    let mut spec = json!({
        "driver": format,
        "file": source.io_opts().file_spec(path),
        "discard": "unmap",
    });
    source.opts.put_io_keys(&mut spec);
    if crate::drivers::has_backing_file(format) && !with_backing {
        spec["backing"] = json!("");
    }
    if let Some(n) = node_name {
        spec["node-name"] = json!(n);
    }
    let opts = BlockdevOptions::from_json(spec)?;
    Ok(graph.add(&opts)?.node)
}

/// The node that has `path` open (the same file, by device and inode), if any.
pub fn node_using(graph: &Graph, path: &str) -> Option<String> {
    let target = file_identity(path)?;
    graph
        .nodes()
        .into_iter()
        .filter(|n| n.driver.file_child().is_none())
        .find(|n| file_identity(&n.driver.filename()) == Some(target))
        .map(|n| n.name.clone())
}

/// The target's cluster size, where its format has one.
pub fn cluster_size(node: &Node) -> Option<u64> {
    let mut v = json!({});
    node.driver.image_info(&mut v);
    v["cluster-size"].as_u64()
}

/// Whether `a` and `b` name the same file.
pub fn same_file(a: &str, b: &str) -> bool {
    file_identity(a).is_some_and(|id| file_identity(b) == Some(id))
}
