//! The qcow2 format.
//!
//! - [`header`]: header and extensions, validated at open.
//! - [`entry`]: L1/L2 entry decoding into a [`entry::Mapping`].
//! - [`meta`]: cached tables, refcounts, allocation, update ordering.
//! - [`overlap`]: where the metadata is, so every write is checked against
//!   it first (`overlap-check`).
//! - `resize`: `block_resize` and `change-backing-file`.
//! - this module: the driver; it turns a guest range into a plan of
//!   segments (`super::segments`) and does the data I/O outside the
//!   metadata lock.
//!
//! Requests whose clusters are all allocated and owned (the common case
//! once an image is in use) go straight to the file node with the caller's
//! buffer. Everything else (allocation, copy-on-write, compressed data,
//! backing reads) takes the slow path; allocating writes are serialised.

pub mod cache;
pub mod check;
pub mod create;
pub mod entry;
pub mod header;
pub mod meta;
pub mod overlap;
mod resize;
pub mod snapshot;
pub mod writeback;

use super::aes_legacy::{self, Cipher, Key};
use super::deflate;
use super::join::Join;
use super::segments;
use super::{wait, Done, Driver, Encryption, Extent, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::{BlkdebugEvent as Ev, OverlapMode, Qcow2Options};
use entry::{Mapping, COPIED, ZERO};
use header::Header;
use meta::{corrupt, read_at, write_at, FreeKind, IoTicket, Meta, PassDiscard};
use overlap::Overlap;
use parking_lot::{Condvar, Mutex};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a thread that reaps its own ring waits for the metadata lock
/// before it hands its request to a thread that may wait (`checked_plan`).
const LOCAL_LOCK_WAIT: Duration = Duration::from_micros(50);

pub struct Qcow2Driver {
    file: Arc<Node>,
    backing: crate::drivers::backing::Slot,
    header: Header,
    /// The virtual size (`header.size` at open; `block_resize` changes it).
    size: AtomicU64,
    /// The backing file name and format the header records now
    /// (`change-backing-file` rewrites them).
    backing_name: Mutex<(Option<String>, Option<String>)>,
    meta: Mutex<Meta>,
    /// Guest clusters whose mapping a request is changing; others wait.
    claims: Mutex<HashSet<u64>>,
    released: Condvar,
    /// Signalled when a batch of metadata changes has been written.
    committed: Condvar,
    /// See [`Driver::defer_metadata`].
    deferred: AtomicBool,
    cs: u64,
    read_only: bool,
    snapshots: Vec<snapshot::Snapshot>,
    /// Set once corruption was found: the corrupt bit is on disk and writes are refused.
    corrupt: AtomicBool,
    /// Legacy AES (crypt_method 1): data clusters are encrypted.
    key: Key,
}

type Segment = segments::Segment<Mapping>;
type Segments = segments::Segments<Mapping>;

/// Reads and validates the header of the image in `file`.
pub fn read_header(file: &Node) -> Result<Header> {
    let size = file.size();
    let head = read_at(file, 0, size.min(2 << 20) as usize)?;
    Header::parse(&head, size)
}

impl Qcow2Driver {
    pub fn open(
        file: Arc<Node>,
        mut header: Header,
        backing: Option<Arc<Node>>,
        opts: &Qcow2Options,
        read_only: bool,
        unmap: bool,
    ) -> Result<Self> {
        let sizes = cache::CacheSizes::new(opts, header.size, header.cluster_size())?;
        if !read_only {
            if header.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::generic(
                    "qcow2: the image is marked corrupt; it can be opened read-only, or repaired with 'qemu-img check -r all'",
                ));
            }
            if header.incompatible & header::INCOMPAT_DIRTY != 0 {
                // Refcounts may be stale (lazy refcounts): rebuild them, then clear the bit.
                let r = check::check(&file, &header, check::Repair::All)?;
                log::info!(
                    "{}: dirty image repaired ({} refcount errors and {} leaks fixed)",
                    file.driver.filename(),
                    r.corruptions_fixed,
                    r.leaks_fixed
                );
                let bits = header.incompatible & !header::INCOMPAT_DIRTY;
                write_at(&file, 72, &bits.to_be_bytes())?;
                wait(|d| file.flush(d))?;
                header.incompatible = bits;
            }
            if header.version >= 3 && header.autoclear != 0 {
                // Features we do not maintain (e.g. bitmaps) become inconsistent once we write.
                write_at(&file, 88, &0u64.to_be_bytes())?;
            }
        }
        let mut meta = Meta::load(file.clone(), &header)?;
        meta.set_cache_sizes(sizes);
        // QEMU's defaults: guest requests pass when the node unmaps.
        meta.set_pass_discard(PassDiscard {
            request: opts.pass_discard_request.unwrap_or(unmap),
            snapshot: opts.pass_discard_snapshot.unwrap_or(true),
            other: opts.pass_discard_other.unwrap_or(false),
        });
        let lazy = header.version >= 3
            && opts
                .lazy_refcounts
                .unwrap_or(header.compatible & header::COMPAT_LAZY_REFCOUNTS != 0);
        if opts.lazy_refcounts == Some(true) && header.version < 3 {
            return Err(Error::generic(
                "qcow2: lazy-refcounts needs a compat=1.1 (version 3) image",
            ));
        }
        if lazy && !read_only {
            meta.set_lazy(&header);
        }
        let snapshots = snapshot::read_table(&file, &header)?;
        if !read_only {
            let checks = opts.overlap_check.unwrap_or(OverlapMode::Cached.mask());
            let mut ov = Overlap::new(checks, header.cluster_bits);
            ov.add_snapshots(&file, &header, &snapshots)?;
            meta.set_overlap(ov);
        }
        let key = Key::new(header.crypt_method == 1);
        Ok(Qcow2Driver {
            cs: header.cluster_size(),
            size: AtomicU64::new(header.size),
            backing_name: Mutex::new((header.backing_file.clone(), header.backing_format.clone())),
            file,
            backing: crate::drivers::backing::Slot::new(backing),
            header,
            meta: Mutex::new(meta),
            claims: Mutex::new(HashSet::new()),
            released: Condvar::new(),
            committed: Condvar::new(),
            deferred: AtomicBool::new(false),
            read_only,
            snapshots,
            corrupt: AtomicBool::new(false),
            key,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// On the first corruption found: set the corrupt bit (v3) so no tool
    /// writes the image before it is repaired, and refuse writes from now on.
    /// Later ones are plain EIO: as QEMU says, further corruption events
    /// (BLOCK_IMAGE_CORRUPTED, raised for `Corrupt` errors) are suppressed.
    fn signal_corruption(&self, e: Error) -> Error {
        if e.kind != crate::error::ErrorKind::Corrupt {
            return e;
        }
        if self.corrupt.swap(true, Ordering::SeqCst) {
            return Error::io(libc::EIO, e.msg);
        }
        log::error!(
            "{}: qcow2: Marking image as corrupt: {e}; further corruption events will be suppressed",
            self.file.driver.filename()
        );
        if !self.read_only && self.header.version >= 3 {
            let bits = self.header.incompatible | header::INCOMPAT_CORRUPT;
            if let Err(w) = write_at(&self.file, 72, &bits.to_be_bytes()) {
                log::error!("cannot set the corrupt bit: {w}");
            }
        }
        e
    }

    fn refuse_if_corrupt(&self) -> Result<()> {
        if self.corrupt.load(Ordering::SeqCst) {
            return Err(Error::io(
                libc::EIO,
                "qcow2 image is marked corrupt: writes are refused",
            ));
        }
        Ok(())
    }

    /// The plan of a data request, recording corruption it finds, with the
    /// ticket that keeps the clusters it maps from being reused until the
    /// request is done.
    /// For a write (`write`), when the range is one owned data run (the
    /// fast path writes it in place), that host range is checked for
    /// metadata overlaps under the same lock.
    ///
    /// None on a thread that reaps its own ring ([`crate::io::on_local_ring`])
    /// when the plan would wait there; the caller then hands the request to
    /// a thread that may wait. The lock's holder may be waiting for a
    /// read-modify-write of metadata, which waits for the aligned data
    /// writes in flight on that very ring; an L2 slice not in the cache is
    /// read, and may evict (write back) another; a corruption found is
    /// recorded with a header write.
    fn checked_plan(
        &self,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<Option<(Segments, IoTicket)>> {
        if crate::io::on_local_ring() {
            return Ok(self.plan_at_once(offset, len, write));
        }
        let meta = self.meta.lock();
        self.plan_locked(meta, offset, len, write)
            .map(Some)
            .map_err(|e| self.signal_corruption(e))
    }

    /// The plan, where it needs no wait: the metadata lock taken at once
    /// (within [`LOCAL_LOCK_WAIT`]), the range's L2 slices cached and no
    /// corruption found (that is recorded by a plan that may wait).
    fn plan_at_once(&self, offset: u64, len: usize, write: bool) -> Option<(Segments, IoTicket)> {
        let meta = self.meta.try_lock_for(LOCAL_LOCK_WAIT)?;
        let first = offset / self.cs;
        let end = (offset + len as u64).div_ceil(self.cs);
        if !meta.cached(first, end - first) {
            return None;
        }
        self.plan_locked(meta, offset, len, write).ok()
    }

    fn plan_locked(
        &self,
        mut meta: parking_lot::MutexGuard<'_, Meta>,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<(Segments, IoTicket)> {
        let r = segments::plan(offset, len, self.cs, usize::MAX, |c| meta.lookup_run(c)).and_then(
            |segs| {
                if let (
                    true,
                    [Segment {
                        map: Mapping::Data { host, copied: true },
                        ..
                    }],
                ) = (write, &segs[..])
                {
                    meta.overlap().check(overlap::NEW, *host, len as u64)?;
                }
                Ok((segs, meta.start_io()))
            },
        );
        drop(meta);
        r
    }

    /// The segments of `offset..offset+len`, adjacent clusters merged when
    /// they map alike (and contiguously, for data); stops once `max`
    /// segments are complete.
    fn plan_upto(&self, offset: u64, len: usize, max: usize) -> Result<Segments> {
        let mut meta = self.meta.lock();
        segments::plan(offset, len, self.cs, max, |c| meta.lookup_run(c))
    }

    /// Reads one compressed cluster, whole.
    fn read_compressed(&self, host: u64, len: u64) -> Result<Buf> {
        if self.key.is_encrypted() {
            return Err(corrupt("compressed cluster in an encrypted image"));
        }
        self.file.debug_event(Ev::ReadCompressed);
        deflate::read_compressed(&self.file, host, len, self.cs, |raw, out| {
            match self.header.compression_type {
                0 => deflate::inflate(raw, out).map_err(corrupt),
                _ => unzstd(raw, out),
            }
        })
    }

    /// Reads a data cluster's bytes, decrypting them when the image is encrypted.
    fn read_data(
        &self,
        cipher: &Option<Arc<Cipher>>,
        guest: u64,
        host: u64,
        buf: Buf,
        done: Done<Buf>,
    ) {
        self.file.debug_event(Ev::ReadAio);
        match cipher {
            Some(c) => aes_legacy::read_decrypted(&self.file, c.clone(), guest, host, buf, done),
            None => self.file.read(host, buf, done),
        }
    }

    /// Reads the guest range from the backing chain (zeroes past its end).
    fn read_backing(&self, guest: u64, buf: Buf, done: Done<Buf>) {
        if self.backing.is_some() {
            self.file.debug_event(Ev::ReadBackingAio);
        }
        self.backing.read(guest, buf, done)
    }

    /// Writes the metadata changes made so far (this request's among
    /// them) before the request completes. One caller at a time writes
    /// everything pending, outside the metadata lock; the others whose
    /// changes its batch carries wait for it: concurrent allocating
    /// requests share their L2 and refcount writes.
    fn commit(&self) -> Result<()> {
        let mut meta = self.meta.lock();
        let target = meta.changes();
        loop {
            match meta.commit_state(target) {
                meta::Commit::Written => return Ok(()),
                meta::Commit::Failed(e) => return Err(e),
                meta::Commit::Busy => self.committed.wait(&mut meta),
                meta::Commit::Idle => {
                    let Some(batch) = meta.start_batch()? else {
                        continue;
                    };
                    let io = batch.io.clone();
                    let mut outcome = io.lock();
                    drop(meta);
                    let r = writeback::write_all(&self.file, batch.writes, batch.flush);
                    *outcome = Some((batch.changes, r));
                    drop(outcome);
                    meta = self.meta.lock();
                    meta.settle_batch();
                    self.committed.notify_all();
                }
            }
        }
    }

    /// A request's metadata on disk before it completes, unless deferred.
    fn request_done(&self) -> Result<()> {
        if self.deferred.load(Ordering::Acquire) {
            return Ok(());
        }
        self.commit()
    }

    /// Waits until no other request changes `cluster`, then holds it.
    fn claim(&self, cluster: u64) -> Claim<'_> {
        let mut claims = self.claims.lock();
        while claims.contains(&cluster) {
            self.released.wait(&mut claims);
        }
        claims.insert(cluster);
        Claim {
            driver: self,
            cluster,
        }
    }

    /// Writes one guest cluster's piece through allocation: the slow path.
    /// Runs on a worker thread, with the cluster claimed; the data I/O
    /// happens outside the metadata lock.
    fn write_allocating(&self, guest: u64, data: &[u8]) -> Result<()> {
        let cluster = guest / self.cs;
        let _claim = self.claim(cluster);
        let in_cluster = (guest % self.cs) as usize;
        let cipher = self.key.cipher()?;
        let old = {
            let mut meta = self.meta.lock();
            let old = meta.lookup(cluster)?;
            match old {
                Mapping::Data { host, copied: true } => {
                    let at = host + in_cluster as u64;
                    meta.overlap().check(overlap::NEW, at, data.len() as u64)?
                }
                // Rewritten in place below.
                Mapping::Zero {
                    host: Some(_),
                    copied: true,
                } => {}
                // Released once the new cluster is in place: refuse before anything is written.
                m => check_free(meta.overlap(), m, self.cs)?,
            }
            old
        };
        if let Mapping::Data { host, copied: true } = old {
            self.file.debug_event(Ev::WriteAio);
            let host = host + in_cluster as u64;
            return match &cipher {
                Some(c) => aes_legacy::write_encrypted(&self.file, c, guest, host, data),
                None => write_at(&self.file, host, data),
            };
        }
        let base = cluster * self.cs;
        let full = data.len() == self.cs as usize;
        // The cluster's new content: old data (from wherever it lives) with the write on top.
        let mut content = if full {
            Buf::zeroed(0)
        } else {
            self.file.debug_event(Ev::CowRead);
            match old {
                Mapping::Unallocated => {
                    let len = self.cs.min(self.virtual_size() - base) as usize;
                    let mut b = Buf::zeroed(self.cs as usize);
                    let src = wait(|d| self.read_backing(base, Buf::zeroed(len), d))?;
                    b[..len].copy_from_slice(&src);
                    b
                }
                Mapping::Zero { .. } => Buf::zeroed(self.cs as usize),
                Mapping::Compressed { host, len } => self.read_compressed(host, len)?,
                Mapping::Data { host, .. } => {
                    let mut b = read_at(&self.file, host, self.cs as usize)?;
                    if let Some(c) = &cipher {
                        c.decrypt(base, &mut b);
                    }
                    b
                }
            }
        };
        if !full {
            content[in_cluster..in_cluster + data.len()].copy_from_slice(data);
        }
        // Encrypted: the whole cluster (copied-on-write data included) in a scratch buffer.
        if let Some(c) = &cipher {
            if full {
                content = Buf::from_slice(data);
            }
            c.encrypt(base, &mut content);
        }
        let payload: &[u8] = if full && cipher.is_none() {
            data
        } else {
            &content
        };
        let reuse = match old {
            Mapping::Zero {
                host: Some(h),
                copied: true,
            } => Some(h),
            _ => None,
        };
        let host = {
            let mut meta = self.meta.lock();
            let host = match reuse {
                Some(h) => h,
                None => meta.alloc_cluster()?,
            };
            meta.overlap()
                .check(overlap::NEW, host, payload.len() as u64)?;
            host
        };
        // Data first, then the mapping, then the old cluster's release.
        if !full {
            self.file.debug_event(Ev::CowWrite);
        }
        self.file.debug_event(Ev::WriteAio);
        write_at(&self.file, host, payload)?;
        let mut meta = self.meta.lock();
        meta.set_l2(cluster, host | COPIED)?;
        // As QEMU: copy-on-write releases are not discarded (soon reused).
        self.release_old(&mut meta, old, reuse.is_some(), FreeKind::Never)?;
        content.truncate(0);
        Ok(())
    }

    /// Synchronous write of a guest range: runs of whole clusters that
    /// need new ones at once, the rest cluster by cluster. A request that
    /// is one such run goes to the file in its own buffer, without a copy.
    fn write_range(&self, offset: u64, buf: Buf) -> Result<Buf> {
        let mut at = 0;
        while at < buf.len() {
            let guest = offset + at as u64;
            if guest.is_multiple_of(self.cs) {
                let whole = (buf.len() - at) as u64 / self.cs;
                if let Some(run) = self.new_run(guest, whole)? {
                    let len = (run.n * self.cs) as usize;
                    self.file.debug_event(Ev::WriteAio);
                    // Data first, then the mapping.
                    if at == 0 && len == buf.len() {
                        let buf = wait(|d| self.file.write(run.host, buf, d))?;
                        self.map_run(run)?;
                        return Ok(buf);
                    }
                    write_at(&self.file, run.host, &buf[at..at + len])?;
                    self.map_run(run)?;
                    at += len;
                    continue;
                }
            }
            let n = ((self.cs - guest % self.cs) as usize).min(buf.len() - at);
            self.write_allocating(guest, &buf[at..at + n])?;
            at += n;
        }
        Ok(buf)
    }

    /// Points a run's clusters at its new host clusters (after its data).
    fn map_run(&self, run: NewRun) -> Result<()> {
        let entries: Vec<u64> = (0..run.n)
            .map(|i| (run.host + i * self.cs) | COPIED)
            .collect();
        self.meta.lock().set_l2_run(run.first, &entries)
    }

    /// Claims and allocates up to `clusters` whole clusters from `guest` on
    /// that map nowhere yet (unallocated, or zero without a cluster), as
    /// one new contiguous run: one allocation, one data write, one L2
    /// update instead of one of each per cluster. None when fewer than two
    /// such clusters start the range (or the image is encrypted): the
    /// caller goes one by one.
    fn new_run(&self, guest: u64, clusters: u64) -> Result<Option<NewRun<'_>>> {
        /// Most clusters claimed at once.
        const MAX_RUN: u64 = 256;
        let first = guest / self.cs;
        let max = clusters.min(MAX_RUN);
        if max < 2 || self.key.is_encrypted() {
            return Ok(None);
        }
        // Ascending, like every claimer of more than one: no deadlock.
        let claims: Vec<Claim> = (first..first + max).map(|c| self.claim(c)).collect();
        let mut meta = self.meta.lock();
        let mut n = 0;
        while n < max {
            match meta.lookup(first + n)? {
                Mapping::Unallocated | Mapping::Zero { host: None, .. } => n += 1,
                _ => break,
            }
        }
        if n < 2 {
            return Ok(None);
        }
        let host = meta.alloc_clusters(n)?;
        meta.overlap().check(overlap::NEW, host, n * self.cs)?;
        Ok(Some(NewRun {
            first,
            host,
            n,
            _claims: claims,
        }))
    }

    /// Drops the reference an L2 entry held, once nothing points there.
    /// The caller has refused a mapping into metadata ([`check_free`])
    /// before the entry changed.
    fn release_old(
        &self,
        meta: &mut Meta,
        old: Mapping,
        reused: bool,
        kind: FreeKind,
    ) -> Result<()> {
        match old {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } if !reused => meta.release(host, self.cs, kind),
            Mapping::Compressed { host, len } => meta.release(host, len, kind),
            _ => Ok(()),
        }
    }

    /// Sets whole clusters to `entry` (zero flag or unallocated). With
    /// `keep`, clusters with data keep their host cluster under the zero
    /// flag (QEMU's zero write without unmap); others are released as
    /// guest requests.
    fn remap_clusters(&self, offset: u64, len: u64, entry: u64, keep: bool) -> Result<()> {
        let r = self.remap_each(offset, len, entry, keep);
        self.meta.lock().free_and_discard();
        r
    }

    fn remap_each(&self, offset: u64, len: u64, entry: u64, keep: bool) -> Result<()> {
        for c in offset / self.cs..(offset + len) / self.cs {
            let _claim = self.claim(c);
            let mut meta = self.meta.lock();
            let old = meta.lookup(c)?;
            let new = match old {
                Mapping::Unallocated if entry == 0 => continue,
                Mapping::Zero { host: None, .. } if entry == ZERO => continue,
                Mapping::Zero { host: Some(_), .. } if keep => continue,
                Mapping::Data { host, copied } if keep => {
                    host | ZERO | if copied { COPIED } else { 0 }
                }
                _ => entry,
            };
            // Refused before the L2 entry changes: a mapping into metadata is
            // neither released nor kept under the zero flag (a later write
            // would reuse it).
            check_free(meta.overlap(), old, self.cs)?;
            meta.set_l2(c, new)?;
            if new == entry {
                self.release_old(&mut meta, old, false, FreeKind::Request)?;
            }
        }
        Ok(())
    }

    /// Whether the cluster holding `guest` reads as zeroes already, so a
    /// partial zero write there need not allocate it.
    fn reads_as_zero(&self, guest: u64) -> Result<bool> {
        let cluster = guest / self.cs;
        Ok(match self.meta.lock().lookup(cluster)? {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self
                .backing
                .get()
                .is_none_or(|b| b.size() <= cluster * self.cs),
            _ => false,
        })
    }

    /// A zero write with unmap over part of a cluster of ours whose rest
    /// reads as zeroes already frees the whole cluster (a big request split
    /// at unaligned places would otherwise keep its edge clusters).
    /// Returns whether it did. Only done with no data request in flight
    /// (a write to the rest of the cluster, which takes no claim, would be
    /// lost), checked and done under the metadata lock so none starts.
    fn unmap_edge(&self, guest: u64, len: u64) -> Result<bool> {
        let v3 = self.header.version >= 3;
        if self.key.is_encrypted() || (!v3 && self.backing.is_some()) {
            return Ok(false);
        }
        let cluster = guest / self.cs;
        let _claim = self.claim(cluster);
        let mut meta = self.meta.lock();
        if !meta.idle() {
            return Ok(false);
        }
        let old = meta.lookup(cluster)?;
        let Mapping::Data { host, copied: true } = old else {
            return Ok(false);
        };
        check_free(meta.overlap(), old, self.cs)?;
        let data = read_at(&self.file, host, self.cs as usize)?;
        let at = (guest % self.cs) as usize;
        if !(data[..at].iter().all(|&b| b == 0)
            && data[at + len as usize..].iter().all(|&b| b == 0))
        {
            return Ok(false);
        }
        meta.set_l2(cluster, if v3 { ZERO } else { 0 })?;
        self.release_old(&mut meta, old, false, FreeKind::Request)?;
        meta.free_and_discard();
        Ok(true)
    }

    /// Zeroes or discards on a worker: metadata changes wait for I/O, and
    /// the submitting thread (a FUSE reader) must not.
    fn remap_later(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        discard: bool,
        unmap: bool,
        done: Done<()>,
    ) {
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            let r = me
                .refuse_if_corrupt()
                .and_then(|()| me.key.cipher())
                .and_then(|_| me.zero_or_discard(offset, len, discard, unmap))
                .and_then(|()| me.request_done());
            done(r.map_err(|e| me.signal_corruption(e)))
        });
    }

    /// Zeroes or discards: whole clusters are remapped, the edges written
    /// unless they already read as zeroes. A zero write without `unmap`
    /// keeps the clusters allocated (v3).
    fn zero_or_discard(&self, offset: u64, len: u64, discard: bool, unmap: bool) -> Result<()> {
        let v3 = self.header.version >= 3;
        let start = offset.next_multiple_of(self.cs).min(offset + len);
        let end = ((offset + len) / self.cs * self.cs).max(start);
        if discard && !v3 && self.backing.is_some() {
            // Unallocating would expose the backing file; discard is only a hint.
            return Ok(());
        }
        if !discard {
            for (o, l) in [(offset, start - offset), (end, offset + len - end)] {
                if l > 0 && !self.reads_as_zero(o)? && !(unmap && self.unmap_edge(o, l)?) {
                    self.write_range(o, Buf::zeroed(l as usize))?;
                }
            }
        }
        if end > start {
            if v3 {
                self.remap_clusters(start, end - start, ZERO, !discard && !unmap)?;
            } else if !self.backing.is_some() {
                self.remap_clusters(start, end - start, 0, false)?;
            } else {
                let mut o = start;
                while o < end {
                    let n = (end - o).min(1 << 20);
                    self.write_range(o, Buf::zeroed(n as usize))?;
                    o += n;
                }
            }
        }
        Ok(())
    }
}

impl Driver for Arc<Qcow2Driver> {
    fn defer_metadata(&self, on: bool) {
        self.deferred.store(on, Ordering::Release);
    }

    fn commit_metadata(&self, done: Done<()>) {
        if !self.meta.lock().pending() {
            return done(Ok(()));
        }
        // It waits for metadata writes: never on the caller's thread, which
        // may be an I/O completion.
        let me = self.clone();
        crate::io::spawn_blocking(move || done(me.commit()));
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.virtual_size()
    }

    /// A range within one run of allocated clusters (owned, for a write) of
    /// an unencrypted image, as `read` and `write` send it to the file, or
    /// a read of unallocated clusters within the backing file's size.
    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<Extent> {
        if self.key.is_encrypted() || (write && self.refuse_if_corrupt().is_err()) {
            return None;
        }
        let (segs, ticket) = self.plan_at_once(offset, len as usize, write)?;
        let [seg] = segs[..] else {
            return None;
        };
        match seg.map {
            Mapping::Data { host, copied } if copied || !write => {
                let mut extent = self.file.direct_extent(host, len, write)?;
                extent.ticket = Some(ticket);
                Some(extent)
            }
            // No host cluster of this image to keep: no ticket.
            Mapping::Unallocated if !write => {
                let backing = self.backing.get()?;
                if offset + len > backing.size() {
                    return None;
                }
                backing.direct_extent(offset, len, false)
            }
            _ => None,
        }
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let cipher = match self.key.cipher() {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        let (segs, ticket) = match self.checked_plan(offset, buf.len(), false) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let me = self.clone();
                return crate::io::spawn_blocking(move || me.read(offset, buf, done));
            }
            Err(e) => return done(Err(e)),
        };
        let done = holding(ticket, done);
        // One segment (the common case): no gathering, the caller's buffer goes down.
        if let [seg] = segs[..] {
            match seg.map {
                Mapping::Data { host, .. } => {
                    return self.read_data(&cipher, offset, host, buf, done)
                }
                Mapping::Unallocated => return self.read_backing(offset, buf, done),
                Mapping::Zero { .. } => {
                    let mut buf = buf;
                    buf.fill(0);
                    return done(Ok(buf));
                }
                Mapping::Compressed { .. } => {}
            }
        }
        let join = Join::new(buf, segs.len(), done);
        for s in segs {
            let piece = Buf::recycled(s.len);
            let j = join.clone();
            let fill: Done<Buf> = Box::new(move |r| j.fill(s.at, r));
            match s.map {
                Mapping::Data { host, .. } => self.read_data(&cipher, s.guest, host, piece, fill),
                Mapping::Zero { .. } => fill(Ok(Buf::zeroed(s.len))),
                Mapping::Unallocated => self.read_backing(s.guest, piece, fill),
                Mapping::Compressed { host, len } => {
                    let at = (s.guest % self.cs) as usize;
                    fill(
                        self.read_compressed(host, len)
                            .map(|c| Buf::from_slice(&c[at..at + s.len])),
                    )
                }
            }
        }
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let cipher = match self.refuse_if_corrupt().and_then(|()| self.key.cipher()) {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        let (segs, ticket) = match self.checked_plan(offset, buf.len(), true) {
            Ok(Some(s)) => s,
            Ok(None) => {
                let me = self.clone();
                return crate::io::spawn_blocking(move || me.write(offset, buf, done));
            }
            Err(e) => return done(Err(e)),
        };
        if let [Segment {
            map: Mapping::Data { host, copied: true },
            ..
        }] = segs[..]
        {
            self.file.debug_event(Ev::WriteAio);
            match cipher {
                None => return self.file.write(host, buf, holding(ticket, done)),
                Some(c) if aes_legacy::whole_sectors(offset, buf.len()) => {
                    let done = holding(ticket, done);
                    return aes_legacy::write_sectors(&self.file, &c, offset, host, buf, done);
                }
                Some(_) => {}
            }
        }
        // The slow path looks its clusters up again under their claims.
        drop(ticket);
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            let r = me
                .write_range(offset, buf)
                .and_then(|b| me.request_done().map(|()| b));
            done(r.map_err(|e| me.signal_corruption(e)));
        });
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        self.remap_later(offset, len, false, unmap, done)
    }

    fn discard(&self, offset: u64, len: u64, done: Done<()>) {
        self.remap_later(offset, len, true, true, done)
    }

    /// Metadata changes still pending (of requests in flight, which other
    /// writes may already rely on) are written before the file is flushed,
    /// and released clusters freed.
    fn flush(&self, done: Done<()>) {
        let idle = {
            let meta = self.meta.lock();
            !meta.pending() && !meta.releasing()
        };
        if idle {
            return self.file.flush(done);
        }
        // Everything pending is written again, a failed batch's too.
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            // Not in the match: the metadata lock would be held through the
            // flush, whose completion may run inline and read this image.
            let r = me.meta.lock().free_released();
            match r {
                Ok(()) => me.file.flush(done),
                Err(e) => done(Err(e)),
            }
        });
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        super::segments::block_status(
            self.virtual_size(),
            offset,
            len,
            self.backing.is_some(),
            self.key.is_encrypted(),
            |len| self.plan_upto(offset, len.min(1 << 40) as usize, 1),
        )
    }

    fn file_child(&self) -> Option<&Arc<Node>> {
        Some(&self.file)
    }

    fn encryption(&self) -> Encryption {
        self.key.encryption()
    }

    fn set_password(&self, password: &str) -> Result<()> {
        self.key.set_password(password)
    }

    fn backing_child(&self) -> Option<Arc<Node>> {
        self.backing.get()
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        self.backing.set(backing);
        Ok(())
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.resize_image(size)
    }

    fn backing_file_name(&self) -> Option<String> {
        self.backing_name.lock().0.clone()
    }

    fn change_backing_file(&self, name: &str, format: Option<&str>) -> Result<()> {
        self.rewrite_backing(name, format)
    }

    /// Lazy refcounts: rebuild them and clear the dirty bit on a clean close.
    fn close(&self) -> Result<()> {
        let mut meta = self.meta.lock();
        meta.free_released()?;
        if !meta.is_lazy() || self.read_only {
            return Ok(());
        }
        let mut header = read_header(&self.file)?;
        if header.incompatible & header::INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        check::check(&self.file, &header, check::Repair::All)?;
        header.incompatible &= !header::INCOMPAT_DIRTY;
        write_at(&self.file, 72, &header.incompatible.to_be_bytes())?;
        wait(|d| self.file.flush(d))
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        use serde_json::json;
        let h = &self.header;
        v["cluster-size"] = json!(self.cs);
        if self.key.is_encrypted() {
            v["encrypted"] = json!(true);
        }
        v["dirty-flag"] = json!(h.incompatible & header::INCOMPAT_DIRTY != 0);
        let mut specific = json!({"compat": if h.version >= 3 { "1.1" } else { "0.10" }});
        if h.version >= 3 {
            specific["lazy-refcounts"] = json!(h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0);
        }
        v["format-specific"] = json!({"type": "qcow2", "data": specific});
        let (name, format) = &*self.backing_name.lock();
        if let Some(b) = name {
            v["backing-filename"] = json!(b);
        }
        if let Some(f) = format {
            v["backing-filename-format"] = json!(f);
        }
        if !self.snapshots.is_empty() {
            v["snapshots"] = self.snapshots.iter().map(|s| s.to_json()).collect();
        }
    }
}

/// A mapping's host clusters are about to lose the reference it held: they
/// must not be metadata (a corrupt L2 entry pointing into a table would
/// otherwise free the table, and the next allocation overwrite it).
fn check_free(ov: &Overlap, m: Mapping, cs: u64) -> Result<()> {
    match m {
        Mapping::Data { host, .. }
        | Mapping::Zero {
            host: Some(host), ..
        } => ov.check_op(overlap::Op::Free, host, cs),
        Mapping::Compressed { host, len } => ov.check_op(overlap::Op::Free, host, len),
        Mapping::Zero { host: None, .. } | Mapping::Unallocated => Ok(()),
    }
}

/// `done`, keeping `ticket` until the request completes.
fn holding(ticket: IoTicket, done: Done<Buf>) -> Done<Buf> {
    Box::new(move |r| {
        drop(ticket);
        done(r)
    })
}

/// A claimed guest cluster, released (and waiters woken) on drop.
/// Guest clusters claimed and given new host clusters, not mapped yet.
struct NewRun<'a> {
    first: u64,
    host: u64,
    n: u64,
    /// Held until the mapping is written.
    _claims: Vec<Claim<'a>>,
}

struct Claim<'a> {
    driver: &'a Qcow2Driver,
    cluster: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.driver.claims.lock().remove(&self.cluster);
        self.driver.released.notify_all();
    }
}

/// A zstd frame (followed by padding up to the sector).
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<()> {
    use std::io::Read;
    let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
        .map_err(|e| corrupt(format!("bad zstd frame in a compressed cluster: {e}")))?;
    dec.read_exact(out).map_err(|e| {
        corrupt(format!(
            "compressed cluster does not inflate to a cluster: {e}"
        ))
    })
}
