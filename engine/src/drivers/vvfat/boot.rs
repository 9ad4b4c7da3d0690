//! The sectors in front of the FATs: the MBR of a hard disk, the boot
//! sector (BPB) and, on FAT32, the FSInfo sector.

use super::geometry::{Geometry, BACKUP_BOOT_SECTOR, FSINFO_SECTOR, SECTOR};

/// QEMU's volume label, in the boot sector and the root directory.
pub(super) const LABEL: &[u8; 11] = b"QEMU VVFAT ";
/// QEMU's volume serial number and Windows NT disk signature.
const VOLUME_ID: u32 = 0xfabe_1afd;
const DISK_SIGNATURE: u32 = 0xbe1a_fdfa;
const OEM_NAME: &[u8; 8] = b"MSWIN4.1";

type Sector = [u8; SECTOR as usize];

fn put16(s: &mut [u8], at: usize, v: u16) {
    s[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(s: &mut [u8], at: usize, v: u32) {
    s[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// (head, sector | cylinder high bits, cylinder low bits) of an LBA, or
/// None past the geometry (the partition is then addressed by LBA only).
fn chs(g: &Geometry, lba: u32) -> Option<[u8; 3]> {
    let sector = lba % g.sectors_per_track + 1;
    let head = lba / g.sectors_per_track % g.heads;
    let cyl = lba / g.sectors_per_track / g.heads;
    let packed = [
        head as u8,
        (sector as u8) | ((cyl >> 8) << 6) as u8,
        cyl as u8,
    ];
    (cyl < g.cylinders.min(1024)).then_some(packed)
}

/// The MBR of a hard disk: one bootable partition over the rest of the disk.
pub(super) fn mbr(g: &Geometry) -> Sector {
    let mut s = [0u8; SECTOR as usize];
    put32(&mut s, 0x1b8, DISK_SIGNATURE);
    let p = 0x1be;
    s[p] = 0x80;
    let first = chs(g, g.partition_start);
    let last = chs(g, g.total_sectors() - 1);
    let lba_only = first.is_none() || last.is_none();
    s[p + 1..p + 4].copy_from_slice(&first.unwrap_or([0xff; 3]));
    s[p + 4] = match (g.fat_bits, lba_only) {
        (12, _) => 0x01,
        (16, false) => 0x06,
        (16, true) => 0x0e,
        (_, false) => 0x0b,
        (_, true) => 0x0c,
    };
    s[p + 5..p + 8].copy_from_slice(&last.unwrap_or([0xff; 3]));
    put32(&mut s, p + 8, g.partition_start);
    put32(&mut s, p + 12, g.fs_sectors());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// The boot sector with its BIOS parameter block. Its code only asks the
/// BIOS for the next boot device (`int 0x18`): the disk holds no system.
pub(super) fn boot_sector(g: &Geometry) -> Sector {
    let mut s = [0u8; SECTOR as usize];
    let fat32 = g.fat_bits == 32;
    // The extended BPB ends at 0x3e (FAT12/16) or 0x5a (FAT32): jump past it.
    let code = if fat32 { 0x5a } else { 0x3e };
    s[..3].copy_from_slice(&[0xeb, (code - 2) as u8, 0x90]);
    s[code..code + 2].copy_from_slice(&[0xcd, 0x18]);
    s[3..11].copy_from_slice(OEM_NAME);
    put16(&mut s, 0x0b, SECTOR as u16);
    s[0x0d] = g.sectors_per_cluster as u8;
    put16(&mut s, 0x0e, g.reserved_sectors as u16);
    s[0x10] = 2;
    put16(&mut s, 0x11, g.root_entries as u16);
    let total = g.fs_sectors();
    let small = !fat32 && total <= 0xffff;
    put16(&mut s, 0x13, if small { total as u16 } else { 0 });
    s[0x15] = media(g);
    put16(
        &mut s,
        0x16,
        if fat32 { 0 } else { g.sectors_per_fat as u16 },
    );
    put16(&mut s, 0x18, g.sectors_per_track as u16);
    put16(&mut s, 0x1a, g.heads as u16);
    put32(&mut s, 0x1c, g.partition_start);
    put32(&mut s, 0x20, if small { 0 } else { total });
    let ext = if fat32 {
        put32(&mut s, 0x24, g.sectors_per_fat);
        // 0x28 flags 0: both FATs mirrored; 0x2a version 0.0.
        put32(&mut s, 0x2c, 2);
        put16(&mut s, 0x30, FSINFO_SECTOR as u16);
        put16(&mut s, 0x32, BACKUP_BOOT_SECTOR as u16);
        0x40
    } else {
        0x24
    };
    s[ext] = if g.floppy { 0x00 } else { 0x80 };
    s[ext + 2] = 0x29;
    put32(&mut s, ext + 3, VOLUME_ID);
    s[ext + 7..ext + 18].copy_from_slice(LABEL);
    let fs_type: &[u8; 8] = match g.fat_bits {
        12 => b"FAT12   ",
        16 => b"FAT16   ",
        _ => b"FAT32   ",
    };
    s[ext + 18..ext + 26].copy_from_slice(fs_type);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Media descriptor: fixed disk or floppy, also the low byte of FAT entry 0.
pub(super) fn media(g: &Geometry) -> u8 {
    if g.floppy {
        0xf0
    } else {
        0xf8
    }
}

/// FAT32's FSInfo sector: the free cluster count and a hint where to
/// look for the next free one.
pub(super) fn fsinfo(free: u32, next_free: u32) -> Sector {
    let mut s = [0u8; SECTOR as usize];
    put32(&mut s, 0, 0x4161_5252);
    put32(&mut s, 0x1e4, 0x6141_7272);
    put32(&mut s, 0x1e8, free);
    put32(&mut s, 0x1ec, next_free);
    put32(&mut s, 0x1fc, 0xaa55_0000);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::bytes::{le16, le32};

    #[test]
    fn mbr_partition_covers_the_disk_after_the_first_track() {
        let g = Geometry::new(None, false).unwrap();
        let m = mbr(&g);
        assert_eq!(&m[510..], &[0x55, 0xaa]);
        assert_eq!(m[0x1be], 0x80);
        assert_eq!(m[0x1be + 4], 0x06);
        assert_eq!(le32(&m, 0x1be + 8), 63);
        assert_eq!(le32(&m, 0x1be + 12), 1024 * 16 * 63 - 63);
        // Start CHS 0/1/1; end CHS 1023/15/63.
        assert_eq!(&m[0x1bf..0x1c2], &[1, 1, 0]);
        assert_eq!(&m[0x1c3..0x1c6], &[15, 63 | (3 << 6), 0xff]);
    }

    #[test]
    fn bpb_fields() {
        let g = Geometry::new(Some(32), false).unwrap();
        let b = boot_sector(&g);
        assert_eq!(le16(&b, 0x0b), 512);
        assert_eq!(le16(&b, 0x11), 0);
        assert_eq!(le16(&b, 0x16), 0);
        assert_eq!(le32(&b, 0x24), g.sectors_per_fat);
        assert_eq!(le32(&b, 0x2c), 2);
        assert_eq!(&b[0x52..0x5a], b"FAT32   ");
        assert_eq!(&b[0x47..0x52], LABEL);
        let f = Geometry::new(Some(12), true).unwrap();
        let b = boot_sector(&f);
        assert_eq!(le16(&b, 0x13), 2880);
        assert_eq!(b[0x15], 0xf0);
        assert_eq!(le32(&b, 0x1c), 0);
        assert_eq!(&b[0x36..0x3e], b"FAT12   ");
        assert_eq!(b[b[1] as usize + 2], 0xcd);
    }
}
