//! `block_resize` and `change-backing-file`: the header fields that may
//! change after open (virtual size, backing file name and format).

use super::entry::Mapping;
use super::header::{check_backing_name, check_virtual_size, l1_entries_for};
use super::meta::{read_at, write_at, FreeKind};
use super::Qcow2Driver;
use crate::drivers::wait;
use crate::error::{Error, Result};
use crate::io::Buf;
use std::sync::atomic::Ordering;

impl Qcow2Driver {
    /// Grows or shrinks the virtual size, as QEMU's qcow2_co_truncate does.
    pub(super) fn resize_image(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::generic("Cannot resize a read-only image"));
        }
        if !size.is_multiple_of(512) {
            return Err(Error::generic("The new size must be a multiple of 512"));
        }
        if !self.snapshots.is_empty() {
            return Err(Error::generic("Can't resize an image which has snapshots"));
        }
        self.refuse_if_corrupt()?;
        check_virtual_size(size, self.header.cluster_bits)
            .map_err(|e| Error::generic(format!("Failed to grow the L1 table: {}", e.msg)))?;
        let old = self.virtual_size();
        let r = if size > old {
            self.grow(old, size)
        } else if size < old {
            // New requests past the new end are refused from now on.
            self.size.store(size, Ordering::Release);
            self.shrink(size, old)
                .inspect_err(|_| self.size.store(old, Ordering::Release))
        } else {
            Ok(())
        };
        r.map_err(|e| self.signal_corruption(e))
    }

    fn grow(&self, old: u64, new: u64) -> Result<()> {
        let entries = l1_entries_for(new, self.header.cluster_bits);
        self.meta.lock().grow_l1(entries)?;
        self.zero_new_area(old, new)?;
        self.set_size(new)
    }

    /// Makes `old..new` read as zeroes before the header exposes it: the
    /// rest of the old last cluster may hold stale data (a shrink keeps
    /// that cluster) or defer to the backing file, and unallocated clusters
    /// would show a backing file longer than `old`. Past the backing file's
    /// end unallocated clusters read as zeroes already, so they stay so
    /// (QEMU zeroes them too, which costs metadata for nothing).
    fn zero_new_area(&self, old: u64, new: u64) -> Result<()> {
        let cs = self.cs;
        let backing_len = self.backing.get().map_or(0, |b| b.size());
        let head_end = old.next_multiple_of(cs).min(new);
        if head_end > old {
            let stale = match self.meta.lock().lookup(old / cs)? {
                Mapping::Unallocated => backing_len > old,
                Mapping::Zero { .. } => false,
                Mapping::Data { .. } | Mapping::Compressed { .. } => true,
            };
            if stale {
                self.write_range(old, Buf::zeroed((head_end - old) as usize))?;
            }
        }
        // Whole clusters: zero flags on v3, zeroed clusters on v2.
        let start = old.next_multiple_of(cs);
        let end = new.min(backing_len).next_multiple_of(cs);
        if end > start {
            self.zero_or_discard(start, end - start, false, true)?;
        }
        Ok(())
    }

    /// Frees every cluster mapped past the new end, then records the size.
    fn shrink(&self, new: u64, old: u64) -> Result<()> {
        let first = new.div_ceil(self.cs);
        let old_clusters = old.div_ceil(self.cs);
        let mut meta = self.meta.lock();
        let per_l2 = meta.l2_entries();
        let keep_l1 = first.div_ceil(per_l2);
        let mut freed = Vec::new();
        let mut tables = Vec::new();
        // The L2 table the new end falls in keeps its entries below the end.
        for c in first..(keep_l1 * per_l2).min(old_clusters) {
            let m = meta.lookup(c)?;
            if m != Mapping::Unallocated {
                meta.set_l2(c, 0)?;
                freed.push(m);
            }
        }
        // Tables wholly past the end are unhooked from L1.
        for idx in keep_l1..meta.l1_len() {
            if let Some((l2, maps)) = meta.clear_l1(idx)? {
                tables.push(l2);
                freed.extend(maps);
            }
        }
        // Nothing may point to a cluster once its refcount drops.
        meta.sync()?;
        for m in freed {
            super::check_free(meta.overlap(), m, self.cs)?;
            self.release_old(&mut meta, m, false, FreeKind::Always)?;
        }
        for t in tables {
            meta.release(t, self.cs, FreeKind::Always)?;
        }
        meta.free_and_discard();
        drop(meta);
        self.set_size(new)
    }

    /// Writes the virtual size into the header once everything it exposes
    /// is on disk.
    fn set_size(&self, size: u64) -> Result<()> {
        self.meta.lock().sync()?;
        let _meta = self.meta.lock();
        write_at(&self.file, 24, &size.to_be_bytes())?;
        wait(|d| self.file.flush(d))?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Rewrites the backing file name and format in the first cluster. A
    /// backing image's node is read-only: the header then goes through a
    /// short-lived read-write descriptor of the same file.
    pub(super) fn rewrite_backing(&self, name: &str, format: Option<&str>) -> Result<()> {
        if !name.is_empty() {
            check_backing_name(name)?;
        }
        self.refuse_if_corrupt()?;
        // Header writes (dirty bit, size) are made under the metadata lock.
        let _meta = self.meta.lock();
        let len = self.cs.min(self.file.size()) as usize;
        let mut first = read_at(&self.file, 0, len)?.to_vec();
        first.resize(self.cs as usize, 0);
        let out = self.header.with_backing(&first, name, format)?;
        if self.file.opts.read_only {
            self.file.driver.write_through(0, &out)?;
        } else {
            write_at(&self.file, 0, &out)?;
            wait(|d| self.file.flush(d))?;
        }
        *self.backing_name.lock() = if name.is_empty() {
            (None, None)
        } else {
            (Some(name.to_string()), format.map(str::to_string))
        };
        Ok(())
    }
}
