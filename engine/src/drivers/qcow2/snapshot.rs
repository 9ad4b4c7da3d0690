//! The internal snapshot table (read for `ImageInfo.snapshots`; snapshot
//! clusters are shared, so writes copy them and the L2 tables that hold them).

use super::header::Header;
use super::meta::{corrupt, read_at};
use crate::error::Result;
use crate::graph::Node;
use serde_json::{json, Value};

/// More than this is refused as corrupt (QEMU's own limit).
const MAX_SNAPSHOTS: u32 = 65536;
/// The table may not be larger than this (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_offset: u64,
    pub l1_size: u32,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Bytes this entry takes in the table, padding included.
    pub entry_len: usize,
}

impl Snapshot {
    /// `SnapshotInfo`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec, "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec / 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        })
    }
}

pub fn read_table(file: &Node, h: &Header) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(corrupt(format!(
            "{} snapshots exceed the limit",
            h.nb_snapshots
        )));
    }
    let avail = file
        .size()
        .saturating_sub(h.snapshots_offset)
        .min(MAX_TABLE_BYTES);
    let raw = read_at(file, h.snapshots_offset, avail as usize)?;
    parse(&raw, h.nb_snapshots, h.cluster_size(), file.size())
}

/// Entry point for the fuzz target: a table of up to 16 entries.
pub fn parse_for_fuzzing(raw: &[u8]) -> Result<Vec<Snapshot>> {
    let count = raw.first().map_or(0, |b| (b % 16) as u32);
    parse(raw, count, 4096, 1 << 30)
}

fn parse(raw: &[u8], count: u32, cs: u64, file_size: u64) -> Result<Vec<Snapshot>> {
    let field = |at: usize, n: usize| -> Result<u64> {
        raw.get(at..at + n)
            .map(|b| b.iter().fold(0u64, |acc, &x| (acc << 8) | x as u64))
            .ok_or_else(|| corrupt("snapshot table runs past its end"))
    };
    let text = |at: usize, n: usize| -> Result<String> {
        raw.get(at..at + n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| corrupt("snapshot table runs past its end"))
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    for _ in 0..count {
        let l1_offset = field(at, 8)?;
        let l1_size = field(at + 8, 4)? as u32;
        let id_len = field(at + 12, 2)? as usize;
        let name_len = field(at + 14, 2)? as usize;
        let extra = field(at + 36, 4)? as usize;
        if extra > 1024 {
            return Err(corrupt("snapshot extra data too large"));
        }
        let mut vm_state_size = field(at + 32, 4)?;
        if extra >= 8 {
            vm_state_size = field(at + 40, 8)?;
        }
        if !l1_offset.is_multiple_of(cs) || l1_offset.saturating_add(l1_size as u64 * 8) > file_size
        {
            return Err(corrupt(format!(
                "snapshot L1 table at {l1_offset:#x} is invalid"
            )));
        }
        let strings = at + 40 + extra;
        out.push(Snapshot {
            id: text(strings, id_len)?,
            name: text(strings + id_len, name_len)?,
            l1_offset,
            l1_size,
            date_sec: field(at + 16, 4)? as u32,
            date_nsec: field(at + 20, 4)? as u32,
            vm_clock_nsec: field(at + 24, 8)?,
            vm_state_size,
            entry_len: (strings + id_len + name_len).next_multiple_of(8) - at,
        });
        at = (strings + id_len + name_len).next_multiple_of(8);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_rejects_truncation() {
        let mut e = vec![0u8; 40];
        e[0..8].copy_from_slice(&0x20000u64.to_be_bytes()); // L1 offset
        e[8..12].copy_from_slice(&1u32.to_be_bytes()); //      L1 entries
        e[12..14].copy_from_slice(&1u16.to_be_bytes()); //     id length
        e[14..16].copy_from_slice(&4u16.to_be_bytes()); //     name length
        e[16..20].copy_from_slice(&1_700_000_000u32.to_be_bytes());
        e[24..32].copy_from_slice(&3_500_000_000u64.to_be_bytes()); // vm clock
        e.extend(b"1snap");
        e.resize(48, 0);
        let s = parse(&e, 1, 0x10000, 0x40000).unwrap();
        assert_eq!((s[0].id.as_str(), s[0].name.as_str()), ("1", "snap"));
        assert_eq!(s[0].to_json()["vm-clock-sec"], 3);
        assert_eq!(s[0].to_json()["vm-clock-nsec"], 500_000_000);
        assert!(parse(&e[..30], 1, 0x10000, 0x40000).is_err());
        assert!(parse(&e, 2, 0x10000, 0x40000).is_err());
        assert!(parse(&e, 1, 0x10000, 0x1000).is_err());
    }
}
