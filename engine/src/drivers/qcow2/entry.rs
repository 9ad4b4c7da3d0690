//! L1/L2 entry encoding.

use crate::drivers::segments::{ClusterMapping, LayerStatus};

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the backing file (or zeroes) answers.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64>, copied: bool },
    /// Data at a host cluster; `copied` means its refcount is exactly one.
    Data { host: u64, copied: bool },
    /// Compressed data: `len` bytes at `host` (an upper bound, in sectors).
    Compressed { host: u64, len: u64 },
}

impl Mapping {
    pub fn decode(e: u64, cluster_bits: u32, v3: bool) -> Mapping {
        if e & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = ((e & !COPIED & !COMPRESSED) >> x) + 1;
            // The stored count excludes the sector holding `host`'s start.
            let len = sectors * 512 - (host & 511);
            return Mapping::Compressed { host, len };
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if v3 && e & ZERO != 0 {
            return Mapping::Zero {
                host: (host != 0).then_some(host),
                copied,
            };
        }
        if host == 0 {
            Mapping::Unallocated
        } else {
            Mapping::Data { host, copied }
        }
    }
}

impl ClusterMapping for Mapping {
    fn offset_by(self, by: u64) -> Mapping {
        match self {
            Mapping::Data { host, copied } => Mapping::Data {
                host: host + by,
                copied,
            },
            m => m,
        }
    }

    /// Data runs also need the same `copied`: that decides the fast path.
    fn continues(&self, len: usize, next: &Mapping) -> bool {
        match (self, next) {
            (
                Mapping::Data {
                    host: h1,
                    copied: c1,
                },
                Mapping::Data {
                    host: h2,
                    copied: c2,
                },
            ) => c1 == c2 && h1 + len as u64 == *h2,
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
            _ => false,
        }
    }

    fn status(&self, has_backing: bool) -> LayerStatus {
        match *self {
            Mapping::Data { host, .. } => (true, false, Some(host), true),
            Mapping::Compressed { .. } => (true, false, None, true),
            Mapping::Zero { .. } => (false, true, None, true),
            Mapping::Unallocated => (false, !has_backing, None, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_kind() {
        assert_eq!(Mapping::decode(0, 16, true), Mapping::Unallocated);
        assert_eq!(
            Mapping::decode(COPIED | 0x5_0000, 16, true),
            Mapping::Data {
                host: 0x5_0000,
                copied: true
            }
        );
        assert_eq!(
            Mapping::decode(ZERO, 16, true),
            Mapping::Zero {
                host: None,
                copied: false
            }
        );
        // v2 has no zero flag: bit 0 is reserved and ignored.
        assert_eq!(
            Mapping::decode(0x5_0000 | ZERO, 16, false),
            Mapping::Data {
                host: 0x5_0000,
                copied: false
            }
        );
        // 64 KiB clusters: x = 54; 2 extra sectors; data starts 0x10 into a sector.
        let e = COMPRESSED | (2u64 << 54) | 0x7_0010;
        assert_eq!(
            Mapping::decode(e, 16, true),
            Mapping::Compressed {
                host: 0x7_0010,
                len: 3 * 512 - 0x10
            }
        );
    }
}
