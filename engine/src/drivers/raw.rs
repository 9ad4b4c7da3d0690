//! The `raw` format: guest offsets are file offsets.

use super::{Done, Driver, Status};
use crate::error::Result;
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent;
use std::sync::Arc;

pub struct RawDriver {
    file: Arc<Node>,
}

impl RawDriver {
    pub fn new(file: Arc<Node>) -> RawDriver {
        RawDriver { file }
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
        self.file.write(offset, buf, done)
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
