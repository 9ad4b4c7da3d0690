//! Writing back cached metadata changes: L2 entries and refcounts are
//! changed in the cache and written later, in batches, so concurrent
//! allocating requests share their metadata writes and nobody holds the
//! metadata lock across them.
//!
//! A batch writes every changed refcount chunk first and every changed L2
//! chunk after: a refcount is raised before an L2 entry points at its
//! cluster, as QEMU's dependency between its refcount and L2 caches does.
//! The refcount stage is written durably (FUA), so the order holds through
//! a power loss in both cache modes, for the L2 stage after it and for
//! whatever is written through later (a new table's L1 entry).
//! See [`write_all`].
//! The other order (an L2 entry removed before the refcount drops) is kept
//! by [`super::meta::Meta::release`], which writes what is pending before
//! it lowers a refcount.

use crate::drivers::Done;
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent as Ev;
use std::sync::Arc;

/// A metadata chunk (4 KiB, or the cluster when smaller) changed in the
/// cache. Refcount chunks sort first: they are written first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chunk {
    /// The refcount block at `.0`, from byte `.1` of it.
    Refblock(u64, usize),
    /// The L2 table at `.0`, from entry `.1` of it.
    L2(u64, u64),
}

/// One chunk's bytes, taken from the cache, and where they go.
pub struct Write {
    pub chunk: Chunk,
    pub offset: u64,
    pub data: Buf,
}

/// The result of a batch written outside the metadata lock: the count of
/// changes it carries, and how it went.
pub type Outcome = Option<(u64, Result<()>)>;

/// Writes `writes`: the refcount chunks, all in flight at once, then the
/// L2 chunks likewise; then flushes the file when `flush`. Waits for them;
/// the first error wins.
pub fn write_all(file: &Arc<Node>, mut writes: Vec<Write>, flush: bool) -> Result<()> {
    writes.sort_by_key(|w| w.chunk);
    let split = writes.partition_point(|w| matches!(w.chunk, Chunk::Refblock(..)));
    let l2 = writes.split_off(split);
    // The refcounts reach the disk before the L2 entries (or the L1 entry
    // written through next) that need them, through a power loss too. FUA
    // writes back only these chunks; a flush would write all the file's
    // dirty data through the page cache.
    let durable = !writes.is_empty();
    if durable {
        file.debug_event(Ev::FlushToDisk);
    }
    write_stage(file, writes, durable)?;
    write_stage(file, l2, false)?;
    if flush {
        file.debug_event(Ev::FlushToDisk);
        crate::io::without_local_ring(|| crate::drivers::wait(|d| file.flush(d)))?;
    }
    Ok(())
}

fn write_stage(file: &Arc<Node>, writes: Vec<Write>, fua: bool) -> Result<()> {
    // It blocks: its writes must go to rings other threads reap.
    crate::io::without_local_ring(|| write_stage_blocking(file, writes, fua))
}

fn write_stage_blocking(file: &Arc<Node>, writes: Vec<Write>, fua: bool) -> Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    if crate::io::on_completer() {
        return Err(Error::io(
            libc::EDEADLK,
            "refused to wait for metadata writes on an I/O completion thread",
        ));
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let n = writes.len();
    for w in writes {
        match w.chunk {
            Chunk::Refblock(..) => file.debug_event(Ev::RefblockUpdate),
            Chunk::L2(..) => file.debug_event(Ev::L2Update),
        }
        let tx = tx.clone();
        let done: Done<Buf> = Box::new(move |r| {
            let _ = tx.send(r.map(drop));
        });
        if fua {
            file.write_fua(w.offset, w.data, done);
        } else {
            file.write(w.offset, w.data, done);
        }
    }
    let mut first = None;
    for _ in 0..n {
        let r = rx.recv().unwrap_or_else(|_| {
            Err(Error::io(
                libc::EIO,
                "metadata write was dropped without completion",
            ))
        });
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
