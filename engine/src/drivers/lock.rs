//! Image locking compatible with QEMU's `file-posix` driver.
//!
//! A user of an image file announces what it does (its *permissions*) and
//! what it lets others do (its *shared* permissions) with open file
//! description (OFD) byte-range read locks on the image itself:
//!
//! - byte `100 + bit` is locked while the user holds permission `bit`;
//! - byte `200 + bit` is locked while the user does **not** share `bit`.
//!
//! The bits are QEMU's `BLK_PERM_*`: consistent read (0), write (1), write
//! unchanged (2), resize (3). A new user first locks its own bytes, then
//! tests for conflicts: another description holding `200 + bit` for a
//! permission it wants (`Failed to get "write" lock`), or `100 + bit` for a
//! permission it does not share (`Failed to get shared "write" lock`). Two
//! users racing both see each other and both fail, never both succeed.
//!
//! OFD locks belong to the open file description, so two descriptors of one
//! process conflict like two processes do, and the locks go away when the
//! last descriptor of the description closes.

use crate::error::{Error, Result};
use crate::options::OnOffAuto;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
pub const CONSISTENT_READ: u64 = 0x01;
/// `BLK_PERM_WRITE`: writes that change the visible content.
pub const WRITE: u64 = 0x02;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that keep the visible content.
pub const WRITE_UNCHANGED: u64 = 0x04;
/// `BLK_PERM_RESIZE`: changing the size.
pub const RESIZE: u64 = 0x08;
/// `BLK_PERM_ALL`.
pub const ALL: u64 = 0x0f;

/// First byte of the permission locks (libvirt uses byte 0).
const PERM_BASE: i64 = 100;
/// First byte of the "not shared" locks.
const SHARED_BASE: i64 = 200;

/// What a user of an image file does, and what it lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub perm: u64,
    pub shared: u64,
}

impl Perms {
    /// A format or protocol node's file as blkfs uses it, as QEMU's default
    /// permissions give it: writers hold consistent read, write and resize
    /// (a format's metadata writes may grow the file; `block_resize` needs
    /// no later upgrade); readers consistent read. Neither shares write or
    /// resize, as QEMU's format nodes never do for their file and backing
    /// nodes never do for their parents (`bdrv_default_perms_for_storage`,
    /// `_for_cow`); `force_share` shares everything (read-only users only).
    pub fn for_node(read_only: bool, force_share: bool) -> Perms {
        let perm = if read_only {
            CONSISTENT_READ
        } else {
            CONSISTENT_READ | WRITE | RESIZE
        };
        let shared = if force_share {
            ALL
        } else {
            CONSISTENT_READ | WRITE_UNCHANGED
        };
        Perms { perm, shared }
    }

    /// What `qemu-img create` takes on the file it creates: write and
    /// resize, sharing everything but resize.
    pub fn for_create() -> Perms {
        Perms {
            perm: WRITE | RESIZE,
            shared: ALL & !RESIZE,
        }
    }
}

/// QEMU's name of one permission bit (`bdrv_perm_names`).
fn perm_name(bit: u64) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

fn bits() -> impl Iterator<Item = (i64, u64)> {
    (0..4).map(|i| (i, 1u64 << i))
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on one byte.
fn lock_byte(fd: BorrowedFd<'_>, byte: i64) -> std::io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass; the descriptor is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn byte_taken(fd: BorrowedFd<'_>, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK fills the flock struct we pass; the descriptor is open.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether the kernel and the filesystem of `fd` do OFD locks.
fn ofd_supported(fd: BorrowedFd<'_>) -> bool {
    !matches!(byte_taken(fd, PERM_BASE), Err(e) if e.raw_os_error() == Some(libc::EINVAL))
}

/// Drops every lock byte `fd` holds: on a failed attempt, and when a node
/// closes while requests in flight still hold its descriptor (closing the
/// last descriptor does the same).
pub fn unlock_all(fd: BorrowedFd<'_>) {
    let mut fl = flock(libc::F_UNLCK, PERM_BASE);
    fl.l_len = SHARED_BASE + 64 - PERM_BASE;
    // SAFETY: F_OFD_SETLK reads the flock struct we pass; the descriptor is open.
    // Unlocking cannot conflict; a failure leaves bytes locked until close.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
}

/// Locks `fd` (a descriptor of `filename`) for `perms` as `mode` says, or
/// fails naming the lock another user holds. Returns whether locks were
/// taken. The locks last as long as the open file description.
pub fn lock(fd: BorrowedFd<'_>, filename: &str, mode: OnOffAuto, perms: Perms) -> Result<bool> {
    match mode {
        OnOffAuto::Off => return Ok(false),
        OnOffAuto::Auto if !ofd_supported(fd) => return Ok(false),
        OnOffAuto::On if !ofd_supported(fd) => {
            return Err(Error::generic(format!(
                "Cannot lock '{filename}': OFD locks are not supported (use file.locking=off)"
            )))
        }
        _ => {}
    }
    let r = apply(fd, perms).and_then(|()| check(fd, perms));
    r.map(|()| true).map_err(|e| {
        unlock_all(fd);
        hint(e, filename)
    })
}

fn hint(mut e: Error, filename: &str) -> Error {
    e.msg = format!(
        "{}. Is another process using the image [{filename}]?",
        e.msg
    );
    e
}

/// Permissions a locked descriptor holds for a while on top of its own (as
/// QEMU's temporary read-write reopen of a backing image); they go with the
/// guard.
pub struct Extra<'a> {
    fd: BorrowedFd<'a>,
    bytes: Vec<i64>,
}

impl<'a> Extra<'a> {
    /// Takes `perm` (bits `fd` does not hold yet), or fails naming the lock
    /// another user holds.
    pub fn take(fd: BorrowedFd<'a>, filename: &str, perm: u64) -> Result<Extra<'a>> {
        let mut extra = Extra {
            fd,
            bytes: Vec::new(),
        };
        for (i, _) in bits().filter(|(_, b)| perm & b != 0) {
            lock_byte(fd, PERM_BASE + i).map_err(|e| {
                let what = format!("Failed to lock byte {}", PERM_BASE + i);
                hint(Error::from_io(&e, what), filename)
            })?;
            extra.bytes.push(PERM_BASE + i);
        }
        check(fd, Perms { perm, shared: ALL }).map_err(|e| hint(e, filename))?;
        Ok(extra)
    }
}

impl Drop for Extra<'_> {
    fn drop(&mut self) {
        for &byte in &self.bytes {
            let fl = flock(libc::F_UNLCK, byte);
            // SAFETY: F_OFD_SETLK reads the flock struct we pass; the descriptor is open.
            // Unlocking cannot conflict; a failure leaves the byte locked until close.
            unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        }
    }
}

/// Step one: lock the bytes of our permissions and of what we do not share.
fn apply(fd: BorrowedFd<'_>, perms: Perms) -> Result<()> {
    let wanted = bits()
        .filter(|(_, b)| perms.perm & b != 0)
        .map(|(i, _)| PERM_BASE + i)
        .chain(
            bits()
                .filter(|(_, b)| perms.shared & b == 0)
                .map(|(i, _)| SHARED_BASE + i),
        );
    for byte in wanted {
        lock_byte(fd, byte).map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                Error::io(libc::EAGAIN, format!("Failed to lock byte {byte}"))
            }
            _ => Error::from_io(&e, format!("Failed to lock byte {byte}")),
        })?;
    }
    Ok(())
}

/// Step two: nobody else unshares what we want, nor holds what we unshare.
fn check(fd: BorrowedFd<'_>, perms: Perms) -> Result<()> {
    let test = |byte: i64, what: String| match byte_taken(fd, byte) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Error::io(libc::EAGAIN, what)),
        Err(e) => Err(Error::from_io(&e, what)),
    };
    for (i, b) in bits().filter(|(_, b)| perms.perm & b != 0) {
        test(
            SHARED_BASE + i,
            format!("Failed to get \"{}\" lock", perm_name(b)),
        )?;
    }
    for (i, b) in bits().filter(|(_, b)| perms.shared & b == 0) {
        test(
            PERM_BASE + i,
            format!("Failed to get shared \"{}\" lock", perm_name(b)),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    fn tmp(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("blkfs-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, b"x").unwrap();
        p.to_string_lossy().into_owned()
    }

    fn open(p: &str) -> File {
        File::options().read(true).write(true).open(p).unwrap()
    }

    fn take(f: &File, p: &str, perms: Perms) -> Result<bool> {
        lock(f.as_fd(), p, OnOffAuto::On, perms)
    }

    #[test]
    fn writers_exclude_each_other_readers_share() {
        let p = tmp("a");
        let rw = Perms::for_node(false, false);
        let ro = Perms::for_node(true, false);
        let a = open(&p);
        assert_eq!(take(&a, &p, rw), Ok(true));
        let b = open(&p);
        let e = take(&b, &p, rw).unwrap_err();
        assert_eq!(
            e.msg,
            format!("Failed to get \"write\" lock. Is another process using the image [{p}]?")
        );
        let e = take(&b, &p, ro).unwrap_err();
        assert!(
            e.msg.starts_with("Failed to get shared \"write\" lock"),
            "{}",
            e.msg
        );
        // The failed attempts left nothing behind; force-share reads.
        assert_eq!(take(&b, &p, Perms::for_node(true, true)), Ok(true));
        drop(a);
        drop(b);
        let (c, d) = (open(&p), open(&p));
        assert_eq!(take(&c, &p, ro), Ok(true));
        assert_eq!(take(&d, &p, ro), Ok(true));
        let e = take(&open(&p), &p, rw).unwrap_err();
        assert!(
            e.msg.starts_with("Failed to get \"write\" lock"),
            "{}",
            e.msg
        );
        let e = take(&open(&p), &p, Perms::for_create()).unwrap_err();
        assert!(
            e.msg.starts_with("Failed to get \"write\" lock"),
            "{}",
            e.msg
        );
        // locking=off takes and checks nothing.
        assert_eq!(lock(open(&p).as_fd(), &p, OnOffAuto::Off, rw), Ok(false));
    }

    #[test]
    fn extra_permissions_for_a_while() {
        let p = tmp("c");
        let ro = Perms::for_node(true, false);
        let (a, b) = (open(&p), open(&p));
        take(&a, &p, ro).unwrap();
        take(&b, &p, ro).unwrap();
        // b reads and does not share write: a cannot write for a while.
        let e = Extra::take(a.as_fd(), &p, WRITE | RESIZE).err().unwrap();
        assert!(
            e.msg.starts_with("Failed to get \"write\" lock"),
            "{}",
            e.msg
        );
        drop(b);
        let c = open(&p);
        {
            let _w = Extra::take(a.as_fd(), &p, WRITE | RESIZE).unwrap();
            assert!(byte_taken(c.as_fd(), PERM_BASE + 1).unwrap());
            assert!(byte_taken(c.as_fd(), PERM_BASE + 3).unwrap());
        }
        // Back to what a held before: consistent read only.
        assert!(!byte_taken(c.as_fd(), PERM_BASE + 1).unwrap());
        assert!(!byte_taken(c.as_fd(), PERM_BASE + 3).unwrap());
        assert!(byte_taken(c.as_fd(), PERM_BASE).unwrap());
        assert!(byte_taken(c.as_fd(), SHARED_BASE + 1).unwrap());
    }

    #[test]
    fn bytes_match_qemu() {
        let p = tmp("b");
        let a = open(&p);
        take(&a, &p, Perms::for_node(false, false)).unwrap();
        let b = open(&p);
        let held = |byte| byte_taken(b.as_fd(), byte).unwrap();
        // consistent read, write, resize held; write and resize unshared.
        let perm: Vec<bool> = (100..104).map(held).collect();
        let unshared: Vec<bool> = (200..204).map(held).collect();
        assert_eq!(perm, [true, true, false, true]);
        assert_eq!(unshared, [false, true, false, true]);
        assert!(!held(99) && !held(104) && !held(204));
    }
}
