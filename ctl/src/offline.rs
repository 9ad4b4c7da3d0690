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
