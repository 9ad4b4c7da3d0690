//! The disk QEMU's vvfat presents, and where the FAT file system's areas
//! sit on it: a hard disk of 16 heads and 63 sectors per track with one
//! partition at sector 63 (FAT16 on 1024 cylinders by default, FAT12 on
//! 64, FAT32 on 1024), or a floppy of 80 cylinders and 2 heads without a
//! partition table (2.88 MB FAT12 by default, 1.44 MB FAT12 with
//! `fat-type=12`, 2.88 MB FAT16 with `fat-type=16`).

use crate::error::{Error, Result};

pub(super) const SECTOR: u64 = 512;

/// Root directory entries of FAT12 and FAT16 (QEMU's: two 8 KiB clusters' worth).
const ROOT_ENTRIES: u32 = 512;
/// FAT32's reserved area: boot sector, FSInfo, their backups at 6 and 7.
const FAT32_RESERVED: u32 = 32;
pub(super) const FSINFO_SECTOR: u32 = 1;
pub(super) const BACKUP_BOOT_SECTOR: u32 = 6;

/// Data cluster counts that make a FAT12 or FAT16 (Microsoft's rule: the
/// type follows from the count alone, so readers decide it the same way).
const FAT12_MAX: u32 = 4084;
const FAT16_MAX: u32 = 65524;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    /// 12, 16 or 32.
    pub fat_bits: u32,
    pub floppy: bool,
    pub heads: u32,
    pub sectors_per_track: u32,
    pub cylinders: u32,
    /// Sectors before the boot sector (the MBR's track), 0 on a floppy.
    pub partition_start: u32,
    pub sectors_per_cluster: u32,
    pub reserved_sectors: u32,
    pub root_entries: u32,
    pub sectors_per_fat: u32,
    /// Usable data clusters (numbered from 2).
    pub data_clusters: u32,
}

impl Geometry {
    /// The geometry QEMU picks for `fat-type` and `floppy`. The cluster
    /// sizes are the ones whose cluster count is valid for the FAT type.
    pub fn new(fat_type: Option<i64>, floppy: bool) -> Result<Geometry> {
        let fat_bits = match fat_type {
            None if floppy => 12,
            None => 16,
            Some(t @ (12 | 16 | 32)) => t as u32,
            Some(t) => {
                return Err(Error::generic(format!(
                    "vvfat: fat-type {t} is not valid: valid FAT types are only 12, 16 and 32"
                )))
            }
        };
        let (cylinders, heads, sectors_per_track, partition_start, sectors_per_cluster) = match (
            floppy, fat_type,
        ) {
            (true, _) if fat_bits == 32 => {
                return Err(Error::generic(
                    "vvfat: a floppy cannot hold FAT32 (too few clusters); use fat-type 12 or 16, or a hard disk",
                ))
            }
            // QEMU: 2.88 MB with 1 KiB clusters unless a FAT type is named.
            (true, None) => (80, 2, 36, 0, 2),
            (true, Some(_)) => (80, 2, if fat_bits == 12 { 18 } else { 36 }, 0, 1),
            (false, _) => (
                if fat_bits == 12 { 64 } else { 1024 },
                16,
                63,
                63,
                // 4 KiB clusters keep FAT32 above its minimum cluster count.
                if fat_bits == 32 { 8 } else { 16 },
            ),
        };
        let mut g = Geometry {
            fat_bits,
            floppy,
            heads,
            sectors_per_track,
            cylinders,
            partition_start,
            sectors_per_cluster,
            reserved_sectors: if fat_bits == 32 { FAT32_RESERVED } else { 1 },
            root_entries: if fat_bits == 32 { 0 } else { ROOT_ENTRIES },
            sectors_per_fat: 0,
            data_clusters: 0,
        };
        g.size_fats();
        let valid = match fat_bits {
            12 => g.data_clusters <= FAT12_MAX,
            16 => (FAT12_MAX + 1..=FAT16_MAX).contains(&g.data_clusters),
            _ => g.data_clusters > FAT16_MAX,
        };
        if !valid {
            return Err(Error::generic(format!(
                "vvfat: internal error: {} clusters do not make a FAT{fat_bits}",
                g.data_clusters
            )));
        }
        Ok(g)
    }

    /// The smallest FATs that map every data cluster left beside them.
    fn size_fats(&mut self) {
        let fs = self.fs_sectors();
        let bits = u64::from(self.fat_bits);
        for spf in 1.. {
            let meta = self.reserved_sectors + 2 * spf + self.root_sectors();
            let clusters = fs.saturating_sub(meta) / self.sectors_per_cluster;
            if (u64::from(clusters) + 2) * bits <= u64::from(spf) * SECTOR * 8 {
                self.sectors_per_fat = spf;
                self.data_clusters = clusters;
                return;
            }
        }
    }

    pub fn total_sectors(&self) -> u32 {
        self.cylinders * self.heads * self.sectors_per_track
    }

    /// Sectors of the file system (the partition, or the whole floppy).
    pub fn fs_sectors(&self) -> u32 {
        self.total_sectors() - self.partition_start
    }

    pub fn size(&self) -> u64 {
        u64::from(self.total_sectors()) * SECTOR
    }

    pub fn cluster_size(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * SECTOR
    }

    fn root_sectors(&self) -> u32 {
        self.root_entries * 32 / SECTOR as u32
    }

    /// Image offset of FAT number `n` (0 or 1).
    pub fn fat_offset(&self, n: u32) -> u64 {
        u64::from(self.partition_start + self.reserved_sectors + n * self.sectors_per_fat) * SECTOR
    }

    pub fn fat_bytes(&self) -> u64 {
        u64::from(self.sectors_per_fat) * SECTOR
    }

    /// Image offset of the fixed root directory of FAT12/16.
    pub fn root_offset(&self) -> u64 {
        self.fat_offset(2)
    }

    /// Image offset of data cluster `cluster` (the first is 2).
    pub fn cluster_offset(&self, cluster: u32) -> u64 {
        self.root_offset()
            + u64::from(self.root_sectors()) * SECTOR
            + u64::from(cluster - 2) * self.cluster_size()
    }

    /// "FAT16 hard disk (504 MiB)" and the like, for messages.
    pub fn describe(&self) -> String {
        format!(
            "FAT{} {} ({})",
            self.fat_bits,
            if self.floppy { "floppy" } else { "hard disk" },
            human(self.size())
        )
    }
}

/// Bytes in KiB below 10 MiB (floppies: 1440 KiB), in MiB above.
pub(super) fn human(bytes: u64) -> String {
    if bytes < 10 << 20 {
        format!("{} KiB", bytes.div_ceil(1024))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_qemus_and_cluster_counts_fit_the_type() {
        let cases = [
            (None, false, 16, 1024 * 16 * 63, 8192),
            (Some(12), false, 12, 64 * 16 * 63, 8192),
            (Some(32), false, 32, 1024 * 16 * 63, 4096),
            (None, true, 12, 5760, 1024),
            (Some(12), true, 12, 2880, 512),
            (Some(16), true, 16, 5760, 512),
        ];
        for (t, floppy, bits, sectors, cluster) in cases {
            let g = Geometry::new(t, floppy).unwrap();
            assert_eq!(g.fat_bits, bits);
            assert_eq!(g.total_sectors(), sectors);
            assert_eq!(g.cluster_size(), cluster);
            // The FATs map every cluster, and the clusters fit in the partition.
            let entries = u64::from(g.data_clusters) + 2;
            assert!(entries * u64::from(bits) <= g.fat_bytes() * 8, "{g:?}");
            let end = g.cluster_offset(2 + g.data_clusters);
            assert!(end <= g.size(), "{g:?}");
            assert!(
                end + g.cluster_size() > g.size(),
                "a cluster left unused: {g:?}"
            );
        }
    }

    #[test]
    fn bad_types_are_refused() {
        assert!(Geometry::new(Some(24), false).is_err());
        assert!(Geometry::new(Some(32), true).is_err());
    }
}
