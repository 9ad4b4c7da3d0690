//! The FUSE export: a flat directory with one regular file per device.
//! `Export` answers each operation once for both transports: the fuser
//! `Filesystem` below (requests read from /dev/fuse) and `ring` (FUSE over
//! io_uring). Every operation is one engine call; replies are sent from
//! whichever thread completes the I/O, so no thread waits for disk I/O.

use crate::fuse_abi;
use crate::ring;
use blkfs_engine::drivers::Done;
use blkfs_engine::graph::Device;
use blkfs_engine::io::Buf;
use blkfs_engine::{Engine, Error};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// Attributes are not cached: sizes and allocation change under the kernel's feet.
const TTL: Duration = Duration::ZERO;
pub const MAX_IO: u32 = 1 << 20;
/// How long a deletion waits for the releases of files closed just before.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// How requests travel between the kernel and the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// FUSE over io_uring where the kernel offers it, else /dev/fuse.
    Auto,
    /// FUSE over io_uring; the mount fails where the kernel does not offer it.
    Uring,
    /// read(2)/writev(2) on /dev/fuse.
    Dev,
}

pub struct Export {
    engine: Arc<Engine>,
    inodes: RwLock<Inodes>,
    started: SystemTime,
    uid: u32,
    gid: u32,
    transport: Transport,
    /// The kernel agreed to FUSE passthrough at INIT.
    passthrough: AtomicBool,
    /// The backing file registered for each passthrough device, kept for
    /// the life of the mount (its opens take their own references).
    backing: Mutex<HashMap<u64, u32>>,
    /// The session's /dev/fuse descriptor, set before the first request.
    dev_fd: OnceLock<OwnedFd>,
    /// Queues made at INIT when the kernel offered FUSE over io_uring.
    rings: Mutex<Option<ring::Prepared>>,
}

#[derive(Default)]
struct Inodes {
    by_id: HashMap<String, u64>,
    by_ino: HashMap<u64, Arc<Device>>,
    /// Inode numbers are never reused: a deleted device's stay dead.
    next: u64,
    /// Deleted devices' inodes: descriptors still open on them get ENODEV.
    gone: std::collections::HashSet<u64>,
    /// Open descriptors per inode: a device whose file is open is not deleted.
    opens: HashMap<u64, usize>,
    /// Being deleted (found closed): opens are refused from then on.
    deleting: std::collections::HashSet<u64>,
    /// chmod/chown of device files (the kernel checks who may, with
    /// `default_permissions`); kept for the life of the mount.
    owners: HashMap<u64, Owner>,
}

/// What chmod and chown set on a device file.
#[derive(Debug, Clone, Copy, Default)]
struct Owner {
    perm: Option<u16>,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// The members of a setattr blkfs acts on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

/// The fuser side: hands each request to the shared `Export`.
pub struct BlkFs(pub Arc<Export>);

impl Export {
    pub fn new(engine: Arc<Engine>, transport: Transport) -> Arc<Export> {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Arc::new(Export {
            engine,
            inodes: RwLock::default(),
            started: SystemTime::now(),
            uid,
            gid,
            transport,
            passthrough: AtomicBool::new(false),
            backing: Mutex::default(),
            dev_fd: OnceLock::new(),
            rings: Mutex::default(),
        })
    }

    /// Called once the session exists (INIT answered): keeps a descriptor
    /// of the connection and, where the kernel agreed, starts the io_uring
    /// queues. Returns the name of the transport in use.
    pub fn connect(self: &Arc<Self>, dev: impl AsFd) -> Result<&'static str, String> {
        let fd = dev
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot duplicate the /dev/fuse descriptor: {e}"))?;
        let raw = fd.as_raw_fd();
        let _ = self.dev_fd.set(fd);
        let Some(rings) = self.rings.lock().take() else {
            return Ok("/dev/fuse");
        };
        rings
            .start(raw, self.clone())
            .map_err(|e| format!("cannot start the FUSE io_uring queues: {e}"))?;
        Ok("io_uring")
    }

    /// A listener that tells the kernel to drop what it cached about a
    /// device whose size changed; `notifier` comes from the session later.
    pub fn resize_listener(
        self: &Arc<Self>,
    ) -> impl FnOnce(fuser::Notifier) -> Box<dyn Fn(&str) + Send + Sync> {
        let me = self.clone();
        move |notifier| {
            Box::new(move |id: &str| {
                let ino = me.inodes.read().by_id.get(id).copied();
                if let Some(ino) = ino {
                    if let Err(e) = notifier.inval_inode(INodeNo(ino), 0, -1) {
                        log::debug!("invalidating {id}: {e}");
                    }
                }
            })
        }
    }

    /// Negotiates the connection at INIT, before the reply is sent.
    fn init(&self, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(256);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        self.passthrough.store(passthrough, Ordering::Relaxed);
        if self.transport == Transport::Dev {
            return Ok(());
        }
        let offered = config
            .capabilities()
            .contains(InitFlags::FUSE_OVER_IO_URING);
        let prepared = if offered {
            // A ring entry's payload holds the largest request or reply.
            ring::Prepared::new((MAX_IO as usize).max(8192))
                .map_err(|e| std::io::Error::other(format!("FUSE over io_uring: {e}")))
        } else {
            Err(std::io::Error::other(
                "the kernel did not offer FUSE over io_uring (it needs Linux 6.14+ with \
                 CONFIG_FUSE_IO_URING, enabled by root: echo 1 > /sys/module/fuse/parameters/enable_uring)",
            ))
        };
        match prepared {
            Ok(p) => {
                if config
                    .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                    .is_ok()
                {
                    *self.rings.lock() = Some(p);
                }
                Ok(())
            }
            Err(e) if self.transport == Transport::Uring => {
                log::error!("{e}");
                Err(e)
            }
            Err(e) => {
                log::debug!("{e}; using /dev/fuse");
                Ok(())
            }
        }
    }

    /// The inode of a device, assigned on first sight and stable afterwards;
    /// a device added again under the same id gets a new one.
    fn inode_of(&self, dev: Arc<Device>) -> Result<u64, Errno> {
        let mine = |inodes: &Inodes| {
            let ino = *inodes.by_id.get(&dev.id)?;
            inodes
                .by_ino
                .get(&ino)
                .is_some_and(|d| Arc::ptr_eq(d, &dev))
                .then_some(ino)
        };
        if let Some(ino) = mine(&self.inodes.read()) {
            return Ok(ino);
        }
        let mut inodes = self.inodes.write();
        if let Some(ino) = mine(&inodes) {
            return Ok(ino);
        }
        // Looked up just as it was deleted: never map a deleted device
        // (it would stay open for good).
        let current = self.engine.graph.file(&dev.id);
        if !current.is_some_and(|d| Arc::ptr_eq(&d, &dev)) {
            return Err(Errno::ENOENT);
        }
        inodes.next = inodes.next.max(INodeNo::ROOT.0) + 1;
        let ino = inodes.next;
        if let Some(old) = inodes.by_id.insert(dev.id.clone(), ino) {
            inodes.by_ino.remove(&old);
            inodes.gone.insert(old);
        }
        inodes.by_ino.insert(ino, dev);
        Ok(ino)
    }

    /// Hooks the mount to device deletion: a device whose file is open is
    /// not deleted (unless forced), and a deleted one leaves the directory.
    pub fn watch_removals(self: &Arc<Self>, notifier: fuser::Notifier) {
        let me = self.clone();
        self.engine.graph.on_busy_check(move |dev| {
            // Closed, it is marked in the same lock: no open slips in
            // between this check and the deletion.
            let open_or_mark = || {
                let mut inodes = me.inodes.write();
                let ino = *inodes.by_id.get(&dev.id).filter(|i| {
                    inodes
                        .by_ino
                        .get(i)
                        .is_some_and(|d| std::ptr::eq(&**d, dev))
                })?;
                match inodes.opens.get(&ino).copied().filter(|&n| n > 0) {
                    Some(n) => Some(n),
                    None => {
                        inodes.deleting.insert(ino);
                        None
                    }
                }
            };
            // close(2) returns before the kernel's RELEASE reaches us: give
            // a file closed just now the moment its release takes.
            let deadline = std::time::Instant::now() + RELEASE_GRACE;
            let mut n = open_or_mark();
            while n.is_some() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
                n = open_or_mark();
            }
            n.map(|n| format!("its file in the mount is open ({n} descriptors)"))
        });
        let me = self.clone();
        self.engine.graph.on_delete_cancelled(move |dev| {
            let mut inodes = me.inodes.write();
            if let Some(ino) = inodes.by_id.get(&dev.id).copied() {
                inodes.deleting.remove(&ino);
            }
        });
        let me = self.clone();
        self.engine.graph.on_removed(move |dev| {
            let ino = {
                let mut inodes = me.inodes.write();
                let Some(&ino) = inodes.by_id.get(&dev.id) else {
                    return;
                };
                // The id may already name a device added since.
                if !inodes.by_ino.get(&ino).is_some_and(|d| Arc::ptr_eq(d, dev)) {
                    return;
                }
                inodes.by_id.remove(&dev.id);
                inodes.by_ino.remove(&ino);
                inodes.owners.remove(&ino);
                inodes.deleting.remove(&ino);
                inodes.gone.insert(ino);
                ino
            };
            me.close_backing(ino);
            if let Err(e) = notifier.inval_entry(INodeNo::ROOT, OsStr::new(&dev.id)) {
                log::debug!("forgetting the file of '{}': {e}", dev.id);
            }
        });
    }

    /// Gives the kernel back the backing file of a deleted passthrough
    /// device (descriptors still open keep their own reference).
    fn close_backing(&self, ino: u64) {
        let Some(id) = self.backing.lock().remove(&ino) else {
            return;
        };
        let Some(fuse) = self.dev_fd.get() else {
            return;
        };
        // _IOW(229, 2, u32): FUSE_DEV_IOC_BACKING_CLOSE.
        const BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
        // SAFETY: the ioctl reads one u32 from the pointer we pass.
        if unsafe { libc::ioctl(fuse.as_raw_fd(), BACKING_CLOSE, &id) } < 0 {
            let e = std::io::Error::last_os_error();
            log::warn!("closing passthrough backing id {id}: {e}");
        }
    }

    /// A descriptor of `ino` was released.
    pub fn release(&self, ino: u64) {
        let mut inodes = self.inodes.write();
        let n = inodes.opens.entry(ino).or_insert(0);
        *n = n.saturating_sub(1);
        if *n == 0 {
            inodes.opens.remove(&ino);
        }
    }

    /// ioctl(2) on a device file. Tools size a device with BLKGETSIZE64,
    /// so it gets a real answer; every other request a quiet ENOTTY, as a
    /// regular file gives (mkfs, losetup and qemu-img probe with several).
    pub fn ioctl(&self, ino: u64, cmd: u32, out_size: u32) -> Result<Vec<u8>, Errno> {
        // _IOR(0x12, 114, u64).
        const BLKGETSIZE64: u32 = 0x8008_1272;
        let dev = self.device(ino)?;
        if cmd == BLKGETSIZE64 && out_size as usize >= 8 {
            return Ok(dev.size().to_le_bytes().to_vec());
        }
        log::debug!(
            "ioctl {cmd:#x} on '{}': not a block device (ENOTTY)",
            dev.id
        );
        Err(Errno::ENOTTY)
    }

    pub fn device(&self, ino: u64) -> Result<Arc<Device>, Errno> {
        let inodes = self.inodes.read();
        match inodes.by_ino.get(&ino) {
            Some(d) => Ok(d.clone()),
            None if inodes.gone.contains(&ino) => Err(Errno::ENODEV),
            None => Err(Errno::ENOENT),
        }
    }

    fn attr(&self, ino: u64, dev: Option<&Device>) -> FileAttr {
        let owner = self
            .inodes
            .read()
            .owners
            .get(&ino)
            .copied()
            .unwrap_or_default();
        let (kind, perm, size, blocks, nlink) = match dev {
            None => (FileType::Directory, 0o755, 0, 0, 2),
            Some(d) => {
                let root = d.root();
                let perm = owner
                    .perm
                    .unwrap_or(if d.read_only() { 0o400 } else { 0o600 });
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
            ino: INodeNo(ino),
            size,
            blocks,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: owner.uid.unwrap_or(self.uid),
            gid: owner.gid.unwrap_or(self.gid),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Attributes as the FUSE wire format carries them.
    pub fn wire_attr(a: &FileAttr) -> fuse_abi::Attr {
        let since = a
            .mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let kind = match a.kind {
            FileType::Directory => libc::S_IFDIR,
            _ => libc::S_IFREG,
        };
        fuse_abi::Attr {
            ino: a.ino.0,
            size: a.size,
            blocks: a.blocks,
            time: (since.as_secs(), since.subsec_nanos()),
            mode: kind | u32::from(a.perm),
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            blksize: a.blksize,
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<FileAttr, Errno> {
        if parent != INodeNo::ROOT.0 {
            return Err(Errno::ENOENT);
        }
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let dev = self.engine.graph.file(name).ok_or(Errno::ENOENT)?;
        let ino = self.inode_of(dev.clone())?;
        Ok(self.attr(ino, Some(&dev)))
    }

    pub fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        if ino == INodeNo::ROOT.0 {
            return Ok(self.attr(ino, None));
        }
        let d = self.device(ino)?;
        Ok(self.attr(ino, Some(&d)))
    }

    /// A device's size changes only through block_resize; its mode and
    /// owner may be set (an operator hands a device file to a VM's user).
    pub fn setattr(&self, ino: u64, set: SetAttr) -> Result<FileAttr, Errno> {
        let dev = self.device(ino)?;
        if set.size.is_some_and(|s| s != dev.size()) {
            return Err(Errno::EPERM);
        }
        if set.mode.is_some() || set.uid.is_some() || set.gid.is_some() {
            let mut inodes = self.inodes.write();
            let o = inodes.owners.entry(ino).or_default();
            if let Some(m) = set.mode {
                o.perm = Some((m & 0o7777) as u16);
            }
            o.uid = set.uid.or(o.uid);
            o.gid = set.gid.or(o.gid);
        }
        Ok(self.attr(ino, Some(&dev)))
    }

    /// Checks an open; Some(backing id) when the kernel serves the file
    /// itself (passthrough).
    pub fn open(&self, ino: u64, flags: i32) -> Result<Option<u32>, Errno> {
        let dev = self.device(ino)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY && dev.read_only() {
            return Err(Errno::EROFS);
        }
        {
            // Counted in the lock a deletion's check marks it in.
            let mut inodes = self.inodes.write();
            if inodes.deleting.contains(&ino) {
                return Err(Errno::ENODEV);
            }
            *inodes.opens.entry(ino).or_insert(0) += 1;
        }
        if !dev.passthrough() {
            return Ok(None);
        }
        self.open_passthrough(ino, &dev).map(Some).inspect_err(|_| {
            self.release(ino);
        })
    }

    /// Opens a passthrough device: the kernel reads and writes its file.
    /// Where the kernel cannot, the open fails rather than quietly serving
    /// the device another way than the one asked for.
    fn open_passthrough(&self, ino: u64, dev: &Device) -> Result<u32, Errno> {
        if !self.passthrough.load(Ordering::Relaxed) {
            log::error!(
                "device '{}': the kernel did not offer FUSE passthrough (CONFIG_FUSE_PASSTHROUGH, Linux 6.9+, root)",
                dev.id
            );
            return Err(Errno::EOPNOTSUPP);
        }
        let mut backing = self.backing.lock();
        if let Some(id) = backing.get(&ino) {
            return Ok(*id);
        }
        let root = dev.root();
        let (Some(fd), Some(fuse)) = (root.driver.passthrough_fd(), self.dev_fd.get()) else {
            return Err(Errno::EOPNOTSUPP);
        };
        match fuser::BackingId::create_raw(fuse, fd) {
            Ok(id) => Ok(*backing.entry(ino).or_insert(id)),
            Err(e) => {
                log::error!("device '{}': FUSE passthrough refused: {e}", dev.id);
                Err(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)))
            }
        }
    }

    /// The root directory's entries: (inode, is a directory, name).
    pub fn readdir(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, Errno> {
        if ino != INodeNo::ROOT.0 {
            return Err(Errno::ENOTDIR);
        }
        let root = INodeNo::ROOT.0;
        let mut entries = vec![
            (root, true, ".".to_string()),
            (root, true, "..".to_string()),
        ];
        for d in self.engine.graph.files() {
            let id = d.id.clone();
            // One deleted meanwhile is left out.
            if let Ok(ino) = self.inode_of(d) {
                entries.push((ino, false, id));
            }
        }
        Ok(entries)
    }

    pub fn lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<u64, Errno> {
        let dev = self.device(ino)?;
        if offset < 0 {
            return Err(Errno::EINVAL);
        }
        let offset = offset as u64;
        if offset >= dev.size() && (whence == libc::SEEK_DATA || whence == libc::SEEK_HOLE) {
            return Err(Errno::ENXIO);
        }
        match whence {
            libc::SEEK_DATA => seek(&dev, offset, true),
            libc::SEEK_HOLE => seek(&dev, offset, false),
            _ => Err(Errno::EINVAL),
        }
    }
}

/// Offset of the next data (or hole) at or after `offset`, walking the
/// device's block status.
fn seek(dev: &Device, offset: u64, want_data: bool) -> Result<u64, Errno> {
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

/// fallocate(2) on a device: zeroing modes write zeroes, plain
/// preallocation inside the device succeeds, growth is refused.
pub fn fallocate(dev: &Arc<Device>, offset: u64, length: u64, mode: i32, done: Done<()>) {
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

impl Filesystem for BlkFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.0.init(config)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.lookup(parent.0, name.as_encoded_bytes()) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
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
        let set = SetAttr {
            size,
            mode,
            uid,
            gid,
        };
        match self.0.setattr(ino.0, set) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.0.open(ino.0, flags.0) {
            Ok(None) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Ok(Some(id)) => {
                // SAFETY: `id` was opened on this connection and stays open
                // for the life of the mount (released again by into_raw).
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &backing);
                let _ = backing.into_raw();
            }
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.release(ino.0);
        reply.ok();
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
        let dev = match self.0.device(ino.0) {
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
        let dev = match self.0.device(ino.0) {
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
        match self.0.device(ino.0) {
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
        let dev = match self.0.device(ino.0) {
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
        let entries = match self.0.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (i, (ino, dir, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
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
        let dev = match self.0.device(ino.0) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        fallocate(
            &dev,
            offset,
            length,
            mode,
            Box::new(move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }),
        );
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

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        match self.0.ioctl(ino.0, cmd, out_size) {
            Ok(data) => reply.ioctl(0, &data),
            Err(e) => reply.error(e),
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
        match self.0.lseek(ino.0, offset, whence) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(e),
        }
    }
}
