//! Builders of the query replies (`BlockInfo`, `BlockDeviceInfo`,
//! `ImageInfo`, `BlockStats`) from live nodes and devices.

use crate::drivers::Encryption;
use crate::graph::{Device, Node};
use serde_json::{json, Value};

pub fn block_info(d: &Device) -> Value {
    // First: looking at the medium refreshes the size a change altered.
    let media = d.root().driver.media();
    let mut inserted = block_device_info(&d.root());
    add_throttle(&mut inserted, d);
    if d.passthrough() {
        // blkfs extension, shown only where it is on.
        inserted["x-passthrough"] = json!(true);
    }
    let mut v = json!({
        "device": d.id,
        "type": "unknown",
        "removable": false,
        "locked": false,
        "io-status": d.io_status().as_str(),
    });
    match media {
        None => v["inserted"] = inserted,
        // No guest locks the door: `locked` stays false.
        Some(m) => {
            v["removable"] = json!(true);
            v["tray_open"] = json!(m.tray_open);
            if m.inserted {
                v["inserted"] = inserted;
            }
        }
    }
    v
}

/// The device's limits in a `BlockDeviceInfo`; the optional ones only when set.
pub fn add_throttle(v: &mut Value, d: &Device) {
    for (k, limit) in d.throttle_config().to_qmp() {
        v[k] = limit;
    }
}

pub fn block_device_info(n: &Node) -> Value {
    let (encrypted, key_missing) = match n.driver.encryption() {
        Encryption::None => (false, false),
        Encryption::Encrypted { key_missing } => (true, key_missing),
    };
    let mut v = json!({
        "file": n.driver.filename(),
        "node-name": n.name,
        "ro": n.opts.read_only,
        "drv": n.driver.format_name(),
        "backing_file_depth": n.backing_depth(),
        "encrypted": encrypted,
        "encryption_key_missing": key_missing,
        "detect_zeroes": n.opts.detect_zeroes.as_str(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(n),
    });
    if let Some(b) = n.driver.backing_child() {
        v["backing_file"] = json!(backing_name(n, &b));
    }
    v
}

/// The backing file name as the image records it, else the opened file's.
fn backing_name(n: &Node, b: &Node) -> String {
    n.driver
        .backing_file_name()
        .unwrap_or_else(|| b.driver.filename())
}

pub fn image_info(n: &Node) -> Value {
    let mut v = json!({
        "filename": n.driver.filename(),
        "format": n.driver.format_name(),
        "virtual-size": n.size(),
    });
    if let Some(a) = n.driver.allocated_size() {
        v["actual-size"] = json!(a);
    }
    if let Some(b) = n.driver.backing_child() {
        v["backing-filename"] = json!(backing_name(n, &b));
        v["full-backing-filename"] = json!(b.driver.filename());
        v["backing-filename-format"] = json!(b.driver.format_name());
        v["backing-image"] = image_info(&b);
    }
    n.driver.image_info(&mut v);
    v
}

/// `BlockStats` of a device: its own counters, with the node tree below.
pub fn device_stats(d: &Device) -> Value {
    let mut v = node_stats(&d.root());
    v["device"] = json!(d.id);
    v["stats"] = d.stats.to_json();
    v
}

fn node_stats(n: &Node) -> Value {
    let mut v = json!({ "stats": n.stats.to_json() });
    if let Some(f) = n.driver.file_child() {
        v["parent"] = node_stats(f);
    }
    if let Some(b) = n.driver.backing_child() {
        v["backing"] = node_stats(&b);
    }
    v
}
