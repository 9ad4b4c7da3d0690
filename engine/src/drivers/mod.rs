//! The driver trait and one module per driver.
//!
//! Data requests are completion based: a driver is handed a request and a
//! [`Done`] callback and returns at once; the callback runs on whichever
//! thread finishes the I/O. Drivers must never block inside a completion.
//!
//! Shared by qcow and qcow2: [`deflate`] (reading compressed clusters) and
//! `segments` (splitting a guest range by cluster mapping). The other
//! formats describe their block maps ([`mapped::Layout`]) and share one
//! driver, [`mapped::Mapped`].

pub mod aes_legacy;
pub mod backing;
pub mod blkdebug;
pub mod blkverify;
pub mod bochs;
pub(crate) mod bytes;
pub mod cloop;
pub mod cow;
pub mod create;
pub mod curl;
pub mod deflate;
pub mod dmg;
pub mod fanout;
pub mod file;
pub mod join;
pub mod lock;
pub mod mapped;
pub mod parallels;
pub mod probe;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod quorum;
pub mod raw;
mod segments;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;
pub mod vvfat;

use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::BlkdebugEvent;
use std::sync::Arc;

/// Formats whose images record a backing file.
pub fn has_backing_file(format: &str) -> bool {
    matches!(format, "qcow2" | "qcow" | "qed" | "vmdk" | "cow")
}

pub type Done<T> = Box<dyn FnOnce(Result<T>) + Send + 'static>;

/// Where a request's bytes lie in the one file that holds them, for a
/// caller that submits the transfer on an io_uring of its own
/// ([`Node::direct_extent`]).
pub struct Extent {
    pub fd: Arc<std::os::fd::OwnedFd>,
    pub offset: u64,
    /// The nodes the request passes, with its offset in each, to account
    /// it in each as [`Node::read`] and [`Node::write`] do.
    pub(crate) path: smallvec::SmallVec<[(Arc<crate::stats::Stats>, u64); 4]>,
    /// Held until the transfer ends, as [`Driver::write`] and
    /// [`Driver::read`] hold them: an O_DIRECT write's share of its file's
    /// read-modify-write lock,
    pub(crate) rmw: Option<parking_lot::ArcRwLockReadGuard<parking_lot::RawRwLock, ()>>,
    /// and a qcow2 request's ticket (its clusters are not reused meanwhile).
    pub(crate) ticket: Option<qcow2::meta::IoTicket>,
}

impl Extent {
    pub(crate) fn new(fd: Arc<std::os::fd::OwnedFd>, offset: u64) -> Extent {
        Extent {
            fd,
            offset,
            path: Default::default(),
            rmw: None,
            ticket: None,
        }
    }
}

/// What one layer knows about a range starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Bytes from the queried offset that share this status (> 0).
    pub len: u64,
    /// Reads return data stored in this layer (or below it, for filters).
    pub data: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// Where the data lives in the protocol file, when known.
    pub offset: Option<u64>,
    /// False when this layer defers to its backing file.
    pub allocated: bool,
}

impl Status {
    /// `len` bytes of data, as a layer without a map reports them.
    pub fn data(len: u64, offset: Option<u64>) -> Status {
        Status {
            len,
            data: true,
            zero: false,
            offset,
            allocated: true,
        }
    }
}

/// The length a block status query may answer for: `len` cut at `size`;
/// past the end is ENXIO, as lseek's SEEK_DATA says.
pub fn status_len(offset: u64, len: u64, size: u64) -> Result<u64> {
    match len.min(size.saturating_sub(offset)) {
        0 => Err(Error::io(
            libc::ENXIO,
            format!("block status at {offset} is past the end ({size} bytes)"),
        )),
        n => Ok(n),
    }
}

pub trait Driver: Send + Sync {
    /// `drv` in QMP replies.
    fn format_name(&self) -> &'static str;
    /// The virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`; the request lies within `size()`.
    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>);
    /// Writes `buf` at `offset`; hands the buffer back for reuse.
    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>);
    /// Where `len` bytes at `offset` lie when reading (or writing) them is
    /// one plain transfer on one file, with nothing for the chain to do
    /// before or after it, and the file's `aio=native`; None sends the
    /// request through [`Driver::read`] / [`Driver::write`]. A write's
    /// extent counts as the write under way (the file grows to hold it).
    /// Drivers ask their children through [`Node::direct_extent`].
    fn direct_extent(&self, _offset: u64, _len: u64, _write: bool) -> Option<Extent> {
        None
    }
    /// Makes the range read as zeroes, deallocating it when `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>);
    /// A hint that the range is no longer used; it may read back as anything.
    fn discard(&self, offset: u64, len: u64, done: Done<()>);
    fn flush(&self, done: Done<()>);
    /// Whether [`Driver::write_fua`] makes a write durable by itself.
    fn has_fua(&self) -> bool {
        false
    }
    /// A write on stable storage when `done` runs; called only when
    /// [`Driver::has_fua`] (elsewhere [`Node::write_fua`] flushes after).
    fn write_fua(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        self.write(offset, buf, done)
    }
    /// Allocation status of this layer at `offset` (at most `len` bytes).
    fn block_status(&self, offset: u64, len: u64) -> Result<Status>;
    /// Bytes the image occupies on the host, where that is known; a format
    /// answers for its file.
    fn allocated_size(&self) -> Option<u64> {
        self.file_child().and_then(|f| f.driver.allocated_size())
    }
    /// The filename shown in `BlockDeviceInfo.file` / `ImageInfo.filename`;
    /// a format shows its file's.
    fn filename(&self) -> String {
        self.file_child()
            .map(|f| f.driver.filename())
            .unwrap_or_default()
    }
    /// The protocol (or filtered) child, when the driver has one.
    fn file_child(&self) -> Option<&Arc<Node>> {
        None
    }
    fn backing_child(&self) -> Option<Arc<Node>> {
        None
    }
    /// Children besides `file` and `backing` (blkverify's test image,
    /// quorum's children); each is used as a `file` is.
    fn other_children(&self) -> Vec<Arc<Node>> {
        Vec::new()
    }
    /// Puts `new` in `old`'s place among `other_children` (a mirror's
    /// `replaces`), with this node's users quiesced.
    fn replace_child(&self, old: &Arc<Node>, _new: Arc<Node>) -> Result<()> {
        Err(Error::generic(format!(
            "Node '{}' cannot be replaced under a '{}' node",
            old.name,
            self.format_name()
        )))
    }
    /// Replaces the backing node (block jobs, with the node's users quiesced);
    /// the image header is rewritten separately (`change_backing_file`).
    fn set_backing(&self, _backing: Option<Arc<Node>>) -> Result<()> {
        Err(Error::generic(format!(
            "Driver '{}' has no backing file",
            self.format_name()
        )))
    }
    /// Whether the file child may be resized under this node (QEMU's shared
    /// `resize` permission): true where this node's size follows its file's.
    fn shares_file_resize(&self) -> bool {
        false
    }
    /// The descriptor the kernel may do this node's I/O on by itself (FUSE
    /// passthrough): a raw node's regular file, byte for byte.
    fn passthrough_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
    /// For a block job's target that no guest writes yet: requests may
    /// complete with their metadata changes still cached, written in
    /// shared batches by the job's flush (or an eviction) instead of one
    /// commit per request. Off again before any guest may write the node.
    fn defer_metadata(&self, _on: bool) {}
    /// Writes the metadata changes deferred so far (no flush of the file):
    /// a copy-before-write's target clusters are reachable on disk before
    /// the guest write it protects goes on.
    fn commit_metadata(&self, done: Done<()>) {
        done(Ok(()))
    }
    /// Leaves the image consistent before the daemon exits (no I/O may follow).
    fn close(&self) -> Result<()> {
        Ok(())
    }
    /// `qemu-img check` (without repair) of formats other than qcow2,
    /// which has its own; None where the format has no check.
    fn check(&self) -> Option<Result<qcow2::check::CheckResult>> {
        None
    }
    /// Adds format-specific members to an `ImageInfo`.
    fn image_info(&self, _info: &mut serde_json::Value) {}

    /// Changes the virtual size (`block_resize`); new space reads as zeroes.
    /// Called with no request of the device in flight.
    fn resize(&self, _size: u64) -> Result<()> {
        Err(Error::generic(format!(
            "Driver '{}' does not support resizing",
            self.format_name()
        )))
    }
    /// The backing file name recorded in the image, when it names one.
    fn backing_file_name(&self) -> Option<String> {
        None
    }
    /// Rewrites the backing file name (and format) recorded in the image;
    /// an empty name records none (a stream of the whole chain).
    fn change_backing_file(&self, _name: &str, _format: Option<&str>) -> Result<()> {
        Err(Error::generic(format!(
            "Driver '{}' does not record a backing file",
            self.format_name()
        )))
    }
    /// Writes `data` at `offset` of a node opened read-only, through a
    /// short-lived read-write descriptor, then syncs it (a backing image's
    /// header). The protocol driver does it; others pass it to their file.
    fn write_through(&self, offset: u64, data: &[u8]) -> Result<()> {
        match self.file_child() {
            Some(f) => f.driver.write_through(offset, data),
            None => Err(Error::generic(format!(
                "Driver '{}' cannot write through a read-only node",
                self.format_name()
            ))),
        }
    }
    /// Drops (`on` false) or takes again the image locks of the protocol
    /// node below, around a reopen whose new descriptor takes them itself.
    fn set_locks(&self, on: bool) -> Result<()> {
        match self.file_child() {
            Some(f) => f.driver.set_locks(on),
            None => Ok(()),
        }
    }
    /// The medium of a removable drive (host_cdrom, host_floppy) below;
    /// None for other drivers.
    fn media(&self) -> Option<file::Media> {
        self.file_child().and_then(|f| f.driver.media())
    }
    /// Encryption state of this layer.
    fn encryption(&self) -> Encryption {
        Encryption::None
    }
    /// Sets the key of an encrypted image (`block_passwd`).
    fn set_password(&self, _password: &str) -> Result<()> {
        Err(Error::generic("Device is not encrypted"))
    }
    /// A blkdebug event raised by a parent at the point the event's name
    /// says. It travels down the file children until a blkdebug node takes it.
    fn debug_event(&self, ev: BlkdebugEvent) {
        if let Some(f) = self.file_child() {
            f.driver.debug_event(ev);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    /// Encrypted; `key_missing` until `block_passwd` gives the password.
    Encrypted {
        key_missing: bool,
    },
}

/// `done`, called with EIO if it is dropped uncalled (a bug below, e.g. a
/// panicking worker), so the caller is answered and in-flight counts settle
/// instead of a request hanging for good.
/// Takes the closure itself, so the two are one allocation.
pub fn completes_on_drop<T, F>(done: F) -> Done<T>
where
    T: Send + 'static,
    F: FnOnce(Result<T>) + Send + 'static,
{
    struct Guard<T, F: FnOnce(Result<T>)>(Option<F>, std::marker::PhantomData<fn(T)>);
    impl<T, F: FnOnce(Result<T>)> Drop for Guard<T, F> {
        fn drop(&mut self) {
            if let Some(done) = self.0.take() {
                log::error!("a request was dropped without completion; failing it with EIO");
                done(Err(Error::io(
                    libc::EIO,
                    "request was dropped without completion",
                )));
            }
        }
    }
    let mut guard = Guard(Some(done), std::marker::PhantomData);
    Box::new(move |r| {
        if let Some(done) = guard.0.take() {
            done(r)
        }
    })
}

/// Runs a completion-based call and waits for its result. For slow paths
/// and control commands only, never from inside a completion.
pub fn wait<T: Send + 'static>(f: impl FnOnce(Done<T>)) -> Result<T> {
    if crate::io::on_completer() {
        // The completion may need this thread: waiting here could hang for good.
        log::error!("a wait for I/O on an I/O completion thread was refused");
        return Err(Error::io(
            libc::EDEADLK,
            "refused to wait for I/O on an I/O completion thread",
        ));
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    // The thread blocks here: its I/O must go to rings other threads reap.
    crate::io::without_local_ring(|| {
        f(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().unwrap_or_else(|_| {
            Err(Error::io(
                libc::EIO,
                "request was dropped without completion",
            ))
        })
    })
}
