//! Consistency check and repair: rebuilds every cluster's reference count
//! from the metadata (header, L1/L2 tables of the image and its snapshots,
//! refcount structures, snapshot table) and compares it with the stored
//! one, counting the same things `qemu-img check` does.

use super::entry::{Mapping, COPIED, OFFSET_MASK};
use super::header::Header;
use super::meta::{read_at, Meta};
use super::snapshot;
use crate::error::Result;
use crate::graph::Node;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    None,
    /// Lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Also raise refcounts that are too low and fix COPIED flags.
    All,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub check_errors: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
}

impl CheckResult {
    /// `ImageCheck`, omitting zero counters as qemu-img does.
    pub fn to_json(&self, filename: &str) -> Value {
        self.to_json_as(filename, "qcow2")
    }

    /// `qemu-img check --output=json` of a `format` image.
    pub fn to_json_as(&self, filename: &str, format: &str) -> Value {
        let mut v = json!({
            "filename": filename, "format": format, "check-errors": self.check_errors,
            "image-end-offset": self.image_end_offset, "total-clusters": self.total_clusters,
        });
        for (k, n) in [
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", self.corruptions_fixed),
            ("leaks-fixed", self.leaks_fixed),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ] {
            if n > 0 {
                v[k] = json!(n);
            }
        }
        v
    }
}

struct Counter {
    cs: u64,
    refs: Vec<u64>,
    /// References to clusters past the end of the file.
    beyond: u64,
}

impl Counter {
    fn add(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        for c in off / self.cs..=(off + len - 1) / self.cs {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r += 1,
                None => self.beyond += 1,
            }
        }
    }
}

/// Walks one L1 table; `stats` only for the active one.
fn walk_l1(
    file: &Node,
    h: &Header,
    cnt: &mut Counter,
    l1_off: u64,
    l1_size: u32,
    mut stats: Option<&mut CheckResult>,
) -> Result<Vec<(u64, u64)>> {
    let cs = h.cluster_size();
    cnt.add(l1_off, l1_size as u64 * 8);
    let l1 = read_at(file, l1_off, l1_size as usize * 8)?;
    let mut l2_tables = Vec::new();
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let l1e = u64::from_be_bytes(e.try_into().unwrap_or_default());
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        cnt.add(l2, cs);
        l2_tables.push((i as u64, l1e));
        if l2 + cs > file.size() {
            continue;
        }
        let table = read_at(file, l2, cs as usize)?;
        // Contiguity is judged within one L2 table, as qemu-img does.
        let mut next_contiguous = 0u64;
        for e in table.chunks_exact(8) {
            let m = Mapping::decode(
                u64::from_be_bytes(e.try_into().unwrap_or_default()),
                h.cluster_bits,
                h.version >= 3,
            );
            match m {
                Mapping::Compressed { host, len } => {
                    cnt.add(host, len);
                    if let Some(s) = stats.as_deref_mut() {
                        s.allocated_clusters += 1;
                        s.compressed_clusters += 1;
                        // Compressed clusters count as fragmented by nature.
                        s.fragmented_clusters += 1;
                    }
                }
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    host: Some(host), ..
                } => {
                    cnt.add(host, cs);
                    if let Some(s) = stats.as_deref_mut() {
                        s.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            s.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                }
                _ => {}
            }
        }
    }
    Ok(l2_tables)
}

/// Counts an entry whose COPIED flag disagrees with its cluster's stored
/// refcount; returns the corrected entry when it is to be fixed.
fn fix_copied(
    meta: &mut Meta,
    res: &mut CheckResult,
    entry: u64,
    cluster: u64,
    fix: bool,
) -> Option<u64> {
    let one = meta.refcount(cluster).ok()? == 1;
    if one == (entry & COPIED != 0) {
        return None;
    }
    res.corruptions += 1;
    fix.then_some(if one { entry | COPIED } else { entry & !COPIED })
}

/// Checks (and optionally repairs) the image in `file`. Must run with no
/// writer on the image.
pub fn check(file: &Arc<Node>, h: &Header, repair: Repair) -> Result<CheckResult> {
    let cs = h.cluster_size();
    let nb = file.size().div_ceil(cs);
    let mut cnt = Counter {
        cs,
        refs: vec![0; nb as usize],
        beyond: 0,
    };
    let mut res = CheckResult {
        total_clusters: h.size.div_ceil(cs),
        ..Default::default()
    };
    cnt.add(0, cs);
    let active_l2 = walk_l1(
        file,
        h,
        &mut cnt,
        h.l1_table_offset,
        h.l1_size,
        Some(&mut res),
    )?;
    let snaps = snapshot::read_table(file, h)?;
    if h.nb_snapshots > 0 {
        let table_len: u64 = snaps.iter().map(|s| s.entry_len as u64).sum();
        cnt.add(h.snapshots_offset, table_len.max(1));
        for s in &snaps {
            walk_l1(file, h, &mut cnt, s.l1_offset, s.l1_size, None)?;
        }
    }
    cnt.add(
        h.refcount_table_offset,
        h.refcount_table_clusters as u64 * cs,
    );
    let rt = read_at(
        file,
        h.refcount_table_offset,
        (h.refcount_table_clusters as u64 * cs) as usize,
    )?;
    for e in rt.chunks_exact(8) {
        let rb = u64::from_be_bytes(e.try_into().unwrap_or_default()) & OFFSET_MASK;
        if rb != 0 {
            cnt.add(rb, cs);
        }
    }
    res.corruptions += cnt.beyond;
    let mut meta = Meta::load(file.clone(), h)?;
    for (c, &want) in cnt.refs.iter().enumerate() {
        let have = match meta.refcount(c as u64) {
            Ok(r) => r,
            Err(_) => {
                res.check_errors += 1;
                continue;
            }
        };
        if want > 0 || have > 0 {
            res.image_end_offset = (c as u64 + 1) * cs;
        }
        if have == want {
            continue;
        }
        let leak = have > want;
        if leak {
            res.leaks += 1
        } else {
            res.corruptions += 1
        }
        let fix = match repair {
            Repair::None => false,
            Repair::Leaks => leak,
            Repair::All => true,
        };
        if fix && meta.set_refcount(c as u64, want).is_ok() {
            if leak {
                res.leaks_fixed += 1
            } else {
                res.corruptions_fixed += 1
            }
        }
    }
    // The repaired refcounts go to the file before COPIED is checked on it.
    meta.write_dirty()?;
    // COPIED must be set exactly where the stored refcount is one, in the
    // active tables (checked after the refcount repair, as qemu-img does).
    let fix_flags = repair == Repair::All;
    for (i, l1e) in active_l2 {
        let l2 = l1e & OFFSET_MASK;
        let fixed = fix_copied(&mut meta, &mut res, l1e, l2 / cs, fix_flags);
        if let Some(e) = fixed {
            if super::meta::write_at(file, h.l1_table_offset + i * 8, &e.to_be_bytes()).is_ok() {
                res.corruptions_fixed += 1;
            }
        }
        if l2 + cs > file.size() {
            continue;
        }
        let table = read_at(file, l2, cs as usize)?;
        for (j, e) in table.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(e.try_into().unwrap_or_default());
            let host = match Mapping::decode(e, h.cluster_bits, h.version >= 3) {
                Mapping::Data { host, .. }
                | Mapping::Zero {
                    host: Some(host), ..
                } => host,
                _ => continue,
            };
            if let Some(fixed) = fix_copied(&mut meta, &mut res, e, host / cs, fix_flags) {
                if super::meta::write_at(file, l2 + j as u64 * 8, &fixed.to_be_bytes()).is_ok() {
                    res.corruptions_fixed += 1;
                }
            }
        }
    }
    if repair != Repair::None {
        res.corruptions -= res.corruptions_fixed.min(res.corruptions);
        res.leaks -= res.leaks_fixed.min(res.leaks);
    }
    Ok(res)
}
