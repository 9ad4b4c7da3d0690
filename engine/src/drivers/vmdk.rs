//! VMware VMDK images: a text descriptor (in its own file, or embedded in
//! a monolithic sparse file) listing extents, each flat (plain sectors at
//! an offset of a file), zero, or sparse (a hosted sparse extent: header,
//! grain directory, grain tables of grain offsets, grains appended; as
//! streamOptimized, grains deflated behind markers). A backing image is
//! named by `parentFileNameHint`.

use super::bytes::{le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// "KDMV" read little-endian.
pub const MAGIC: u32 = 0x564d_444b;
const SECTOR: u64 = 512;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZEROED_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;
const FLAG_MARKERS: u32 = 1 << 17;
/// The grain directory is at the end (streamOptimized): in the footer.
const GD_AT_END: u64 = u64::MAX;
/// Grain tables kept in memory per extent.
const GT_CACHE: usize = 64;

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("VMDK image is corrupt: {msg}"))
}

/// A hosted sparse extent's header (sizes and offsets in sectors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain: u64,
    pub desc_offset: u64,
    pub desc_size: u64,
    pub gtes: u32,
    pub rgd: u64,
    pub gd: u64,
    pub overhead: u64,
    pub compress: u16,
}

impl SparseHeader {
    pub fn parse(b: &[u8]) -> Result<SparseHeader> {
        if b.len() < 512 || le32(b, 0) != MAGIC {
            return Err(invalid("Not a VMDK sparse extent"));
        }
        let h = SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes: le32(b, 44),
            rgd: le64(b, 48),
            gd: le64(b, 56),
            overhead: le64(b, 64),
            compress: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(invalid(format!("Unsupported VMDK version {}", h.version)));
        }
        if h.grain == 0 || !h.grain.is_power_of_two() || h.grain > 128 * 1024 {
            return Err(invalid(format!(
                "Invalid granularity, image may be corrupt ({})",
                h.grain
            )));
        }
        if h.gtes == 0 || h.gtes > 512 {
            return Err(invalid(format!("L2 table size too big ({})", h.gtes)));
        }
        if h.capacity > 1 << 40 {
            return Err(invalid("VMDK extent is too large"));
        }
        if h.flags & FLAG_COMPRESSED != 0 && h.compress != 1 {
            return Err(invalid(format!(
                "Unsupported VMDK compression algorithm {}",
                h.compress
            )));
        }
        Ok(h)
    }

    fn grain_bytes(&self) -> u64 {
        self.grain * SECTOR
    }

    fn gd_entries(&self) -> u64 {
        self.capacity
            .div_ceil(self.grain)
            .div_ceil(self.gtes as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    Flat,
    Sparse,
    Zero,
}

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    pub read_only: bool,
    pub sectors: u64,
    pub kind: ExtentType,
    pub file: String,
    /// Flat extents: where in the file the sectors start.
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub cid: u32,
    pub parent_cid: u32,
    pub create_type: String,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

/// The createTypes of descriptors in their own file (the monolithic
/// sparse ones are embedded in their extent).
const CREATE_TYPES: &[&str] = &[
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsSparse",
];

impl Descriptor {
    pub fn parse(text: &str) -> Result<Descriptor> {
        let mut d = Descriptor {
            parent_cid: u32::MAX,
            ..Default::default()
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let (k, v) = (k.trim(), v.trim().trim_matches('"'));
                match k {
                    "CID" => d.cid = u32::from_str_radix(v, 16).unwrap_or(0),
                    "parentCID" => d.parent_cid = u32::from_str_radix(v, 16).unwrap_or(u32::MAX),
                    "createType" => d.create_type = v.to_string(),
                    "parentFileNameHint" => d.parent_hint = Some(v.to_string()),
                    _ => {}
                }
                continue;
            }
            let e = parse_extent(line)?;
            // As QEMU: only read-write data extents count (ZERO, RDONLY
            // and NOACCESS lines are dropped, their sectors too).
            if !e.read_only && e.kind != ExtentType::Zero {
                d.extents.push(e);
            }
        }
        if d.create_type.is_empty() {
            return Err(invalid("invalid VMDK image descriptor"));
        }
        Ok(d)
    }
}

/// `RW 2097152 SPARSE "file.vmdk" [offset]`.
fn parse_extent(line: &str) -> Result<ExtentLine> {
    let bad = || invalid(format!("Invalid extent line: {line}"));
    let (head, rest) = line.split_once('"').ok_or_else(bad)?;
    let (file, tail) = rest.split_once('"').ok_or_else(bad)?;
    let mut words = head.split_whitespace();
    let access = words.next().ok_or_else(bad)?;
    let read_only = match access {
        "RW" => false,
        "RDONLY" => true,
        "NOACCESS" => true,
        _ => return Err(bad()),
    };
    let sectors: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
    let kind = match words.next().ok_or_else(bad)? {
        "FLAT" | "VMFS" => ExtentType::Flat,
        "SPARSE" | "VMFSSPARSE" => ExtentType::Sparse,
        "ZERO" => ExtentType::Zero,
        t => return Err(invalid(format!("Unsupported extent type '{t}'"))),
    };
    let offset = match tail.split_whitespace().next() {
        Some(o) => o.parse().map_err(|_| bad())?,
        None => 0,
    };
    Ok(ExtentLine {
        read_only,
        sectors,
        kind,
        file: file.to_string(),
        offset,
    })
}

struct SparseState {
    gd: Vec<u32>,
    rgd: Vec<u32>,
    gts: HashMap<u32, Vec<u32>>,
    /// The file's end (bytes): new grains and tables go there.
    end: u64,
}

struct Sparse {
    h: SparseHeader,
    state: Mutex<SparseState>,
    /// streamOptimized: the last grain inflated.
    last: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

enum Kind {
    Flat { offset: u64 },
    Zero,
    Sparse(Sparse),
}

struct Extent {
    /// Index into `Vmdk::files`.
    file: u32,
    /// Guest bytes before it.
    start: u64,
    len: u64,
    kind: Kind,
}

pub struct Vmdk {
    files: Vec<Arc<Node>>,
    desc: Descriptor,
    /// This image's CID (a new one from the first write of a session on).
    cid: std::sync::atomic::AtomicU32,
    /// Where the descriptor text is in the first file (offset, bytes), if
    /// the image has one.
    desc_at: Option<(u64, u64)>,
    extents: Vec<Extent>,
    size: u64,
    block: u64,
}

/// Where the descriptor text is: the file itself (text) or embedded.
pub fn read_descriptor(file: &Node) -> Result<(Descriptor, Option<SparseHeader>)> {
    let len = file.size();
    let head = read_at(file, 0, 512.min(len) as usize)?;
    if head.len() >= 4 && le32(&head, 0) == MAGIC {
        let h = SparseHeader::parse(&head)?;
        let mut d = if h.desc_offset == 0 || h.desc_size == 0 {
            // A bare sparse extent.
            Descriptor {
                parent_cid: u32::MAX,
                create_type: "monolithicSparse".into(),
                ..Default::default()
            }
        } else {
            let n = (h.desc_size * SECTOR).min(1 << 20);
            let raw = read_at(file, h.desc_offset * SECTOR, n as usize)?;
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            Descriptor::parse(&String::from_utf8_lossy(&raw[..end]))?
        };
        // As QEMU: the file itself is the one extent, as its header says.
        d.extents = vec![ExtentLine {
            read_only: false,
            sectors: h.capacity,
            kind: ExtentType::Sparse,
            file: file.driver.filename(),
            offset: 0,
        }];
        return Ok((d, Some(h)));
    }
    if len > 1 << 20 {
        return Err(invalid(
            "VMDK descriptor file is too large (or not a VMDK image)",
        ));
    }
    let raw = read_at(file, 0, len as usize)?;
    let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end]);
    if !text.contains("createType") {
        return Err(invalid("Image not in VMDK format"));
    }
    let d = Descriptor::parse(&text)?;
    if !CREATE_TYPES.contains(&d.create_type.as_str()) {
        return Err(invalid(format!(
            "Unsupported image type '{}'",
            d.create_type
        )));
    }
    if d.extents.is_empty() {
        return Err(invalid("VMDK descriptor lists no extents"));
    }
    Ok((d, None))
}

impl Vmdk {
    /// `open_file` opens an extent file named by the descriptor (relative
    /// to the descriptor's directory).
    pub fn open(
        file: Arc<Node>,
        read_only: bool,
        mut open_file: impl FnMut(&str, bool) -> Result<Arc<Node>>,
    ) -> Result<Vmdk> {
        let (desc, own_header) = read_descriptor(&file)?;
        let mut files = vec![file.clone()];
        let mut extents = Vec::new();
        let mut start = 0u64;
        let embedded = own_header.is_some();
        for (i, line) in desc.extents.iter().enumerate() {
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .ok_or_else(|| invalid("VMDK extent is too large"))?;
            // A monolithic sparse image is its own first extent; zero
            // extents have no file.
            let (idx, node) = if (embedded && i == 0) || line.kind == ExtentType::Zero {
                (0, file.clone())
            } else {
                let n = open_file(&line.file, line.read_only)?;
                files.push(n.clone());
                ((files.len() - 1) as u32, n)
            };
            let kind = match line.kind {
                ExtentType::Zero => Kind::Zero,
                ExtentType::Flat => Kind::Flat {
                    offset: line
                        .offset
                        .checked_mul(SECTOR)
                        .ok_or_else(|| invalid("VMDK extent offset is too large"))?,
                },
                ExtentType::Sparse => Kind::Sparse(open_sparse(&node, line.sectors, read_only)?),
            };
            extents.push(Extent {
                file: idx,
                start,
                len,
                kind,
            });
            start = start
                .checked_add(len)
                .ok_or_else(|| invalid("VMDK image is too large"))?;
        }
        let grains: Vec<u64> = extents
            .iter()
            .filter_map(|e| match &e.kind {
                Kind::Sparse(s) => Some(s.h.grain_bytes()),
                _ => None,
            })
            .collect();
        let block = grains.first().copied().unwrap_or(64 << 10);
        if grains.iter().any(|&g| g != block) {
            return Err(invalid(
                "VMDK extents with different grain sizes are not supported",
            ));
        }
        if extents.iter().any(|e| !e.start.is_multiple_of(block)) {
            return Err(invalid(
                "VMDK extents not aligned to the grain size are not supported",
            ));
        }
        let desc_at = match &own_header {
            Some(h) if h.desc_offset != 0 && h.desc_size != 0 => {
                Some((h.desc_offset * SECTOR, (h.desc_size * SECTOR).min(1 << 20)))
            }
            Some(_) => None,
            None => Some((0, file.size())),
        };
        Ok(Vmdk {
            files,
            cid: std::sync::atomic::AtomicU32::new(desc.cid),
            desc,
            desc_at,
            extents,
            size: start,
            block,
        })
    }

    /// Rewrites the descriptor's `CID=` line with `cid` (the same bytes
    /// otherwise; NUL-padded to its old length, as QEMU writes it).
    fn write_cid(&self, cid: u32) -> Result<()> {
        let Some((at, len)) = self.desc_at else {
            return Ok(());
        };
        let f = &self.files[0];
        let raw = read_at(f, at, len as usize)?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let text = String::from_utf8_lossy(&raw[..end]);
        let mut out = String::with_capacity(text.len() + 8);
        for line in text.split_inclusive('\n') {
            if line.trim_start().starts_with("CID=") {
                out.push_str(&format!("CID={cid:x}\n"));
            } else {
                out.push_str(line);
            }
        }
        let mut bytes = out.into_bytes();
        if bytes.len() < raw.len() {
            bytes.resize(raw.len(), 0);
        }
        if self
            .desc_at
            .is_some_and(|(_, l)| at != 0 && bytes.len() as u64 > l)
        {
            return Err(invalid("the VMDK descriptor does not fit its space"));
        }
        write_at(f, at, &bytes)?;
        wait(|d| f.flush(d))
    }

    fn extent_at(&self, guest: u64) -> Option<&Extent> {
        let i = self
            .extents
            .partition_point(|e| e.start <= guest)
            .checked_sub(1)?;
        let e = &self.extents[i];
        (guest - e.start < e.len).then_some(e)
    }

    /// The grain table at sector `gt` of extent file `f`, loaded on first use.
    fn gt<'s>(
        &self,
        f: u32,
        st: &'s mut SparseState,
        h: &SparseHeader,
        gt: u32,
    ) -> Result<&'s mut Vec<u32>> {
        if !st.gts.contains_key(&gt) {
            let at = gt as u64 * SECTOR;
            let len = h.gtes as u64 * 4;
            if at + len > st.end.next_multiple_of(SECTOR) {
                return Err(corrupt(format!(
                    "grain table at sector {gt} lies outside the file"
                )));
            }
            let raw = read_at(&self.files[f as usize], at, len as usize)?;
            if st.gts.len() >= GT_CACHE {
                st.gts.clear();
            }
            st.gts
                .insert(gt, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
        }
        st.gts
            .get_mut(&gt)
            .ok_or_else(|| Error::io(libc::EIO, "VMDK grain table vanished from the cache"))
    }
}

fn open_sparse(file: &Node, sectors: u64, read_only: bool) -> Result<Sparse> {
    let head = read_at(file, 0, 512.min(file.size()) as usize)?;
    let mut h = SparseHeader::parse(&head)?;
    if h.version == 3 && h.flags & FLAG_COMPRESSED == 0 && !read_only {
        return Err(invalid("VMDK version 3 must be read only"));
    }
    if h.gd == GD_AT_END {
        // streamOptimized as VMware writes it: the real header is the
        // footer, 1024 bytes from the end. Appending grains would bury it.
        if !read_only {
            return Err(invalid(
                "streamOptimized VMDK images with their grain directory in the footer open read-only only",
            ));
        }
        let len = file.size();
        if len < 1536 {
            return Err(corrupt("streamOptimized image without a footer"));
        }
        let footer = read_at(file, len - 1024, 512)?;
        h = SparseHeader::parse(&footer)?;
    }
    if h.capacity < sectors {
        return Err(corrupt("the extent is smaller than the descriptor says"));
    }
    // QEMU's bounds ("L1 size too big"), and the directory inside the file.
    let n = h.gd_entries();
    if n > 32 << 20 {
        return Err(invalid("L1 size too big"));
    }
    let n = n as usize;
    let read_dir = |at: u64| -> Result<Vec<u32>> {
        if at == 0 {
            return Ok(Vec::new());
        }
        let start = at
            .checked_mul(SECTOR)
            .filter(|s| {
                s.checked_add(n as u64 * 4)
                    .is_some_and(|e| e <= file.size())
            })
            .ok_or_else(|| corrupt("the grain directory lies outside the file"))?;
        let raw = read_at(file, start, n * 4)?;
        Ok(raw.chunks_exact(4).map(|c| le32(c, 0)).collect())
    };
    let gd = read_dir(h.gd)?;
    let rgd = if h.flags & FLAG_RGD != 0 {
        read_dir(h.rgd)?
    } else {
        Vec::new()
    };
    Ok(Sparse {
        state: Mutex::new(SparseState {
            gd,
            rgd,
            gts: HashMap::new(),
            end: file.size(),
        }),
        last: Mutex::new(None),
        h,
    })
}

/// Special ids: extent index above, grain offset (sectors) below.
fn special_id(extent: usize, sector: u64) -> u64 {
    ((extent as u64) << 48) | sector
}

impl Layout for Vmdk {
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        self.block
    }

    fn file(&self, i: u32) -> Option<&Arc<Node>> {
        self.files.get(i as usize)
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let guest = b * self.block;
        let Some(e) = self.extent_at(guest) else {
            return Ok((Block::Zero, 1));
        };
        let within = guest - e.start;
        let left = (e.len - within).div_ceil(self.block);
        match &e.kind {
            Kind::Zero => Ok((Block::Zero, left)),
            Kind::Flat { offset } => Ok((
                Block::DataIn {
                    file: e.file,
                    host: offset + within,
                },
                left,
            )),
            Kind::Sparse(s) => {
                let grain = within / self.block;
                let (gdi, gti) = (grain / s.h.gtes as u64, (grain % s.h.gtes as u64) as usize);
                let mut st = s.state.lock();
                let gt_at = st.gd.get(gdi as usize).copied().unwrap_or(0);
                if gt_at == 0 {
                    return Ok((Block::Unallocated, (s.h.gtes as u64 - gti as u64).min(left)));
                }
                let table = self.gt(e.file, &mut st, &s.h, gt_at)?;
                let g = table[gti];
                let zeroed = s.h.flags & FLAG_ZEROED_GRAIN != 0;
                Ok(match g {
                    0 => (Block::Unallocated, 1),
                    1 if zeroed => (Block::Zero, 1),
                    g if s.h.flags & FLAG_COMPRESSED != 0 => {
                        let ei = self
                            .extents
                            .iter()
                            .position(|x| std::ptr::eq(x, e))
                            .unwrap_or(0);
                        (Block::Special(special_id(ei, g as u64)), 1)
                    }
                    g => {
                        // A grain past the end (a truncated copy): new
                        // grains must not land on it.
                        let grain_end = g as u64 * SECTOR + self.block;
                        st.end = st.end.max(grain_end);
                        (
                            Block::DataIn {
                                file: e.file,
                                host: g as u64 * SECTOR,
                            },
                            1,
                        )
                    }
                })
            }
        }
    }

    /// A deflated grain behind its marker (LBA, size).
    fn read_special(&self, id: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let (ei, sector) = ((id >> 48) as usize, id & ((1 << 48) - 1));
        let e = self
            .extents
            .get(ei)
            .ok_or_else(|| Error::io(libc::EIO, "no such VMDK extent"))?;
        let Kind::Sparse(s) = &e.kind else {
            return Err(Error::io(
                libc::EIO,
                "VMDK compressed grain outside a sparse extent",
            ));
        };
        let grain = {
            let cached = s
                .last
                .lock()
                .as_ref()
                .filter(|(k, _)| *k == id)
                .map(|(_, g)| g.clone());
            match cached {
                Some(g) => g,
                None => {
                    let f = &self.files[e.file as usize];
                    let marker = read_at(f, sector * SECTOR, 12)?;
                    let size = le32(&marker, 8) as u64;
                    if size > 2 * s.h.grain_bytes() + 4096 {
                        return Err(corrupt(format!(
                            "compressed grain at sector {sector} is too large"
                        )));
                    }
                    let raw = read_at(f, sector * SECTOR + 12, size as usize)?;
                    let mut out = vec![0u8; s.h.grain_bytes() as usize];
                    super::deflate::inflate_zlib_upto(&raw, &mut out).map_err(|m| {
                        Error::io(libc::EIO, format!("VMDK grain at sector {sector}: {m}"))
                    })?;
                    let g = Arc::new(out);
                    *s.last.lock() = Some((id, g.clone()));
                    g
                }
            }
        };
        let at = ((guest - e.start) % self.block) as usize;
        buf.copy_from_slice(&grain[at..at + buf.len()]);
        Ok(())
    }

    fn writable(&self) -> bool {
        true
    }

    /// A new CID for the image on the first write of a session, as QEMU
    /// does (overlays of it record its CID as their parentCID).
    fn first_write(&self) -> Result<()> {
        let cid = u32::from_le_bytes(
            super::create::uuid_v4()?[..4]
                .try_into()
                .unwrap_or([1, 2, 3, 4]),
        );
        self.write_cid(cid)?;
        self.cid.store(cid, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn checkable(&self) -> bool {
        true
    }

    fn zeroes_from_file(&self, guest: u64) -> bool {
        matches!(
            self.extent_at(guest),
            Some(Extent {
                kind: Kind::Flat { .. },
                ..
            })
        )
    }

    /// A new grain at the end of its extent file (and a new grain table
    /// there first, when its directory entry is empty); the table entries
    /// once the data is on disk, the redundant ones too.
    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        let guest = b * self.block;
        let e = self
            .extent_at(guest)
            .ok_or_else(|| Error::io(libc::EINVAL, "write past the last VMDK extent"))?;
        let Kind::Sparse(s) = &e.kind else {
            return Err(Error::io(
                libc::EROFS,
                "VMDK zero extents cannot be written",
            ));
        };
        let f = &self.files[e.file as usize];
        // streamOptimized: the grain deflated behind its marker (sector,
        // size), padded to whole sectors, as qemu-img writes it.
        let stored;
        let content = if s.h.flags & FLAG_COMPRESSED != 0 {
            let z = miniz_oxide::deflate::compress_to_vec_zlib(content, 6);
            let mut g = Vec::with_capacity(12 + z.len() + SECTOR as usize);
            g.extend_from_slice(&(guest / SECTOR).to_le_bytes());
            g.extend_from_slice(&(z.len() as u32).to_le_bytes());
            g.extend_from_slice(&z);
            g.resize(g.len().next_multiple_of(SECTOR as usize), 0);
            stored = g;
            &stored[..]
        } else {
            content
        };
        let grain = (guest - e.start) / self.block;
        let (gdi, gti) = (
            (grain / s.h.gtes as u64) as usize,
            (grain % s.h.gtes as u64) as usize,
        );
        let (at, gt_at) = {
            let mut st = s.state.lock();
            let at = st.end.next_multiple_of(SECTOR);
            st.end = at + content.len() as u64;
            (at, st.gd.get(gdi).copied().unwrap_or(0))
        };
        write_at(f, at, content)?;
        let entry = u32::try_from(at / SECTOR)
            .map_err(|_| Error::io(libc::EFBIG, "VMDK extent too large"))?;
        if gt_at == 0 {
            return self.new_tables(f, s, gdi, gti, entry);
        }
        wait(|d| f.flush(d))?;
        write_at(
            f,
            gt_at as u64 * SECTOR + gti as u64 * 4,
            &entry.to_le_bytes(),
        )?;
        let rgt = s.state.lock().rgd.get(gdi).copied().unwrap_or(0);
        if rgt != 0 {
            write_at(
                f,
                rgt as u64 * SECTOR + gti as u64 * 4,
                &entry.to_le_bytes(),
            )?;
        }
        let mut st = s.state.lock();
        if let Some(t) = st.gts.get_mut(&gt_at) {
            t[gti] = entry;
        }
        Ok(())
    }

    fn zero_block(&self, b: u64) -> Result<bool> {
        let Some(Extent {
            kind: Kind::Sparse(s),
            ..
        }) = self.extent_at(b * self.block)
        else {
            return Ok(false);
        };
        if s.h.flags & FLAG_ZEROED_GRAIN == 0 || !matches!(self.lookup(b)?.0, Block::Unallocated) {
            return Ok(false);
        }
        // Only where a table already exists (no table just for zeroes).
        let e = self
            .extent_at(b * self.block)
            .ok_or_else(|| Error::io(libc::EIO, "no extent"))?;
        let grain = (b * self.block - e.start) / self.block;
        let (gdi, gti) = (
            (grain / s.h.gtes as u64) as usize,
            (grain % s.h.gtes as u64) as usize,
        );
        let gt_at = s.state.lock().gd.get(gdi).copied().unwrap_or(0);
        if gt_at == 0 {
            return Ok(false);
        }
        let f = &self.files[e.file as usize];
        write_at(
            f,
            gt_at as u64 * SECTOR + gti as u64 * 4,
            &1u32.to_le_bytes(),
        )?;
        // The redundant table says the same.
        let rgt = s.state.lock().rgd.get(gdi).copied().unwrap_or(0);
        if rgt != 0 {
            write_at(f, rgt as u64 * SECTOR + gti as u64 * 4, &1u32.to_le_bytes())?;
        }
        if let Some(t) = s.state.lock().gts.get_mut(&gt_at) {
            t[gti] = 1;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        for f in &self.files[1..] {
            wait(|d| f.flush(d))?;
        }
        Ok(())
    }

    fn backing_file(&self) -> Option<String> {
        self.desc.parent_hint.clone()
    }

    fn backing_format(&self) -> Option<String> {
        self.desc.parent_hint.as_ref().map(|_| "vmdk".to_string())
    }

    fn image_info(&self, v: &mut Value) {
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut x = json!({
                    "filename": self.files[e.file as usize].driver.filename(),
                    "virtual-size": e.len,
                    "format": match e.kind { Kind::Flat { .. } => "FLAT", Kind::Zero => "ZERO", Kind::Sparse(_) => "" },
                });
                if let Kind::Sparse(s) = &e.kind {
                    x["cluster-size"] = json!(s.h.grain_bytes());
                    if s.h.flags & FLAG_COMPRESSED != 0 {
                        x["compressed"] = json!(true);
                    }
                }
                x
            })
            .collect();
        if self
            .extents
            .iter()
            .any(|e| matches!(e.kind, Kind::Sparse(_)))
        {
            v["cluster-size"] = json!(self.block);
        }
        v["format-specific"] = json!({"type": "vmdk", "data": {
            "cid": self.cid.load(std::sync::atomic::Ordering::Relaxed), "parent-cid": self.desc.parent_cid,
            "create-type": self.desc.create_type, "extents": extents}});
    }
}

impl Vmdk {
    /// The table entries for a grain whose directory entry is empty: a new
    /// grain table (and its redundant copy) after the grain, flushed with
    /// it, then the directory entries.
    fn new_tables(
        &self,
        f: &Arc<Node>,
        s: &Sparse,
        gdi: usize,
        gti: usize,
        entry: u32,
    ) -> Result<()> {
        let table_bytes = (s.h.gtes as u64 * 4).next_multiple_of(SECTOR);
        let mut table = vec![0u32; s.h.gtes as usize];
        table[gti] = entry;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        let redundant = s.h.flags & FLAG_RGD != 0 && s.h.rgd != 0;
        let (gt_at, rgt_at) = {
            let mut st = s.state.lock();
            let gt_at = st.end.next_multiple_of(SECTOR);
            st.end = gt_at + table_bytes * if redundant { 2 } else { 1 };
            (gt_at, gt_at + table_bytes)
        };
        write_at(f, gt_at, &raw)?;
        if redundant {
            write_at(f, rgt_at, &raw)?;
        }
        wait(|d| f.flush(d))?;
        let sector = |at: u64| {
            u32::try_from(at / SECTOR).map_err(|_| Error::io(libc::EFBIG, "VMDK extent too large"))
        };
        let (gt_s, rgt_s) = (sector(gt_at)?, sector(rgt_at)?);
        if s.h.gd == 0 {
            return Err(corrupt("the extent has no grain directory"));
        }
        write_at(f, s.h.gd * SECTOR + gdi as u64 * 4, &gt_s.to_le_bytes())?;
        if redundant {
            write_at(f, s.h.rgd * SECTOR + gdi as u64 * 4, &rgt_s.to_le_bytes())?;
        }
        let mut st = s.state.lock();
        if let Some(x) = st.gd.get_mut(gdi) {
            *x = gt_s;
        }
        if redundant {
            if let Some(x) = st.rgd.get_mut(gdi) {
                *x = rgt_s;
            }
        }
        st.gts.insert(gt_s, table);
        Ok(())
    }
}

/// `qemu-img create -f vmdk` options.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat.
    pub subformat: Option<String>,
    pub adapter_type: Option<String>,
    pub hwversion: Option<String>,
    pub toolsversion: Option<String>,
    pub compat6: bool,
    pub zeroed_grain: bool,
    pub backing_file: Option<String>,
}

/// The largest extent of the twoGbMaxExtent subformats.
const SPLIT: u64 = 2 << 30;

/// A hosted sparse extent of `size` bytes as QEMU lays it out: header,
/// room for a descriptor (sectors 1-20), redundant and primary grain
/// directories each followed by all their grain tables, grains from the
/// next 64 KiB on. Returns the bytes to write and the file length.
fn sparse_extent(
    size: u64,
    zeroed_grain: bool,
    stream: bool,
    descriptor: Option<&str>,
) -> (Vec<u8>, u64) {
    let sectors = size / SECTOR;
    let grains = sectors.div_ceil(128);
    let gt_size = (512u64 * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(512);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd = 1 + 20;
    let gd = rgd + gd_sectors + gt_size * gt_count;
    let grain_offset = (gd + gd_sectors + gt_size * gt_count).next_multiple_of(128);
    let mut b = vec![0u8; (gd + gd_sectors) as usize * SECTOR as usize];
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut b, 0, MAGIC);
    let version = match (stream, zeroed_grain) {
        (true, _) => 3,
        (false, true) => 2,
        (false, false) => 1,
    };
    put32(&mut b, 4, version);
    let mut flags = 1 | FLAG_RGD | if zeroed_grain { FLAG_ZEROED_GRAIN } else { 0 };
    if stream {
        flags |= FLAG_COMPRESSED | FLAG_MARKERS;
        b[77..79].copy_from_slice(&1u16.to_le_bytes());
    }
    put32(&mut b, 8, flags);
    let put64 =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put64(&mut b, 12, sectors);
    put64(&mut b, 20, 128);
    put64(&mut b, 28, 1);
    put64(&mut b, 36, 20);
    put32(&mut b, 44, 512);
    put64(&mut b, 48, rgd);
    put64(&mut b, 56, gd);
    put64(&mut b, 64, grain_offset);
    b[73..77].copy_from_slice(b"\n \r\n");
    if let Some(d) = descriptor {
        b[512..512 + d.len()].copy_from_slice(d.as_bytes());
    }
    for (dir, tables) in [(rgd, rgd + gd_sectors), (gd, gd + gd_sectors)] {
        for i in 0..gt_count {
            let at = (dir * SECTOR + i * 4) as usize;
            put32(&mut b, at, (tables + i * gt_size) as u32);
        }
    }
    (b, grain_offset * SECTOR)
}

/// The CID in the descriptor of the vmdk image at `path`.
fn cid_of(path: &str) -> Result<u32> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{path}'")))?;
    let io = |e: std::io::Error| Error::from_io(&e, format!("Could not read '{path}'"));
    let mut head = vec![0u8; 512];
    let n = f.read_at(&mut head, 0).map_err(io)?;
    let mut text = vec![0u8; 20 * 512];
    let m = if n >= 512 && le32(&head, 0) == MAGIC {
        let h = SparseHeader::parse(&head)?;
        f.read_at(&mut text, h.desc_offset * SECTOR).map_err(io)?
    } else {
        f.read_at(&mut text, 0).map_err(io)?
    };
    let end = text[..m].iter().position(|&c| c == 0).unwrap_or(m);
    Ok(Descriptor::parse(&String::from_utf8_lossy(&text[..end]))?.cid)
}

/// Creates a VMDK image as `qemu-img create -f vmdk` does.
pub fn create(path: &str, size: u64, o: &CreateOptions) -> Result<()> {
    let subformat = o.subformat.as_deref().unwrap_or("monolithicSparse");
    let (flat, split) = match subformat {
        "monolithicSparse" | "streamOptimized" => (false, false),
        "monolithicFlat" => (true, false),
        "twoGbMaxExtentSparse" => (false, true),
        "twoGbMaxExtentFlat" => (true, true),
        s => return Err(invalid(format!("Unknown subformat: {s}"))),
    };
    let stream = subformat == "streamOptimized";
    let adapter = o.adapter_type.as_deref().unwrap_or("ide");
    let heads = match adapter {
        "ide" => 16,
        "lsilogic" | "buslogic" | "legacyESX" => 255,
        a => return Err(invalid(format!("Unknown adapter type: '{a}'"))),
    };
    let hw = match (&o.hwversion, o.compat6) {
        (Some(_), true) => return Err(invalid("compat6 cannot be enabled with hwversion set")),
        (Some(v), false) => v.clone(),
        (None, true) => "6".into(),
        (None, false) => "4".into(),
    };
    let size = size.next_multiple_of(SECTOR);
    let parent = match &o.backing_file {
        Some(b) => {
            let dir = std::path::Path::new(path)
                .parent()
                .unwrap_or(std::path::Path::new(""));
            let full = if b.starts_with('/') {
                b.clone()
            } else {
                dir.join(b).to_string_lossy().into_owned()
            };
            Some((b.clone(), cid_of(&full)?))
        }
        None => None,
    };
    let p = std::path::Path::new(path);
    let dir = p.parent().unwrap_or(std::path::Path::new(""));
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (prefix, postfix) = match name.rfind('.') {
        Some(i) => (name[..i].to_string(), name[i..].to_string()),
        None => (name.clone(), String::new()),
    };
    // The extents: (file name, bytes).
    let mut extents = Vec::new();
    if !flat && !split {
        extents.push((name.clone(), size));
    } else if !split {
        extents.push((format!("{prefix}-flat{postfix}"), size));
    } else {
        let mut left = size;
        let mut n = 1;
        while left > 0 || n == 1 {
            let len = left.min(SPLIT);
            let kind = if flat { 'f' } else { 's' };
            extents.push((format!("{prefix}-{kind}{n:03}{postfix}"), len));
            left -= len;
            n += 1;
        }
    }
    let lines: String = extents
        .iter()
        .map(|(f, len)| {
            if flat {
                format!("RW {} FLAT \"{f}\" 0\n", len / SECTOR)
            } else {
                format!("RW {} SPARSE \"{f}\"\n", len / SECTOR)
            }
        })
        .collect();
    let cid = u32::from_le_bytes(
        super::create::uuid_v4()?[..4]
            .try_into()
            .unwrap_or([1, 2, 3, 4]),
    );
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID={cid:x}\nparentCID={:x}\ncreateType=\"{subformat}\"\n{}\n# Extent description\n{lines}\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{hw}\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{heads}\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"{adapter}\"\nddb.toolsVersion = \"{}\"\n",
        parent.as_ref().map_or(u32::MAX, |p| p.1),
        parent.as_ref().map_or(String::new(), |p| format!("parentFileNameHint=\"{}\"", p.0)),
        size / (SECTOR * heads * 63),
        o.toolsversion.as_deref().unwrap_or("2147483647"),
    );
    if !flat && !split {
        if desc.len() > 20 * SECTOR as usize {
            return Err(invalid("VMDK descriptor is too long"));
        }
        let (head, len) = sparse_extent(size, o.zeroed_grain, stream, Some(&desc));
        return super::create::write_new(path, &head, len);
    }
    for (f, len) in &extents {
        let full = dir.join(f).to_string_lossy().into_owned();
        if flat {
            super::create::write_new(&full, &[], *len)?;
        } else {
            let (head, flen) = sparse_extent(*len, o.zeroed_grain, false, None);
            super::create::write_new(&full, &head, flen)?;
        }
    }
    super::create::write_new(path, desc.as_bytes(), desc.len() as u64)
}
