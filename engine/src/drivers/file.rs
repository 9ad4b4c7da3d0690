//! The `file` protocol and the host devices: `host_device` (a block or
//! character device), `host_cdrom` and `host_floppy` (removable media).
//!
//! With `cache.direct=on` the descriptor is O_DIRECT; requests that are not
//! aligned go through an aligned bounce buffer (reads) or a serialised
//! read-modify-write (writes), so callers may send any offset and length.
//!
//! The node locks its file as QEMU does (see [`super::lock`]) on its own
//! descriptor at open, per `locking` (default `auto`); the locks go with the
//! descriptor when the node closes.

use super::{Done, Driver, Extent, Status};
use crate::error::{Error, Result};
use crate::graph::NodeOptions;
use crate::io::{self, Backend, Buf, IoReq, OpKind};
use crate::options::OnOffAuto;
use parking_lot::RwLock;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// O_DIRECT alignment when the kernel does not report one; 4 KiB satisfies
/// every common device.
const FALLBACK_ALIGN: u64 = 4096;

/// Which of the host drivers opened the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    File,
    Device,
    Cdrom,
    Floppy,
}

impl Host {
    fn name(self) -> &'static str {
        match self {
            Host::File => "file",
            Host::Device => "host_device",
            Host::Cdrom => "host_cdrom",
            Host::Floppy => "host_floppy",
        }
    }

    fn removable(self) -> bool {
        matches!(self, Host::Cdrom | Host::Floppy)
    }
}

/// The state of a removable medium (`BlockInfo`'s `inserted`, `tray_open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Media {
    pub inserted: bool,
    pub tray_open: bool,
}

pub struct FileDriver {
    host: Host,
    io: Arc<FileIo>,
    no_flush: bool,
    read_only: bool,
    /// A block device: its size is fixed.
    blockdev: bool,
    /// The image locks held on `fd`, if any.
    locked: Option<super::lock::Perms>,
}

/// What the file's requests use: shared with a write that a thread owning
/// its ring hands to a thread that may wait (see [`FileIo::write_with`]).
struct FileIo {
    fd: Arc<OwnedFd>,
    filename: Arc<str>,
    backend: Arc<dyn Backend>,
    direct: bool,
    /// Without O_DIRECT: one write at a time (see [`IoReq::serial`]).
    buffered_writes: Option<Arc<parking_lot::Mutex<()>>>,
    /// Offset and length alignment of O_DIRECT requests.
    align: u64,
    size: AtomicU64,
    /// O_DIRECT only: aligned writes share it, a read-modify-write holds it alone.
    rmw: Arc<RwLock<()>>,
}

impl Drop for FileDriver {
    /// The node is closed: its image locks go now, even if the last
    /// completions still hold the descriptor for a moment.
    fn drop(&mut self) {
        if self.locked.is_some() {
            super::lock::unlock_all(self.io.fd.as_fd());
        }
    }
}

impl FileDriver {
    pub fn open(
        host: Host,
        filename: &str,
        locking: Option<OnOffAuto>,
        opts: &NodeOptions,
    ) -> Result<FileDriver> {
        let cpath = CString::new(filename)
            .map_err(|_| Error::generic(format!("Invalid filename '{filename}'")))?;
        let mut flags = libc::O_CLOEXEC;
        flags |= if opts.read_only {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        if !opts.writeback {
            flags |= libc::O_DSYNC;
        }
        if host.removable() {
            // As QEMU: an empty drive must still open.
            flags |= libc::O_NONBLOCK;
        }
        // SAFETY: cpath is a valid NUL-terminated string.
        let raw = unsafe { libc::open(cpath.as_ptr(), flags) };
        if raw < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::from_io(&e, format!("Could not open '{filename}'")));
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let perms = super::lock::Perms::for_node(opts.read_only, opts.force_share);
        let mode = locking.unwrap_or(OnOffAuto::Auto);
        let locked = super::lock::lock(fd.as_fd(), filename, mode, perms)?.then_some(perms);
        let kind = file_kind(&fd)
            .map_err(|e| Error::from_io(&e, format!("Could not stat '{filename}'")))?;
        match (host, kind) {
            (Host::Device, libc::S_IFBLK | libc::S_IFCHR) => {}
            (Host::Device, _) => {
                return Err(Error::generic(format!(
                    "'host_device' driver expects either a character or block device: '{filename}' is neither"
                )))
            }
            (Host::Cdrom | Host::Floppy, libc::S_IFBLK) => {}
            (Host::Cdrom | Host::Floppy, _) => {
                return Err(Error::generic(format!(
                    "'{}' driver expects a block device: '{filename}' is not one",
                    host.name()
                )))
            }
            (Host::File, _) => {}
        }
        let blockdev = kind == libc::S_IFBLK;
        let size = match fd_size(&fd, blockdev) {
            Ok(size) => size,
            // No medium in the drive: an empty device until one is inserted.
            Err(e) if host.removable() && e.raw_os_error() == Some(libc::ENOMEDIUM) => 0,
            Err(e) => {
                return Err(Error::from_io(
                    &e,
                    format!("Could not get the size of '{filename}'"),
                ))
            }
        };
        let align = match (opts.direct, blockdev) {
            (false, _) => 1,
            (true, true) => logical_block_size(&fd).unwrap_or(FALLBACK_ALIGN),
            (true, false) => dio_align(&fd),
        };
        Ok(FileDriver {
            host,
            io: Arc::new(FileIo {
                fd,
                filename: filename.into(),
                backend: io::backend(opts.aio),
                direct: opts.direct,
                buffered_writes: (!opts.direct).then(|| Arc::new(parking_lot::Mutex::new(()))),
                align,
                size: AtomicU64::new(size),
                rmw: Arc::new(RwLock::new(())),
            }),
            no_flush: opts.no_flush,
            read_only: opts.read_only,
            blockdev,
            locked,
        })
    }
}

impl FileIo {
    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.align) && len.is_multiple_of(self.align)
    }

    fn submit_data(&self, kind: OpKind, offset: u64, buf: Buf, done: Done<Buf>) {
        self.submit(IoReq::data(self.fd.clone(), kind, offset, buf), done)
    }

    fn submit(&self, mut req: IoReq, done: Done<Buf>) {
        let name = self.filename.clone();
        if req.kind == OpKind::Write {
            req.serial = self.buffered_writes.clone();
        }
        self.backend.submit(
            req,
            Box::new(move |req, r| {
                done(r.map(|()| req.buf).map_err(|e| Error::from_io(&e, &name)))
            }),
        );
    }

    fn submit_control(&self, kind: OpKind, offset: u64, len: u64, done: Done<()>) {
        let name = self.filename.clone();
        let req = IoReq::control(self.fd.clone(), kind, offset, len);
        self.backend.submit(
            req,
            Box::new(move |_, r| done(r.map_err(|e| Error::from_io(&e, &name)))),
        );
    }

    /// The aligned range covering `offset..offset+len`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let start = offset - offset % self.align;
        let end = (offset + len).next_multiple_of(self.align);
        (start, end - start)
    }

    /// Synchronous read-modify-write of an unaligned O_DIRECT write.
    fn write_unaligned(&self, offset: u64, buf: &Buf) -> Result<()> {
        let _excl = self.rmw.write();
        let (start, len) = self.widen(offset, buf.len() as u64);
        let mut bounce =
            super::wait(|d| self.submit_data(OpKind::Read, start, Buf::recycled(len as usize), d))?;
        let at = (offset - start) as usize;
        bounce[at..at + buf.len()].copy_from_slice(buf);
        super::wait(|d| self.submit_data(OpKind::Write, start, bounce, d))?;
        // The padded block may run past the end: cut the file back to what
        // the caller wrote, never below its old size.
        let end = (offset + buf.len() as u64).max(self.size.load(Ordering::Relaxed));
        if start + len > end {
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::ftruncate(self.fd.as_raw_fd(), end as libc::off_t) } < 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::from_io(&e, &self.filename));
            }
        }
        self.size.fetch_max(end, Ordering::Relaxed);
        Ok(())
    }

    /// On a thread that reaps its own ring ([`io::on_local_ring`]) a write
    /// never waits: the read-modify-write it would wait for may itself wait
    /// for aligned writes in flight on that very ring. Such a write goes to
    /// a thread that may wait instead.
    fn write_with(self: &Arc<Self>, offset: u64, buf: Buf, fua: bool, done: Done<Buf>) {
        let len = buf.len() as u64;
        let mut req = IoReq::data(self.fd.clone(), OpKind::Write, offset, buf);
        req.fua = fua;
        if !self.direct {
            self.size.fetch_max(offset + len, Ordering::Relaxed);
            return self.submit(req, done);
        }
        let local = io::on_local_ring();
        if self.aligned(offset, len) {
            let shared = if local {
                self.rmw.try_read_arc()
            } else {
                Some(self.rmw.read_arc())
            };
            if let Some(shared) = shared {
                self.size.fetch_max(offset + len, Ordering::Relaxed);
                return self.submit(
                    req,
                    Box::new(move |r| {
                        drop(shared);
                        done(r)
                    }),
                );
            }
        }
        if local {
            let file = self.clone();
            return io::spawn_blocking(move || file.write_with(offset, req.buf, fua, done));
        }
        let buf = req.buf;
        let mut r = self.write_unaligned(offset, &buf);
        if fua && r.is_ok() {
            r = super::wait(|d| self.submit_control(OpKind::Fdatasync, 0, 0, d));
        }
        done(r.map(|()| buf));
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64, done: Done<()>) {
        self.submit_control(OpKind::Fallocate(mode), offset, len, done);
    }
}

impl Driver for FileDriver {
    fn format_name(&self) -> &'static str {
        self.host.name()
    }

    fn size(&self) -> u64 {
        self.io.size.load(Ordering::Relaxed)
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        if self.io.aligned(offset, len) {
            return self.io.submit_data(OpKind::Read, offset, buf, done);
        }
        let (start, wide) = self.io.widen(offset, len);
        let mut out = buf;
        self.io.submit_data(
            OpKind::Read,
            start,
            Buf::recycled(wide as usize),
            Box::new(move |r| {
                done(r.map(|bounce| {
                    let at = (offset - start) as usize;
                    let n = out.len();
                    out.copy_from_slice(&bounce[at..at + n]);
                    out
                }))
            }),
        );
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        self.io.write_with(offset, buf, false, done)
    }

    fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<Extent> {
        let io = &self.io;
        // The caller's io_uring stands for this file's own rings, not its threads.
        if io.backend.name() != "native" || (io.direct && !io.aligned(offset, len)) {
            return None;
        }
        let mut extent = Extent::new(io.fd.clone(), offset);
        if !write {
            return Some(extent);
        }
        if self.read_only {
            return None;
        }
        // As `write_with` on a ring's own thread: a read-modify-write under
        // way is waited for elsewhere, never here.
        if io.direct {
            extent.rmw = Some(io.rmw.try_read_arc()?);
        }
        io.size.fetch_max(offset + len, Ordering::Relaxed);
        Some(extent)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        let end = offset + len;
        // Punching keeps the size, so a range past the end is zeroed instead.
        let mode = if unmap && end > self.size() {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            mode
        };
        // Waits here (the caller's thread, never a completion) so the
        // fallback can issue plain writes.
        let r = super::wait(|d| self.io.fallocate(mode, offset, len, d));
        if r.is_ok() {
            self.io.size.fetch_max(end, Ordering::Relaxed);
        }
        match r {
            Err(e) if e.errno() == libc::EOPNOTSUPP || e.errno() == libc::EINVAL => {
                done(write_zero_buffers(self, offset, len))
            }
            other => done(other),
        }
    }

    fn discard(&self, offset: u64, len: u64, done: Done<()>) {
        // A block device takes whole logical blocks (EINVAL otherwise); its
        // punch is a write of zeroes that may unmap (BLKDISCARD's effect
        // with a guarantee), through the same backend as every request.
        let (offset, len) = if self.blockdev {
            let block = logical_block_size(&self.io.fd).unwrap_or(512);
            let start = offset.next_multiple_of(block);
            let end = (offset + len) / block * block;
            if end <= start {
                return done(Ok(()));
            }
            (start, end - start)
        } else {
            (offset, len)
        };
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.io.fallocate(
            mode,
            offset,
            len,
            Box::new(move |r| match r {
                // Discard is advisory: a filesystem without hole punching just keeps the data.
                Err(e) if e.errno() == libc::EOPNOTSUPP => done(Ok(())),
                other => done(other),
            }),
        );
    }

    fn flush(&self, done: Done<()>) {
        if self.no_flush {
            return done(Ok(()));
        }
        self.io.submit_control(OpKind::Fdatasync, 0, 0, done);
    }

    fn has_fua(&self) -> bool {
        true
    }

    fn write_fua(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        self.io.write_with(offset, buf, !self.no_flush, done)
    }

    /// A removable drive's medium now; the size follows a medium change.
    fn media(&self) -> Option<Media> {
        if !self.host.removable() {
            return None;
        }
        let size = fd_size(&self.io.fd, true).unwrap_or(0);
        self.io.size.store(size, Ordering::Relaxed);
        // _IO(0x53, 0x26) with CDSL_CURRENT; drives that are not CD-ROMs
        // (floppies, loop devices) answer ENOTTY and the size decides.
        const CDROM_DRIVE_STATUS: libc::c_ulong = 0x5326;
        const CDS_TRAY_OPEN: i32 = 2;
        const CDS_DISC_OK: i32 = 4;
        let status = if self.host == Host::Cdrom {
            // SAFETY: the ioctl takes its slot argument by value.
            unsafe { libc::ioctl(self.io.fd.as_raw_fd(), CDROM_DRIVE_STATUS, libc::c_int::MAX) }
        } else {
            -1
        };
        Some(if status >= 0 {
            Media {
                inserted: status == CDS_DISC_OK,
                tray_open: status == CDS_TRAY_OPEN,
            }
        } else {
            Media {
                inserted: size > 0,
                tray_open: false,
            }
        })
    }

    fn passthrough_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (!self.blockdev).then(|| self.io.fd.as_fd())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let size = self.size();
        let len = super::status_len(offset, len, size)?;
        let fd = self.io.fd.as_raw_fd();
        let seek = |whence| {
            // SAFETY: plain syscall on a descriptor we own.
            let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(r as u64)
            }
        };
        let data_at = match seek(libc::SEEK_DATA) {
            Ok(d) => d,
            // No data after offset: the rest of the file is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
            // No SEEK_DATA support: everything counts as data.
            Err(_) => offset,
        };
        if data_at > offset {
            return Ok(Status {
                len: (data_at - offset).min(len),
                data: false,
                zero: true,
                offset: Some(offset),
                allocated: true,
            });
        }
        let hole_at = seek(libc::SEEK_HOLE).unwrap_or(size).max(offset + 1);
        Ok(Status::data((hole_at - offset).min(len), Some(offset)))
    }

    fn allocated_size(&self) -> Option<u64> {
        // SAFETY: fstat fills a zeroed struct for a descriptor we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: see above.
        let r = unsafe { libc::fstat(self.io.fd.as_raw_fd(), &mut st) };
        (r == 0).then_some(st.st_blocks as u64 * 512)
    }

    fn filename(&self) -> String {
        self.io.filename.to_string()
    }

    /// The node is read-only: it takes the write and resize permissions for
    /// the duration, as QEMU's temporary read-write reopen does, so the
    /// write is refused while another user does not share them.
    fn write_through(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _perms = match self.locked {
            Some(held) => Some(super::lock::Extra::take(
                self.io.fd.as_fd(),
                &self.io.filename,
                (super::lock::WRITE | super::lock::RESIZE) & !held.perm,
            )?),
            None => None,
        };
        write_through_path(&self.io.filename, offset, data)
    }

    fn set_locks(&self, on: bool) -> Result<()> {
        let Some(perms) = self.locked else {
            return Ok(());
        };
        if on {
            super::lock::lock(self.io.fd.as_fd(), &self.io.filename, OnOffAuto::On, perms)?;
        } else {
            super::lock::unlock_all(self.io.fd.as_fd());
        }
        Ok(())
    }

    fn resize(&self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::generic(format!(
                "Cannot resize '{}': it is open read-only",
                self.io.filename
            )));
        }
        if self.blockdev {
            if size != self.size() {
                return Err(Error::generic("Cannot grow/shrink a block device"));
            }
            return Ok(());
        }
        let len = libc::off_t::try_from(size)
            .map_err(|_| Error::from_errno(libc::EFBIG, &self.io.filename))?;
        // No read-modify-write may straddle the old end while it moves.
        let _excl = self.io.rmw.write();
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(self.io.fd.as_raw_fd(), len) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::from_io(
                &e,
                format!("Failed to resize '{}'", self.io.filename),
            ));
        }
        self.io.size.store(size, Ordering::Relaxed);
        Ok(())
    }
}

/// Creates (or empties) the image file `path` as `qemu-img create` does: opened
/// without truncation, locked for write and resize (refused while another
/// user has the file open, see [`super::lock`]), then truncated to zero. The
/// locks last until the returned file is closed.
pub fn create_locked(path: &str) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not create '{path}'")))?;
    super::lock::lock(
        f.as_fd(),
        path,
        OnOffAuto::Auto,
        super::lock::Perms::for_create(),
    )
    .map_err(|e| e.context(format!("Could not create '{path}'")))?;
    f.set_len(0)
        .map_err(|e| Error::from_io(&e, format!("Could not empty '{path}'")))?;
    Ok(f)
}

/// Writes `data` at `offset` of the file at `path` through a short-lived
/// read-write descriptor, then syncs it.
fn write_through_path(path: &str, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{path}' for writing")))?;
    f.write_all_at(data, offset)
        .and_then(|()| f.sync_data())
        .map_err(|e| Error::from_io(&e, format!("Could not write '{path}'")))
}

/// Fallback for filesystems without FALLOC_FL_ZERO_RANGE.
fn write_zero_buffers(f: &FileDriver, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut pos = offset;
    while pos < offset + len {
        let n = CHUNK.min(offset + len - pos);
        super::wait(|d| f.write(pos, Buf::zeroed(n as usize), d))?;
        pos += n;
    }
    Ok(())
}

/// The O_DIRECT offset alignment the kernel reports (statx STATX_DIOALIGN).
fn dio_align(fd: &OwnedFd) -> u64 {
    // SAFETY: statx fills a zeroed struct; the empty path with AT_EMPTY_PATH names the descriptor.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let align = stx.stx_dio_offset_align as u64;
    if r == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && align.is_power_of_two()
        && align <= FALLBACK_ALIGN
    {
        align
    } else {
        FALLBACK_ALIGN
    }
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: fstat fills a zeroed struct for a descriptor we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The file type bits (`S_IFREG`, `S_IFBLK`, ...).
fn file_kind(fd: &OwnedFd) -> std::io::Result<libc::mode_t> {
    Ok(fstat(fd)?.st_mode & libc::S_IFMT)
}

/// The size of a file, or of a block device (BLKGETSIZE64).
fn fd_size(fd: &OwnedFd, blockdev: bool) -> std::io::Result<u64> {
    // _IOR(0x12, 114, size_t): not exported by the libc crate.
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    if blockdev {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
        if unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(size);
    }
    Ok(fstat(fd)?.st_size as u64)
}

/// A block device's logical block size (BLKSSZGET): its O_DIRECT alignment.
fn logical_block_size(fd: &OwnedFd) -> Option<u64> {
    // _IO(0x12, 104): not exported by the libc crate.
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer we pass.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut size) };
    (r == 0 && size > 0 && (size as u64).is_power_of_two()).then_some(size as u64)
}
