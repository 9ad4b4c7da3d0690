//! Metadata overlap checks (QEMU's `overlap-check`).
//!
//! Before qcow2 issues a write to its file (guest data or metadata), the
//! host range is checked against the image's metadata: the header, the
//! active L1 table, active L2 tables, the refcount table, refcount blocks,
//! the snapshot table, the snapshots' L1 tables (inactive L1) and the L2
//! tables they point to (inactive L2). A write that would land on metadata
//! of a checked kind is refused: the image is marked corrupt and the
//! request fails with EIO, as QEMU's `qcow2_pre_write_overlap_check` does.
//!
//! QEMU scans its tables on every check; here the metadata clusters are
//! kept in one map (host cluster -> how many tables of each kind live
//! there), updated by `meta` whenever metadata moves (an L2 table is
//! hooked in or dropped, a refcount block is added, the L1 or refcount
//! table moves). A check is one map lookup per cluster written, so the 4k
//! fast path pays one hash lookup. Snapshots are read-only in blkfs, so
//! the inactive tables are recorded once at open (the inactive L2 tables
//! only when that kind is checked: it reads every snapshot's L1 table).

use super::entry::OFFSET_MASK;
use super::header::Header;
use super::meta::read_at;
use super::snapshot::Snapshot;
use crate::drivers::bytes::be64;
use crate::error::{Corruption, Error, ErrorKind, Result};
use crate::graph::Node;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The kinds of metadata, numbered as QEMU's `QCOW2_OL_*_BITNR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MainHeader = 0,
    ActiveL1 = 1,
    ActiveL2 = 2,
    RefcountTable = 3,
    RefcountBlock = 4,
    SnapshotTable = 5,
    InactiveL1 = 6,
    InactiveL2 = 7,
}

const KINDS: [Kind; 8] = [
    Kind::MainHeader,
    Kind::ActiveL1,
    Kind::ActiveL2,
    Kind::RefcountTable,
    Kind::RefcountBlock,
    Kind::SnapshotTable,
    Kind::InactiveL1,
    Kind::InactiveL2,
];

impl Kind {
    pub fn bit(self) -> u8 {
        1 << self as u8
    }

    /// QEMU's name of the kind, as its messages print it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::MainHeader => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
            Kind::InactiveL2 => "inactive L2 table",
        }
    }
}

/// What a checked range is for: it names the refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    /// Clusters just allocated (about to be written).
    Allocation,
    /// A cluster whose reference is dropped (a guest mapping into metadata).
    Free,
}

/// Nothing is ignored: the range must not overlap metadata of any checked kind.
pub const NEW: u8 = 0;

/// Host cluster indexes are spread well enough by one multiplication; the
/// default SipHash would cost more than the rest of the check.
#[derive(Default)]
pub struct ClusterHasher(u64);

impl Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// How many tables of each kind occupy one host cluster (more than one
/// only in a corrupt image), and the kinds present as a bit mask.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Owners {
    mask: u8,
    counts: [u32; 8],
}

#[derive(Debug)]
pub struct Overlap {
    /// The kinds checked (bit = `Kind::bit`); the others are not even tracked.
    enabled: u8,
    cluster_bits: u32,
    clusters: HashMap<u64, Owners, BuildHasherDefault<ClusterHasher>>,
}

impl Overlap {
    pub fn new(enabled: u8, cluster_bits: u32) -> Overlap {
        Overlap {
            enabled,
            cluster_bits,
            clusters: HashMap::default(),
        }
    }

    pub fn enabled(&self) -> u8 {
        self.enabled
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Host clusters of `offset..offset+len`.
    fn clusters_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let last = offset.saturating_add(len - 1);
        (offset >> self.cluster_bits)..(last >> self.cluster_bits) + 1
    }

    /// Records a table of `kind` at `offset..offset+len`.
    pub fn add(&mut self, kind: Kind, offset: u64, len: u64) {
        if self.enabled & kind.bit() == 0 || kind == Kind::MainHeader {
            return;
        }
        for c in self.clusters_of(offset, len) {
            let o = self.clusters.entry(c).or_default();
            o.counts[kind as usize] += 1;
            o.mask |= kind.bit();
        }
    }

    /// Forgets a table recorded with `add`.
    pub fn remove(&mut self, kind: Kind, offset: u64, len: u64) {
        if self.enabled & kind.bit() == 0 {
            return;
        }
        for c in self.clusters_of(offset, len) {
            let Some(o) = self.clusters.get_mut(&c) else {
                continue;
            };
            let n = &mut o.counts[kind as usize];
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.mask &= !kind.bit();
                if o.mask == 0 {
                    self.clusters.remove(&c);
                }
            }
        }
    }

    /// Records the one-cluster tables that `entries` (L1 or refcount table
    /// entries) point to.
    pub fn add_entries(&mut self, kind: Kind, entries: &[u64]) {
        if self.enabled & kind.bit() == 0 {
            return;
        }
        let cs = self.cs();
        for &e in entries {
            let off = e & OFFSET_MASK;
            if off != 0 {
                self.add(kind, off, cs);
            }
        }
    }

    /// A table entry changed from `old` to `new`: the one-cluster table of
    /// `kind` it pointed to is no longer referenced there, the new one is.
    pub fn replace_entry(&mut self, kind: Kind, old: u64, new: u64) {
        let cs = self.cs();
        if old & OFFSET_MASK != 0 {
            self.remove(kind, old & OFFSET_MASK, cs);
        }
        if new & OFFSET_MASK != 0 {
            self.add(kind, new & OFFSET_MASK, cs);
        }
    }

    /// The snapshot table and the tables of every snapshot (the inactive L2
    /// tables read from the snapshots' L1 tables, when that kind is checked).
    pub fn add_snapshots(&mut self, file: &Node, h: &Header, snaps: &[Snapshot]) -> Result<()> {
        let table_len: u64 = snaps.iter().map(|s| s.entry_len as u64).sum();
        self.add(Kind::SnapshotTable, h.snapshots_offset, table_len);
        for s in snaps {
            let l1_len = s.l1_size as u64 * 8;
            self.add(Kind::InactiveL1, s.l1_offset, l1_len);
            if self.enabled & Kind::InactiveL2.bit() != 0 && l1_len > 0 {
                let raw = read_at(file, s.l1_offset, l1_len as usize)?;
                let l1: Vec<u64> = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
                self.add_entries(Kind::InactiveL2, &l1);
            }
        }
        Ok(())
    }

    /// The first kind (in QEMU's order) of checked metadata, other than
    /// the kinds in `ignore`, that `offset..offset+len` overlaps. Ranges are
    /// widened to whole clusters, as QEMU does.
    pub fn find(&self, ignore: u8, offset: u64, len: u64) -> Option<Kind> {
        let chk = self.enabled & !ignore;
        if chk == 0 || len == 0 {
            return None;
        }
        if chk & Kind::MainHeader.bit() != 0 && offset < self.cs() {
            return Some(Kind::MainHeader);
        }
        let range = self.clusters_of(offset, len);
        let mut hit = 0u8;
        if range.end - range.start > self.clusters.len() as u64 {
            // A big write over few tables: look at the tables instead.
            for (c, o) in &self.clusters {
                if range.contains(c) {
                    hit |= o.mask;
                }
            }
        } else {
            for c in range {
                if let Some(o) = self.clusters.get(&c) {
                    hit |= o.mask;
                }
            }
        }
        let hit = hit & chk;
        (hit != 0).then(|| KINDS[hit.trailing_zeros() as usize])
    }

    /// `Ok` when a write of `offset..offset+len` overlaps no checked
    /// metadata other than `ignore`; otherwise the corruption error QEMU
    /// signals (the driver marks the image corrupt when it sees it).
    pub fn check(&self, ignore: u8, offset: u64, len: u64) -> Result<()> {
        match self.find(ignore, offset, len) {
            None => Ok(()),
            Some(k) => Err(overlap_error(Op::Write, k, offset, len)),
        }
    }

    /// Like `check`, for something other than a plain write: an allocation
    /// about to be written, or a cluster about to be freed.
    pub fn check_op(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        match self.find(NEW, offset, len) {
            None => Ok(()),
            Some(k) => Err(overlap_error(op, k, offset, len)),
        }
    }
}

fn overlap_error(op: Op, k: Kind, offset: u64, len: u64) -> Error {
    let what = match op {
        Op::Write => "write on",
        Op::Allocation => "allocation on",
        Op::Free => "free of",
    };
    let mut e = Error::new(
        ErrorKind::Corrupt,
        format!(
            "Preventing invalid {what} metadata (overlaps with {})",
            k.name()
        ),
    );
    e.corruption = Some(Corruption {
        offset,
        size: len,
        fatal: true,
    });
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u8 = 0xff;
    const CS: u64 = 0x10000;
    const COPIED: u64 = 1 << 63;

    fn ov(enabled: u8) -> Overlap {
        Overlap::new(enabled, 16)
    }

    #[test]
    fn header_is_the_first_cluster() {
        let o = ov(ALL);
        assert_eq!(o.find(NEW, 0, 1), Some(Kind::MainHeader));
        assert_eq!(o.find(NEW, CS - 1, 1), Some(Kind::MainHeader));
        assert_eq!(o.find(NEW, CS, 512), None);
        assert_eq!(o.find(Kind::MainHeader.bit(), 0, 512), None);
        assert_eq!(o.find(NEW, 0, 0), None);
    }

    #[test]
    fn ranges_are_widened_to_clusters() {
        let mut o = ov(ALL);
        o.add(Kind::ActiveL1, 3 * CS, 16);
        assert_eq!(o.find(NEW, 3 * CS + 0x8000, 512), Some(Kind::ActiveL1));
        assert_eq!(o.find(NEW, 3 * CS - 1, 2), Some(Kind::ActiveL1));
        assert_eq!(o.find(NEW, 2 * CS, CS), None);
        assert_eq!(o.find(NEW, 4 * CS, CS), None);
        // A write covering many clusters finds the table either way.
        assert_eq!(o.find(NEW, CS, 100 * CS), Some(Kind::ActiveL1));
        assert_eq!(o.find(NEW, 4 * CS, 100 * CS), None);
        assert_eq!(o.find(NEW, u64::MAX - 10, 10), None);
    }

    #[test]
    fn ignored_and_disabled_kinds() {
        let mut o = ov(ALL & !Kind::InactiveL2.bit());
        o.add(Kind::ActiveL2, 5 * CS, CS);
        o.add(Kind::InactiveL2, 6 * CS, CS);
        assert_eq!(o.find(Kind::ActiveL2.bit(), 5 * CS, 512), None);
        assert_eq!(o.find(NEW, 5 * CS, 512), Some(Kind::ActiveL2));
        // Not checked, hence not even recorded.
        assert_eq!(o.find(NEW, 6 * CS, 512), None);
        assert!(!o.clusters.contains_key(&6));
        let none = ov(0);
        assert_eq!(none.find(NEW, 0, 512), None);
    }

    #[test]
    fn lowest_kind_wins_when_tables_share_a_cluster() {
        let mut o = ov(ALL);
        o.add(Kind::ActiveL2, 2 * CS, CS);
        o.add(Kind::ActiveL1, 2 * CS, 8);
        assert_eq!(o.find(NEW, 2 * CS, 512), Some(Kind::ActiveL1));
        // An L1 entry update ignores the active L1 but still hits the L2 table.
        assert_eq!(
            o.find(Kind::ActiveL1.bit(), 2 * CS, 8),
            Some(Kind::ActiveL2)
        );
    }

    #[test]
    fn tables_come_and_go_with_their_entries() {
        let mut o = ov(ALL);
        // Two L1 entries point at one L2 table (a corrupt image).
        o.add_entries(Kind::ActiveL2, &[(7 * CS) | COPIED, 0, (7 * CS) | COPIED]);
        o.replace_entry(Kind::ActiveL2, (7 * CS) | COPIED, (9 * CS) | COPIED);
        assert_eq!(o.find(NEW, 7 * CS, 1), Some(Kind::ActiveL2));
        assert_eq!(o.find(NEW, 9 * CS, 1), Some(Kind::ActiveL2));
        o.replace_entry(Kind::ActiveL2, 7 * CS, 0);
        assert_eq!(o.find(NEW, 7 * CS, 1), None);
        assert!(!o.clusters.contains_key(&7));
        // A table that moves: the refcount table grows from one to two clusters.
        o.add(Kind::RefcountTable, CS, CS);
        o.remove(Kind::RefcountTable, CS, CS);
        o.add(Kind::RefcountTable, 20 * CS, 2 * CS);
        assert_eq!(o.find(NEW, CS, 1), None);
        assert_eq!(o.find(NEW, 21 * CS, 1), Some(Kind::RefcountTable));
        // Removing what is not there changes nothing.
        o.remove(Kind::RefcountBlock, 21 * CS, 1);
        assert_eq!(o.find(NEW, 21 * CS, 1), Some(Kind::RefcountTable));
    }

    /// The map kept up to date while tables are allocated and move (L2
    /// tables, refcount blocks, a refcount table that grows, an L1 table
    /// that grows, L1 entries cleared by a shrink) equals the map built
    /// from the image on disk afterwards.
    #[test]
    fn map_follows_metadata_as_it_moves() {
        use super::super::create::{create, CreateOptions};
        use super::super::meta::Meta;
        use super::super::{read_header, Qcow2Driver};
        use crate::drivers::{wait, Driver};
        use crate::io::Buf;
        use crate::options::{BlockdevOptions, Qcow2Options};
        use std::sync::Arc;

        let dir = std::env::temp_dir().join(format!("blkfs-overlap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.qcow2");
        let path_str = path.to_str().unwrap();
        // 512-byte clusters and 64-bit refcounts: a refcount block covers
        // 32 KiB and the first refcount table 2 MiB of file.
        let o = CreateOptions {
            size: 4 << 20,
            cluster_bits: 9,
            refcount_order: 6,
            ..CreateOptions::default()
        };
        create(path_str, &o).unwrap();
        let graph = crate::graph::Graph::new(Default::default());
        let file = graph
            .add(
                &BlockdevOptions::from_json(
                    serde_json::json!({"driver": "file", "node-name": "f", "filename": path_str}),
                )
                .unwrap(),
            )
            .unwrap()
            .node;
        let h0 = read_header(&file).unwrap();
        let opts = Qcow2Options {
            overlap_check: Some(ALL),
            ..Qcow2Options::default()
        };
        let drv = Arc::new(
            Qcow2Driver::open(file.clone(), h0.clone(), None, &opts, false, true).unwrap(),
        );
        let write = |off: u64, len: usize| {
            wait(|d| drv.write(off, Buf::from_slice(&vec![0x33; len]), d)).unwrap();
        };
        for off in (0..4u64 << 20).step_by(1 << 20) {
            write(off, 1 << 20);
        }
        drv.resize_image(16 << 20).unwrap();
        write(12 << 20, 64 << 10);
        wait(|d| drv.discard(1 << 20, 256 << 10, d)).unwrap();
        drv.resize_image(2 << 20).unwrap();
        write(0, 4096);

        let h = read_header(&file).unwrap();
        assert_ne!(h.refcount_table_offset, h0.refcount_table_offset);
        assert_ne!(h.l1_table_offset, h0.l1_table_offset);
        let live = drv.meta.lock().overlap().clusters.clone();
        let mut fresh = Meta::load(file.clone(), &h).unwrap();
        fresh.set_overlap(Overlap::new(ALL, 9));
        assert_eq!(live.len(), fresh.overlap().clusters.len());
        assert!(live == fresh.overlap().clusters);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_carry_qemu_message_and_access() {
        let mut o = ov(ALL);
        o.add(Kind::RefcountBlock, 4 * CS, CS);
        let e = o.check(NEW, 4 * CS + 512, 4096).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corrupt);
        assert_eq!(
            e.msg,
            "Preventing invalid write on metadata (overlaps with refcount block)"
        );
        let c = e.corruption.unwrap();
        assert_eq!((c.offset, c.size, c.fatal), (4 * CS + 512, 4096, true));
        assert!(o.check(Kind::RefcountBlock.bit(), 4 * CS, 8).is_ok());
        let e = o.check_op(Op::Allocation, 4 * CS, CS).unwrap_err();
        assert!(e
            .msg
            .starts_with("Preventing invalid allocation on metadata"));
    }
}
