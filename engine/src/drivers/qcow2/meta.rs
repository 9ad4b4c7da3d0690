//! Cached metadata: the L1 table, L2 tables, the refcount table and
//! refcount blocks, and cluster allocation. Everything here runs under the
//! driver's metadata lock with synchronous I/O on the file node.
//!
//! Ordering keeps the image consistent at every moment (a crash may leak
//! clusters, never corrupt): a refcount is raised before anything points to
//! the cluster, a new L2 table is written before the L1 entry that points to
//! it, and a cluster is released only after nothing points to it any more.
//!
//! Released clusters are reused (QEMU's `free_cluster_index`): allocation
//! searches forward from the lowest index that may be free for a run of
//! clusters with refcount 0, and appends at the end of the file when there
//! is none. A released cluster is reusable only once
//! - no data I/O planned before its release is still in flight (a read or
//!   write that looked up the old mapping must not meet the new owner's
//!   data): requests hold an [`IoTicket`] of the epoch they were planned in,
//!   and a cluster released in epoch E is reusable from epoch E + 2 on,
//!   which is reached only once every request of epoch E has finished;
//! - the L2 entry's removal is on disk: a refcount drop waits in `drops`
//!   until a write-back has written the removal and flushed the file
//!   (QEMU's dependency of the refcount cache on the L2 cache), so not even
//!   a power loss can leave an entry pointing at a cluster counted free.
//!   Flushed drops apply at points where no structural change is half
//!   made ([`Meta::apply_flushed`], [`Meta::free_released`]).
//!
//! Freed clusters are discarded in the file (after their refcount drop is
//! written) when the `pass-discard-*` option of the release's kind says so.
//! In lazy-refcount mode refcounts are not kept, so allocation appends.
//!
//! L2 tables and refcount blocks are cached in bounded LRU caches
//! ([`super::cache`]). Changes to their entries are written back
//! ([`super::writeback`]): by the request that made them before it
//! completes (the driver's commit, batched with other requests'), and by
//! [`Meta::write_dirty`] before anything whose order matters (a structural
//! write, a flush, an eviction, the flush before refcount drops). Every other metadata
//! write (new tables, L1, refcount table, header) is written through.

use super::cache::{CacheSizes, Lru};
use super::entry::{Mapping, COPIED, OFFSET_MASK};
use super::header::Header;
use super::overlap::{self, Kind, Overlap};
use super::writeback::{self, Chunk, Outcome};
use crate::drivers::bytes::be64;
use crate::drivers::wait;
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent as Ev;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a cluster is released: decides whether it is discarded in the file
/// (QEMU's `enum qcow2_discard_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeKind {
    /// Never discarded (copy-on-write releases: the next write reuses them).
    Never,
    /// Always discarded (shrinking).
    Always,
    /// A guest discard or zero write with unmap (`pass-discard-request`).
    Request,
    /// Snapshot bookkeeping (`pass-discard-snapshot`).
    Snapshot,
    /// Metadata moves: L1, L2 copy-on-write, refcount table (`pass-discard-other`).
    Other,
}

/// The `pass-discard-*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassDiscard {
    pub request: bool,
    pub snapshot: bool,
    pub other: bool,
}

impl PassDiscard {
    fn passes(&self, kind: FreeKind) -> bool {
        match kind {
            FreeKind::Never => false,
            FreeKind::Always => true,
            FreeKind::Request => self.request,
            FreeKind::Snapshot => self.snapshot,
            FreeKind::Other => self.other,
        }
    }
}

/// Data requests in flight, counted per epoch parity (see the module doc).
#[derive(Default)]
pub struct InFlight([AtomicU64; 2]);

/// A data request planned from the current mappings; dropped when it is done.
pub struct IoTicket {
    inflight: Arc<InFlight>,
    bucket: usize,
}

impl Drop for IoTicket {
    fn drop(&mut self) {
        self.inflight.0[self.bucket].fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Meta {
    file: Arc<Node>,
    cluster_bits: u32,
    cs: u64,
    v3: bool,
    l1: Vec<u64>,
    l1_offset: u64,
    /// L2 table slices (or whole tables) by their file offset.
    l2: Lru<Vec<u64>>,
    /// Entries of one cached L2 slice.
    slice_entries: u64,
    reftable: Vec<u64>,
    reftable_offset: u64,
    refblocks: Lru<Vec<u8>>,
    refcount_bits: u32,
    /// Host cluster index of the file's end: appending allocations go there.
    next_free: u64,
    /// The lowest host cluster index that may be free.
    free_hint: u64,
    /// Released clusters not reusable yet: (epoch of release, first, count).
    quarantine: VecDeque<(u64, u64, u64)>,
    quarantined: HashSet<u64>,
    inflight: Arc<InFlight>,
    epoch: u64,
    /// Refcount drops waiting for the removals behind them to be flushed,
    /// those a batch outside the lock carries, and those flushed.
    drops: Vec<Release>,
    dropping: Vec<Release>,
    flushed: Vec<Release>,
    /// Drops queued per cluster, not applied yet: a release counts them.
    dropped: HashMap<u64, u64>,
    pass: PassDiscard,
    /// Freed byte ranges waiting to be discarded in the file.
    discards: Vec<(u64, u64)>,
    /// Lazy refcounts: the header's incompatible bits, and whether the
    /// dirty bit is already on disk. Refcounts are then not written at
    /// all; they are rebuilt on close or on the next read-write open.
    lazy: Option<(u64, bool)>,
    /// Where the metadata is, for the overlap checks of every write.
    overlap: Overlap,
    /// Cached chunks changed and not written yet.
    dirty: BTreeSet<Chunk>,
    /// Chunks a batch is writing outside the lock (not evictable either).
    writing: Vec<Chunk>,
    /// Changes made so far, and how many of the first ones are written.
    changes: u64,
    written: u64,
    /// The last failed batch: the changes it carried and its error.
    failed: Option<(u64, Error)>,
    /// Held while a batch is written outside the lock; its outcome is left
    /// here for whoever settles it first.
    io: Arc<Mutex<Outcome>>,
}

/// Where the cached metadata changes stand for a commit.
pub enum Commit {
    /// Written up to the commit's changes.
    Written,
    /// A batch carrying them failed.
    Failed(Error),
    /// A batch is being written: wait for it.
    Busy,
    /// Nobody writes: start a batch.
    Idle,
}

/// A batch to write outside the lock: hold `io` while writing `writes`,
/// then leave `(changes, result)` in it and settle.
pub struct Batch {
    pub io: Arc<Mutex<Outcome>>,
    pub writes: Vec<writeback::Write>,
    pub changes: u64,
    /// Flush after the writes: refcount drops wait for it.
    pub flush: bool,
}

/// A released run of host clusters: (offset, length, why).
type Release = (u64, u64, FreeKind);

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

impl Drop for Meta {
    /// Every path that closes an image writes what is pending first; a
    /// change still pending here is a bug to hear about, not to hide.
    fn drop(&mut self) {
        if !self.dirty.is_empty() {
            log::error!(
                "{}: qcow2: {} changed metadata chunks were never written",
                self.file.driver.filename(),
                self.dirty.len()
            );
        }
        if self.releasing() {
            log::error!(
                "{}: qcow2: {} released clusters were never freed (leaked)",
                self.file.driver.filename(),
                self.dropped.len()
            );
        }
    }
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
        let sizes = CacheSizes::default_for(h.size, cs);
        Ok(Meta {
            next_free: file.size().div_ceil(cs),
            file,
            cluster_bits: h.cluster_bits,
            cs,
            v3: h.version >= 3,
            l1,
            l1_offset: h.l1_table_offset,
            l2: Lru::new(sizes.l2_entries),
            slice_entries: sizes.l2_entry_bytes / 8,
            reftable,
            reftable_offset: h.refcount_table_offset,
            refblocks: Lru::new(sizes.refcount_blocks),
            refcount_bits: h.refcount_bits(),
            free_hint: 0,
            quarantine: VecDeque::new(),
            quarantined: HashSet::new(),
            inflight: Arc::new(InFlight::default()),
            epoch: 0,
            drops: Vec::new(),
            dropping: Vec::new(),
            flushed: Vec::new(),
            dropped: HashMap::new(),
            pass: PassDiscard::default(),
            discards: Vec::new(),
            lazy: None,
            overlap: Overlap::new(0, h.cluster_bits),
            dirty: BTreeSet::new(),
            writing: Vec::new(),
            changes: 0,
            written: 0,
            failed: None,
            io: Arc::new(Mutex::new(None)),
        })
    }

    /// Resizes the caches (empties them): at open, before any change.
    pub fn set_cache_sizes(&mut self, sizes: CacheSizes) {
        self.l2 = Lru::new(sizes.l2_entries);
        self.slice_entries = sizes.l2_entry_bytes / 8;
        self.refblocks = Lru::new(sizes.refcount_blocks);
    }

    pub fn set_pass_discard(&mut self, pass: PassDiscard) {
        self.pass = pass;
    }

    /// Whether no data request is in flight.
    pub fn idle(&self) -> bool {
        self.inflight
            .0
            .iter()
            .all(|c| c.load(Ordering::SeqCst) == 0)
    }

    /// Registers a data request planned from the mappings looked up now.
    pub fn start_io(&self) -> IoTicket {
        let bucket = (self.epoch & 1) as usize;
        self.inflight.0[bucket].fetch_add(1, Ordering::SeqCst);
        IoTicket {
            inflight: self.inflight.clone(),
            bucket,
        }
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
    /// What is pending goes first: this write may depend on it.
    fn write_meta(&mut self, own: u8, off: u64, data: &[u8]) -> Result<()> {
        self.write_dirty()?;
        self.overlap.check(own, off, data.len() as u64)?;
        write_at(&self.file, off, data)
    }

    /// Writes what is pending, then flushes the file.
    pub fn sync(&mut self) -> Result<()> {
        self.write_dirty()?;
        wait(|d| self.file.flush(d))
    }

    /// Records a changed chunk of the cache.
    fn mark(&mut self, c: Chunk) {
        self.dirty.insert(c);
        self.changes += 1;
    }

    /// The cache key of the entry holding a chunk: (L2, key).
    fn cache_key(&self, c: Chunk) -> (bool, u64) {
        match c {
            Chunk::Refblock(rb, _) => (false, rb),
            Chunk::L2(l2, idx) => (true, l2 + idx / self.slice_entries * self.slice_entries * 8),
        }
    }

    /// Whether a cached entry holds changes not written yet (pending or
    /// being written): it must not be evicted before they are.
    fn unwritten(&self, l2: bool, key: u64) -> bool {
        self.dirty
            .iter()
            .chain(&self.writing)
            .any(|&c| self.cache_key(c) == (l2, key))
    }

    /// Before inserting into a cache: the entry it would evict is written first.
    fn make_room(&mut self, l2: bool) -> Result<()> {
        let victim = if l2 {
            self.l2.victim()
        } else {
            self.refblocks.victim()
        };
        match victim {
            Some(key) if self.unwritten(l2, key) => self.write_dirty(),
            _ => Ok(()),
        }
    }

    /// The bytes of the pending chunks, overlap-checked.
    fn take_writes(&mut self, chunks: &[Chunk]) -> Result<Vec<writeback::Write>> {
        let chunk = self.chunk();
        let mut out = Vec::with_capacity(chunks.len());
        for &c in chunks {
            let (offset, data, kind) = match c {
                Chunk::Refblock(rb, first) => {
                    let block = self
                        .refblocks
                        .get_mut(rb)
                        .ok_or_else(|| corrupt("refcount cache lost a changed block"))?;
                    let data = Buf::from_slice(&block[first..first + chunk]);
                    if chunk < self.cs as usize {
                        self.file.debug_event(Ev::RefblockUpdatePart);
                    }
                    (rb + first as u64, data, Kind::RefcountBlock)
                }
                Chunk::L2(l2, idx) => {
                    let (_, key) = self.cache_key(c);
                    let slice = self
                        .l2
                        .get_mut(key)
                        .ok_or_else(|| corrupt("L2 cache lost a changed slice"))?;
                    let at = (idx % self.slice_entries) as usize;
                    let bytes: Vec<u8> = slice[at..at + chunk / 8]
                        .iter()
                        .flat_map(|e| e.to_be_bytes())
                        .collect();
                    (l2 + idx * 8, Buf::from_slice(&bytes), Kind::ActiveL2)
                }
            };
            self.overlap.check(kind.bit(), offset, chunk as u64)?;
            out.push(writeback::Write {
                chunk: c,
                offset,
                data,
            });
        }
        Ok(out)
    }

    /// Takes the outcome of a batch written outside the lock, waiting for
    /// the batch to end; nothing when nobody writes or it is taken already.
    fn settle(&mut self) {
        let outcome = self.io.clone().lock().take();
        let Some((changes, r)) = outcome else {
            return;
        };
        let chunks = std::mem::take(&mut self.writing);
        let drops = std::mem::take(&mut self.dropping);
        match r {
            Ok(()) => {
                self.wrote(changes);
                self.flushed.extend(drops);
            }
            Err(e) => {
                self.dirty.extend(chunks);
                self.drops.extend(drops);
                self.failed = Some((changes, e));
            }
        }
    }

    fn wrote(&mut self, changes: u64) {
        self.written = self.written.max(changes);
        if self.failed.as_ref().is_some_and(|(c, _)| *c <= changes) {
            self.failed = None;
        }
    }

    /// Settles a batch written outside the lock (its writer calls this,
    /// between requests' changes: the drops it flushed apply here).
    pub fn settle_batch(&mut self) {
        self.settle();
        self.apply_flushed();
    }

    /// Writes every pending change now, under the lock; waits for a batch
    /// being written outside it first (its older copies must not land
    /// after these).
    pub fn write_dirty(&mut self) -> Result<()> {
        if self.dirty.is_empty() && self.writing.is_empty() && self.dropping.is_empty() {
            return Ok(());
        }
        self.settle();
        let chunks: Vec<Chunk> = self.dirty.iter().copied().collect();
        let changes = self.changes;
        let writes = self.take_writes(&chunks)?;
        self.dirty.clear();
        match writeback::write_all(&self.file, writes, false) {
            Ok(()) => {
                self.wrote(changes);
                Ok(())
            }
            Err(e) => {
                self.dirty.extend(chunks);
                Err(e)
            }
        }
    }

    /// Frees what was released: writes and flushes the changes behind the
    /// drops, lowers the refcounts, and writes those (unflushed: losing
    /// them leaks clusters, nothing worse). Only where no structural
    /// change is half made: a drop may rewrite a refcount it captured.
    pub fn free_released(&mut self) -> Result<()> {
        if !self.drops.is_empty() {
            let drops = std::mem::take(&mut self.drops);
            let flushed = self.write_dirty().and_then(|()| {
                self.file.debug_event(Ev::FlushToDisk);
                wait(|d| self.file.flush(d))
            });
            if let Err(e) = flushed {
                self.drops.extend(drops);
                return Err(e);
            }
            self.flushed.extend(drops);
        }
        self.apply_flushed();
        self.write_dirty()
    }

    /// Lowers the refcounts whose removals a flush made durable.
    pub fn apply_flushed(&mut self) {
        let flushed = std::mem::take(&mut self.flushed);
        self.apply_drops(flushed);
    }

    /// Whether released clusters wait to be freed.
    pub fn releasing(&self) -> bool {
        !self.dropped.is_empty()
    }

    /// Changes made so far: a commit waits until these are written.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    pub fn commit_state(&self, changes: u64) -> Commit {
        if self.written >= changes {
            return Commit::Written;
        }
        match &self.failed {
            Some((c, e)) if *c >= changes => Commit::Failed(e.clone()),
            _ if !self.writing.is_empty() || !self.dropping.is_empty() => Commit::Busy,
            _ => Commit::Idle,
        }
    }

    /// Starts a batch of every pending change, to write outside the lock;
    /// None when nothing is pending (then it is all written).
    pub fn start_batch(&mut self) -> Result<Option<Batch>> {
        if self.dirty.is_empty() && self.drops.is_empty() {
            self.wrote(self.changes);
            return Ok(None);
        }
        let chunks: Vec<Chunk> = self.dirty.iter().copied().collect();
        let writes = self.take_writes(&chunks)?;
        self.dirty.clear();
        self.writing = chunks;
        debug_assert!(self.dropping.is_empty(), "two batches in flight");
        self.dropping = std::mem::take(&mut self.drops);
        Ok(Some(Batch {
            io: self.io.clone(),
            writes,
            changes: self.changes,
            flush: !self.dropping.is_empty(),
        }))
    }

    /// Whether changes are waiting to be written.
    pub fn pending(&self) -> bool {
        self.written < self.changes
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

    /// The cached slice of the L2 table at `l2_off` holding entry `l2_idx`,
    /// and the index of that entry in it.
    fn l2_slice(&mut self, l2_off: u64, l2_idx: u64) -> Result<(&mut Vec<u64>, usize)> {
        let first = l2_idx / self.slice_entries * self.slice_entries;
        let key = l2_off + first * 8;
        if !self.l2.contains(key) {
            self.check_host(l2_off, "L2 table")?;
            self.file.debug_event(Ev::L2Load);
            let raw = read_at(&self.file, key, self.slice_entries as usize * 8)?;
            self.make_room(true)?;
            self.l2
                .insert(key, raw.chunks_exact(8).map(|e| be64(e, 0)).collect());
        }
        let slice = self.l2.get_mut(key).ok_or_else(|| corrupt("L2 cache"))?;
        Ok((slice, (l2_idx - first) as usize))
    }

    /// A whole L2 table, read from the file once what is pending is written.
    fn read_l2_table(&mut self, l2_off: u64) -> Result<Vec<u64>> {
        self.check_host(l2_off, "L2 table")?;
        self.write_dirty()?;
        let raw = read_at(&self.file, l2_off, self.cs as usize)?;
        Ok(raw.chunks_exact(8).map(|e| be64(e, 0)).collect())
    }

    /// Drops every cached slice of the L2 table at `l2_off`, and its
    /// pending changes: nothing points to the table any more.
    fn forget_l2_table(&mut self, l2_off: u64) {
        self.dirty
            .retain(|c| !matches!(c, Chunk::L2(t, _) if *t == l2_off));
        let step = self.slice_entries * 8;
        for key in (l2_off..l2_off + self.cs).step_by(step as usize) {
            self.l2.remove(key);
        }
    }

    /// Whether looking up `count` guest clusters from `first` needs no
    /// I/O: every L2 slice they map through is cached (or has no table).
    pub fn cached(&self, first: u64, count: u64) -> bool {
        let per = self.l2_entries();
        (first..first + count).all(|c| {
            let (l1_idx, l2_idx) = (c / per, c % per);
            let l2_off = self.l1.get(l1_idx as usize).map_or(0, |e| e & OFFSET_MASK);
            let key = l2_off + l2_idx / self.slice_entries * self.slice_entries * 8;
            l2_off == 0 || self.l2.contains(key)
        })
    }

    /// The mapping of one guest cluster.
    pub fn lookup(&mut self, guest_cluster: u64) -> Result<Mapping> {
        self.lookup_run(guest_cluster).map(|(m, _)| m)
    }

    /// The mapping of one guest cluster and how many clusters from it map
    /// alike without another lookup: the rest of an L2 table's span when
    /// its L1 entry is empty (SEEK_DATA over an empty 64 TiB image is then
    /// one step per L1 entry, not per cluster), else 1.
    pub fn lookup_run(&mut self, guest_cluster: u64) -> Result<(Mapping, u64)> {
        let per = self.l2_entries();
        let (l1_idx, l2_idx) = (guest_cluster / per, guest_cluster % per);
        let Some(&l1e) = self.l1.get(l1_idx as usize) else {
            return Err(corrupt(format!(
                "guest cluster {guest_cluster} is beyond the L1 table"
            )));
        };
        let l2_off = l1e & OFFSET_MASK;
        if l2_off == 0 {
            return Ok((Mapping::Unallocated, per - l2_idx));
        }
        let (bits, v3) = (self.cluster_bits, self.v3);
        let (slice, i) = self.l2_slice(l2_off, l2_idx)?;
        let m = Mapping::decode(slice[i], bits, v3);
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
        Ok((m, 1))
    }

    /// Points a guest cluster at `entry`, allocating its L2 table if needed.
    pub fn set_l2(&mut self, guest_cluster: u64, entry: u64) -> Result<()> {
        self.set_l2_run(guest_cluster, &[entry])
    }

    /// Points consecutive guest clusters at `entries`, in the cache: the
    /// touched chunks are written back later (see the module doc).
    pub fn set_l2_run(&mut self, first: u64, entries: &[u64]) -> Result<()> {
        let per = self.l2_entries();
        let per_chunk = self.chunk() as u64 / 8;
        let mut i = 0;
        while i < entries.len() {
            let gc = first + i as u64;
            let n = ((per - gc % per) as usize).min(entries.len() - i);
            let l2_off = self.l2_table_for_write(gc)?;
            for (k, &e) in entries[i..i + n].iter().enumerate() {
                let l2_idx = (gc + k as u64) % per;
                let (slice, j) = self.l2_slice(l2_off, l2_idx)?;
                slice[j] = e;
                self.mark(Chunk::L2(l2_off, l2_idx / per_chunk * per_chunk));
            }
            i += n;
        }
        Ok(())
    }

    /// The L2 table of a guest cluster, ready to be written: allocated if
    /// missing, copied if shared with a snapshot.
    fn l2_table_for_write(&mut self, guest_cluster: u64) -> Result<u64> {
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
            let first = l2_idx / self.slice_entries * self.slice_entries;
            self.make_room(true)?;
            self.l2
                .insert(l2_off + first * 8, vec![0; self.slice_entries as usize]);
        } else if l1e & COPIED == 0 {
            // Shared with a snapshot: write a private copy, point L1 at it,
            // then drop our reference to the shared one.
            self.file.debug_event(Ev::L2AllocCowRead);
            let table = self.read_l2_table(l2_off)?;
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
            self.release(l2_off, self.cs, FreeKind::Other)?;
            l2_off = copy;
        }
        Ok(l2_off)
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
        if !self.refblocks.contains(rb_off) {
            self.check_host(rb_off, "refcount block")?;
            self.file.debug_event(Ev::RefblockLoad);
            let raw = read_at(&self.file, rb_off, self.cs as usize)?;
            self.make_room(false)?;
            self.refblocks.insert(rb_off, raw.to_vec());
        }
        self.refblocks
            .get_mut(rb_off)
            .ok_or_else(|| corrupt("refcount cache"))
    }

    /// Sets a refcount, allocating (and hooking up) a refcount block when
    /// the cluster is not covered yet.
    pub fn set_refcount(&mut self, host_cluster: u64, value: u64) -> Result<()> {
        self.set_refcounts(host_cluster..host_cluster + 1, value)
    }

    /// Sets the refcount of a run of clusters, in the cache: the touched
    /// chunks are written back later (see the module doc).
    pub fn set_refcounts(&mut self, clusters: std::ops::Range<u64>, value: u64) -> Result<()> {
        let per_block = self.refblock_entries();
        let bits = self.refcount_bits;
        if bits < 64 && value >> bits != 0 {
            return Err(Error::io(libc::EOVERFLOW, "qcow2: refcount overflow"));
        }
        let chunk = self.chunk();
        for c in clusters {
            let (rt_idx, rb_idx) = (c / per_block, c % per_block);
            if rt_idx as usize >= self.reftable.len() {
                self.grow_reftable(rt_idx)?;
            }
            let mut rb_off = self.reftable[rt_idx as usize] & OFFSET_MASK;
            if rb_off == 0 {
                rb_off = self.new_refblock(rt_idx)?;
            }
            let block = self.refblock(rb_off)?;
            let (at, _) = rc_set(block, rb_idx as usize, bits, value);
            self.mark(Chunk::Refblock(rb_off, at / chunk * chunk));
        }
        Ok(())
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
        self.make_room(false)?;
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
        self.sync()?;
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
            self.make_room(false)?;
            self.refblocks.insert(off, block);
        }
        self.release(old_off, old_clusters * cs, FreeKind::Other)
    }

    fn reftable_offset_of(&self, rt_idx: u64) -> Result<u64> {
        Ok(self.reftable_offset + rt_idx * 8)
    }

    /// A new cluster at the end of the file, its refcount already 1.
    pub fn alloc_cluster(&mut self) -> Result<u64> {
        self.alloc_clusters(1)
    }

    /// `n` contiguous free clusters (the lowest run found, or at the end of
    /// the file), their refcounts already 1. They are reserved before any
    /// refcount is set, so refcount blocks and tables allocated on the way
    /// (always at the file's end) land after them.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.mark_dirty()?;
        self.file.debug_event(Ev::ClusterAlloc);
        if self.lazy.is_some() {
            let first = self.next_free;
            self.overlap
                .check_op(overlap::Op::Allocation, first * self.cs, n * self.cs)?;
            self.next_free += n;
            return Ok(first * self.cs);
        }
        // Pending discards first: a reused cluster must not be punched later.
        self.process_discards();
        self.reclaim();
        let (first, gap) = self.find_free(n)?;
        self.overlap
            .check_op(overlap::Op::Allocation, first * self.cs, n * self.cs)?;
        let end = first + n;
        self.free_hint = gap.unwrap_or(end);
        self.next_free = self.next_free.max(end);
        self.set_refcounts(first..end, 1)?;
        Ok(first * self.cs)
    }

    /// The first run of `n` clusters from `free_hint` on with refcount 0
    /// and not quarantined (past the file's end everything is free), and
    /// the first free cluster skipped because its run was too short.
    fn find_free(&mut self, n: u64) -> Result<(u64, Option<u64>)> {
        let mut start = self.free_hint;
        let mut gap = None;
        let mut c = start;
        while c < start + n && c < self.next_free {
            if self.quarantined.contains(&c) || self.refcount(c)? != 0 {
                if c > start {
                    gap = gap.or(Some(start));
                }
                start = c + 1;
            }
            c += 1;
        }
        Ok((start, gap))
    }

    /// Advances the epoch as far as finished requests allow and makes the
    /// clusters released two epochs ago reusable.
    fn reclaim(&mut self) {
        for _ in 0..2 {
            // The previous epoch's requests share the next epoch's bucket.
            if self.inflight.0[((self.epoch + 1) & 1) as usize].load(Ordering::SeqCst) != 0 {
                break;
            }
            self.epoch += 1;
        }
        while let Some(&(e, first, n)) = self.quarantine.front() {
            if e + 2 > self.epoch {
                break;
            }
            self.quarantine.pop_front();
            for c in first..first + n {
                self.quarantined.remove(&c);
            }
            self.free_hint = self.free_hint.min(first);
        }
    }

    /// Records that cluster `c` reached refcount 0.
    fn freed(&mut self, c: u64, kind: FreeKind) {
        // Were it an L2 table, its slices must not outlive it (the cluster
        // may become another table).
        self.forget_l2_table(c * self.cs);
        self.quarantined.insert(c);
        match self.quarantine.back_mut() {
            Some((e, first, n)) if *e == self.epoch && *first + *n == c => *n += 1,
            _ => self.quarantine.push_back((self.epoch, c, 1)),
        }
        if self.pass.passes(kind) {
            let off = c * self.cs;
            match self.discards.last_mut() {
                Some((o, l)) if *o + *l == off => *l += self.cs,
                _ => self.discards.push((off, self.cs)),
            }
        }
    }

    /// At the end of a request that released clusters: frees them and
    /// discards them in the file. A failure leaves them allocated, to be
    /// freed by a later write-back.
    pub fn free_and_discard(&mut self) {
        if let Err(e) = self.free_released() {
            log::debug!("qcow2: released clusters stay allocated for now: {e}");
        }
        self.process_discards();
    }

    /// Discards the freed clusters queued so far in the file, once their
    /// refcount drops are written; discards are advisory, so failures are
    /// only logged.
    pub fn process_discards(&mut self) {
        if self.discards.is_empty() {
            return;
        }
        if let Err(e) = self.write_dirty() {
            log::debug!("qcow2: freed clusters stay undiscarded: {e}");
            return;
        }
        for (off, len) in std::mem::take(&mut self.discards) {
            if let Err(e) = wait(|d| self.file.discard(off, len, d)) {
                log::debug!("qcow2: discard of freed clusters at {off:#x}+{len:#x}: {e}");
            }
        }
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
        self.sync()?;
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
            self.release(old_off, old_len * 8, FreeKind::Other)?;
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
            self.read_l2_table(l2_off)?
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
        self.forget_l2_table(l2_off);
        Ok(Some((l2_off, mappings)))
    }

    /// Drops one reference of every host cluster in `off..off+len`, once
    /// what pointed there (an L2 entry changed in the cache, a table
    /// unhooked) is written and flushed: the drop waits for the next
    /// batch or [`Meta::free_released`]. Those that reach zero become free
    /// (see the module doc).
    pub fn release(&mut self, off: u64, len: u64, kind: FreeKind) -> Result<()> {
        self.file.debug_event(Ev::ClusterFree);
        if self.lazy.is_some() {
            return self.mark_dirty();
        }
        let (first, last) = (off / self.cs, (off + len.max(1) - 1) / self.cs);
        for c in first..=last {
            if self.refcount(c)? <= self.dropped.get(&c).copied().unwrap_or(0) {
                return Err(corrupt(format!(
                    "refcount of cluster {c} would drop below zero"
                )));
            }
        }
        for c in first..=last {
            *self.dropped.entry(c).or_default() += 1;
        }
        self.drops.push((off, len, kind));
        Ok(())
    }

    /// Lowers the refcounts of released runs whose removal is on disk. A
    /// failure keeps the clusters allocated (leaked, never shared).
    fn apply_drops(&mut self, drops: Vec<Release>) {
        for (off, len, kind) in drops {
            let (first, last) = (off / self.cs, (off + len.max(1) - 1) / self.cs);
            for c in first..=last {
                if let Some(n) = self.dropped.get_mut(&c) {
                    *n -= 1;
                    if *n == 0 {
                        self.dropped.remove(&c);
                    }
                }
                let r = self.refcount(c).and_then(|rc| match rc {
                    0 => Err(corrupt(format!(
                        "refcount of cluster {c} would drop below zero"
                    ))),
                    _ => self.set_refcount(c, rc - 1).map(|()| rc),
                });
                match r {
                    Ok(1) => self.freed(c, kind),
                    Ok(_) => {}
                    Err(e) => log::error!("qcow2: cluster {c} stays allocated: {e}"),
                }
            }
        }
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
    use crate::drivers::qcow2::{check, create, read_header};
    use crate::options::BlockdevOptions;

    /// A fresh image's metadata over a file node, and the engine behind it.
    fn image(name: &str, o: create::CreateOptions) -> (Arc<crate::Engine>, Arc<Node>, Meta) {
        let dir = std::env::temp_dir().join(format!("blkfs-meta-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.qcow2").to_string_lossy().into_owned();
        create::create(&path, &o).unwrap();
        let engine = crate::Engine::new();
        let spec = serde_json::json!({"driver": "file", "node-name": "f", "filename": path});
        let file = engine
            .graph
            .add(&BlockdevOptions::from_json(spec).unwrap())
            .unwrap()
            .node;
        let h = read_header(&file).unwrap();
        let meta = Meta::load(file.clone(), &h).unwrap();
        // The open node keeps the file alive.
        std::fs::remove_dir_all(&dir).unwrap();
        (engine, file, meta)
    }

    #[test]
    fn free_cluster_search_reuses_the_lowest_run() {
        let o = create::CreateOptions {
            size: 64 << 20,
            ..Default::default()
        };
        let (_e, _f, mut m) = image("search", o);
        let cs = m.cs;
        let end = m.next_free;
        let a = m.alloc_cluster().unwrap() / cs;
        assert_eq!(a, end, "a fresh image appends");
        let b = m.alloc_clusters(3).unwrap() / cs;
        assert_eq!(b, end + 1);
        let c = m.alloc_cluster().unwrap() / cs;
        assert_eq!(c, end + 4);
        // A request planned before the release keeps the clusters quarantined.
        let t = m.start_io();
        m.release(b * cs, 3 * cs, FreeKind::Never).unwrap();
        assert_eq!(
            m.refcount(b).unwrap(),
            1,
            "freed once the removal is flushed"
        );
        m.free_released().unwrap();
        assert_eq!(m.refcount(b).unwrap(), 0);
        assert_eq!(
            m.alloc_cluster().unwrap() / cs,
            end + 5,
            "in-flight request"
        );
        drop(t);
        // Now the lowest run of two is reused; the third freed cluster stays
        // the search start.
        assert_eq!(m.alloc_clusters(2).unwrap() / cs, b);
        assert_eq!(
            m.alloc_clusters(2).unwrap() / cs,
            end + 6,
            "a one-cluster hole is too short"
        );
        assert_eq!(
            m.alloc_cluster().unwrap() / cs,
            b + 2,
            "the hole is still found"
        );
        assert_eq!(m.alloc_cluster().unwrap() / cs, end + 8);
        // Lazy refcounts: always the end.
        m.release(a * cs, cs, FreeKind::Never).unwrap();
        m.lazy = Some((0, true));
        assert_eq!(m.alloc_cluster().unwrap() / cs, end + 9);
    }

    #[test]
    fn freed_clusters_are_queued_for_discard_by_kind() {
        let o = create::CreateOptions {
            size: 64 << 20,
            ..Default::default()
        };
        let (_e, _f, mut m) = image("discard", o);
        let cs = m.cs;
        m.set_pass_discard(PassDiscard {
            request: true,
            snapshot: false,
            other: false,
        });
        let first = m.alloc_clusters(8).unwrap();
        // Adjacent frees merge into one range.
        m.release(first, cs, FreeKind::Request).unwrap();
        m.release(first + cs, cs, FreeKind::Always).unwrap();
        m.release(first + 2 * cs, cs, FreeKind::Other).unwrap();
        m.release(first + 3 * cs, cs, FreeKind::Snapshot).unwrap();
        m.release(first + 4 * cs, cs, FreeKind::Never).unwrap();
        m.release(first + 6 * cs, cs, FreeKind::Request).unwrap();
        assert!(m.discards.is_empty(), "nothing is free before the flush");
        m.free_released().unwrap();
        assert_eq!(m.discards, vec![(first, 2 * cs), (first + 6 * cs, cs)]);
        // A shared cluster is not freed by dropping one reference.
        m.set_refcount(first / cs + 7, 2).unwrap();
        m.release(first + 7 * cs, cs, FreeKind::Request).unwrap();
        m.free_released().unwrap();
        assert_eq!(m.refcount(first / cs + 7).unwrap(), 1);
        assert_eq!(m.discards.len(), 2);
        m.process_discards();
        assert!(m.discards.is_empty());
    }

    /// Random allocations and releases on an image with tiny refcount
    /// blocks (refcount blocks and a growing refcount table allocated on
    /// the way): no cluster is handed out twice or overlaps metadata, and
    /// the refcounts stay exact (check sees only the clusters we hold).
    #[test]
    fn allocations_never_overlap() {
        let o = create::CreateOptions {
            size: 64 << 20,
            cluster_bits: 9,
            refcount_order: 6,
            ..Default::default()
        };
        let (_e, file, mut m) = image("overlap", o);
        let cs = m.cs;
        let mut next = crate::testutil::xorshift(0x5EED_0FC1_A57E_1234);
        let mut held: Vec<(u64, u64)> = Vec::new();
        let mut owner = std::collections::HashMap::new();
        for _ in 0..5000 {
            if held.is_empty() || !next().is_multiple_of(3) {
                let n = 1 + next() % 4;
                let first = m.alloc_clusters(n).unwrap() / cs;
                for c in first..first + n {
                    assert!(
                        owner.insert(c, first).is_none(),
                        "cluster {c} handed out twice"
                    );
                    assert_eq!(m.refcount(c).unwrap(), 1);
                }
                held.push((first, n));
            } else {
                let (first, n) = held.swap_remove((next() % held.len() as u64) as usize);
                for c in first..first + n {
                    owner.remove(&c);
                }
                m.release(first * cs, n * cs, FreeKind::Other).unwrap();
                // Drops wait across allocations (and refcount table moves) too.
                if next().is_multiple_of(4) {
                    m.free_released().unwrap();
                }
            }
            // Nothing we hold is metadata.
            let rt = m.reftable_offset / cs;
            let rt_len = (m.reftable.len() as u64 * 8).div_ceil(cs);
            for c in rt..rt + rt_len {
                assert!(!owner.contains_key(&c), "cluster {c} of the refcount table");
            }
            for e in &m.reftable {
                assert!(!owner.contains_key(&((e & OFFSET_MASK) / cs)));
            }
        }
        assert!(m.reftable.len() > 64, "the refcount table grew");
        // Held clusters were never written: extend the file over them.
        m.free_released().unwrap();
        write_at(&file, (m.next_free - 1) * cs, &vec![0; cs as usize]).unwrap();
        wait(|d| file.flush(d)).unwrap();
        let h = read_header(&file).unwrap();
        let r = check::check(&file, &h, check::Repair::None).unwrap();
        assert_eq!(r.corruptions, 0);
        assert_eq!(
            r.leaks,
            owner.len() as u64,
            "held clusters are the only leaks"
        );
    }

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
