//! The driver of the block-mapped formats (vdi, vpc, parallels, qed, cow,
//! bochs, cloop, dmg): each format describes how its guest blocks map to
//! its file ([`Layout`]); reads, copy-on-write writes, zeroing and block
//! status are written once, here.

use super::backing::Slot;
use super::join::Join;
use super::qcow2::check::CheckResult;
use super::qcow2::meta::write_at;
use super::segments::{self, ClusterMapping, LayerStatus};
use super::{wait, Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::options::DriverName;
use parking_lot::Mutex;
use std::sync::Arc;

/// Where a guest block's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// In the file, from this offset on.
    Data(u64),
    /// Not in this image: the backing file's bytes, zeroes without one.
    Unallocated,
    /// Zeroes, whatever the backing file holds.
    Zero,
    /// In another file of the image (a vmdk extent), [`Layout::file`] `file`.
    DataIn { file: u32, host: u64 },
    /// Stored the format's own way (compressed): [`Layout::read_special`];
    /// blocks with the same id are one stored piece.
    Special(u64),
}

impl ClusterMapping for Block {
    fn offset_by(self, by: u64) -> Block {
        match self {
            Block::Data(h) => Block::Data(h + by),
            Block::DataIn { file, host } => Block::DataIn {
                file,
                host: host + by,
            },
            b => b,
        }
    }

    fn continues(&self, len: usize, next: &Block) -> bool {
        match (self, next) {
            (Block::Data(h1), Block::Data(h2)) => h1 + len as u64 == *h2,
            (Block::DataIn { file: f1, host: h1 }, Block::DataIn { file: f2, host: h2 }) => {
                f1 == f2 && h1 + len as u64 == *h2
            }
            (Block::Unallocated, Block::Unallocated) | (Block::Zero, Block::Zero) => true,
            (Block::Special(a), Block::Special(b)) => a == b,
            _ => false,
        }
    }

    fn status(&self, has_backing: bool) -> LayerStatus {
        match *self {
            Block::Data(h) | Block::DataIn { host: h, .. } => (true, false, Some(h), true),
            Block::Special(_) => (true, false, None, true),
            Block::Zero => (false, true, None, true),
            Block::Unallocated => (false, !has_backing, None, false),
        }
    }
}

/// One format's mapping of guest blocks to its file, and what it changes
/// to allocate one. Lookups use the format's own caches (interior locks).
pub trait Layout: Send + Sync {
    fn format_name(&self) -> &'static str;
    /// The virtual size in bytes.
    fn size(&self) -> u64;
    /// Guest bytes per block.
    fn block_size(&self) -> u64;
    /// Guest block `b`'s mapping (for data: of its first byte), and how many
    /// blocks from `b` on map the same way with no offset to move (for
    /// data: blocks that follow each other in the file too).
    fn lookup(&self, b: u64) -> Result<(Block, u64)>;
    /// The guest bytes `guest..guest + buf.len()`, all stored in the
    /// `Special(id)` form.
    fn read_special(&self, id: u64, _guest: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::io(
            libc::EIO,
            format!("{}: block {id} has no special form", self.format_name()),
        ))
    }
    /// The image's file `i` other than its first (a vmdk extent).
    fn file(&self, _i: u32) -> Option<&Arc<Node>> {
        None
    }
    /// Whether the format writes at all (the others open read-only only).
    fn writable(&self) -> bool {
        false
    }
    /// Makes guest block `b`, not `Data` now, hold `content` (the whole
    /// block): new space in the file, the data there on disk before the
    /// map points at it. Called one at a time.
    fn allocate(&self, b: u64, _content: &[u8]) -> Result<()> {
        Err(Error::io(
            libc::EROFS,
            format!(
                "{} images cannot be written (block {b})",
                self.format_name()
            ),
        ))
    }
    /// Before the first change of a session (VHDX gives its headers a new
    /// data write GUID).
    fn first_write(&self) -> Result<()> {
        Ok(())
    }
    /// Makes block `b` read as zeroes with no data, if the format can say
    /// so in its map (true when it did). Called one at a time.
    fn zero_block(&self, _b: u64) -> Result<bool> {
        Ok(false)
    }
    /// Whether block status asks the file whether the data block holding
    /// `guest` reads as zeroes (QEMU's `BDRV_BLOCK_RECURSE`: preallocated
    /// images, flat extents).
    fn zeroes_from_file(&self, _guest: u64) -> bool {
        false
    }
    /// Whether `qemu-img check` knows the format (blkfs checks its map).
    fn checkable(&self) -> bool {
        false
    }
    /// Writes what the format keeps back before a flush of the file.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    /// Leaves the image consistent (a clean close); no I/O follows.
    fn close(&self) -> Result<()> {
        Ok(())
    }
    /// Changes the virtual size (`block_resize`), with no request in flight.
    fn resize(&self, _size: u64) -> Result<()> {
        Err(Error::generic(format!(
            "Driver '{}' does not support resizing",
            self.format_name()
        )))
    }
    /// Rewrites the backing file name (and format) the image records.
    fn change_backing_file(&self, _name: &str, _format: Option<&str>) -> Result<()> {
        Err(Error::generic(format!(
            "Driver '{}' does not record a backing file",
            self.format_name()
        )))
    }
    /// The backing file the image names, and its format if it says.
    fn backing_file(&self) -> Option<String> {
        None
    }
    fn backing_format(&self) -> Option<String> {
        None
    }
    /// Adds the format's members to an `ImageInfo`.
    fn image_info(&self, _info: &mut serde_json::Value) {}
}

/// Whether this driver runs `format`.
pub fn drives(format: DriverName) -> bool {
    matches!(
        format,
        DriverName::Vdi
            | DriverName::Vpc
            | DriverName::Parallels
            | DriverName::Bochs
            | DriverName::Cloop
            | DriverName::Qed
            | DriverName::Cow
            | DriverName::Dmg
            | DriverName::Vmdk
            | DriverName::Vhdx
    )
}

/// Whether `format` can be written (the others open read-only only).
pub fn writes(format: DriverName) -> bool {
    matches!(
        format,
        DriverName::Vdi
            | DriverName::Vpc
            | DriverName::Parallels
            | DriverName::Qed
            | DriverName::Cow
            | DriverName::Vmdk
            | DriverName::Vhdx
    )
}

/// The layout of the `format` image in `file`.
/// `open_file` opens another file the image names (a vmdk extent),
/// read-only when asked.
pub fn open_layout(
    format: DriverName,
    file: Arc<Node>,
    read_only: bool,
    open_file: &mut dyn FnMut(&str, bool) -> Result<Arc<Node>>,
) -> Result<Box<dyn Layout>> {
    Ok(match format {
        DriverName::Vdi => Box::new(super::vdi::Vdi::open(file)?),
        DriverName::Vpc => Box::new(super::vpc::Vpc::open(file)?),
        DriverName::Parallels => Box::new(super::parallels::Parallels::open(file, read_only)?),
        DriverName::Bochs => Box::new(super::bochs::Bochs::open(file)?),
        DriverName::Cloop => Box::new(super::cloop::Cloop::open(file)?),
        DriverName::Qed => Box::new(super::qed::Qed::open(file, read_only)?),
        DriverName::Cow => Box::new(super::cow::Cow::open(file)?),
        DriverName::Dmg => Box::new(super::dmg::Dmg::open(file)?),
        DriverName::Vhdx => Box::new(super::vhdx::Vhdx::open(file, read_only)?),
        DriverName::Vmdk => Box::new(super::vmdk::Vmdk::open(file, read_only, open_file)?),
        other => {
            return Err(Error::generic(format!(
                "Driver '{}' is not supported by blkfs yet",
                other.as_str()
            )))
        }
    })
}

/// What a read-write open of a format that only reads gets.
pub fn read_only_error(format: &str) -> Error {
    Error::generic(format!(
        "Driver '{format}' can only open images read-only (set read-only=on)"
    ))
}

pub struct Mapped {
    file: Arc<Node>,
    layout: Box<dyn Layout>,
    backing: Slot,
    /// Serialises the writes that allocate or read-modify-write.
    writer: Mutex<()>,
    /// [`Layout::first_write`] has run.
    written: std::sync::atomic::AtomicBool,
}

type Segment = segments::Segment<Block>;
type Segments = segments::Segments<Block>;

/// Most bytes one block status answer covers, block by block.
const STATUS_SPAN: u64 = 1 << 20;

impl Mapped {
    pub fn new(file: Arc<Node>, layout: Box<dyn Layout>, backing: Option<Arc<Node>>) -> Mapped {
        Mapped {
            file,
            layout,
            backing: Slot::new(backing),
            writer: Mutex::new(()),
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn plan(&self, offset: u64, len: usize) -> Result<Segments> {
        segments::plan(offset, len, self.layout.block_size(), usize::MAX, |b| {
            self.layout.lookup(b)
        })
    }

    fn read_segment(&self, s: Segment, mut buf: Buf, done: Done<Buf>) {
        match s.map {
            Block::Data(host) => self.file.read(host, buf, done),
            Block::DataIn { file, host } => match self.extent(file) {
                Ok(f) => f.read(host, buf, done),
                Err(e) => done(Err(e)),
            },
            Block::Unallocated => self.backing.read(s.guest, buf, done),
            Block::Zero => {
                buf.fill(0);
                done(Ok(buf))
            }
            Block::Special(id) => done(
                self.layout
                    .read_special(id, s.guest, &mut buf)
                    .map(|()| buf),
            ),
        }
    }

    /// What block `b` (mapped as `m`, not data) reads as now, whole.
    fn old_content(&self, b: u64, m: Block) -> Result<Buf> {
        let bs = self.layout.block_size();
        let base = b * bs;
        let valid = bs.min(self.layout.size() - base) as usize;
        let mut content = Buf::zeroed(bs as usize);
        match m {
            Block::Unallocated if self.backing.is_some() => {
                let old = wait(|d| self.backing.read(base, Buf::zeroed(valid), d))?;
                content[..valid].copy_from_slice(&old);
            }
            Block::Special(id) => self.layout.read_special(id, base, &mut content[..valid])?,
            _ => {}
        }
        Ok(content)
    }

    /// Writes `data` at `guest`, inside one block: in place on data,
    /// otherwise into a new block holding the old content with `data` on
    /// top. Called with `writer` held.
    fn write_block(&self, guest: u64, data: &[u8]) -> Result<()> {
        let bs = self.layout.block_size();
        let (b, at) = (guest / bs, (guest % bs) as usize);
        let (m, _) = self.layout.lookup(b)?;
        match m {
            Block::Data(host) => return write_at(&self.file, host + at as u64, data),
            Block::DataIn { file, host } => {
                return write_at(self.extent(file)?, host + at as u64, data)
            }
            _ => {}
        }
        let mut content = if data.len() as u64 == bs {
            Buf::from_slice(data)
        } else {
            self.old_content(b, m)?
        };
        content[at..at + data.len()].copy_from_slice(data);
        self.layout.allocate(b, &content)
    }

    /// The pieces of `offset..offset+len` inside one block each.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let bs = self.layout.block_size();
        let end = offset + len;
        let mut o = offset;
        std::iter::from_fn(move || {
            (o < end).then(|| {
                let n = (bs - o % bs).min(end - o);
                o += n;
                (o - n, n)
            })
        })
    }

    fn write_range(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _w = self.writer.lock();
        for (guest, n) in self.pieces(offset, data.len() as u64) {
            let at = (guest - offset) as usize;
            self.write_block(guest, &data[at..at + n as usize])?;
        }
        Ok(())
    }

    /// Zeroes a range: blocks that read as zeroes stay as they are, whole
    /// blocks become zero blocks where the format has them, the rest gets
    /// zero data.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let _w = self.writer.lock();
        let bs = self.layout.block_size();
        let zeroes = vec![0u8; bs as usize];
        for (guest, n) in self.pieces(offset, len) {
            let b = guest / bs;
            match self.layout.lookup(b)?.0 {
                Block::Zero => continue,
                Block::Unallocated if !self.backing.is_some() => continue,
                _ if n == bs && self.layout.zero_block(b)? => continue,
                _ => self.write_block(guest, &zeroes[..n as usize])?,
            }
        }
        Ok(())
    }

    fn extent(&self, i: u32) -> Result<&Arc<Node>> {
        self.layout
            .file(i)
            .ok_or_else(|| Error::io(libc::EIO, format!("image file {i} is missing")))
    }

    /// The consistency of the block map: every data block inside its file,
    /// no two blocks on the same bytes; the counts `qemu-img check` prints.
    fn check_map(&self) -> Result<CheckResult> {
        let bs = self.layout.block_size();
        let size = self.layout.size();
        let n = size.div_ceil(bs);
        let mut r = CheckResult {
            total_clusters: n,
            image_end_offset: self.file.size(),
            ..Default::default()
        };
        // (file, host, bytes) of every run of data blocks.
        let mut runs: Vec<(u32, u64, u64)> = Vec::new();
        let mut next: Option<(u32, u64)> = None;
        let mut b = 0;
        while b < n {
            let (m, run) = match self.layout.lookup(b) {
                Ok((m, run)) => (m, run.clamp(1, n - b)),
                Err(e) => {
                    log::warn!("check: block {b}: {e}");
                    r.corruptions += 1;
                    b += 1;
                    continue;
                }
            };
            let (file, host) = match m {
                Block::Data(h) => (0, h),
                Block::DataIn { file, host } => (file, host),
                Block::Special(_) => {
                    r.allocated_clusters += run;
                    r.compressed_clusters += run;
                    b += run;
                    continue;
                }
                _ => {
                    b += run;
                    continue;
                }
            };
            let bytes = (run * bs).min(size - b * bs);
            let node = if file == 0 {
                &self.file
            } else {
                self.extent(file)?
            };
            if host
                .checked_add(bytes)
                .is_none_or(|e| e > node.size().next_multiple_of(bs))
            {
                log::warn!("check: blocks {b}.. lie past the end of their file");
                r.corruptions += 1;
            }
            r.allocated_clusters += run;
            if next != Some((file, host)) {
                r.fragmented_clusters += 1;
            }
            next = Some((file, host + run * bs));
            runs.push((file, host, bytes));
            b += run;
        }
        runs.sort_unstable();
        for w in runs.windows(2) {
            if w[0].0 == w[1].0 && w[1].1 < w[0].1 + w[0].2 {
                log::warn!("check: data at {:#x} is shared by two blocks", w[1].1);
                r.corruptions += 1;
            }
        }
        Ok(r)
    }

    /// Whether the format writes; runs its first-write step once.
    fn writable(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if !self.layout.writable() {
            return Err(read_only_error(self.layout.format_name()));
        }
        if !self.written.load(Ordering::Acquire) {
            let _w = self.writer.lock();
            if !self.written.load(Ordering::Acquire) {
                self.layout.first_write()?;
                self.written.store(true, Ordering::Release);
            }
        }
        Ok(())
    }
}

impl Driver for Arc<Mapped> {
    fn format_name(&self) -> &'static str {
        self.layout.format_name()
    }

    fn size(&self) -> u64 {
        self.layout.size()
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let segs = match self.plan(offset, buf.len()) {
            Ok(s) => s,
            Err(e) => return done(Err(e)),
        };
        // One segment: the caller's buffer goes down as it is.
        if let [s] = segs[..] {
            return self.read_segment(s, buf, done);
        }
        let join = Join::new(buf, segs.len(), done);
        for s in segs {
            let j = join.clone();
            self.read_segment(s, Buf::recycled(s.len), Box::new(move |r| j.fill(s.at, r)));
        }
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        // Within data already in the file: straight there.
        match self.plan(offset, buf.len()).as_deref() {
            Ok(
                &[Segment {
                    map: Block::Data(host),
                    ..
                }],
            ) => return self.file.write(host, buf, done),
            Ok(
                &[Segment {
                    map: Block::DataIn { file, host },
                    ..
                }],
            ) => {
                return match self.extent(file) {
                    Ok(f) => f.write(host, buf, done),
                    Err(e) => done(Err(e)),
                }
            }
            Ok(_) => {}
            Err(e) => return done(Err(e.clone())),
        }
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            let r = me.write_range(offset, &buf);
            done(r.map(|()| buf));
        });
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool, done: Done<()>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        let me = self.clone();
        crate::io::spawn_blocking(move || done(me.zero_range(offset, len)));
    }

    /// Only a hint: these formats keep their blocks.
    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(self.writable())
    }

    fn flush(&self, done: Done<()>) {
        if !self.layout.writable() {
            return self.file.flush(done);
        }
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            done(me.layout.flush().and_then(|()| wait(|d| me.file.flush(d))))
        });
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let mut st = segments::block_status(
            self.layout.size(),
            offset,
            len,
            self.backing.is_some(),
            false,
            |len| self.plan(offset, len.min(STATUS_SPAN) as usize),
        )?;
        // As QEMU does for preallocated images: data over a hole of the
        // file (or past its end) reads as zeroes.
        if let (true, false, Some(host)) =
            (self.layout.zeroes_from_file(offset), st.zero, st.offset)
        {
            let file = match self.layout.lookup(offset / self.layout.block_size())?.0 {
                Block::DataIn { file, .. } => self.extent(file)?,
                _ => &self.file,
            };
            match file.block_status(host, st.len) {
                Ok(f) => {
                    st.len = st.len.min(f.len);
                    st.zero = f.zero;
                }
                Err(e) if e.errno() == libc::ENXIO => st.zero = true,
                // Only extra information.
                Err(_) => {}
            }
        }
        Ok(st)
    }

    fn file_child(&self) -> Option<&Arc<Node>> {
        Some(&self.file)
    }

    fn backing_child(&self) -> Option<Arc<Node>> {
        self.backing.get()
    }

    fn set_backing(&self, backing: Option<Arc<Node>>) -> Result<()> {
        self.backing.set(backing);
        Ok(())
    }

    fn backing_file_name(&self) -> Option<String> {
        self.layout.backing_file()
    }

    fn change_backing_file(&self, name: &str, format: Option<&str>) -> Result<()> {
        self.layout.change_backing_file(name, format)
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.layout.resize(size)
    }

    fn close(&self) -> Result<()> {
        self.layout.close()
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        self.layout.image_info(v)
    }

    fn check(&self) -> Option<Result<CheckResult>> {
        self.layout.checkable().then(|| self.check_map())
    }
}
