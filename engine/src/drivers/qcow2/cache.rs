//! Metadata cache sizing and a least-recently-used table cache.
//!
//! Sizes follow QEMU's qcow2 options (`read_cache_sizes` in block/qcow2.c):
//! `l2-cache-size` (default: enough to map the whole image, at most 32 MiB),
//! `refcount-cache-size` (default: 4 clusters), and `cache-size`, the sum of
//! both, split between them. An L2 cache too small to map the whole image
//! holds 4 KiB slices of tables instead of whole tables, as QEMU does.

use crate::error::{Error, Result};
use crate::options::Qcow2Options;
use std::collections::{BTreeMap, HashMap};

/// QEMU's default ceiling of the L2 cache (on Linux).
pub const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Fewest L2 cache entries and refcount blocks kept, whatever the options say.
const MIN_L2_ENTRIES: u64 = 2;
const MIN_REFCOUNT_BLOCKS: u64 = 4;

/// The metadata caches of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSizes {
    /// Bytes of one L2 cache entry: a whole table or a 4 KiB slice of one.
    pub l2_entry_bytes: u64,
    /// L2 cache entries.
    pub l2_entries: usize,
    /// Refcount blocks cached (one cluster each).
    pub refcount_blocks: usize,
}

impl CacheSizes {
    /// QEMU's `read_cache_sizes` and the entry counts derived from them.
    pub fn new(opts: &Qcow2Options, virtual_size: u64, cluster_size: u64) -> Result<CacheSizes> {
        let max_l2_entries = virtual_size.div_ceil(cluster_size);
        let max_l2_cache = (max_l2_entries * 8).next_multiple_of(cluster_size);
        let min_refcount_cache = MIN_REFCOUNT_BLOCKS * cluster_size;
        let l2_max_setting = opts.l2_cache_size.unwrap_or(DEFAULT_L2_CACHE_MAX);
        let mut refcount = opts.refcount_cache_size.unwrap_or(min_refcount_cache);
        let mut l2 = max_l2_cache.min(l2_max_setting);
        if let Some(combined) = opts.cache_size {
            let (l2_set, rc_set) = (
                opts.l2_cache_size.is_some(),
                opts.refcount_cache_size.is_some(),
            );
            if l2_set && rc_set {
                return Err(Error::generic(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            } else if l2_set && l2_max_setting > combined {
                return Err(Error::generic("l2-cache-size may not exceed cache-size"));
            } else if refcount > combined {
                return Err(Error::generic(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            if l2_set {
                refcount = combined - l2;
            } else if rc_set {
                l2 = combined - refcount;
            } else if combined >= max_l2_cache + min_refcount_cache {
                l2 = max_l2_cache;
                refcount = combined - l2;
            } else {
                refcount = combined.min(min_refcount_cache);
                l2 = combined - refcount;
            }
        }
        let l2_entry_bytes = if l2 < max_l2_cache {
            cluster_size.min(4096)
        } else {
            cluster_size
        };
        let l2_entries = (l2 / l2_entry_bytes).max(MIN_L2_ENTRIES);
        if l2_entries > i32::MAX as u64 {
            return Err(Error::generic("L2 cache size too big"));
        }
        let refcount_blocks = (refcount / cluster_size).max(MIN_REFCOUNT_BLOCKS);
        if refcount_blocks > i32::MAX as u64 {
            return Err(Error::generic("Refcount cache size too big"));
        }
        Ok(CacheSizes {
            l2_entry_bytes,
            l2_entries: l2_entries as usize,
            refcount_blocks: refcount_blocks as usize,
        })
    }

    /// The defaults (no options given).
    pub fn default_for(virtual_size: u64, cluster_size: u64) -> CacheSizes {
        let opts = Qcow2Options::default();
        Self::new(&opts, virtual_size, cluster_size).unwrap_or(CacheSizes {
            l2_entry_bytes: cluster_size.min(4096),
            l2_entries: MIN_L2_ENTRIES as usize,
            refcount_blocks: MIN_REFCOUNT_BLOCKS as usize,
        })
    }
}

/// A map from a table's file offset to its content, holding at most `cap`
/// entries; inserting into a full cache evicts the least recently used one.
pub struct Lru<V> {
    map: HashMap<u64, (V, u64)>,
    /// Last-use stamp -> key, oldest first.
    order: BTreeMap<u64, u64>,
    tick: u64,
    cap: usize,
}

impl<V> Lru<V> {
    pub fn new(cap: usize) -> Lru<V> {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// The entry, marked as used now.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut V> {
        let (v, stamp) = self.map.get_mut(&key)?;
        // The newest entry needs no reordering (the common run of hits).
        if *stamp != self.tick {
            self.order.remove(stamp);
            self.tick += 1;
            *stamp = self.tick;
            self.order.insert(self.tick, key);
        }
        Some(v)
    }

    /// Inserts (or replaces) an entry as the most recently used, evicting
    /// the least recently used one when the cache is full.
    /// The key the next insert of a new key would evict, if any.
    pub fn victim(&self) -> Option<u64> {
        if self.map.len() < self.cap {
            return None;
        }
        self.order.first_key_value().map(|(_, &k)| k)
    }

    pub fn insert(&mut self, key: u64, value: V) {
        self.remove(key);
        while self.map.len() >= self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&old);
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.map.insert(key, (value, self.tick));
    }

    pub fn remove(&mut self, key: u64) -> Option<V> {
        let (v, stamp) = self.map.remove(&key)?;
        self.order.remove(&stamp);
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut c = Lru::new(3);
        c.insert(1, "a");
        c.insert(2, "b");
        c.insert(3, "c");
        // Using 1 makes 2 the oldest.
        assert_eq!(c.get_mut(1), Some(&mut "a"));
        c.insert(4, "d");
        assert!(!c.contains(2));
        assert!(c.contains(1) && c.contains(3) && c.contains(4));
        assert_eq!(c.len(), 3);
        // Replacing an entry does not evict another.
        c.insert(3, "C");
        assert_eq!(c.len(), 3);
        assert_eq!(c.get_mut(3), Some(&mut "C"));
        // Now 1 is the oldest, then 4.
        c.insert(5, "e");
        assert!(!c.contains(1));
        assert_eq!(c.remove(4), Some("d"));
        assert_eq!(c.remove(4), None);
        c.insert(6, "f");
        c.insert(7, "g");
        assert_eq!(c.len(), 3);
        assert!(c.contains(6) && c.contains(7) && !c.contains(3));
        // Repeated hits on the newest entry keep the order consistent.
        for _ in 0..10 {
            c.get_mut(7);
        }
        c.insert(8, "h");
        assert!(!c.contains(5) && c.contains(7));
    }

    fn opts(l2: Option<u64>, rc: Option<u64>, all: Option<u64>) -> Qcow2Options {
        Qcow2Options {
            l2_cache_size: l2,
            refcount_cache_size: rc,
            cache_size: all,
            ..Default::default()
        }
    }

    #[test]
    fn sizes_follow_qemu() {
        let cs = 65536;
        // 1 GiB image: 128 KiB of L2 tables map it all, whole tables.
        let s = CacheSizes::new(&opts(None, None, None), 1 << 30, cs).unwrap();
        assert_eq!(
            (s.l2_entry_bytes, s.l2_entries, s.refcount_blocks),
            (cs, 2, 4)
        );
        // 100 TiB image with 2 MiB clusters: capped at 32 MiB of 4 KiB slices.
        let s = CacheSizes::new(&opts(None, None, None), 100 << 40, 2 << 20).unwrap();
        assert_eq!((s.l2_entry_bytes, s.l2_entries), (4096, 8192));
        assert_eq!(s.refcount_blocks, 4);
        // cache-size alone: L2 first, the rest to refcounts.
        let s = CacheSizes::new(&opts(None, None, Some(1 << 20)), 1 << 30, cs).unwrap();
        assert_eq!((s.l2_entries, s.refcount_blocks), (2, 14));
        // Too small for both: the refcount cache gets its minimum first.
        let s = CacheSizes::new(&opts(None, None, Some(300 << 10)), 64 << 30, cs).unwrap();
        assert_eq!(s.refcount_blocks, 4);
        assert_eq!((s.l2_entry_bytes, s.l2_entries), (4096, (300 - 256) / 4));
        let s = CacheSizes::new(&opts(Some(1 << 20), None, None), 64 << 30, cs).unwrap();
        assert_eq!((s.l2_entry_bytes, s.l2_entries), (4096, 256));
        let s = CacheSizes::new(&opts(None, Some(1 << 20), None), 1 << 30, cs).unwrap();
        assert_eq!(s.refcount_blocks, 16);
        let e = |o| CacheSizes::new(&o, 1 << 30, cs).unwrap_err().msg;
        assert_eq!(
            e(opts(Some(1), Some(1), Some(1))),
            "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
        );
        assert_eq!(
            e(opts(Some(2 << 20), None, Some(1 << 20))),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            e(opts(None, Some(2 << 20), Some(1 << 20))),
            "refcount-cache-size may not exceed cache-size"
        );
    }
}
