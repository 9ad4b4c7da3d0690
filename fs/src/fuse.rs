//! The FUSE export: a flat directory with one regular file per device.
//! Every operation is one engine call; replies are sent from whichever
//! thread completes the I/O, so reader threads never wait for disk I/O.

use blkfs_engine::graph::Device;
use blkfs_engine::io::Buf;
use blkfs_engine::{Engine, Error};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Attributes are not cached: sizes and allocation change under the kernel's feet.
const TTL: Duration = Duration::ZERO;
pub const MAX_IO: u32 = 1 << 20;

pub struct BlkFs {
    engine: Arc<Engine>,
    inodes: Arc<RwLock<Inodes>>,
    started: SystemTime,
    uid: u32,
    gid: u32,
    /// The kernel agreed to FUSE passthrough at INIT.
    passthrough: AtomicBool,
    /// The backing file registered for each passthrough device, kept for
    /// the life of the mount (its opens take their own references).
    backing: Mutex<HashMap<INodeNo, fuser::BackingId>>,
}

#[derive(Default)]
pub struct Inodes {
    by_id: HashMap<String, INodeNo>,
    by_ino: HashMap<INodeNo, Arc<Device>>,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

impl BlkFs {
    pub fn new(engine: Arc<Engine>) -> BlkFs {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        BlkFs {
            engine,
            inodes: Arc::default(),
            started: SystemTime::now(),
            uid,
            gid,
            passthrough: AtomicBool::new(false),
            backing: Mutex::default(),
        }
    }

    /// A listener that tells the kernel to drop what it cached about a
    /// device whose size changed; `notifier` comes from the session later.
    pub fn resize_listener(
        &self,
    ) -> impl FnOnce(fuser::Notifier) -> Box<dyn Fn(&str) + Send + Sync> {
        let inodes = self.inodes.clone();
        move |notifier| {
            Box::new(move |id: &str| {
                let ino = inodes.read().by_id.get(id).copied();
                if let Some(ino) = ino {
                    if let Err(e) = notifier.inval_inode(ino, 0, -1) {
                        log::debug!("invalidating {id}: {e}");
                    }
                }
            })
        }
    }

    /// The inode of a device, assigned on first sight and stable afterwards.
    fn inode_of(&self, dev: Arc<Device>) -> INodeNo {
        if let Some(ino) = self.inodes.read().by_id.get(&dev.id) {
            return *ino;
        }
        let mut inodes = self.inodes.write();
        let next = INodeNo(inodes.by_id.len() as u64 + 2);
        let ino = *inodes.by_id.entry(dev.id.clone()).or_insert(next);
        inodes.by_ino.insert(ino, dev);
        ino
    }

    fn device(&self, ino: INodeNo) -> Result<Arc<Device>, Errno> {
        self.inodes
            .read()
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: INodeNo, dev: Option<&Device>) -> FileAttr {
        let (kind, perm, size, blocks, nlink) = match dev {
            None => (FileType::Directory, 0o755, 0, 0, 2),
            Some(d) => {
                let root = d.root();
                let perm = if root.opts.read_only { 0o400 } else { 0o600 };
                let alloc = root.driver.allocated_size().unwrap_or(0);
                (
                    FileType::RegularFile,
                    perm,
                    root.size(),
                    alloc.div_ceil(512),
                    1,
                )
            }
        };
        FileAttr {
            ino,
            size,
            blocks,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Opens a passthrough device: the kernel reads and writes its file.
    /// Where the kernel cannot, the open fails rather than quietly serving
    /// the device another way than the one asked for.
    fn open_passthrough(&self, ino: INodeNo, dev: &Device, reply: ReplyOpen) {
        if !self.passthrough.load(Ordering::Relaxed) {
            log::error!(
                "device '{}': the kernel did not offer FUSE passthrough (CONFIG_FUSE_PASSTHROUGH, Linux 6.9+, root)",
                dev.id
            );
            return reply.error(Errno::EOPNOTSUPP);
        }
        let mut backing = self.backing.lock();
        let id = match backing.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let root = dev.root();
                let Some(fd) = root.driver.passthrough_fd() else {
                    return reply.error(Errno::EOPNOTSUPP);
                };
                match reply.open_backing(fd) {
                    Ok(id) => v.insert(id),
                    Err(e) => {
                        log::error!("device '{}': FUSE passthrough refused: {e}", dev.id);
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        return reply.error(Errno::from_i32(errno));
                    }
                }
            }
        };
        reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id)
    }

    /// Offset of the next data (or hole) at or after `offset`, walking the
    /// device's block status.
    fn seek(&self, dev: &Device, offset: u64, want_data: bool) -> Result<u64, Errno> {
        let root = dev.root();
        let size = root.size();
        let mut pos = offset;
        while pos < size {
            let st = root.block_status(pos, size - pos).map_err(|e| errno(&e))?;
            let is_data = st.data || !st.zero;
            if is_data == want_data {
                return Ok(pos);
            }
            pos += st.len.max(1);
        }
        // The end of the device counts as a hole; there is no data past it.
        if want_data {
            Err(Errno::ENXIO)
        } else {
            Ok(size)
        }
    }
}

impl Filesystem for BlkFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(256);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(dev) = name.to_str().and_then(|n| self.engine.graph.device(n).ok()) else {
            return reply.error(Errno::ENOENT);
        };
        let ino = self.inode_of(dev.clone());
        reply.entry(&TTL, &self.attr(ino, Some(&dev)), Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT {
            return reply.attr(&TTL, &self.attr(ino, None));
        }
        match self.device(ino) {
            Ok(d) => reply.attr(&TTL, &self.attr(ino, Some(&d))),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        // A device's size changes only through block_resize; ownership and
        // mode follow the device, not the caller.
        if size.is_some_and(|s| s != dev.size()) || mode.is_some() || uid.is_some() || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.attr(ino, Some(&dev)));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        if flags.acc_mode() != OpenAccMode::O_RDONLY && dev.read_only() {
            return reply.error(Errno::EROFS);
        }
        if dev.passthrough() {
            return self.open_passthrough(ino, &dev, reply);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        dev.read(
            offset,
            size as usize,
            Box::new(move |r| match r {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let len = data.len() as u32;
        dev.write(
            offset,
            Buf::from_slice(data),
            Box::new(move |r| match r {
                Ok(_) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    /// FLUSH comes with every close() of a descriptor (a forked child's
    /// too). It is not a durability point (fsync is), and blkfs keeps no
    /// write cache of its own, so it answers at once: a close must never
    /// wait behind a device the error policy stopped.
    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.device(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        dev.flush(Box::new(move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![(INodeNo::ROOT, FileType::Directory, ".".to_string())];
        entries.push((INodeNo::ROOT, FileType::Directory, "..".to_string()));
        for d in self.engine.graph.devices() {
            let id = d.id.clone();
            entries.push((self.inode_of(d), FileType::RegularFile, id));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let done: blkfs_engine::drivers::Done<()> = Box::new(move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        });
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let in_range = offset
            .checked_add(length)
            .is_some_and(|end| end <= dev.size());
        let zeroing = mode == PUNCH
            || mode == libc::FALLOC_FL_ZERO_RANGE
            || mode == libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if zeroing && !in_range {
            // A device cannot grow through fallocate, nor be zeroed past its end.
            return done(Err(Error::io(
                libc::EINVAL,
                "fallocate range crosses the end of the device",
            )));
        }
        match mode {
            // The range must read back as zeroes; it is deallocated only
            // when the device's discard option is unmap.
            PUNCH => dev.write_zeroes(offset, length, true, done),
            m if m == libc::FALLOC_FL_ZERO_RANGE
                || m == libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE =>
            {
                dev.write_zeroes(offset, length, false, done)
            }
            // Plain preallocation inside the device: the space already exists.
            0 | libc::FALLOC_FL_KEEP_SIZE if in_range => done(Ok(())),
            0 | libc::FALLOC_FL_KEEP_SIZE => done(Err(Error::io(
                libc::EOPNOTSUPP,
                "devices are resized with block_resize, not fallocate",
            ))),
            _ => done(Err(Error::io(
                libc::EOPNOTSUPP,
                "unsupported fallocate mode",
            ))),
        }
    }

    /// Devices have no extended attributes. ENOSYS (not ENODATA) makes the
    /// kernel stop asking: it looks for `security.capability` before every
    /// write, one round trip per write (17k IOPS on a passthrough device).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let dev = match self.device(ino) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        if offset < 0 {
            return reply.error(Errno::EINVAL);
        }
        let offset = offset as u64;
        if offset >= dev.size() && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
            return reply.error(Errno::ENXIO);
        }
        let r = match whence {
            libc::SEEK_DATA => self.seek(&dev, offset, true),
            libc::SEEK_HOLE => self.seek(&dev, offset, false),
            _ => Err(Errno::EINVAL),
        };
        match r {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(e),
        }
    }
}
