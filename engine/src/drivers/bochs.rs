//! Bochs growing images (read-only): a 512-byte header, a catalog of
//! extents, and each allocated extent stored as a sector bitmap followed
//! by its sectors; a sector whose bit is clear reads as zeroes.

use super::bytes::{le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::read_at;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const TYPE: &[u8] = b"Redolog";
const SUBTYPE: &[u8] = b"Growing";
const HEADER_LEN: usize = 512;
const SECTOR: u64 = 512;
const VERSION_1: u32 = 0x0001_0000;
const VERSION_2: u32 = 0x0002_0000;
const UNALLOCATED: u32 = 0xffff_ffff;
/// Extents whose bitmaps stay cached.
const BITMAP_CACHE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub catalog_offset: u64,
    pub catalog_entries: u32,
    pub bitmap_size: u64,
    pub extent_size: u64,
    pub size: u64,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

/// The NUL-terminated string at `b[at..at + len]` equals `want`.
fn c_str_is(b: &[u8], at: usize, len: usize, want: &[u8]) -> bool {
    let field = &b[at..at + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    &field[..end] == want
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_LEN
            || !c_str_is(b, 0, 32, MAGIC)
            || !c_str_is(b, 32, 16, TYPE)
            || !c_str_is(b, 48, 16, SUBTYPE)
        {
            return Err(invalid("Image not in Bochs format"));
        }
        let size = match le32(b, 64) {
            VERSION_2 => le64(b, 88),
            VERSION_1 => le64(b, 84),
            _ => return Err(invalid("Image not in Bochs format")),
        } / SECTOR
            * SECTOR;
        let h = Header {
            catalog_offset: le32(b, 68) as u64,
            catalog_entries: le32(b, 72),
            bitmap_size: le32(b, 76) as u64,
            extent_size: le32(b, 80) as u64,
            size,
        };
        if h.catalog_entries > 0x10_0000 {
            return Err(invalid("Catalog size is too large"));
        }
        if h.extent_size < SECTOR {
            return Err(invalid("Extent size must be at least 512"));
        }
        if !h.extent_size.is_power_of_two() {
            return Err(invalid(format!(
                "Extent size {} is not a power of two",
                h.extent_size
            )));
        }
        if h.extent_size > 0x80_0000 {
            return Err(invalid(format!(
                "Extent size {} is too large",
                h.extent_size
            )));
        }
        if (h.catalog_entries as u64) < h.size.div_ceil(h.extent_size) {
            return Err(invalid("Catalog size is too small for this disk size"));
        }
        // The bitmap covers the extent's sectors, and no more than a
        // sector's worth over (an extent has at most 16384 sectors).
        if h.bitmap_size == 0
            || h.bitmap_size * 8 < h.extent_size / SECTOR
            || h.bitmap_size > (h.extent_size / SECTOR).div_ceil(8) + SECTOR
        {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "Bochs image is corrupt: the bitmap is too small for an extent",
            ));
        }
        Ok(h)
    }

    /// Bytes each stored extent takes: its bitmap and its sectors, each
    /// rounded up to whole sectors.
    fn slot(&self) -> u64 {
        self.bitmap_size.next_multiple_of(SECTOR) + self.extent_size.next_multiple_of(SECTOR)
    }
}

pub struct Bochs {
    file: Arc<Node>,
    h: Header,
    catalog: Vec<u32>,
    data_offset: u64,
    bitmaps: Mutex<HashMap<u32, Arc<Vec<u8>>>>,
}

impl Bochs {
    pub fn open(file: Arc<Node>) -> Result<Bochs> {
        let head = read_at(&file, 0, HEADER_LEN.min(file.size() as usize))?;
        let h = Header::parse(&head)?;
        let raw = read_at(&file, h.catalog_offset, h.catalog_entries as usize * 4)?;
        let catalog = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(Bochs {
            data_offset: h.catalog_offset + 4 * h.catalog_entries as u64,
            file,
            h,
            catalog,
            bitmaps: Mutex::new(HashMap::new()),
        })
    }

    fn slot_offset(&self, e: u32) -> u64 {
        self.data_offset + e as u64 * self.h.slot()
    }

    fn bitmap(&self, e: u32) -> Result<Arc<Vec<u8>>> {
        if let Some(b) = self.bitmaps.lock().get(&e) {
            return Ok(b.clone());
        }
        let raw = read_at(&self.file, self.slot_offset(e), self.h.bitmap_size as usize)?;
        let b = Arc::new(raw.to_vec());
        let mut cache = self.bitmaps.lock();
        if cache.len() >= BITMAP_CACHE {
            cache.clear();
        }
        cache.insert(e, b.clone());
        Ok(b)
    }
}

impl Layout for Bochs {
    fn format_name(&self) -> &'static str {
        "bochs"
    }

    fn size(&self) -> u64 {
        self.h.size
    }

    fn block_size(&self) -> u64 {
        SECTOR
    }

    /// Sector `s`: a run of sectors of its extent present (data, one after
    /// the other in the file) or absent.
    fn lookup(&self, s: u64) -> Result<(Block, u64)> {
        let per_extent = self.h.extent_size / SECTOR;
        let (ext, first) = (s / per_extent, s % per_extent);
        let left = per_extent - first;
        let e = self
            .catalog
            .get(ext as usize)
            .copied()
            .unwrap_or(UNALLOCATED);
        if e == UNALLOCATED {
            return Ok((Block::Unallocated, left));
        }
        let bits = self.bitmap(e)?;
        let present = |i: u64| bits[(i / 8) as usize] >> (i % 8) & 1 != 0;
        let p = present(first);
        let run = (first..per_extent).take_while(|&i| present(i) == p).count() as u64;
        if !p {
            return Ok((Block::Unallocated, run));
        }
        let host =
            self.slot_offset(e) + self.h.bitmap_size.next_multiple_of(SECTOR) + first * SECTOR;
        Ok((Block::Data(host), run))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn header(version: u32, extent: u32, catalog: u32, bitmap: u32, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[32..32 + TYPE.len()].copy_from_slice(TYPE);
        h[48..48 + SUBTYPE.len()].copy_from_slice(SUBTYPE);
        h[64..68].copy_from_slice(&version.to_le_bytes());
        h[68..72].copy_from_slice(&512u32.to_le_bytes());
        h[72..76].copy_from_slice(&catalog.to_le_bytes());
        h[76..80].copy_from_slice(&bitmap.to_le_bytes());
        h[80..84].copy_from_slice(&extent.to_le_bytes());
        let at = if version == VERSION_2 { 88 } else { 84 };
        h[at..at + 8].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn parses_both_versions() {
        for v in [VERSION_1, VERSION_2] {
            let h = Header::parse(&header(v, 65536, 16, 16, 1 << 20)).unwrap();
            assert_eq!(
                (h.size, h.extent_size, h.catalog_entries),
                (1 << 20, 65536, 16)
            );
        }
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        for (h, msg) in [
            (header(3, 65536, 16, 16, 1 << 20), "not in Bochs format"),
            (header(VERSION_2, 100, 16, 16, 1 << 20), "at least 512"),
            (header(VERSION_2, 3 << 10, 16, 16, 1 << 20), "power of two"),
            (header(VERSION_2, 16 << 20, 16, 4096, 1 << 20), "too large"),
            (header(VERSION_2, 65536, 8, 16, 1 << 20), "too small"),
        ] {
            let e = Header::parse(&h).unwrap_err();
            assert!(e.to_string().contains(msg), "{e}");
        }
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let base = header(VERSION_2, 65536, 16, 16, 1 << 20);
        for (h, _) in crate::testutil::mutations(&base, 104, 20_000) {
            let _ = Header::parse(&h);
        }
    }
}
