//! Cached metadata: the L1 table, L2 tables, the refcount table and
//! refcount blocks, and cluster allocation. Everything here runs under the
//! driver's metadata lock with synchronous I/O on the file node.
//!
//! Ordering keeps the image consistent at every moment (a crash may leak
//! clusters, never corrupt): a refcount is raised before anything points to
//! the cluster, a new L2 table is written before the L1 entry that points to
//! it, and a cluster is released only after nothing points to it any more.

use super::entry::{Mapping, COPIED, OFFSET_MASK};
use super::header::Header;
use super::overlap::{self, Kind, Overlap};
use crate::drivers::bytes::be64;
use crate::drivers::wait;
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent as Ev;
use std::collections::HashMap;
use std::sync::Arc;

/// L2 tables and refcount blocks kept in memory, per kind.
const CACHE_TABLES: usize = 512;

pub struct Meta {
    file: Arc<Node>,
    cluster_bits: u32,
    cs: u64,
    v3: bool,
    l1: Vec<u64>,
    l1_offset: u64,
    l2: HashMap<u64, Vec<u64>>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    refblocks: HashMap<u64, Vec<u8>>,
    refcount_bits: u32,
    /// Host cluster index where the next allocation goes (the file's end).
    next_free: u64,
    /// Lazy refcounts: the header's incompatible bits, and whether the
    /// dirty bit is already on disk. Refcounts are then not written at
    /// all; they are rebuilt on close or on the next read-write open.
    lazy: Option<(u64, bool)>,
    /// Where the metadata is, for the overlap checks of every write.
    overlap: Overlap,
}

pub fn read_at(file: &Node, offset: u64, len: usize) -> Result<Buf> {
    wait(|d| file.read(offset, Buf::zeroed(len), d))
}

pub fn write_at(file: &Node, offset: u64, data: &[u8]) -> Result<()> {
    wait(|d| file.write(offset, Buf::from_slice(data), d)).map(drop)
}

pub fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(
        crate::error::ErrorKind::Corrupt,
        format!("qcow2 image is corrupt: {msg}"),
    )
}

impl Meta {
    pub fn load(file: Arc<Node>, h: &Header) -> Result<Meta> {
        let l1_raw = read_at(&file, h.l1_table_offset, h.l1_size as usize * 8)?;
        let l1 = l1_raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let rt_len = h.refcount_table_clusters as usize * h.cluster_size() as usize;
        file.debug_event(Ev::ReftableLoad);
        let rt_raw = read_at(&file, h.refcount_table_offset, rt_len)?;
        let reftable = rt_raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let cs = h.cluster_size();
        Ok(Meta {
            next_free: file.size().div_ceil(cs),
            file,
            cluster_bits: h.cluster_bits,
            cs,
            v3: h.version >= 3,
            l1,
            l1_offset: h.l1_table_offset,
            l2: HashMap::new(),
            reftable,
            reftable_offset: h.refcount_table_offset,
            refblocks: HashMap::new(),
            refcount_bits: h.refcount_bits(),
            lazy: None,
            overlap: Overlap::new(0, h.cluster_bits),
        })
    }

    /// Switches to lazy refcount updates (see `lazy`).
    pub fn set_lazy(&mut self, h: &Header) {
        self.lazy = Some((h.incompatible, false));
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }

    /// Starts checking writes against metadata (`overlap`): `ov` holds the
    /// snapshot tables, the active tables are added here.
    pub fn set_overlap(&mut self, mut ov: Overlap) {
        ov.add(Kind::ActiveL1, self.l1_offset, self.l1.len() as u64 * 8);
        ov.add_entries(Kind::ActiveL2, &self.l1);
        let rt_len = self.reftable.len() as u64 * 8;
        ov.add(Kind::RefcountTable, self.reftable_offset, rt_len);
        ov.add_entries(Kind::RefcountBlock, &self.reftable);
        self.overlap = ov;
    }

    pub fn overlap(&self) -> &Overlap {
        &self.overlap
    }

    /// Writes metadata after the overlap check; `own` is the kind being
    /// written (not checked against itself), `overlap::NEW` for a new table.
    fn write_meta(&self, own: u8, off: u64, data: &[u8]) -> Result<()> {
        self.overlap.check(own, off, data.len() as u64)?;
        write_at(&self.file, off, data)
    }

    /// Before the first metadata change in lazy mode: the dirty bit goes to
    /// disk (and is flushed) so a crash is known to need a refcount rebuild.
    fn mark_dirty(&mut self) -> Result<()> {
        if let Some((bits, false)) = self.lazy {
            let dirty = bits | super::header::INCOMPAT_DIRTY;
            write_at(&self.file, 72, &dirty.to_be_bytes())?;
            wait(|d| self.file.flush(d))?;
            self.lazy = Some((bits, true));
        }
        Ok(())
    }

    pub fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    /// A host cluster offset read from metadata must be aligned and inside the file.
    fn check_host(&self, off: u64, what: &str) -> Result<()> {
        if !off.is_multiple_of(self.cs) || off == 0 || off >= self.next_free * self.cs {
            return Err(corrupt(format!("{what} offset {off:#x} is invalid")));
        }
        Ok(())
    }

    fn l2_table(&mut self, l2_off: u64) -> Result<&mut Vec<u64>> {
        if !self.l2.contains_key(&l2_off) {
            self.check_host(l2_off, "L2 table")?;
            self.file.debug_event(Ev::L2Load);
            let raw = read_at(&self.file, l2_off, self.cs as usize)?;
            if self.l2.len() >= CACHE_TABLES {
                if let Some(k) = self.l2.keys().next().copied() {
                    self.l2.remove(&k);
                }
            }
            self.l2
                .insert(l2_off, raw.chunks_exact(8).map(|e| be64(e, 0)).collect());
        }
        self.l2.get_mut(&l2_off).ok_or_else(|| corrupt("L2 cache"))
    }

    /// The mapping of one guest cluster.
    pub fn lookup(&mut self, guest_cluster: u64) -> Result<Mapping> {
        let (l1_idx, l2_idx) = (
            guest_cluster / self.l2_entries(),
            (guest_cluster % self.l2_entries()) as usize,
        );
        let Some(&l1e) = self.l1.get(l1_idx as usize) else {
            return Err(corrupt(format!(
                "guest cluster {guest_cluster} is beyond the L1 table"
            )));
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let (bits, v3) = (self.cluster_bits, self.v3);
        let e = self.l2_table(l2_off)?[l2_idx];
        let m = Mapping::decode(e, bits, v3);
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => self.check_host(host, "data cluster")?,
            Mapping::Compressed { host, len } if host + len > (self.next_free + 1) * self.cs => {
                return Err(corrupt(format!(
                    "compressed cluster at {host:#x} runs past the end of the file"
                )))
            }
            _ => {}
        }
        Ok(m)
    }

    /// The mapping of one guest cluster and how many clusters from it map
    /// alike without another lookup: the rest of an L2 table's span when
    /// its L1 entry is empty (SEEK_DATA over an empty 64 TiB image is then
    /// one step per L1 entry, not per cluster), else 1.
    pub fn lookup_run(&mut self, guest_cluster: u64) -> Result<(Mapping, u64)> {
        let per = self.l2_entries();
        let l1e = self.l1.get((guest_cluster / per) as usize).copied();
        if l1e.is_some_and(|e| e & OFFSET_MASK == 0) {
            return Ok((Mapping::Unallocated, per - guest_cluster % per));
        }
        Ok((self.lookup(guest_cluster)?, 1))
    }

    /// Points a guest cluster at `entry`, allocating its L2 table if needed.
    pub fn set_l2(&mut self, guest_cluster: u64, entry: u64) -> Result<()> {
        self.mark_dirty()?;
        let (l1_idx, l2_idx) = (
            guest_cluster / self.l2_entries(),
            guest_cluster % self.l2_entries(),
        );
        let l1e = *self
            .l1
            .get(l1_idx as usize)
            .ok_or_else(|| corrupt("L1 index out of range"))?;
        let mut l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            l2_off = self.alloc_cluster()?;
            self.file.debug_event(Ev::L2AllocWrite);
            self.write_meta(overlap::NEW, l2_off, &Buf::zeroed(self.cs as usize))?;
            let e = l2_off | COPIED;
            self.file.debug_event(Ev::L1Update);
            let at = self.l1_offset + l1_idx * 8;
            self.write_meta(Kind::ActiveL1.bit(), at, &e.to_be_bytes())?;
            self.l1[l1_idx as usize] = e;
            self.overlap.replace_entry(Kind::ActiveL2, l1e, e);
            self.l2.insert(l2_off, vec![0; self.l2_entries() as usize]);
        } else if l1e & COPIED == 0 {
            // Shared with a snapshot: write a private copy, point L1 at it,
            // then drop our reference to the shared one.
            self.file.debug_event(Ev::L2AllocCowRead);
            let table = self.l2_table(l2_off)?.clone();
            let copy = self.alloc_cluster()?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.debug_event(Ev::L2AllocWrite);
            self.write_meta(overlap::NEW, copy, &bytes)?;
            let e = copy | COPIED;
            self.file.debug_event(Ev::L1Update);
            let at = self.l1_offset + l1_idx * 8;
            self.write_meta(Kind::ActiveL1.bit(), at, &e.to_be_bytes())?;
            self.l1[l1_idx as usize] = e;
            self.overlap.replace_entry(Kind::ActiveL2, l1e, e);
            self.l2.insert(copy, table);
            self.release(l2_off, self.cs)?;
            l2_off = copy;
        }
        let chunk = self.chunk();
        let table = self.l2_table(l2_off)?;
        table[l2_idx as usize] = entry;
        // Whole aligned chunks from the cached table: no read-modify-write below.
        let first = (l2_idx as usize * 8) / chunk * chunk;
        let bytes: Vec<u8> = table[first / 8..(first + chunk) / 8]
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect();
        self.file.debug_event(Ev::L2Update);
        self.write_meta(Kind::ActiveL2.bit(), l2_off + first as u64, &bytes)
    }

    /// Metadata is written in aligned chunks of this size (from the cache),
    /// so an O_DIRECT image never needs a read-modify-write for it.
    fn chunk(&self) -> usize {
        4096.min(self.cs as usize)
    }

    fn refblock_entries(&self) -> u64 {
        self.cs * 8 / self.refcount_bits as u64
    }

    pub fn refcount(&mut self, host_cluster: u64) -> Result<u64> {
        let (rt_idx, rb_idx) = (
            host_cluster / self.refblock_entries(),
            host_cluster % self.refblock_entries(),
        );
        let rb_off = self.reftable.get(rt_idx as usize).copied().unwrap_or(0) & OFFSET_MASK;
        if rb_off == 0 {
            return Ok(0);
        }
        let bits = self.refcount_bits;
        Ok(rc_get(self.refblock(rb_off)?, rb_idx as usize, bits))
    }

    fn refblock(&mut self, rb_off: u64) -> Result<&mut Vec<u8>> {
        if !self.refblocks.contains_key(&rb_off) {
            self.check_host(rb_off, "refcount block")?;
            self.file.debug_event(Ev::RefblockLoad);
            let raw = read_at(&self.file, rb_off, self.cs as usize)?;
            if self.refblocks.len() >= CACHE_TABLES {
                if let Some(k) = self.refblocks.keys().next().copied() {
                    self.refblocks.remove(&k);
                }
            }
            self.refblocks.insert(rb_off, raw.to_vec());
        }
        self.refblocks
            .get_mut(&rb_off)
            .ok_or_else(|| corrupt("refcount cache"))
    }

    /// Sets a refcount, allocating (and hooking up) a refcount block when
    /// the cluster is not covered yet.
    pub fn set_refcount(&mut self, host_cluster: u64, value: u64) -> Result<()> {
        let per_block = self.refblock_entries();
        let (rt_idx, rb_idx) = (host_cluster / per_block, host_cluster % per_block);
        if rt_idx as usize >= self.reftable.len() {
            self.grow_reftable(rt_idx)?;
        }
        let bits = self.refcount_bits;
        if bits < 64 && value >> bits != 0 {
            return Err(Error::io(libc::EOVERFLOW, "qcow2: refcount overflow"));
        }
        let mut rb_off = self.reftable[rt_idx as usize] & OFFSET_MASK;
        if rb_off == 0 {
            rb_off = self.new_refblock(rt_idx)?;
        }
        let chunk = self.chunk();
        let block = self.refblock(rb_off)?;
        let (at, _) = rc_set(block, rb_idx as usize, bits, value);
        let first = at / chunk * chunk;
        let bytes = block[first..first + chunk].to_vec();
        if chunk < self.cs as usize {
            self.file.debug_event(Ev::RefblockUpdatePart);
        }
        self.file.debug_event(Ev::RefblockUpdate);
        self.write_meta(Kind::RefcountBlock.bit(), rb_off + first as u64, &bytes)
    }

    /// Writes a new refcount block for table slot `rt_idx` at the end of the
    /// file, then hooks it into the table.
    fn new_refblock(&mut self, rt_idx: u64) -> Result<u64> {
        self.file.debug_event(Ev::RefblockAlloc);
        let idx = self.next_free;
        self.next_free += 1;
        let off = idx * self.cs;
        let mut block = vec![0u8; self.cs as usize];
        let per_block = self.refblock_entries();
        let covers_itself = idx / per_block == rt_idx;
        if covers_itself {
            rc_set(
                &mut block,
                (idx % per_block) as usize,
                self.refcount_bits,
                1,
            );
        }
        self.file.debug_event(Ev::RefblockAllocWrite);
        self.write_meta(overlap::NEW, off, &block)?;
        self.refblocks.insert(off, block);
        self.file.debug_event(Ev::RefblockAllocHookup);
        self.file.debug_event(Ev::ReftableUpdate);
        let at = self.reftable_offset_of(rt_idx)?;
        self.write_meta(Kind::RefcountTable.bit(), at, &off.to_be_bytes())?;
        let old = std::mem::replace(&mut self.reftable[rt_idx as usize], off);
        self.overlap.replace_entry(Kind::RefcountBlock, old, off);
        if !covers_itself {
            self.set_refcount(idx, 1)?;
        }
        Ok(off)
    }

    /// Moves the refcount table to a bigger place at the end of the file.
    ///
    /// The new table and the refcount blocks that describe its own clusters
    /// are written first, unreferenced; one header write then switches to
    /// them; the old table is released last. A crash at any point leaves
    /// either the old or the new table in force (and at worst leaked clusters).
    fn grow_reftable(&mut self, need_idx: u64) -> Result<()> {
        self.file.debug_event(Ev::ReftableGrow);
        let cs = self.cs;
        let per_block = self.refblock_entries();
        let old_len = self.reftable.len() as u64;
        let start = self.next_free;
        // The new table must also cover its own region, which starts at the
        // file's end: that may lie past `need_idx` (leaked clusters after
        // failed allocations push the end out).
        let mut new_entries = (need_idx + 1).max(old_len * 2).next_multiple_of(cs / 8);
        let (table_clusters, end) = loop {
            if new_entries * 8 > 8 << 20 {
                return Err(Error::io(
                    libc::ENOSPC,
                    "qcow2: the refcount table would exceed 8 MiB",
                ));
            }
            let table_clusters = new_entries * 8 / cs;
            // Blocks needed for slots the old table does not have: they
            // describe the new region [start, end), themselves included.
            let mut new_blocks = 0;
            let end = loop {
                let end = start + table_clusters + new_blocks;
                let missing = (start / per_block..=(end - 1) / per_block)
                    .filter(|&k| k >= old_len || self.reftable[k as usize] & OFFSET_MASK == 0)
                    .count() as u64;
                if missing == new_blocks {
                    break end;
                }
                new_blocks = missing;
            };
            if (end - 1) / per_block < new_entries {
                break (table_clusters, end);
            }
            new_entries = ((end - 1) / per_block + 1).next_multiple_of(cs / 8);
        };
        let mut table = self.reftable.clone();
        table.resize(new_entries as usize, 0);
        let blocks_at = start + table_clusters;
        let mut next_block = blocks_at;
        let mut fresh: Vec<(u64, Vec<u8>)> = Vec::new();
        for k in start / per_block..=(end - 1) / per_block {
            if table[k as usize] & OFFSET_MASK != 0 {
                continue;
            }
            let mut block = vec![0u8; cs as usize];
            let lo = (k * per_block).max(start);
            let hi = ((k + 1) * per_block).min(end);
            for c in lo..hi {
                rc_set(
                    &mut block,
                    (c - k * per_block) as usize,
                    self.refcount_bits,
                    1,
                );
            }
            table[k as usize] = next_block * cs;
            fresh.push((next_block * cs, block));
            next_block += 1;
        }
        self.file.debug_event(Ev::RefblockAllocWriteBlocks);
        for (off, block) in &fresh {
            self.write_meta(overlap::NEW, *off, block)?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.debug_event(Ev::RefblockAllocWriteTable);
        self.write_meta(overlap::NEW, start * cs, &bytes)?;
        self.next_free = end;
        // Clusters of the new region that existing blocks describe.
        for c in start..end {
            let k = c / per_block;
            if k < old_len && self.reftable[k as usize] & OFFSET_MASK != 0 {
                self.set_refcount(c, 1)?;
            }
        }
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        crate::drivers::wait(|d| self.file.flush(d))?;
        self.file.debug_event(Ev::RefblockAllocSwitchTable);
        write_at(&self.file, 48, &hdr)?;
        let (old_off, old_clusters) = (self.reftable_offset, (old_len * 8).div_ceil(cs));
        self.overlap
            .remove(Kind::RefcountTable, old_off, old_len * 8);
        self.overlap
            .add(Kind::RefcountTable, start * cs, new_entries * 8);
        self.reftable = table;
        self.reftable_offset = start * cs;
        for (off, block) in fresh {
            self.overlap.add(Kind::RefcountBlock, off, cs);
            self.refblocks.insert(off, block);
        }
        self.release(old_off, old_clusters * cs)
    }

    fn reftable_offset_of(&self, rt_idx: u64) -> Result<u64> {
        Ok(self.reftable_offset + rt_idx * 8)
    }

    /// A new cluster at the end of the file, its refcount already 1.
    pub fn alloc_cluster(&mut self) -> Result<u64> {
        self.alloc_clusters(1)
    }

    /// `n` contiguous new clusters at the end of the file, their refcounts
    /// already 1. They are reserved before any refcount is set, so refcount
    /// blocks allocated on the way land after them.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.mark_dirty()?;
        self.file.debug_event(Ev::ClusterAlloc);
        let first = self.next_free;
        self.overlap
            .check_op(overlap::Op::Allocation, first * self.cs, n * self.cs)?;
        self.next_free += n;
        if self.lazy.is_none() {
            for idx in first..first + n {
                self.set_refcount(idx, 1)?;
            }
        }
        Ok(first * self.cs)
    }

    /// Entries of the L1 table.
    pub fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// Moves the L1 table to a bigger place with `entries` entries.
    ///
    /// The copy is written to new clusters and flushed, one header write
    /// switches l1_size and l1_table_offset together, and the old table is
    /// released only once that is flushed: a crash leaves either table in
    /// force (and at worst leaked clusters).
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let old_len = self.l1_len();
        if entries <= old_len {
            return Ok(());
        }
        let size = u32::try_from(entries)
            .map_err(|_| Error::generic("Failed to grow the L1 table: File too large"))?;
        let clusters = (entries * 8).div_ceil(self.cs);
        self.file.debug_event(Ev::L1GrowAllocTable);
        let off = self.alloc_clusters(clusters)?;
        let mut table = self.l1.clone();
        table.resize(entries as usize, 0);
        let mut bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((clusters * self.cs) as usize, 0);
        self.file.debug_event(Ev::L1GrowWriteTable);
        self.write_meta(overlap::NEW, off, &bytes)?;
        wait(|d| self.file.flush(d))?;
        self.file.debug_event(Ev::L1GrowActivateTable);
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&size.to_be_bytes());
        hdr[4..].copy_from_slice(&off.to_be_bytes());
        write_at(&self.file, 36, &hdr)?;
        wait(|d| self.file.flush(d))?;
        let old_off = std::mem::replace(&mut self.l1_offset, off);
        self.overlap.remove(Kind::ActiveL1, old_off, old_len * 8);
        self.overlap.add(Kind::ActiveL1, off, entries * 8);
        self.l1 = table;
        if old_len > 0 {
            self.release(old_off, old_len * 8)?;
        }
        Ok(())
    }

    /// Clears L1 entry `l1_idx` on disk and returns what it referenced, for
    /// the caller to release once the change is flushed: the L2 table's
    /// offset and, when the table was ours alone, the mappings in it.
    pub fn clear_l1(&mut self, l1_idx: u64) -> Result<Option<(u64, Vec<Mapping>)>> {
        let l1e = *self
            .l1
            .get(l1_idx as usize)
            .ok_or_else(|| corrupt("L1 index out of range"))?;
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok(None);
        }
        self.mark_dirty()?;
        let (bits, v3) = (self.cluster_bits, self.v3);
        let mappings = if l1e & COPIED != 0 {
            self.l2_table(l2_off)?
                .iter()
                .map(|&e| Mapping::decode(e, bits, v3))
                .collect()
        } else {
            Vec::new()
        };
        let at = self.l1_offset + l1_idx * 8;
        self.write_meta(Kind::ActiveL1.bit(), at, &0u64.to_be_bytes())?;
        self.l1[l1_idx as usize] = 0;
        self.overlap.replace_entry(Kind::ActiveL2, l1e, 0);
        self.l2.remove(&l2_off);
        Ok(Some((l2_off, mappings)))
    }

    /// Drops one reference of every host cluster in `off..off+len`.
    pub fn release(&mut self, off: u64, len: u64) -> Result<()> {
        self.file.debug_event(Ev::ClusterFree);
        if self.lazy.is_some() {
            return self.mark_dirty();
        }
        let first = off / self.cs;
        let last = (off + len.max(1) - 1) / self.cs;
        for c in first..=last {
            let rc = self.refcount(c)?;
            if rc == 0 {
                return Err(corrupt(format!(
                    "refcount of cluster {c} would drop below zero"
                )));
            }
            self.set_refcount(c, rc - 1)?;
        }
        Ok(())
    }
}

/// Reads entry `idx` of a refcount block with `bits`-wide entries.
pub fn rc_get(block: &[u8], idx: usize, bits: u32) -> u64 {
    if bits < 8 {
        let per = 8 / bits as usize;
        let shift = (idx % per) * bits as usize;
        return ((block[idx / per] >> shift) & ((1u8 << bits) - 1)) as u64;
    }
    let n = bits as usize / 8;
    block[idx * n..idx * n + n]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | b as u64)
}

/// Writes entry `idx`; returns the byte range that changed.
pub fn rc_set(block: &mut [u8], idx: usize, bits: u32, value: u64) -> (usize, usize) {
    if bits < 8 {
        let per = 8 / bits as usize;
        let shift = (idx % per) * bits as usize;
        let mask = ((1u8 << bits) - 1) << shift;
        let byte = &mut block[idx / per];
        *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
        return (idx / per, 1);
    }
    let n = bits as usize / 8;
    let bytes = value.to_be_bytes();
    block[idx * n..idx * n + n].copy_from_slice(&bytes[8 - n..]);
    (idx * n, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for idx in 0..(64 * 8 / bits as usize) {
                rc_set(&mut block, idx, bits, (idx as u64 * 7) & max);
            }
            for idx in 0..(64 * 8 / bits as usize) {
                assert_eq!(
                    rc_get(&block, idx, bits),
                    (idx as u64 * 7) & max,
                    "bits {bits} idx {idx}"
                );
            }
        }
        // Sub-byte entries start at the least significant bit.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 0, 1, 1);
        assert_eq!(b[0], 1);
        rc_set(&mut b, 1, 4, 0xf);
        assert_eq!(b[0], 0xf1);
        // 16-bit entries are big-endian.
        let mut b = vec![0u8; 4];
        rc_set(&mut b, 1, 16, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }
}
