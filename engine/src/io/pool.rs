//! `aio=threads`: worker threads doing blocking preadv/pwritev/fsync/fallocate.

use super::{Backend, IoDone, IoReq, OpKind};
use crossbeam_channel::{unbounded, Sender};
use std::io;

pub const DEFAULT_THREADS: usize = 16;

pub struct Pool {
    tx: Sender<(IoReq, IoDone)>,
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let (tx, rx) = unbounded::<(IoReq, IoDone)>();
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("blkfs-pool-{i}"))
                .spawn(move || {
                    super::mark_completer();
                    for (mut req, done) in rx.iter() {
                        let r = run(&mut req);
                        done(req, r);
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start pool thread {i}: {e}");
            }
        }
        Pool { tx }
    }
}

impl Backend for Pool {
    fn submit(&self, req: IoReq, done: IoDone) {
        if let Err(e) = self.tx.send((req, done)) {
            // Only when every worker died; fail the request instead of losing it.
            let (req, done) = e.into_inner();
            done(req, Err(io::Error::other("I/O thread pool is gone")));
        }
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

/// Performs one request completely, on the calling thread.
pub fn run(req: &mut IoReq) -> io::Result<()> {
    let fd = req.raw_fd();
    let serial = req.serial.clone();
    let _serial = serial.as_ref().map(|m| m.lock());
    loop {
        let off = (req.offset + req.done as u64) as libc::off_t;
        let rest = req.buf.len() - req.done.min(req.buf.len());
        // SAFETY: fd is kept open by req.fd; the pointer and length stay inside req.buf.
        let r = unsafe {
            match req.kind {
                OpKind::Read => {
                    libc::pread(fd, req.buf.as_mut_ptr().add(req.done).cast(), rest, off) as i64
                }
                OpKind::Write if req.fua => {
                    let iov = libc::iovec {
                        iov_base: req.buf.as_ptr().add(req.done) as *mut libc::c_void,
                        iov_len: rest,
                    };
                    libc::pwritev2(fd, &iov, 1, off, libc::RWF_DSYNC) as i64
                }
                OpKind::Write => {
                    libc::pwrite(fd, req.buf.as_ptr().add(req.done).cast(), rest, off) as i64
                }
                OpKind::Fsync => libc::fsync(fd) as i64,
                OpKind::Fdatasync => libc::fdatasync(fd) as i64,
                OpKind::Fallocate(mode) => {
                    libc::fallocate(fd, mode, req.offset as libc::off_t, req.len as libc::off_t)
                        as i64
                }
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(errno) if req.ended(errno) => return Ok(()),
                _ => return Err(e),
            }
        }
        if req.advance(r as usize)? {
            return Ok(());
        }
    }
}
