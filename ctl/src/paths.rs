//! Image paths given to blkctl are the user's: relative ones are resolved
//! against blkctl's working directory before they reach the daemon, whose
//! working directory is its own.

use serde_json::Value;
use std::path::Path;

/// `path` made absolute against the current directory; URLs and absolute
/// paths are left alone.
pub fn absolute(path: &str) -> Result<String, String> {
    if path.is_empty() || path.contains("://") || Path::new(path).is_absolute() {
        return Ok(path.to_string());
    }
    let cwd = std::env::current_dir()
        .map_err(|e| format!("cannot resolve '{path}': no current directory: {e}"))?;
    Ok(cwd.join(path).to_string_lossy().into_owned())
}

/// Drivers whose `filename` is a local path.
const LOCAL: &[&str] = &["file", "host_device", "host_cdrom", "host_floppy"];

/// Resolves every local file name of a blockdev spec: the `filename` of
/// protocol nodes, vvfat's `dir` and blkdebug's `config`, at any depth
/// (children, backing).
pub fn absolutize_spec(v: &mut Value) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            let driver = m.get("driver").and_then(Value::as_str).map(str::to_string);
            let key = match driver.as_deref() {
                Some("vvfat") => Some("dir"),
                Some("blkdebug") => Some("config"),
                Some(d) if LOCAL.contains(&d) => Some("filename"),
                _ => None,
            };
            for (k, child) in m.iter_mut() {
                match child {
                    Value::String(s) if Some(k.as_str()) == key => *s = absolute(s)?,
                    _ => absolutize_spec(child)?,
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(absolutize_spec),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn local_names_are_resolved_and_nothing_else() {
        let cwd = std::env::current_dir().unwrap();
        let at = |p: &str| cwd.join(p).to_string_lossy().into_owned();
        let mut v = json!({"driver": "qcow2", "id": "d0", "backing": "base-node",
            "file": {"driver": "file", "filename": "a.qcow2"},
            "x": {"driver": "http", "filename": "http://h/a.img"},
            "children": [{"driver": "vvfat", "dir": "share"},
                         {"driver": "host_device", "filename": "/dev/loop0"}]});
        absolutize_spec(&mut v).unwrap();
        assert_eq!(v["file"]["filename"], json!(at("a.qcow2")));
        assert_eq!(v["children"][0]["dir"], json!(at("share")));
        assert_eq!(v["children"][1]["filename"], "/dev/loop0");
        assert_eq!(v["x"]["filename"], "http://h/a.img");
        assert_eq!(v["backing"], "base-node");
        assert_eq!(v["id"], "d0");
    }
}
