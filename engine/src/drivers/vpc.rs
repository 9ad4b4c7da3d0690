//! Virtual PC / Hyper-V VHD images (`vpc`), fixed and dynamic: a 512-byte
//! footer (copied at the start of dynamic images), a dynamic header, a
//! block allocation table of sector numbers, and blocks each preceded by
//! a sector bitmap (written all-present and never read, as QEMU does).

use super::bytes::{be32, be64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

pub const COOKIE: &[u8; 8] = b"conectix";
const DYN_COOKIE: &[u8; 8] = b"cxsparse";
const SECTOR: u64 = 512;
const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const UNALLOCATED: u32 = 0xffff_ffff;
const BLOCK_SIZE: u64 = 2 << 20;
/// The CHS product that marks "use current_size" (65535 x 16 x 255).
const MAX_CHS: u64 = 65535 * 16 * 255;
/// QEMU's limit: 2040 GiB.
const MAX_SECTORS: u64 = 0xff00_0000;
/// Seconds from the Unix epoch to 2000-01-01, VHD's epoch.
const VHD_EPOCH: u64 = 946_684_800;

// Footer fields.
const F_DATA_OFFSET: usize = 16;
const F_CREATOR_APP: usize = 28;
const F_CURRENT_SIZE: usize = 48;
const F_CYLS: usize = 56;
const F_HEADS: usize = 58;
const F_SECS: usize = 59;
const F_TYPE: usize = 60;
const F_CHECKSUM: usize = 64;
// Dynamic header fields.
const D_TABLE_OFFSET: usize = 16;
const D_MAX_ENTRIES: usize = 28;
const D_BLOCK_SIZE: usize = 32;
const D_CHECKSUM: usize = 36;

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("VHD image is corrupt: {msg}"))
}

/// `~(sum of the bytes)` with the checksum field taken as zero.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b.iter().enumerate().fold(0u32, |s, (i, &x)| {
        if (field..field + 4).contains(&i) {
            s
        } else {
            s.wrapping_add(x as u32)
        }
    });
    !sum
}

/// The virtual size from a footer, as QEMU resolves CHS geometry against
/// `current_size` by the program that made the image.
pub fn virtual_size(footer: &[u8]) -> Result<u64> {
    let chs = be16(footer, F_CYLS) as u64 * footer[F_HEADS] as u64 * footer[F_SECS] as u64;
    let app = &footer[F_CREATOR_APP..F_CREATOR_APP + 4];
    // Virtual PC and QEMU itself size by geometry; Hyper-V, disk2vhd and
    // the rest by current_size.
    let use_chs = app == b"vpc " || app == b"qemu";
    let sectors = if !use_chs || chs == MAX_CHS {
        be64(footer, F_CURRENT_SIZE) / SECTOR
    } else {
        chs
    };
    if sectors > MAX_SECTORS {
        return Err(Error::io(libc::EFBIG, "VHD image is larger than 2040 GiB"));
    }
    Ok(sectors * SECTOR)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// What the header and footer say; the table is read separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The footer (as found at the start or the end of the file).
    pub footer: Vec<u8>,
    pub size: u64,
    /// None for a fixed image.
    pub dynamic: Option<Dynamic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    pub table_offset: u64,
    pub entries: u32,
    pub block_size: u64,
    pub bitmap_size: u64,
}

impl Header {
    /// `head`: the first 512 bytes; `tail`: the last 512; `dyn_header`:
    /// 1024 bytes at the footer's data offset (dynamic images only).
    pub fn parse(head: &[u8], tail: &[u8], dyn_header: Option<&[u8]>) -> Result<Header> {
        let footer = if head.len() >= 512 && &head[..8] == COOKIE {
            &head[..512]
        } else if tail.len() >= 512 && &tail[..8] == COOKIE && be32(tail, F_TYPE) == TYPE_FIXED {
            &tail[..512]
        } else if head.len() < 512 {
            return Err(invalid("File too small for a VHD header"));
        } else {
            return Err(invalid("invalid VPC image"));
        };
        if be32(footer, F_CHECKSUM) != checksum(footer, F_CHECKSUM) {
            return Err(invalid("Incorrect header checksum"));
        }
        let size = virtual_size(footer)?;
        // A footer at the start means a dynamic (or differencing) image.
        if &head[..8] != COOKIE {
            return Ok(Header {
                footer: footer.to_vec(),
                size,
                dynamic: None,
            });
        }
        let d = dyn_header
            .filter(|d| d.len() >= 1024)
            .ok_or_else(|| invalid("Error reading dynamic VHD header"))?;
        if &d[..8] != DYN_COOKIE {
            return Err(invalid("Invalid header magic"));
        }
        let block_size = be32(d, D_BLOCK_SIZE) as u64;
        // Blocks are copied whole: 256 MiB is Hyper-V's largest.
        if !block_size.is_power_of_two() || !(SECTOR..=256 << 20).contains(&block_size) {
            return Err(invalid(format!("Invalid block size {block_size}")));
        }
        let entries = be32(d, D_MAX_ENTRIES);
        if entries > i32::MAX as u32 / 4 {
            return Err(invalid(format!("Max Table Entries too large ({entries})")));
        }
        if size.div_ceil(block_size) > u32::MAX as u64 {
            return Err(invalid("Too many blocks"));
        }
        if (entries as u64) * block_size < size {
            return Err(invalid("Page table too small"));
        }
        Ok(Header {
            footer: footer.to_vec(),
            size,
            dynamic: Some(Dynamic {
                table_offset: be64(d, D_TABLE_OFFSET),
                entries,
                block_size,
                bitmap_size: (block_size / 4096).next_multiple_of(SECTOR),
            }),
        })
    }
}

struct State {
    bat: Vec<u32>,
    /// Where the next block's bitmap goes.
    free: u64,
}

pub struct Vpc {
    file: Arc<Node>,
    h: Header,
    state: Mutex<State>,
}

impl Vpc {
    pub fn open(file: Arc<Node>) -> Result<Vpc> {
        let len = file.size();
        let head = read_at(&file, 0, 512.min(len) as usize)?;
        let tail = read_at(&file, len.saturating_sub(512), 512.min(len) as usize)?;
        let dyn_header = if head.len() == 512 && &head[..8] == COOKIE {
            let at = be64(&head, F_DATA_OFFSET);
            (at.checked_add(1024).is_some_and(|e| e <= len))
                .then(|| read_at(&file, at, 1024))
                .transpose()?
        } else {
            None
        };
        let h = Header::parse(&head, &tail, dyn_header.as_deref())?;
        let (bat, free) = match &h.dynamic {
            None => (Vec::new(), 0),
            Some(d) => {
                let table_len = d.entries as u64 * 4;
                if d.table_offset
                    .checked_add(table_len)
                    .is_none_or(|e| e > len)
                {
                    return Err(corrupt("the block table runs past the end of the file"));
                }
                let raw = read_at(&file, d.table_offset, table_len as usize)?;
                let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
                let mut free = (d.table_offset + table_len).next_multiple_of(SECTOR);
                for &e in bat.iter().filter(|&&e| e != UNALLOCATED) {
                    free = free.max(e as u64 * SECTOR + d.bitmap_size + d.block_size);
                }
                if free > len {
                    return Err(corrupt(
                        "free_data_block_offset points after the end of file. The image has been truncated.",
                    ));
                }
                (bat, free)
            }
        };
        Ok(Vpc {
            file,
            h,
            state: Mutex::new(State { bat, free }),
        })
    }
}

impl Layout for Vpc {
    fn format_name(&self) -> &'static str {
        "vpc"
    }

    fn size(&self) -> u64 {
        self.h.size
    }

    fn block_size(&self) -> u64 {
        self.h.dynamic.as_ref().map_or(BLOCK_SIZE, |d| d.block_size)
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let Some(d) = &self.h.dynamic else {
            // Fixed: the guest's bytes are the file's, from 0.
            let blocks = self.h.size.div_ceil(BLOCK_SIZE);
            return Ok((Block::Data(b * BLOCK_SIZE), blocks.saturating_sub(b).max(1)));
        };
        let s = self.state.lock();
        let map = s.bat.get(b as usize..).unwrap_or_default();
        match map.first() {
            Some(&e) if e != UNALLOCATED => Ok((Block::Data(e as u64 * SECTOR + d.bitmap_size), 1)),
            _ => {
                let run = map.iter().take_while(|e| **e == UNALLOCATED).count();
                Ok((Block::Unallocated, run.max(1) as u64))
            }
        }
    }

    fn writable(&self) -> bool {
        true
    }

    /// The bitmap (all present), the block and the footer after it first;
    /// the table entry once they are on disk.
    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        let d = self
            .h
            .dynamic
            .as_ref()
            .ok_or_else(|| Error::io(libc::EIO, "a fixed VHD has no blocks to allocate"))?;
        if b >= d.entries as u64 {
            return Err(corrupt(format!("block {b} is past the block table")));
        }
        let at = self.state.lock().free;
        let mut block = vec![0xffu8; d.bitmap_size as usize];
        block.extend_from_slice(content);
        block.extend_from_slice(&self.h.footer);
        write_at(&self.file, at, &block)?;
        wait(|done| self.file.flush(done))?;
        let e = u32::try_from(at / SECTOR)
            .map_err(|_| Error::io(libc::EFBIG, "VHD image file too large"))?;
        write_at(&self.file, d.table_offset + b * 4, &e.to_be_bytes())?;
        let mut s = self.state.lock();
        s.bat[b as usize] = e;
        s.free = at + d.bitmap_size + d.block_size;
        Ok(())
    }

    fn zeroes_from_file(&self, _guest: u64) -> bool {
        self.h.dynamic.is_none()
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        if let Some(d) = &self.h.dynamic {
            v["cluster-size"] = serde_json::json!(d.block_size);
        }
    }
}

/// The VHD specification's CHS geometry for `sectors`: (cylinders, heads,
/// sectors per track).
fn geometry(sectors: u64) -> (u64, u64, u64) {
    let ts = sectors.min(MAX_CHS);
    let (spt, heads, cth);
    if ts >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = ts / spt;
    } else {
        let mut s = 17;
        let mut c = ts / 17;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = ts / 31;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = ts / 63;
        }
        (spt, heads, cth) = (s, h, c);
    }
    (cth / heads, heads, spt)
}

/// Creates a VHD image as `qemu-img create -f vpc` does: `size` rounded up
/// to what CHS geometry can hold (unless `force_size`), dynamic with
/// 2 MiB blocks or fixed.
pub fn create(path: &str, size: u64, fixed: bool, force_size: bool) -> Result<()> {
    let mut sectors = size.div_ceil(SECTOR);
    let (c, h, s, app): (u64, u64, u64, &[u8; 4]) = if force_size {
        (65535, 16, 255, b"qem2")
    } else {
        let mut i = 0;
        loop {
            let (c, h, s) = geometry(sectors + i);
            if c * h * s >= sectors || (c, h, s) == (65535, 16, 255) {
                if (c, h, s) != (65535, 16, 255) {
                    sectors = c * h * s;
                }
                break (c, h, s, b"qemu");
            }
            i += 1;
        }
    };
    if sectors > MAX_SECTORS {
        return Err(Error::io(
            libc::EFBIG,
            "Disk size is too large, max size is 2040 GiB",
        ));
    }
    let bytes = sectors * SECTOR;
    let mut f = vec![0u8; 512];
    f[..8].copy_from_slice(COOKIE);
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset = if fixed { u64::MAX } else { 512 };
    f[F_DATA_OFFSET..F_DATA_OFFSET + 8].copy_from_slice(&data_offset.to_be_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    f[24..28].copy_from_slice(&(now.saturating_sub(VHD_EPOCH) as u32).to_be_bytes());
    f[F_CREATOR_APP..F_CREATOR_APP + 4].copy_from_slice(app);
    f[32..36].copy_from_slice(&0x0005_0003u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&bytes.to_be_bytes());
    f[F_CURRENT_SIZE..F_CURRENT_SIZE + 8].copy_from_slice(&bytes.to_be_bytes());
    f[F_CYLS..F_CYLS + 2].copy_from_slice(&(c as u16).to_be_bytes());
    f[F_HEADS] = h as u8;
    f[F_SECS] = s as u8;
    let kind = if fixed { TYPE_FIXED } else { TYPE_DYNAMIC };
    f[F_TYPE..F_TYPE + 4].copy_from_slice(&kind.to_be_bytes());
    f[68..84].copy_from_slice(&super::create::uuid_v4()?);
    let sum = checksum(&f, F_CHECKSUM);
    f[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    if fixed {
        // The footer after the data; the file sparse before it.
        let file = super::file::create_locked(path)?;
        let io = |r: std::io::Result<()>| {
            r.map_err(|e| Error::from_io(&e, format!("Could not write '{path}'")))
        };
        use std::os::unix::fs::FileExt;
        io(file.write_all_at(&f, bytes))?;
        return io(file.sync_all());
    }
    let entries = sectors.div_ceil(BLOCK_SIZE / SECTOR);
    let table_offset = 1536u64;
    let table_len = (entries * 4).next_multiple_of(SECTOR);
    let mut d = vec![0u8; 1024];
    d[..8].copy_from_slice(DYN_COOKIE);
    d[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    d[D_TABLE_OFFSET..D_TABLE_OFFSET + 8].copy_from_slice(&table_offset.to_be_bytes());
    d[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    d[D_MAX_ENTRIES..D_MAX_ENTRIES + 4].copy_from_slice(&(entries as u32).to_be_bytes());
    d[D_BLOCK_SIZE..D_BLOCK_SIZE + 4].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
    let sum = checksum(&d, D_CHECKSUM);
    d[D_CHECKSUM..D_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    let mut image = f.clone();
    image.extend_from_slice(&d);
    image.extend(std::iter::repeat_n(0xffu8, table_len as usize));
    image.extend_from_slice(&f);
    let len = image.len() as u64;
    super::create::write_new(path, &image, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_sizes_as_qemu_img() {
        // Sizes qemu-img create gives (C/H/S and bytes).
        for (mib, chs) in [
            (1u64, (31, 4, 17)),
            (10, (302, 4, 17)),
            (100, (1004, 12, 17)),
            (1024, (2081, 16, 63)),
        ] {
            let sectors = (mib << 20) / 512;
            let mut i = 0;
            let got = loop {
                let g = geometry(sectors + i);
                if g.0 * g.1 * g.2 >= sectors {
                    break g;
                }
                i += 1;
            };
            assert_eq!(got, chs, "{mib} MiB");
        }
    }

    #[test]
    fn virtual_size_by_creator() {
        let mut f = vec![0u8; 512];
        f[F_CYLS..F_CYLS + 2].copy_from_slice(&302u16.to_be_bytes());
        f[F_HEADS] = 4;
        f[F_SECS] = 17;
        f[F_CURRENT_SIZE..F_CURRENT_SIZE + 8].copy_from_slice(&(10u64 << 20).to_be_bytes());
        f[F_CREATOR_APP..F_CREATOR_APP + 4].copy_from_slice(b"qemu");
        assert_eq!(virtual_size(&f).unwrap(), 302 * 4 * 17 * 512);
        f[F_CREATOR_APP..F_CREATOR_APP + 4].copy_from_slice(b"win ");
        assert_eq!(virtual_size(&f).unwrap(), 10 << 20);
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let dir = std::env::temp_dir().join(format!("vpc-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.vhd");
        create(p.to_str().unwrap(), 10 << 20, false, false).unwrap();
        let base = std::fs::read(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for (mut img, r) in crate::testutil::mutations(&base, 1536, 20_000) {
            // Mostly with a right checksum, to reach the checks after it.
            if r % 4 != 0 {
                let sum = checksum(&img[..512], F_CHECKSUM);
                img[F_CHECKSUM..F_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
            }
            let tail = &img[img.len() - 512..];
            let _ = Header::parse(&img[..512], tail, Some(&img[512..1536]));
        }
    }
}
