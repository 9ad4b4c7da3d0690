//! The allocation map of a node and its backing chain, as `qemu-img map
//! --output=json` prints it (`BlockDeviceMapEntry` plus `present` and
//! `compressed`).

use crate::error::Result;
use crate::graph::Node;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// The layer that answers (0 = the top); the bottom one when none does.
    pub depth: usize,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

impl MapEntry {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "start": self.start, "length": self.length, "depth": self.depth,
            "present": self.present, "zero": self.zero, "data": self.data,
            "compressed": self.compressed,
        });
        if let Some(o) = self.offset {
            v["offset"] = json!(o);
        }
        v
    }

    /// Whether `next` continues this entry.
    fn extends(&self, next: &MapEntry) -> bool {
        (
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed,
        ) == (
            next.depth,
            next.present,
            next.zero,
            next.data,
            next.compressed,
        ) && match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            (None, None) => true,
            _ => false,
        }
    }
}

/// Maps the whole guest range of `top`.
pub fn map(top: &Arc<Node>) -> Result<Vec<MapEntry>> {
    let size = top.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = entry_at(top, pos, size - pos)?;
        pos += e.length;
        match out.last_mut() {
            Some(last) if last.extends(&e) => last.length += e.length,
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// Walks down the chain until a layer allocates `pos` (the NBD server's
/// block status too).
pub fn entry_at(top: &Arc<Node>, pos: u64, mut len: u64) -> Result<MapEntry> {
    let mut node = top.clone();
    let mut depth = 0;
    loop {
        let st = node.block_status(pos, len)?;
        len = len.min(st.len).max(1);
        if st.allocated {
            return Ok(MapEntry {
                start: pos,
                length: len,
                depth,
                present: true,
                zero: st.zero,
                data: st.data,
                compressed: st.data && st.offset.is_none(),
                offset: st.offset,
            });
        }
        match node.driver.backing_child() {
            Some(b) if pos < b.size() => {
                len = len.min(b.size() - pos);
                node = b.clone();
                depth += 1;
            }
            // Past the end of a shorter backing file, or no backing: zeroes.
            _ => {
                return Ok(MapEntry {
                    start: pos,
                    length: len,
                    depth,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                })
            }
        }
    }
}
