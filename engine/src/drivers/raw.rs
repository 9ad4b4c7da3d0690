//! The `raw` format: guest offsets are file offsets.

use super::{Done, Driver, Extent, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent;
use std::sync::Arc;

pub struct RawDriver {
    file: Arc<Node>,
    /// The format was probed: writes must not make the image look like
    /// another format (it would open as that one next time, as QEMU guards).
    probed: bool,
}

/// The bytes a probe looks at.
const PROBED: u64 = 512;

impl RawDriver {
    pub fn new(file: Arc<Node>, probed: bool) -> RawDriver {
        RawDriver { file, probed }
    }

    /// Whether writing `buf` at `offset` keeps the first sector raw.
    fn keeps_raw(&self, offset: u64, buf: &[u8]) -> Result<bool> {
        let mut head =
            super::qcow2::meta::read_at(&self.file, 0, PROBED.min(self.size()) as usize)?;
        let end = (offset + buf.len() as u64).min(head.len() as u64);
        if offset < end {
            let n = (end - offset) as usize;
            head[offset as usize..end as usize].copy_from_slice(&buf[..n]);
        }
        Ok(super::probe::probe_bytes(&head, &self.file.driver.filename()) == "raw")
    }
}

impl Driver for RawDriver {
    fn passthrough_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file.driver.passthrough_fd()
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        self.file.debug_event(BlkdebugEvent::ReadAio);
        self.file.read(offset, buf, done)
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        self.file.debug_event(BlkdebugEvent::WriteAio);
        if self.probed && offset < PROBED {
            match self.keeps_raw(offset, &buf) {
                Ok(true) => {}
                Ok(false) => {
                    return done(Err(Error::io(
                        libc::EPERM,
                        "a write to the first sector of an image probed as raw would make it look like another format",
                    )))
                }
                Err(e) => return done(Err(e)),
            }
        }
        self.file.write(offset, buf, done)
    }

    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<Extent> {
        if write && self.probed && offset < PROBED {
            return None;
        }
        self.file.direct_extent(offset, len, write)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        self.file.write_zeroes(offset, len, unmap, done)
    }

    fn discard(&self, offset: u64, len: u64, done: Done<()>) {
        self.file.discard(offset, len, done)
    }

    fn flush(&self, done: Done<()>) {
        self.file.flush(done)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        self.file.block_status(offset, len)
    }

    fn file_child(&self) -> Option<&Arc<Node>> {
        Some(&self.file)
    }

    /// A pass-through: its size is its file's.
    fn shares_file_resize(&self) -> bool {
        true
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.file.driver.resize(size)
    }
}
