//! cloop images (read-only), as `create_compressed_fs` makes them: a
//! shell-script preamble, the block size and count, then the offsets of
//! the zlib-compressed blocks.

use super::bytes::{be32, be64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::read_at;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

/// The start of the preamble, for probing.
pub const PREAMBLE: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
const HEADER_LEN: usize = 136;
const MAX_BLOCK: u32 = 64 << 20;
const MAX_BLOCKS: u32 = 536_870_911;
/// The largest compressed block QEMU accepts.
const MAX_COMPRESSED: u64 = 128 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub block_size: u32,
    pub blocks: u32,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, msg.to_string())
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header> {
        if b.len() < HEADER_LEN {
            return Err(invalid("Image not in cloop format (too short)"));
        }
        let h = Header {
            block_size: be32(b, 128),
            blocks: be32(b, 132),
        };
        if h.block_size == 0 {
            return Err(invalid("block_size cannot be zero"));
        }
        if !h.block_size.is_multiple_of(512) {
            return Err(invalid(format!(
                "block_size {} must be a multiple of 512",
                h.block_size
            )));
        }
        if h.block_size > MAX_BLOCK {
            return Err(invalid(format!(
                "block_size {} must be 64 MB or less",
                h.block_size
            )));
        }
        if h.blocks > MAX_BLOCKS {
            return Err(invalid(format!(
                "n_blocks {} must be {MAX_BLOCKS} or less",
                h.blocks
            )));
        }
        if (h.blocks as u64 + 1) * 8 > 512 << 20 {
            return Err(invalid(
                "image requires too many offsets, try increasing block size",
            ));
        }
        Ok(h)
    }

    /// Checks the offsets table as QEMU does.
    pub fn check_offsets(offsets: &[u64]) -> Result<()> {
        for (i, w) in offsets.windows(2).enumerate() {
            if w[1] < w[0] {
                return Err(corrupt(format!(
                    "offsets not monotonically increasing at index {}, image file is corrupt",
                    i + 1
                )));
            }
            if w[1] - w[0] > MAX_COMPRESSED {
                return Err(corrupt(format!(
                    "invalid compressed block size at index {i}, image file is corrupt"
                )));
            }
        }
        Ok(())
    }
}

pub struct Cloop {
    file: Arc<Node>,
    h: Header,
    offsets: Vec<u64>,
    /// The last block inflated: sequential reads take it piece by piece.
    last: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Cloop {
    pub fn open(file: Arc<Node>) -> Result<Cloop> {
        let head = read_at(&file, 0, HEADER_LEN.min(file.size() as usize))?;
        let h = Header::parse(&head)?;
        let n = h.blocks as usize + 1;
        if HEADER_LEN as u64 + n as u64 * 8 > file.size() {
            return Err(corrupt("the offsets run past the end of the file"));
        }
        let raw = read_at(&file, HEADER_LEN as u64, n * 8)?;
        let offsets: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Header::check_offsets(&offsets)?;
        Ok(Cloop {
            file,
            h,
            offsets,
            last: Mutex::new(None),
        })
    }

    fn block(&self, id: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((b, data)) = &*self.last.lock() {
            if *b == id {
                return Ok(data.clone());
            }
        }
        let (start, end) = (self.offsets[id as usize], self.offsets[id as usize + 1]);
        let raw = read_at(&self.file, start, (end - start) as usize)?;
        let mut out = vec![0u8; self.h.block_size as usize];
        super::deflate::inflate_zlib(&raw, &mut out)
            .map_err(|e| Error::io(libc::EIO, format!("cloop block {id}: {e}")))?;
        let out = Arc::new(out);
        *self.last.lock() = Some((id, out.clone()));
        Ok(out)
    }
}

impl Layout for Cloop {
    fn format_name(&self) -> &'static str {
        "cloop"
    }

    fn size(&self) -> u64 {
        self.h.blocks as u64 * self.h.block_size as u64
    }

    fn block_size(&self) -> u64 {
        self.h.block_size as u64
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        Ok((Block::Special(b), 1))
    }

    fn read_special(&self, id: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.block(id)?;
        let at = (guest % self.h.block_size as u64) as usize;
        buf.copy_from_slice(&data[at..at + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(block: u32, blocks: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..PREAMBLE.len()].copy_from_slice(PREAMBLE);
        h[128..132].copy_from_slice(&block.to_be_bytes());
        h[132..136].copy_from_slice(&blocks.to_be_bytes());
        h
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        assert!(Header::parse(&header(65536, 16)).is_ok());
        for (h, msg) in [
            (header(0, 1), "cannot be zero"),
            (header(1000, 1), "multiple of 512"),
            (header(128 << 20, 1), "64 MB or less"),
            (header(512, u32::MAX), "must be"),
        ] {
            let e = Header::parse(&h).unwrap_err();
            assert!(e.to_string().contains(msg), "{e}");
        }
        assert!(Header::check_offsets(&[10, 20, 15]).is_err());
        assert!(Header::check_offsets(&[10, 10 + (200 << 20)]).is_err());
        assert!(Header::check_offsets(&[10, 20, 20, 30]).is_ok());
    }
}
