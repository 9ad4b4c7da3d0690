//! VirtualBox VDI images (version 1.1), dynamic and static: a 512-byte
//! header, a map of 32-bit block numbers, then the 1 MiB blocks in the
//! order they were allocated.

use super::bytes::{le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

pub const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
const HEADER_LEN: usize = 512;
const SECTOR: u64 = 512;
const BLOCK_SIZE: u32 = 1 << 20;
/// QEMU's bound on the block map ((2^31 - 512) / 4 entries).
const MAX_BLOCKS: u32 = 0x1fff_ff80;
const UNALLOCATED: u32 = 0xffff_ffff;
/// A block given back: reads as zeroes, as an unallocated one.
const DISCARDED: u32 = 0xffff_fffe;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;

// Field offsets in the header.
const OFF_SIGNATURE: usize = 0x40;
const OFF_VERSION: usize = 0x44;
const OFF_HEADER_SIZE: usize = 0x48;
const OFF_TYPE: usize = 0x4c;
const OFF_BMAP: usize = 0x154;
const OFF_DATA: usize = 0x158;
const OFF_SECTOR_SIZE: usize = 0x168;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCK_EXTRA: usize = 0x17c;
const OFF_BLOCKS: usize = 0x180;
const OFF_ALLOCATED: usize = 0x184;
const OFF_UUID_IMAGE: usize = 0x188;
const OFF_UUID_SNAP: usize = 0x198;
const OFF_UUID_LINK: usize = 0x1a8;
const OFF_UUID_PARENT: usize = 0x1b8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub image_type: u32,
    pub offset_bmap: u64,
    pub offset_data: u64,
    pub disk_size: u64,
    pub blocks: u32,
    pub allocated: u32,
}

fn unsupported(msg: impl std::fmt::Display) -> Error {
    Error::generic(format!("unsupported VDI image ({msg})"))
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("VDI image is corrupt: {msg}"))
}

impl Header {
    /// Checks the header as QEMU does; `file_size` bounds the block map.
    pub fn parse(b: &[u8], file_size: u64) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(Error::generic("Image not in VDI format (too short)"));
        }
        let signature = le32(b, OFF_SIGNATURE);
        if signature != SIGNATURE {
            return Err(Error::generic(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        let version = le32(b, OFF_VERSION);
        if version != VERSION_1_1 {
            return Err(unsupported(format!(
                "version {}.{}",
                version >> 16,
                version & 0xffff
            )));
        }
        let h = Header {
            image_type: le32(b, OFF_TYPE),
            offset_bmap: le32(b, OFF_BMAP) as u64,
            offset_data: le32(b, OFF_DATA) as u64,
            disk_size: le64(b, OFF_DISK_SIZE),
            blocks: le32(b, OFF_BLOCKS),
            allocated: le32(b, OFF_ALLOCATED),
        };
        let sector_size = le32(b, OFF_SECTOR_SIZE);
        let block_size = le32(b, OFF_BLOCK_SIZE);
        if !matches!(h.image_type, TYPE_DYNAMIC | TYPE_STATIC) {
            return Err(unsupported(format!("image type {}", h.image_type)));
        }
        if !h.offset_bmap.is_multiple_of(SECTOR) || h.offset_bmap < HEADER_LEN as u64 {
            return Err(unsupported(format!(
                "unaligned block map offset {:#x}",
                h.offset_bmap
            )));
        }
        if !h.offset_data.is_multiple_of(SECTOR) {
            return Err(unsupported(format!(
                "unaligned data offset {:#x}",
                h.offset_data
            )));
        }
        if sector_size != SECTOR as u32 {
            return Err(unsupported(format!("sector size {sector_size} is not 512")));
        }
        if block_size != BLOCK_SIZE {
            return Err(unsupported(format!(
                "block size {block_size} is not {BLOCK_SIZE}"
            )));
        }
        if le32(b, OFF_BLOCK_EXTRA) != 0 {
            return Err(unsupported("extra block data"));
        }
        if h.blocks > MAX_BLOCKS {
            return Err(unsupported(format!(
                "too many blocks {}, max is {MAX_BLOCKS}",
                h.blocks
            )));
        }
        if h.disk_size > h.blocks as u64 * BLOCK_SIZE as u64 {
            return Err(unsupported(format!(
                "disk size {}, image bitmap has room for {}",
                h.disk_size,
                h.blocks as u64 * BLOCK_SIZE as u64
            )));
        }
        if b[OFF_UUID_LINK..OFF_UUID_LINK + 16].iter().any(|&x| x != 0) {
            return Err(unsupported("non-NULL link UUID"));
        }
        if b[OFF_UUID_PARENT..OFF_UUID_PARENT + 16]
            .iter()
            .any(|&x| x != 0)
        {
            return Err(unsupported("non-NULL parent UUID"));
        }
        if h.allocated > h.blocks {
            return Err(corrupt(format!(
                "{} blocks allocated of {}",
                h.allocated, h.blocks
            )));
        }
        let bmap_end = h.offset_bmap + h.blocks as u64 * 4;
        if bmap_end > file_size || bmap_end > h.offset_data {
            return Err(corrupt("the block map runs past the data or the file"));
        }
        Ok(h)
    }
}

struct State {
    bmap: Vec<u32>,
    /// The next block number to allocate.
    next: u32,
}

pub struct Vdi {
    file: Arc<Node>,
    h: Header,
    state: Mutex<State>,
}

impl Vdi {
    pub fn open(file: Arc<Node>) -> Result<Vdi> {
        let head = read_at(&file, 0, HEADER_LEN.min(file.size() as usize))?;
        let h = Header::parse(&head, file.size())?;
        let raw = read_at(&file, h.offset_bmap, h.blocks as usize * 4)?;
        let bmap: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let mut next = h.allocated;
        for (i, &e) in bmap.iter().enumerate() {
            if e < DISCARDED {
                if e >= h.blocks {
                    return Err(corrupt(format!("block {i} maps to block {e}")));
                }
                // A map entry written before a crash cut the header's
                // count short: never allocate that block again.
                next = next.max(e + 1);
            }
        }
        Ok(Vdi {
            file,
            state: Mutex::new(State { bmap, next }),
            h,
        })
    }

    fn host(&self, e: u32) -> u64 {
        self.h.offset_data + e as u64 * BLOCK_SIZE as u64
    }
}

impl Layout for Vdi {
    fn format_name(&self) -> &'static str {
        "vdi"
    }

    /// VBoxManage makes images of any byte size; QEMU rounds up to sectors.
    fn size(&self) -> u64 {
        self.h.disk_size.next_multiple_of(SECTOR)
    }

    fn block_size(&self) -> u64 {
        BLOCK_SIZE as u64
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let s = self.state.lock();
        let map = s.bmap.get(b as usize..).unwrap_or_default();
        let Some(&first) = map.first() else {
            return Ok((Block::Unallocated, 1));
        };
        if first < DISCARDED {
            let run = map
                .iter()
                .zip(first..)
                .take_while(|(e, want)| **e == *want)
                .count();
            return Ok((Block::Data(self.host(first)), run as u64));
        }
        let run = map.iter().take_while(|e| **e >= DISCARDED).count();
        Ok((Block::Unallocated, run as u64))
    }

    fn writable(&self) -> bool {
        true
    }

    fn checkable(&self) -> bool {
        true
    }

    fn zeroes_from_file(&self, _guest: u64) -> bool {
        self.h.image_type == TYPE_STATIC
    }

    /// The block goes after the last one. The header's count moves first,
    /// with the data, and the map entry only once both are on disk: a
    /// crash (or a torn write) leaves at worst a count ahead of the map,
    /// a leaked block (qemu-img check calls it a mismatch, as after a
    /// QEMU crash at the same point), never two map entries on one block.
    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        let e = {
            let s = self.state.lock();
            if s.next >= self.h.blocks {
                return Err(corrupt("no block left to allocate"));
            }
            s.next
        };
        write_at(&self.file, self.host(e), content)?;
        write_at(&self.file, OFF_ALLOCATED as u64, &(e + 1).to_le_bytes())?;
        wait(|d| self.file.flush(d))?;
        write_at(&self.file, self.h.offset_bmap + b * 4, &e.to_le_bytes())?;
        let mut s = self.state.lock();
        s.next = e + 1;
        s.bmap[b as usize] = e;
        Ok(())
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        v["cluster-size"] = serde_json::json!(BLOCK_SIZE);
    }
}

/// Creates a VDI image as `qemu-img create -f vdi [-o static=on]` does.
pub fn create(path: &str, size: u64, fixed: bool) -> Result<()> {
    let disk_size = size.next_multiple_of(SECTOR);
    let blocks = disk_size.div_ceil(BLOCK_SIZE as u64);
    if blocks > MAX_BLOCKS as u64 {
        return Err(Error::generic(format!(
            "Unsupported VDI image size (size is {size}, max supported is {})",
            MAX_BLOCKS as u64 * BLOCK_SIZE as u64
        )));
    }
    let bmap_len = (blocks * 4).next_multiple_of(SECTOR);
    let offset_data = HEADER_LEN as u64 + bmap_len;
    let mut h = vec![0u8; HEADER_LEN];
    h[..TEXT.len()].copy_from_slice(TEXT);
    let mut put32 = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(OFF_SIGNATURE, SIGNATURE);
    put32(OFF_VERSION, VERSION_1_1);
    put32(OFF_HEADER_SIZE, 0x180);
    put32(OFF_TYPE, if fixed { TYPE_STATIC } else { TYPE_DYNAMIC });
    put32(OFF_BMAP, HEADER_LEN as u32);
    put32(OFF_DATA, offset_data as u32);
    put32(OFF_SECTOR_SIZE, SECTOR as u32);
    put32(OFF_BLOCK_SIZE, BLOCK_SIZE);
    put32(OFF_BLOCKS, blocks as u32);
    put32(OFF_ALLOCATED, if fixed { blocks as u32 } else { 0 });
    h[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&disk_size.to_le_bytes());
    h[OFF_UUID_IMAGE..OFF_UUID_IMAGE + 16].copy_from_slice(&super::create::uuid_v4()?);
    h[OFF_UUID_SNAP..OFF_UUID_SNAP + 16].copy_from_slice(&super::create::uuid_v4()?);
    let mut bmap = vec![0u8; bmap_len as usize];
    for (i, e) in bmap.chunks_exact_mut(4).take(blocks as usize).enumerate() {
        let v = if fixed { i as u32 } else { UNALLOCATED };
        e.copy_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&bmap);
    let len = if fixed {
        offset_data + blocks * BLOCK_SIZE as u64
    } else {
        offset_data
    };
    super::create::write_new(path, &h, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(blocks: u32, disk: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        let mut put32 = |at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(OFF_SIGNATURE, SIGNATURE);
        put32(OFF_VERSION, VERSION_1_1);
        put32(OFF_TYPE, TYPE_DYNAMIC);
        put32(OFF_BMAP, 512);
        put32(OFF_DATA, 1024);
        put32(OFF_SECTOR_SIZE, 512);
        put32(OFF_BLOCK_SIZE, BLOCK_SIZE);
        put32(OFF_BLOCKS, blocks);
        h[OFF_DISK_SIZE..OFF_DISK_SIZE + 8].copy_from_slice(&disk.to_le_bytes());
        h
    }

    #[test]
    fn parses_a_dynamic_header() {
        let h = Header::parse(&header(5, 5 << 20), 1024).unwrap();
        assert_eq!((h.blocks, h.disk_size, h.offset_data), (5, 5 << 20, 1024));
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let cases: [(usize, u32, &str); 5] = [
            (OFF_SIGNATURE, 1, "not in VDI format"),
            (OFF_VERSION, 0x10000, "version 1.0"),
            (OFF_BLOCK_SIZE, 4096, "block size 4096"),
            (OFF_SECTOR_SIZE, 4096, "sector size"),
            (OFF_BMAP, 0x201, "unaligned block map"),
        ];
        for (at, v, msg) in cases {
            let mut h = header(5, 5 << 20);
            h[at..at + 4].copy_from_slice(&v.to_le_bytes());
            let e = Header::parse(&h, 1024).unwrap_err();
            assert!(e.to_string().contains(msg), "{e}");
        }
        let e = Header::parse(&header(5, 6 << 20), 1024).unwrap_err();
        assert!(e.to_string().contains("room for"), "{e}");
        let mut h = header(5, 5 << 20);
        h[OFF_UUID_PARENT] = 1;
        assert!(Header::parse(&h, 1024).is_err());
        // The block map must fit before the data.
        assert!(Header::parse(&header(200, 5 << 20), 1 << 20).is_err());
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let base = header(5, 5 << 20);
        for (h, r) in crate::testutil::mutations(&base, HEADER_LEN, 20_000) {
            let _ = Header::parse(&h, r % (1 << 22));
        }
    }
}
