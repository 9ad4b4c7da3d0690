//! User-Mode Linux COW images (version 3, as `uml_mkcow` makes them): a
//! header naming the backing file, a bitmap of the sectors this file
//! holds, and every sector at its own place after the bitmap.
//!
//! Writes land in place; the bitmap changes are kept in memory and
//! written once the data is on disk (at a flush or a clean close), so a
//! crash loses only unflushed writes, which then read from the backing
//! file as before.

use super::bytes::{be32, be64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::Arc;

pub const MAGIC: u32 = 0x4f4f_4f4d;
const VERSION: u32 = 3;
/// magic, version, mtime, size, sectorsize, alignment, cow_format, then
/// the backing file's path in 4096 bytes (packed).
const HEADER_LEN: usize = 32 + 4096;
const PATH_AT: usize = 32;
const SECTOR: u64 = 512;
const ALIGN: u64 = 4096;
/// cow_format: a bitmap (the only one).
const COW_BITMAP: u32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub mtime: u32,
    pub size: u64,
    pub alignment: u64,
    pub backing_file: String,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < 8 || be32(b, 0) != MAGIC {
            return Err(invalid("Image not in COW format"));
        }
        let version = be32(b, 4);
        if version != VERSION {
            return Err(invalid(format!(
                "COW version {version} images are not supported (uml_mkcow makes version 3)"
            )));
        }
        if b.len() < HEADER_LEN {
            return Err(invalid("Image not in COW format (short header)"));
        }
        let sector_size = be32(b, 20) as u64;
        if sector_size != SECTOR {
            return Err(invalid(format!("COW sector size {sector_size} is not 512")));
        }
        let alignment = be32(b, 24) as u64;
        if !alignment.is_power_of_two() || !(SECTOR..=1 << 20).contains(&alignment) {
            return Err(invalid(format!("COW alignment {alignment} is invalid")));
        }
        if be32(b, 28) != COW_BITMAP {
            return Err(invalid("COW format is not a bitmap"));
        }
        let path = &b[PATH_AT..HEADER_LEN];
        let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
        if end == 0 {
            return Err(invalid("COW image names no backing file"));
        }
        let size = be64(b, 12);
        if size > 1 << 50 {
            return Err(invalid("COW image size is too large"));
        }
        Ok(Header {
            mtime: be32(b, 8),
            size,
            alignment,
            backing_file: String::from_utf8_lossy(&path[..end]).into_owned(),
        })
    }

    fn bitmap_offset(&self) -> u64 {
        (HEADER_LEN as u64).next_multiple_of(self.alignment)
    }

    fn bitmap_len(&self) -> u64 {
        self.size.div_ceil(SECTOR).div_ceil(8)
    }

    fn data_offset(&self) -> u64 {
        (self.bitmap_offset() + self.bitmap_len()).next_multiple_of(self.alignment)
    }
}

struct State {
    bitmap: Vec<u8>,
    /// Bitmap bytes changed in memory only.
    dirty: BTreeSet<usize>,
}

pub struct Cow {
    file: Arc<Node>,
    h: Header,
    state: Mutex<State>,
}

impl Cow {
    pub fn open(file: Arc<Node>) -> Result<Cow> {
        let head = read_at(&file, 0, HEADER_LEN.min(file.size() as usize))?;
        let h = Header::parse(&head)?;
        if h.bitmap_offset() + h.bitmap_len() > file.size() {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "COW image is corrupt: the bitmap runs past the end of the file",
            ));
        }
        let bitmap = read_at(&file, h.bitmap_offset(), h.bitmap_len() as usize)?.to_vec();
        Ok(Cow {
            file,
            h,
            state: Mutex::new(State {
                bitmap,
                dirty: BTreeSet::new(),
            }),
        })
    }

    /// Writes the changed bitmap bytes, in runs, once the data they cover
    /// is on disk.
    fn write_bitmap(&self) -> Result<()> {
        let (bitmap, dirty) = {
            let s = self.state.lock();
            if s.dirty.is_empty() {
                return Ok(());
            }
            (s.bitmap.clone(), s.dirty.clone())
        };
        wait(|d| self.file.flush(d))?;
        let mut it = dirty.iter().copied().peekable();
        while let Some(first) = it.next() {
            let mut last = first;
            while it.peek() == Some(&(last + 1)) {
                last += 1;
                it.next();
            }
            let at = self.h.bitmap_offset() + first as u64;
            write_at(&self.file, at, &bitmap[first..=last])?;
            // Written: off the list (bytes changed again since stay on it
            // through the next allocation's insert).
            let mut s = self.state.lock();
            let unchanged: Vec<usize> = (first..=last)
                .filter(|&b| s.bitmap[b] == bitmap[b])
                .collect();
            for b in unchanged {
                s.dirty.remove(&b);
            }
        }
        Ok(())
    }
}

impl Layout for Cow {
    fn format_name(&self) -> &'static str {
        "cow"
    }

    fn size(&self) -> u64 {
        self.h.size
    }

    fn block_size(&self) -> u64 {
        SECTOR
    }

    /// Sector `s`: a run of sectors present here (at their own place, so
    /// one after the other) or in the backing file.
    fn lookup(&self, s: u64) -> Result<(Block, u64)> {
        let st = self.state.lock();
        let present = |i: u64| st.bitmap[(i / 8) as usize] >> (i % 8) & 1 != 0;
        let sectors = self.h.size.div_ceil(SECTOR);
        if s >= sectors {
            return Ok((Block::Unallocated, 1));
        }
        let p = present(s);
        // Whole bytes at a time past the first: runs can be long.
        let mut end = s + 1;
        while end < sectors && present(end) == p {
            end += 1;
            if end.is_multiple_of(8) {
                let want = if p { 0xff } else { 0 };
                while end + 8 <= sectors && st.bitmap[(end / 8) as usize] == want {
                    end += 8;
                }
            }
        }
        let run = end - s;
        if p {
            Ok((Block::Data(self.h.data_offset() + s * SECTOR), run))
        } else {
            Ok((Block::Unallocated, run))
        }
    }

    fn writable(&self) -> bool {
        true
    }

    fn allocate(&self, s: u64, content: &[u8]) -> Result<()> {
        write_at(&self.file, self.h.data_offset() + s * SECTOR, content)?;
        let mut st = self.state.lock();
        let byte = (s / 8) as usize;
        st.bitmap[byte] |= 1 << (s % 8);
        st.dirty.insert(byte);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.write_bitmap()
    }

    fn close(&self) -> Result<()> {
        self.write_bitmap()?;
        wait(|d| self.file.flush(d))
    }

    fn backing_file(&self) -> Option<String> {
        Some(self.h.backing_file.clone())
    }

    /// UML's backing files are plain disks.
    fn backing_format(&self) -> Option<String> {
        Some("raw".into())
    }
}

/// `p` made absolute and without `.` and `..` (symbolic links kept), as
/// uml_mkcow records its backing file.
fn absolute(p: &str) -> Result<String> {
    use std::path::{Component, PathBuf};
    let joined = std::env::current_dir()
        .map_err(|e| Error::from_io(&e, "Could not get the current directory"))?
        .join(p);
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Ok(out.to_string_lossy().into_owned())
}

/// Creates a COW image over `backing` as `uml_mkcow` does: the backing
/// file's absolute name, size and modification time, the file as long as
/// its data area.
pub fn create(path: &str, backing: &str, size: Option<u64>) -> Result<()> {
    let backing = &absolute(backing)?;
    let meta = std::fs::metadata(backing)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{backing}'")))?;
    let size = size.unwrap_or(meta.len());
    if backing.len() >= HEADER_LEN - PATH_AT {
        return Err(invalid("COW backing file name is too long"));
    }
    let mtime = {
        use std::os::unix::fs::MetadataExt;
        meta.mtime() as u32
    };
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&VERSION.to_be_bytes());
    h[8..12].copy_from_slice(&mtime.to_be_bytes());
    h[12..20].copy_from_slice(&size.to_be_bytes());
    h[20..24].copy_from_slice(&(SECTOR as u32).to_be_bytes());
    h[24..28].copy_from_slice(&(ALIGN as u32).to_be_bytes());
    h[PATH_AT..PATH_AT + backing.len()].copy_from_slice(backing.as_bytes());
    let header = Header::parse(&h)?;
    super::create::write_new(path, &h, header.data_offset() + size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&VERSION.to_be_bytes());
        h[12..20].copy_from_slice(&size.to_be_bytes());
        h[20..24].copy_from_slice(&512u32.to_be_bytes());
        h[24..28].copy_from_slice(&4096u32.to_be_bytes());
        h[PATH_AT..PATH_AT + 8].copy_from_slice(b"base.img");
        h
    }

    #[test]
    fn layout_as_uml_mkcow() {
        // uml_mkcow over a 3 MiB file: bitmap at 8192, data at 12288.
        let h = Header::parse(&header(3 << 20)).unwrap();
        assert_eq!(
            (h.bitmap_offset(), h.bitmap_len(), h.data_offset()),
            (8192, 768, 12288)
        );
        assert_eq!(h.backing_file, "base.img");
    }

    #[test]
    fn refuses_other_versions_and_formats() {
        let mut h = header(1 << 20);
        h[7] = 2;
        assert!(Header::parse(&h)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let mut h = header(1 << 20);
        h[31] = 1;
        assert!(Header::parse(&h).is_err());
        let mut h = header(1 << 20);
        h[PATH_AT] = 0;
        assert!(Header::parse(&h).is_err());
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        for (h, _) in crate::testutil::mutations(&header(3 << 20), 48, 20_000) {
            if let Ok(p) = Header::parse(&h) {
                let _ = p.data_offset();
            }
        }
    }
}
