//! Parallels images: a 64-byte header, a table (BAT) of 32-bit cluster
//! offsets (in sectors for the old magic, in clusters for the new one),
//! then the clusters in the order they were allocated.

use super::bytes::{le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

pub const MAGIC_OLD: &[u8; 16] = b"WithoutFreeSpace";
pub const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
const HEADER_LEN: u64 = 64;
const SECTOR: u64 = 512;
const OFF_INUSE: u64 = 44;
/// `inuse` while an image is open for writing ("Ynot").
const INUSE: u32 = 0x746f_6e59;
const DEFAULT_CLUSTER: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Cluster size in sectors.
    pub tracks: u64,
    pub bat_entries: u32,
    pub size: u64,
    pub inuse: u32,
    /// The first data sector.
    pub data_off: u64,
    /// Sectors per BAT unit (1 for the old magic, `tracks` for the new).
    pub multiplier: u64,
    pub ext_off: u64,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("Parallels image is corrupt: {msg}"),
    )
}

impl Header {
    pub fn parse(b: &[u8], file_size: u64) -> Result<Header> {
        if b.len() < HEADER_LEN as usize || le32(b, 16) != 2 {
            return Err(invalid("Image not in Parallels format"));
        }
        let ext = match &b[..16] {
            m if m == MAGIC_OLD => false,
            m if m == MAGIC_EXT => true,
            _ => return Err(invalid("Image not in Parallels format")),
        };
        let tracks = le32(b, 28) as u64;
        if tracks == 0 {
            return Err(invalid("Invalid image: Zero sectors per track"));
        }
        if tracks > i32::MAX as u64 / 513 {
            return Err(invalid("Invalid image: Too big cluster"));
        }
        let bat_entries = le32(b, 32);
        if bat_entries > i32::MAX as u32 / 4 {
            return Err(invalid("Catalog too large"));
        }
        let sectors = if ext { le64(b, 36) } else { le32(b, 36) as u64 };
        let ext_off = le64(b, 56);
        if ext_off >= (i64::MAX >> 9) as u64 {
            return Err(invalid("Invalid image: Too big offset"));
        }
        let mut min_off = (HEADER_LEN + 4 * bat_entries as u64).div_ceil(SECTOR);
        if ext {
            min_off = min_off.next_multiple_of(tracks);
        }
        let data_off = match le32(b, 48) as u64 {
            0 if !ext => min_off,
            d if d >= min_off && d <= file_size / SECTOR => d,
            // QEMU takes the smallest possible offset then (and checks
            // the clusters against it).
            _ => min_off,
        };
        let size = sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| invalid("Invalid image: Too big size"))?;
        Ok(Header {
            tracks,
            bat_entries,
            size,
            inuse: le32(b, 44),
            data_off,
            multiplier: if ext { tracks } else { 1 },
            ext_off,
        })
    }

    fn cluster(&self) -> u64 {
        self.tracks * SECTOR
    }
}

struct State {
    bat: Vec<u32>,
    /// Where the next cluster goes.
    end: u64,
}

pub struct Parallels {
    file: Arc<Node>,
    h: Header,
    read_only: bool,
    state: Mutex<State>,
}

impl Parallels {
    pub fn open(file: Arc<Node>, read_only: bool) -> Result<Parallels> {
        let len = file.size();
        let head = read_at(&file, 0, HEADER_LEN.min(len) as usize)?;
        let h = Header::parse(&head, len)?;
        if h.ext_off != 0 && !read_only {
            log::warn!(
                "{}: Format Extension ignored in RW mode",
                file.driver.filename()
            );
        }
        if HEADER_LEN + h.bat_entries as u64 * 4 > len {
            return Err(corrupt("the BAT runs past the end of the file"));
        }
        let raw = read_at(&file, HEADER_LEN, h.bat_entries as usize * 4)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let cs = h.cluster();
        let mut end = h.data_off * SECTOR;
        let mut seen = std::collections::HashSet::new();
        for (i, &e) in bat.iter().enumerate().filter(|(_, e)| **e != 0) {
            let host = e as u64 * h.multiplier * SECTOR;
            if host + cs > len.next_multiple_of(cs) || host < h.data_off * SECTOR {
                return Err(corrupt(format!(
                    "cluster {i} at {host:#x} lies outside the data area"
                )));
            }
            if !seen.insert(e) {
                return Err(corrupt(format!("cluster {i} shares its data with another")));
            }
            end = end.max(host + cs);
        }
        if !read_only {
            // Open for writing: a crash leaves the mark, and QEMU then
            // checks the image.
            write_at(&file, OFF_INUSE, &INUSE.to_le_bytes())?;
            wait(|d| file.flush(d))?;
        }
        Ok(Parallels {
            file,
            h,
            read_only,
            state: Mutex::new(State { bat, end }),
        })
    }
}

impl Layout for Parallels {
    fn format_name(&self) -> &'static str {
        "parallels"
    }

    fn size(&self) -> u64 {
        self.h.size
    }

    fn block_size(&self) -> u64 {
        self.h.cluster()
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let s = self.state.lock();
        let map = s.bat.get(b as usize..).unwrap_or_default();
        match map.first() {
            Some(&e) if e != 0 => Ok((Block::Data(e as u64 * self.h.multiplier * SECTOR), 1)),
            _ => {
                let run = map.iter().take_while(|e| **e == 0).count();
                Ok((Block::Unallocated, run.max(1) as u64))
            }
        }
    }

    fn writable(&self) -> bool {
        true
    }

    fn checkable(&self) -> bool {
        true
    }

    /// The cluster goes to the end of the data; its BAT entry once it is on disk.
    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        // Images whose BAT covers less than their size read zeroes past it.
        if b >= self.h.bat_entries as u64 {
            return Err(Error::io(
                libc::EINVAL,
                format!("cluster {b} is past the image's BAT"),
            ));
        }
        let unit = self.h.multiplier * SECTOR;
        // Whole BAT units: the entry must point exactly at the data.
        let at = self.state.lock().end.next_multiple_of(unit);
        let e = u32::try_from(at / unit)
            .map_err(|_| Error::io(libc::EFBIG, "Parallels image file too large"))?;
        write_at(&self.file, at, content)?;
        wait(|d| self.file.flush(d))?;
        write_at(&self.file, HEADER_LEN + b * 4, &e.to_le_bytes())?;
        let mut s = self.state.lock();
        s.bat[b as usize] = e;
        s.end = at + self.h.cluster();
        Ok(())
    }

    /// A clean close: the data and BAT on disk first, then the mark off.
    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        wait(|d| self.file.flush(d))?;
        write_at(&self.file, OFF_INUSE, &0u32.to_le_bytes())?;
        wait(|d| self.file.flush(d))
    }
}

/// Creates a Parallels image as `qemu-img create -f parallels` does.
pub fn create(path: &str, size: u64, cluster: Option<u64>) -> Result<()> {
    let cs = cluster.unwrap_or(DEFAULT_CLUSTER).next_multiple_of(SECTOR);
    let size = size.next_multiple_of(SECTOR);
    if cs == 0 || cs >= (i64::MAX as u64) >> 32 {
        return Err(invalid("Cluster size is too large"));
    }
    if size >= (1u64 << 32) * cs {
        return Err(invalid("Image size is too large for this cluster size"));
    }
    let bat_entries = size.div_ceil(cs);
    let data_off = (HEADER_LEN + 4 * bat_entries).div_ceil(cs) * cs / SECTOR;
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..16].copy_from_slice(MAGIC_EXT);
    let mut put32 = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(16, 2);
    put32(20, 16);
    put32(24, (size / SECTOR / 16 / 32) as u32);
    put32(28, (cs / SECTOR) as u32);
    put32(32, bat_entries as u32);
    put32(48, data_off as u32);
    h[36..44].copy_from_slice(&(size / SECTOR).to_le_bytes());
    super::create::write_new(path, &h, data_off * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: &[u8; 16], tracks: u32, bat: u32, sectors: u64, data_off: u32) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..16].copy_from_slice(magic);
        h[16..20].copy_from_slice(&2u32.to_le_bytes());
        h[28..32].copy_from_slice(&tracks.to_le_bytes());
        h[32..36].copy_from_slice(&bat.to_le_bytes());
        h[36..44].copy_from_slice(&sectors.to_le_bytes());
        h[48..52].copy_from_slice(&data_off.to_le_bytes());
        h
    }

    #[test]
    fn parses_both_magics() {
        let h = Header::parse(&header(MAGIC_EXT, 2048, 10, 20480, 2048), 1 << 20).unwrap();
        assert_eq!((h.multiplier, h.size, h.data_off), (2048, 10 << 20, 2048));
        let h = Header::parse(&header(MAGIC_OLD, 128, 32, 4096, 0), 1 << 20).unwrap();
        assert_eq!((h.multiplier, h.data_off), (1, 1));
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        assert!(Header::parse(&header(b"WithoutFreeSpacX", 8, 1, 8, 1), 4096).is_err());
        let e = Header::parse(&header(MAGIC_EXT, 0, 1, 8, 1), 4096).unwrap_err();
        assert!(e.to_string().contains("Zero sectors per track"));
        let e = Header::parse(&header(MAGIC_EXT, 8, u32::MAX, 8, 1), 4096).unwrap_err();
        assert!(e.to_string().contains("Catalog too large"));
        // A data offset past the file: the smallest one instead.
        let h = Header::parse(&header(MAGIC_EXT, 8, 1, 8, 4096), 4096).unwrap();
        assert_eq!(h.data_off, 8);
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let base = header(MAGIC_EXT, 2048, 10, 20480, 2048);
        for (h, r) in crate::testutil::mutations(&base, 64, 20_000) {
            let _ = Header::parse(&h, r % (1 << 30));
        }
    }
}
