//! Subcommands that open an image directly through the engine, without a
//! daemon: `map`, `check`, `create`. They lock the image as qemu-img does:
//! refused while another process writes it (or, for writes, uses it);
//! `force_share` (`-U`) lets read-only inspection through.

use crate::args::parse_size;
use blkfs_engine::options::BlockdevOptions;
use blkfs_engine::{drivers::probe::probe, Engine};
use serde_json::{json, Value};
use std::sync::Arc;

/// Opens IMAGE read-only, with its backing chain; the format is probed
/// when not given.
pub fn open(
    image: &str,
    format: Option<&str>,
    force_share: bool,
) -> Result<Arc<blkfs_engine::graph::Node>, String> {
    let format = match format {
        Some(f) => f.to_string(),
        None => probe(image).map_err(|e| e.to_string())?.to_string(),
    };
    let spec = json!({"driver": format, "read-only": true, "force-share": force_share,
        "file": {"driver": "file", "filename": image}});
    let opts = BlockdevOptions::from_json(spec).map_err(|e| e.to_string())?;
    let engine = Engine::new();
    engine
        .graph
        .add(&opts)
        .map(|a| a.node)
        .map_err(|e| e.to_string())
}

/// The allocation map as `qemu-img map --output=json` prints it.
pub fn map(image: &str, format: Option<&str>, force_share: bool) -> Result<Vec<Value>, String> {
    let node = open(image, format, force_share)?;
    let entries = blkfs_engine::map::map(&node).map_err(|e| e.to_string())?;
    Ok(entries.iter().map(|e| e.to_json()).collect())
}

/// `qemu-img check` of an image: an `ImageCheck`.
pub fn check(
    image: &str,
    repair: blkfs_engine::drivers::qcow2::check::Repair,
    force_share: bool,
) -> Result<Value, String> {
    use blkfs_engine::drivers::qcow2::{check, read_header};
    let format = probe(image).map_err(|e| e.to_string())?;
    if format != "qcow2" {
        if repair != check::Repair::None {
            return Err(format!(
                "-r is for qcow2 images ({format} images are repaired by a read-write open where the format needs it: qed, vhdx)"
            ));
        }
        let node = open(image, Some(format), force_share)?;
        return match node.driver.check() {
            Some(r) => r
                .map(|r| r.to_json_as(image, format))
                .map_err(|e| e.to_string()),
            None => Err("This image format does not support checks".into()),
        };
    }
    let read_only = repair == check::Repair::None;
    let spec = json!({"driver": "file", "node-name": "image", "read-only": read_only,
        "force-share": force_share, "filename": image});
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

/// `qemu-img create` of any format blkfs creates. Without SIZE the
/// backing file's size is used.
pub fn create(
    image: &str,
    format: &str,
    size: Option<&str>,
    backing: Option<&str>,
    backing_format: Option<&str>,
    options: Option<&str>,
) -> Result<(), String> {
    use blkfs_engine::drivers::create::{parse_options, NewImage};
    let size = match (size, backing) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(b)) => {
            let dir = std::path::Path::new(image)
                .parent()
                .unwrap_or(std::path::Path::new(""));
            let path = if b.starts_with('/') {
                b.to_string()
            } else {
                dir.join(b).to_string_lossy().into_owned()
            };
            open(&path, backing_format, true)?.size()
        }
        (None, None) => return Err("a size is needed without a backing file".into()),
    };
    let img = NewImage {
        size,
        backing_file: backing.map(str::to_string),
        backing_format: backing_format.map(str::to_string),
        options: parse_options(options.unwrap_or("")).map_err(|e| e.to_string())?,
    };
    blkfs_engine::drivers::create::create(image, format, &img).map_err(|e| e.to_string())
}
