//! The `vvfat` driver: a host directory exported, read-only, as a disk
//! holding a FAT file system, as QEMU's vvfat does.
//!
//! - [`geometry`]: the disk QEMU presents (hard disk or floppy, FAT type)
//!   and where the file system's areas sit on it.
//! - [`boot`]: MBR, boot sector and FAT32's FSInfo sector.
//! - [`dirent`]: short (8.3) and long (VFAT) names, directory entries.
//! - [`scan`]: the walk of the host directory.
//! - [`layout`]: clusters, FATs and directories, as a plan of byte ranges.
//!
//! Metadata is built at open and kept in memory; file data is read from
//! the host files on demand, off the caller's thread.

mod boot;
mod dirent;
mod geometry;
mod layout;
mod scan;

use super::{Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::NodeOptions;
use crate::io::Buf;
use layout::{Plan, Source};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct VvfatDriver {
    image: Arc<Image>,
    filename: String,
}

struct Image {
    plan: Plan,
    /// Per host file: a read found it gone (warned once, reads zeroes).
    vanished: Vec<AtomicBool>,
}

/// Settles the node's read-only flag before it opens, as QEMU does for
/// vvfat ("read only is the default for safety"): without `read-only` a
/// top-level node becomes read-only; a node asked to be writable
/// (`read-only=off`, or under a writable parent) is refused, as blkfs
/// refuses it for the other read-only drivers. `rw=on` is refused first.
pub fn settle_read_only(
    rw: Option<bool>,
    read_only: Option<bool>,
    top: bool,
    opts: &mut NodeOptions,
) -> Result<()> {
    if rw == Some(true) {
        return Err(Error::generic(
            "vvfat: rw=on (writes reaching the host directory) is not supported by blkfs: \
             the directory can only be exported read-only (rw=off, the default)",
        ));
    }
    if read_only.is_none() && top {
        opts.read_only = true;
    }
    if !opts.read_only {
        return Err(super::mapped::read_only_error("vvfat"));
    }
    Ok(())
}

impl VvfatDriver {
    /// Builds the image of `dir`; `rw=on` must have been refused already
    /// ([`settle_read_only`]).
    pub fn open(dir: &str, fat_type: Option<i64>, floppy: Option<bool>) -> Result<VvfatDriver> {
        let floppy = floppy.unwrap_or(false);
        let g = geometry::Geometry::new(fat_type, floppy)?;
        let plan = layout::build(Path::new(dir), g)?;
        log::info!(
            "vvfat: '{dir}' exported as a {} with {} files",
            g.describe(),
            plan.files.len()
        );
        let mut filename = String::from("fat:");
        if floppy {
            filename.push_str("floppy:");
        }
        if let Some(t) = fat_type {
            filename.push_str(&format!("{t}:"));
        }
        filename.push_str(dir);
        Ok(VvfatDriver {
            image: Arc::new(Image {
                vanished: plan.files.iter().map(|_| AtomicBool::new(false)).collect(),
                plan,
            }),
            filename,
        })
    }
}

impl Image {
    /// Whether `[offset, offset + len)` holds bytes of host files.
    fn reads_files(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (region, n) = self.plan.at(pos);
            if matches!(region, Some(r) if matches!(r.source, Source::File(_))) {
                return true;
            }
            pos += n;
        }
        false
    }

    /// Fills `buf` with the image bytes at `offset`.
    fn fill(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (region, n) = self.plan.at(pos);
            let n = n.min((buf.len() - done) as u64) as usize;
            let out = &mut buf[done..done + n];
            match region {
                None => out.fill(0),
                Some(r) => {
                    let inside = (pos - r.start) as usize;
                    match r.source {
                        Source::Meta(at) => {
                            out.copy_from_slice(&self.plan.meta[at + inside..][..n])
                        }
                        Source::File(f) => self.read_file(f, inside as u64, out)?,
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Bytes of host file `f` from `at`: zeroes past the size it had at
    /// open, past its end now, or when it is gone.
    fn read_file(&self, f: usize, at: u64, out: &mut [u8]) -> Result<()> {
        let file = &self.plan.files[f];
        let want = file.size.saturating_sub(at).min(out.len() as u64) as usize;
        out[want..].fill(0);
        if want == 0 {
            return Ok(());
        }
        let cannot = |e: &std::io::Error| {
            Error::from_io(e, format!("vvfat: cannot read '{}'", file.path.display()))
        };
        let host = match std::fs::File::open(&file.path) {
            Ok(h) => h,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.vanished[f].swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "vvfat: '{}' is gone from the host directory; its clusters read as zeroes",
                        file.path.display()
                    );
                }
                out[..want].fill(0);
                return Ok(());
            }
            Err(e) => return Err(cannot(&e)),
        };
        let mut got = 0;
        while got < want {
            match host.read_at(&mut out[got..want], at + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(cannot(&e)),
            }
        }
        // The file shrank since open.
        out[got..want].fill(0);
        Ok(())
    }
}

fn read_only() -> Error {
    Error::io(libc::EROFS, "vvfat: the exported directory is read-only")
}

impl Driver for VvfatDriver {
    fn format_name(&self) -> &'static str {
        "vvfat"
    }

    fn size(&self) -> u64 {
        self.image.plan.geometry.size()
    }

    fn read(&self, offset: u64, mut buf: Buf, done: Done<Buf>) {
        if !self.image.reads_files(offset, buf.len() as u64) {
            let r = self.image.fill(offset, &mut buf);
            return done(r.map(|()| buf));
        }
        // Host file reads block: never on the caller's thread.
        let image = self.image.clone();
        crate::io::spawn_blocking(move || {
            let r = image.fill(offset, &mut buf);
            done(r.map(|()| buf));
        });
    }

    fn write(&self, _offset: u64, _buf: Buf, done: Done<Buf>) {
        done(Err(read_only()))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool, done: Done<()>) {
        done(Err(read_only()))
    }

    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(Err(read_only()))
    }

    fn flush(&self, done: Done<()>) {
        done(Ok(()))
    }

    /// Data wherever the plan has bytes; zeroes in free clusters and gaps.
    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let len = super::status_len(offset, len, self.size())?;
        let (region, n) = self.image.plan.at(offset);
        Ok(Status {
            len: n.min(len),
            data: region.is_some(),
            zero: region.is_none(),
            offset: None,
            allocated: true,
        })
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }
}
