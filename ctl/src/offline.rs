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

/// `qemu-img check` of a qcow2 image: an `ImageCheck`.
pub fn check(
    image: &str,
    repair: blkfs_engine::drivers::qcow2::check::Repair,
    force_share: bool,
) -> Result<Value, String> {
    use blkfs_engine::drivers::qcow2::{check, read_header};
    if probe(image).map_err(|e| e.to_string())? != "qcow2" {
        return Err("this image format does not support checks".into());
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

/// `qemu-img create`: a raw (sparse) or qcow2 image. Without SIZE the
/// backing file's size is used.
pub fn create(
    image: &str,
    format: &str,
    size: Option<&str>,
    backing: Option<&str>,
    backing_format: Option<&str>,
    options: Option<&str>,
) -> Result<(), String> {
    use blkfs_engine::drivers::qcow2::create::{create, CreateOptions};
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
    match format {
        "raw" => {
            if backing.is_some() || options.is_some() {
                return Err("raw images take no backing file or options".into());
            }
            let f = blkfs_engine::drivers::file::create_locked(image).map_err(|e| e.to_string())?;
            f.set_len(size).map_err(|e| e.to_string())
        }
        "qcow2" => {
            let mut o = CreateOptions {
                size,
                backing_file: backing.map(str::to_string),
                backing_format: backing_format.map(str::to_string),
                ..Default::default()
            };
            for kv in options.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("option '{kv}' needs a value"))?;
                match k {
                    "cluster_size" => {
                        let cs = parse_size(v)?;
                        if !cs.is_power_of_two() {
                            return Err(format!("cluster_size {cs} is not a power of two"));
                        }
                        o.cluster_bits = cs.trailing_zeros();
                    }
                    "compat" => {
                        o.version = match v {
                            "0.10" | "v2" => 2,
                            "1.1" | "v3" => 3,
                            _ => return Err(format!("compat '{v}' is not 0.10 or 1.1")),
                        }
                    }
                    "refcount_bits" => {
                        let bits: u64 = v
                            .parse()
                            .map_err(|_| format!("invalid refcount_bits '{v}'"))?;
                        if !bits.is_power_of_two() || bits > 64 {
                            return Err(format!(
                                "refcount_bits {bits} is not a power of two up to 64"
                            ));
                        }
                        o.refcount_order = bits.trailing_zeros();
                    }
                    "lazy_refcounts" => o.lazy_refcounts = matches!(v, "on" | "true"),
                    _ => return Err(format!("unknown qcow2 option '{k}'")),
                }
            }
            create(image, &o).map_err(|e| e.to_string())
        }
        other => Err(format!("creating '{other}' images is not supported yet")),
    }
}
