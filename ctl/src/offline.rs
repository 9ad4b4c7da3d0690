//! Subcommands that open an image directly through the engine (read-only),
//! without a daemon: `map`.

use blkfs_engine::options::BlockdevOptions;
use blkfs_engine::{drivers::probe::probe, Engine};
use serde_json::{json, Value};
use std::sync::Arc;

/// Opens IMAGE read-only, with its backing chain; the format is probed
/// when not given.
pub fn open(image: &str, format: Option<&str>) -> Result<Arc<blkfs_engine::graph::Node>, String> {
    let format = match format {
        Some(f) => f.to_string(),
        None => probe(image).map_err(|e| e.to_string())?.to_string(),
    };
    let spec =
        json!({"driver": format, "read-only": true, "file": {"driver": "file", "filename": image}});
    let opts = BlockdevOptions::from_json(spec).map_err(|e| e.to_string())?;
    let engine = Engine::new();
    engine
        .graph
        .add(&opts)
        .map(|a| a.node)
        .map_err(|e| e.to_string())
}

/// The allocation map as `qemu-img map --output=json` prints it.
pub fn map(image: &str, format: Option<&str>) -> Result<Vec<Value>, String> {
    let node = open(image, format)?;
    let entries = blkfs_engine::map::map(&node).map_err(|e| e.to_string())?;
    Ok(entries.iter().map(|e| e.to_json()).collect())
}

/// `qemu-img check` of a qcow2 image: an `ImageCheck`.
pub fn check(
    image: &str,
    repair: blkfs_engine::drivers::qcow2::check::Repair,
) -> Result<Value, String> {
    use blkfs_engine::drivers::qcow2::{check, read_header};
    if probe(image).map_err(|e| e.to_string())? != "qcow2" {
        return Err("this image format does not support checks".into());
    }
    let read_only = repair == check::Repair::None;
    let spec =
        json!({"driver": "file", "node-name": "image", "read-only": read_only, "filename": image});
    let opts = BlockdevOptions::from_json(spec).map_err(|e| e.to_string())?;
    let engine = Engine::new();
    let file = engine.graph.add(&opts).map_err(|e| e.to_string())?.node;
    let header = read_header(&file).map_err(|e| e.to_string())?;
    let result = check::check(&file, &header, repair).map_err(|e| e.to_string())?;
    if !read_only {
        blkfs_engine::drivers::wait(|d| file.flush(d)).map_err(|e| e.to_string())?;
    }
    Ok(result.to_json(image))
}
