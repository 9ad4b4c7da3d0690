//! Hyper-V VHDX images (dynamic and fixed): a 1 MiB header section (file
//! identifier, two headers, region tables), a log, a block allocation
//! table (payload entries with a sector-bitmap entry after every chunk),
//! a metadata region, and payload blocks.
//!
//! A read-write open replays a log left by a crash; a read-only one
//! refuses such an image. Every BAT change goes through the log, as QEMU
//! writes it: the entry is written and flushed before the BAT sector
//! moves, and the headers' log GUID says when the log must be replayed.

use super::bytes::{le16, le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

pub const SIGNATURE: &[u8; 8] = b"vhdxfile";
const MIB: u64 = 1 << 20;
const KIB64: u64 = 64 << 10;
const HEADER_AT: [u64; 2] = [KIB64, 2 * KIB64];
const REGION_AT: u64 = 3 * KIB64;
const REGION2_AT: u64 = 4 * KIB64;
const LOG_SECTOR: u64 = 4096;
const SECTOR: u64 = 512;
const BAT_GUID: [u8; 16] = guid(
    0x2dc27766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
const META_GUID: [u8; 16] = guid(
    0x8b7ca206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
const FILE_PARAMS: [u8; 16] = guid(
    0xcaa16737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const DISK_SIZE: [u8; 16] = guid(
    0x2fa54224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const PAGE83: [u8; 16] = guid(
    0xbeca12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const PHYSICAL_SECTOR: [u8; 16] = guid(
    0xcda348c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d35f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
const STATE_ZERO: u64 = 2;
const STATE_PRESENT: u64 = 6;
const STATE_PARTIAL: u64 = 7;
const OFFSET_MASK: u64 = !0xfffff;

/// An MS-GUID's on-disk bytes (data1-3 little-endian).
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// CRC-32C (Castagnoli), as VHDX checksums its structures.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// `data` checksummed with its 4-byte checksum field at `at` taken as zero.
fn checksum_ok(data: &[u8], at: usize) -> bool {
    let mut copy = data.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == le32(data, at)
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("VHDX image is corrupt: {msg}"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seq: u64,
    pub file_write_guid: [u8; 16],
    pub data_write_guid: [u8; 16],
    pub log_guid: [u8; 16],
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// One header block (the first 4 KiB of it), if valid.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < 4096 || &b[..4] != b"head" || le16(b, 66) != 1 || !checksum_ok(&b[..4096], 4) {
            return None;
        }
        let g = |at: usize| -> [u8; 16] { b[at..at + 16].try_into().unwrap_or([0; 16]) };
        Some(Header {
            seq: le64(b, 8),
            file_write_guid: g(16),
            data_write_guid: g(32),
            log_guid: g(48),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(b"head");
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[66..68].copy_from_slice(&1u16.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        let c = crc32c(&b);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// The current header of the two: the valid one with the higher
    /// sequence number (equal ones must be identical).
    pub fn current(h1: Option<Header>, h2: Option<Header>) -> Result<(usize, Header)> {
        match (h1, h2) {
            (Some(a), Some(b)) if a.seq > b.seq => Ok((0, a)),
            (Some(a), Some(b)) if b.seq > a.seq => Ok((1, b)),
            (Some(a), Some(b)) if a == b => Ok((0, a)),
            (Some(a), None) => Ok((0, a)),
            (None, Some(b)) => Ok((1, b)),
            _ => Err(invalid("No valid VHDX header found")),
        }
    }
}

/// Where the BAT and the metadata are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    pub bat: (u64, u64),
    pub meta: (u64, u64),
}

impl Regions {
    pub fn parse(b: &[u8]) -> Result<Regions> {
        if b.len() < KIB64 as usize || &b[..4] != b"regi" || !checksum_ok(&b[..KIB64 as usize], 4) {
            return Err(corrupt("bad region table"));
        }
        let n = le32(b, 8);
        if n > 2047 {
            return Err(corrupt("too many region table entries"));
        }
        let (mut bat, mut meta) = (None, None);
        for i in 0..n as usize {
            let e = &b[16 + i * 32..48 + i * 32];
            let r = (le64(e, 16), le32(e, 24) as u64);
            let slot = if e[..16] == BAT_GUID {
                &mut bat
            } else if e[..16] == META_GUID {
                &mut meta
            } else if le32(e, 28) & 1 != 0 {
                return Err(invalid("VHDX image has an unknown required region"));
            } else {
                continue;
            };
            if slot.replace(r).is_some() {
                return Err(corrupt("duplicate region table entry"));
            }
        }
        match (bat, meta) {
            (Some(bat), Some(meta)) => Ok(Regions { bat, meta }),
            _ => Err(corrupt("the BAT or metadata region is missing")),
        }
    }
}

/// What the metadata region says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub block_size: u64,
    pub fixed: bool,
    pub size: u64,
}

impl Params {
    /// `b`: the metadata region (its table and items).
    pub fn parse(b: &[u8]) -> Result<Params> {
        if b.len() < 32 || &b[..8] != b"metadata" {
            return Err(corrupt("bad metadata table"));
        }
        let n = le16(b, 10) as usize;
        if n > 2047 || 32 + n * 32 > b.len() {
            return Err(corrupt("too many metadata entries"));
        }
        let mut items: Vec<([u8; 16], usize, usize, u32)> = Vec::new();
        for i in 0..n {
            let e = &b[32 + i * 32..64 + i * 32];
            let id: [u8; 16] = e[..16].try_into().unwrap_or([0; 16]);
            let (off, len, bits) = (le32(e, 16) as usize, le32(e, 20) as usize, le32(e, 24));
            if items.iter().any(|x| x.0 == id) {
                return Err(corrupt("duplicate metadata item"));
            }
            items.push((id, off, len, bits));
        }
        let item = |id: [u8; 16], len: usize| -> Result<&[u8]> {
            let (_, off, l, _) = items
                .iter()
                .find(|x| x.0 == id)
                .ok_or_else(|| invalid("VHDX metadata lacks a required item"))?;
            if *l < len || off.checked_add(len).is_none_or(|e| e > b.len()) {
                return Err(corrupt("metadata item out of bounds"));
            }
            Ok(&b[*off..*off + len])
        };
        for (id, _, _, bits) in &items {
            let known = [
                FILE_PARAMS,
                DISK_SIZE,
                PAGE83,
                LOGICAL_SECTOR,
                PHYSICAL_SECTOR,
                PARENT_LOCATOR,
            ];
            if !known.contains(id) && bits & 4 != 0 {
                return Err(invalid("VHDX metadata has an unknown required item"));
            }
        }
        let fp = item(FILE_PARAMS, 8)?;
        let (block_size, flags) = (le32(fp, 0) as u64, le32(fp, 4));
        if flags & 2 != 0 {
            return Err(invalid(
                "Differencing VHDX images (with a parent) are not supported",
            ));
        }
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(corrupt(format!("invalid block size {block_size}")));
        }
        let size = le64(item(DISK_SIZE, 8)?, 0) / SECTOR * SECTOR;
        item(PAGE83, 16)?;
        if le32(item(LOGICAL_SECTOR, 4)?, 0) != 512 {
            return Err(invalid(
                "VHDX images with 4096-byte logical sectors are not supported",
            ));
        }
        item(PHYSICAL_SECTOR, 4)?;
        Ok(Params {
            block_size,
            fixed: flags & 1 != 0,
            size,
        })
    }

    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * 512 / self.block_size
    }

    fn data_blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    fn bat_entries(&self) -> u64 {
        let d = self.data_blocks();
        d + d.saturating_sub(1) / self.chunk_ratio()
    }

    fn bat_index(&self, b: u64) -> u64 {
        b + b / self.chunk_ratio()
    }
}

/// A log entry's parts, once checked.
struct LogEntry {
    seq: u64,
    len: u64,
    flushed: u64,
    last: u64,
    /// (file offset, 4 KiB sector or None for `zero_len` zero bytes).
    writes: Vec<(u64, Option<Vec<u8>>, u64)>,
}

/// The entry at `at` of the log `log` (its bytes), if valid for `guid`.
fn log_entry(log: &[u8], at: usize, guid: &[u8; 16]) -> Option<LogEntry> {
    let h = log.get(at..at + 64)?;
    if &h[..4] != b"loge" || h[32..48] != guid[..] {
        return None;
    }
    let len = le32(h, 8) as u64;
    let seq = le64(h, 16);
    let count = le32(h, 24) as usize;
    if len == 0 || !len.is_multiple_of(LOG_SECTOR) || seq == 0 || count * 32 > len as usize {
        return None;
    }
    let entry = log.get(at..at + len as usize)?;
    if !checksum_ok(entry, 4) {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128);
    let mut data_at = desc_sectors * LOG_SECTOR as usize;
    let mut writes = Vec::new();
    for i in 0..count {
        let d = entry.get(64 + i * 32..96 + i * 32)?;
        let off = le64(d, 16);
        if le64(d, 24) != seq || !off.is_multiple_of(LOG_SECTOR) {
            return None;
        }
        match &d[..4] {
            b"zero" => {
                let n = le64(d, 8);
                if !n.is_multiple_of(LOG_SECTOR) {
                    return None;
                }
                writes.push((off, None, n));
            }
            b"desc" => {
                let s = entry.get(data_at..data_at + LOG_SECTOR as usize)?;
                if &s[..4] != b"data" || ((le32(s, 4) as u64) << 32 | le32(s, 4092) as u64) != seq {
                    return None;
                }
                let mut sector = vec![0u8; LOG_SECTOR as usize];
                sector[..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..].copy_from_slice(&d[4..8]);
                writes.push((off, Some(sector), LOG_SECTOR));
                data_at += LOG_SECTOR as usize;
            }
            _ => return None,
        }
    }
    Some(LogEntry {
        seq,
        len,
        flushed: le64(h, 48),
        last: le64(h, 56),
        writes,
    })
}

/// The run of entries to replay: the valid sequence (each entry's
/// number one more than the last) starting with the highest number.
fn log_search(log: &[u8], guid: &[u8; 16]) -> Vec<LogEntry> {
    let mut best: Vec<LogEntry> = Vec::new();
    let mut at = 0;
    while at < log.len() {
        let Some(first) = log_entry(log, at, guid) else {
            at += LOG_SECTOR as usize;
            continue;
        };
        let mut run = vec![];
        let (mut pos, mut next_seq) = (at, first.seq);
        while let Some(e) = log_entry(log, pos % log.len(), guid) {
            if e.seq != next_seq || run.len() > log.len() / LOG_SECTOR as usize {
                break;
            }
            pos += e.len as usize;
            next_seq += 1;
            run.push(e);
        }
        if best.first().is_none_or(|b| first.seq > b.seq) {
            best = run;
        }
        // On past the run (not into it again: a scan stays linear).
        at = pos.max(at + LOG_SECTOR as usize);
    }
    best
}

/// How many log entries a replay of `log` would apply (for fuzzing the
/// log parser).
pub fn replayable_entries(log: &[u8], guid: &[u8; 16]) -> usize {
    log_search(log, guid).len()
}

struct State {
    bat: Vec<u64>,
    /// The file's end: new blocks go at the next MiB.
    end: u64,
    /// Headers: which slot is current, and its contents.
    current: usize,
    header: Header,
    /// Where the next log entry goes, and its sequence number.
    log_pos: u64,
    log_seq: u64,
}

pub struct Vhdx {
    file: Arc<Node>,
    p: Params,
    regions: Regions,
    state: Mutex<State>,
}

impl Vhdx {
    pub fn open(file: Arc<Node>, read_only: bool) -> Result<Vhdx> {
        let len = file.size();
        if len < MIB {
            return Err(invalid("Image not in VHDX format (too short)"));
        }
        let id = read_at(&file, 0, 8)?;
        if &id[..] != SIGNATURE {
            return Err(invalid("Image not in VHDX format"));
        }
        let h1 = Header::parse(&read_at(&file, HEADER_AT[0], 4096)?);
        let h2 = Header::parse(&read_at(&file, HEADER_AT[1], 4096)?);
        let (current, header) = Header::current(h1, h2)?;
        let regions = Regions::parse(&read_at(&file, REGION_AT, KIB64 as usize)?)?;
        let (moff, mlen) = regions.meta;
        if mlen > 16 * MIB || moff.checked_add(mlen).is_none_or(|e| e > len) {
            return Err(corrupt("the metadata region lies outside the file"));
        }
        let p = Params::parse(&read_at(&file, moff, mlen as usize)?)?;
        let (boff, blen) = regions.bat;
        if p.bat_entries() * 8 > blen || boff.checked_add(blen).is_none_or(|e| e > len) {
            return Err(corrupt("the BAT is too small or lies outside the file"));
        }
        // The spec puts every region on a 1 MiB boundary; the BAT's sectors
        // are rewritten whole (through the log), so they must be.
        let log = (header.log_offset, header.log_length as u64);
        let areas = [(0, MIB), log, regions.bat, regions.meta];
        if [boff, moff].iter().any(|o| !o.is_multiple_of(MIB)) {
            return Err(corrupt(
                "the BAT or metadata region is not aligned to 1 MiB",
            ));
        }
        let log_ok = log.0 >= MIB
            && log.0.is_multiple_of(MIB)
            && log.1 != 0
            && log.1.is_multiple_of(MIB)
            && log.0.checked_add(log.1).is_some_and(|e| e <= len);
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[..i] {
                if a.1 != 0 && b.1 != 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                    return Err(corrupt(format!(
                        "VHDX region {:#x}-{:#x} overlaps with region {:#x}-{:#x}",
                        a.0,
                        a.0 + a.1,
                        b.0,
                        b.0 + b.1
                    )));
                }
            }
        }
        if !log_ok && !read_only {
            return Err(corrupt(
                "the log region is invalid: the image can only be opened read-only",
            ));
        }
        let v = Vhdx {
            state: Mutex::new(State {
                bat: Vec::new(),
                end: len,
                current,
                header,
                log_pos: 0,
                log_seq: 1,
            }),
            file,
            p,
            regions,
        };
        let guid = v.state.lock().header.log_guid;
        if guid != [0; 16] && log_ok && v.log_pending(&guid)? {
            if read_only {
                let name = v.file.driver.filename();
                return Err(Error::io(
                    libc::EPERM,
                    format!(
                        "VHDX image file '{name}' opened read-only, but contains a log that needs to be replayed; open it read-write (or run: qemu-img check -r all '{name}')"
                    ),
                ));
            }
            v.replay()?;
        } else if guid != [0; 16] && !read_only {
            // A log GUID with no entry to replay (a crash before the entry
            // was written): the log is empty.
            v.update_headers(|h| h.log_guid = [0; 16])?;
        }
        let raw = read_at(&v.file, boff, (v.p.bat_entries() * 8) as usize)?;
        let bat: Vec<u64> = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let bs = v.p.block_size;
        let mut end = v.file.size();
        let data_blocks = v.p.data_blocks();
        let file_len = v.file.size();
        for (i, &e) in bat.iter().enumerate() {
            let off = e & OFFSET_MASK;
            let bitmap_entry = (i as u64 + 1).is_multiple_of(v.p.chunk_ratio() + 1);
            if e & 7 != STATE_PRESENT || bitmap_entry {
                continue;
            }
            // Payload block b; only the last one may end past the file.
            let b = i as u64 - i as u64 / (v.p.chunk_ratio() + 1);
            let last = b + 1 >= data_blocks;
            let fits =
                off < file_len && (last || off.checked_add(bs).is_some_and(|x| x <= file_len));
            if !fits {
                return Err(corrupt(format!(
                    "BAT entry {i} (offset {off:#x}) points after end of file ({file_len}). Image has probably been truncated."
                )));
            }
            if areas
                .iter()
                .any(|a| a.1 != 0 && off < a.0 + a.1 && a.0 < off + bs)
            {
                return Err(corrupt(format!(
                    "BAT entry {i} ({off:#x}) overlaps the image's own structures"
                )));
            }
            // New blocks go after every block, the partial last one too.
            end = end.max(off + bs);
        }
        {
            let mut s = v.state.lock();
            s.bat = bat;
            s.end = end;
        }
        Ok(v)
    }

    /// Whether the log holds entries to replay for `guid`.
    fn log_pending(&self, guid: &[u8; 16]) -> Result<bool> {
        let (off, len) = {
            let s = self.state.lock();
            (s.header.log_offset, s.header.log_length as u64)
        };
        let log = read_at(&self.file, off, len as usize)?;
        Ok(!log_search(&log, guid).is_empty())
    }

    /// Replays the log (a read-write open after a crash), then marks it empty.
    fn replay(&self) -> Result<()> {
        let (guid, off, len) = {
            let s = self.state.lock();
            (
                s.header.log_guid,
                s.header.log_offset,
                s.header.log_length as u64,
            )
        };
        if off < MIB
            || !off.is_multiple_of(MIB)
            || !len.is_multiple_of(MIB)
            || len == 0
            || off + len > self.file.size()
        {
            return Err(corrupt("invalid log region"));
        }
        let log = read_at(&self.file, off, len as usize)?;
        let entries = log_search(&log, &guid);
        for e in &entries {
            if e.flushed > self.file.size() {
                return Err(corrupt(
                    "the log refers past the end of the file (truncated?)",
                ));
            }
            for (at, data, n) in &e.writes {
                match data {
                    Some(sector) => write_at(&self.file, *at, sector)?,
                    None => {
                        let zeroes = vec![0u8; MIB as usize];
                        let mut done = 0;
                        while done < *n {
                            let k = (*n - done).min(MIB);
                            write_at(&self.file, at + done, &zeroes[..k as usize])?;
                            done += k;
                        }
                    }
                }
            }
            if self.file.size() < e.last {
                self.file.driver.resize(e.last.next_multiple_of(MIB))?;
            }
        }
        wait(|d| self.file.flush(d))?;
        log::info!(
            "{}: replayed {} VHDX log entries",
            self.file.driver.filename(),
            entries.len()
        );
        self.update_headers(|h| h.log_guid = [0; 16])
    }

    /// Writes the other header slot with `change` applied and the next
    /// sequence number, twice (both slots), as QEMU does.
    fn update_headers(&self, change: impl Fn(&mut Header)) -> Result<()> {
        for _ in 0..2 {
            let (slot, h) = {
                let s = self.state.lock();
                let mut h = s.header.clone();
                change(&mut h);
                h.seq += 1;
                (1 - s.current, h)
            };
            write_at(&self.file, HEADER_AT[slot], &h.encode())?;
            wait(|d| self.file.flush(d))?;
            let mut s = self.state.lock();
            s.current = slot;
            s.header = h;
        }
        Ok(())
    }

    /// Sets BAT entry `i` to `value` through the log: the entry (the whole
    /// 4 KiB BAT sector) written and flushed, the sector in place, then
    /// the log marked empty.
    fn set_bat(&self, i: u64, value: u64) -> Result<()> {
        let (boff, _) = self.regions.bat;
        let sector_at = (boff + i * 8) / LOG_SECTOR * LOG_SECTOR;
        let mut sector = {
            let s = self.state.lock();
            let first = ((sector_at - boff) / 8) as usize;
            let mut b = vec![0u8; LOG_SECTOR as usize];
            for (k, e) in s.bat.iter().enumerate().skip(first).take(512) {
                let e = if k as u64 == i { value } else { *e };
                b[(k - first) * 8..(k - first) * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            b
        };
        if sector_at + LOG_SECTOR > boff + self.regions.bat.1 {
            sector.truncate((boff + self.regions.bat.1 - sector_at) as usize);
        }
        let guid = super::create::uuid_v4()?;
        self.update_headers(|h| h.log_guid = guid)?;
        let (pos, seq, log_off, log_len, end) = {
            let s = self.state.lock();
            (
                s.log_pos,
                s.log_seq,
                s.header.log_offset,
                s.header.log_length as u64,
                s.end,
            )
        };
        let entry = encode_log_entry(&guid, seq, pos, end, sector_at, &sector);
        let pos = if pos + entry.len() as u64 > log_len {
            0
        } else {
            pos
        };
        write_at(&self.file, log_off + pos, &entry)?;
        wait(|d| self.file.flush(d))?;
        write_at(&self.file, sector_at, &sector)?;
        wait(|d| self.file.flush(d))?;
        {
            let mut s = self.state.lock();
            s.log_pos = (pos + entry.len() as u64) % log_len;
            s.log_seq += 1;
            // Only now that the sector is on disk: reads of the block.
            s.bat[i as usize] = value;
        }
        self.update_headers(|h| h.log_guid = [0; 16])
    }
}

/// A log entry writing `sector` (4 KiB, or shorter: zero-padded) at `at`.
fn encode_log_entry(
    guid: &[u8; 16],
    seq: u64,
    tail: u64,
    end: u64,
    at: u64,
    sector: &[u8],
) -> Vec<u8> {
    let mut full = vec![0u8; LOG_SECTOR as usize];
    full[..sector.len()].copy_from_slice(sector);
    let mut e = vec![0u8; 2 * LOG_SECTOR as usize];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(2 * LOG_SECTOR as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&1u32.to_le_bytes());
    e[32..48].copy_from_slice(guid);
    e[48..56].copy_from_slice(&end.to_le_bytes());
    e[56..64].copy_from_slice(&end.to_le_bytes());
    let d = &mut e[64..96];
    d[..4].copy_from_slice(b"desc");
    d[4..8].copy_from_slice(&full[4092..]);
    d[8..16].copy_from_slice(&full[..8]);
    d[16..24].copy_from_slice(&at.to_le_bytes());
    d[24..32].copy_from_slice(&seq.to_le_bytes());
    let s = &mut e[4096..];
    s[..4].copy_from_slice(b"data");
    s[4..8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
    s[8..4092].copy_from_slice(&full[8..4092]);
    s[4092..].copy_from_slice(&(seq as u32).to_le_bytes());
    let c = crc32c(&e);
    e[4..8].copy_from_slice(&c.to_le_bytes());
    e
}

impl Layout for Vhdx {
    fn format_name(&self) -> &'static str {
        "vhdx"
    }

    fn size(&self) -> u64 {
        self.p.size
    }

    fn block_size(&self) -> u64 {
        self.p.block_size
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let s = self.state.lock();
        let e = s
            .bat
            .get(self.p.bat_index(b) as usize)
            .copied()
            .unwrap_or(0);
        match e & 7 {
            STATE_PRESENT => Ok((Block::Data(e & OFFSET_MASK), 1)),
            0 | 1 | 2 | 3 | 5 => Ok((Block::Unallocated, 1)),
            STATE_PARTIAL => Err(Error::io(
                libc::EIO,
                "VHDX block is partially present (differencing)",
            )),
            _ => Err(Error::io(
                libc::EIO,
                format!("VHDX block {b} has an invalid state"),
            )),
        }
    }

    fn writable(&self) -> bool {
        true
    }

    fn checkable(&self) -> bool {
        true
    }

    /// The block at the next MiB after the file's end; the BAT entry
    /// through the log once the data is on disk.
    fn first_write(&self) -> Result<()> {
        let (file_guid, data_guid) = (super::create::uuid_v4()?, super::create::uuid_v4()?);
        self.update_headers(|h| {
            h.file_write_guid = file_guid;
            h.data_write_guid = data_guid;
        })
    }

    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        let at = {
            let mut s = self.state.lock();
            let at = s.end.next_multiple_of(MIB);
            s.end = at + self.p.block_size;
            at
        };
        write_at(&self.file, at, content)?;
        wait(|d| self.file.flush(d))?;
        self.set_bat(self.p.bat_index(b), at | STATE_PRESENT)
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        v["cluster-size"] = serde_json::json!(self.p.block_size);
    }
}

/// Creates a VHDX image as `qemu-img create -f vhdx` does.
pub fn create(
    path: &str,
    size: u64,
    fixed: bool,
    block_size: Option<u64>,
    log_size: Option<u64>,
    block_state_zero: bool,
) -> Result<()> {
    let size = size.next_multiple_of(SECTOR);
    if size > 64 << 40 {
        return Err(invalid("Image size too large; max of 64TB"));
    }
    let log = log_size.unwrap_or(MIB).next_multiple_of(MIB);
    if log == 0 || log >= 4 << 30 {
        return Err(invalid(
            "Log size must be a multiple of 1 MB and smaller than 4 GB",
        ));
    }
    let bs = match block_size.filter(|&b| b != 0) {
        Some(b) => b.next_multiple_of(MIB).min(256 * MIB),
        None if size <= 1 << 30 => 8 * MIB,
        None if size <= 100 << 30 => 16 * MIB,
        None if size <= 32 << 40 => 32 * MIB,
        None => 64 * MIB,
    };
    if !bs.is_power_of_two() {
        return Err(invalid("Block size must be a power of two"));
    }
    let p = Params {
        block_size: bs,
        fixed,
        size,
    };
    let bat_off = (MIB + log).next_multiple_of(MIB);
    let bat_len = (p.bat_entries() * 8).next_multiple_of(MIB);
    let meta_off = (bat_off + bat_len).next_multiple_of(MIB);
    let data_start = bat_off + bat_len + 5 * MIB;
    let mut img = vec![0u8; (meta_off + MIB) as usize];
    img[..8].copy_from_slice(SIGNATURE);
    for (i, c) in "blkfs".encode_utf16().enumerate() {
        img[8 + 2 * i..10 + 2 * i].copy_from_slice(&c.to_le_bytes());
    }
    let (fw, dw) = (super::create::uuid_v4()?, super::create::uuid_v4()?);
    for (i, at) in HEADER_AT.iter().enumerate() {
        let h = Header {
            seq: 1 + i as u64,
            file_write_guid: fw,
            data_write_guid: dw,
            log_guid: [0; 16],
            log_length: log as u32,
            log_offset: MIB,
        };
        img[*at as usize..*at as usize + 4096].copy_from_slice(&h.encode());
    }
    let mut rt = vec![0u8; KIB64 as usize];
    rt[..4].copy_from_slice(b"regi");
    rt[8..12].copy_from_slice(&2u32.to_le_bytes());
    for (k, (g, off, len)) in [(BAT_GUID, bat_off, bat_len), (META_GUID, meta_off, MIB)]
        .into_iter()
        .enumerate()
    {
        let e = &mut rt[16 + k * 32..48 + k * 32];
        e[..16].copy_from_slice(&g);
        e[16..24].copy_from_slice(&off.to_le_bytes());
        e[24..28].copy_from_slice(&(len as u32).to_le_bytes());
    }
    let c = crc32c(&rt);
    rt[4..8].copy_from_slice(&c.to_le_bytes());
    img[REGION_AT as usize..(REGION_AT + KIB64) as usize].copy_from_slice(&rt);
    img[REGION2_AT as usize..(REGION2_AT + KIB64) as usize].copy_from_slice(&rt);
    let m = &mut img[meta_off as usize..];
    m[..8].copy_from_slice(b"metadata");
    m[10..12].copy_from_slice(&5u16.to_le_bytes());
    let items: [([u8; 16], u32, u32, u32); 5] = [
        (FILE_PARAMS, 65536, 8, 4),
        (DISK_SIZE, 65544, 8, 6),
        (PAGE83, 65552, 16, 6),
        (LOGICAL_SECTOR, 65568, 4, 6),
        (PHYSICAL_SECTOR, 65572, 4, 6),
    ];
    for (k, (g, off, len, bits)) in items.iter().enumerate() {
        let e = &mut m[32 + k * 32..64 + k * 32];
        e[..16].copy_from_slice(g);
        e[16..20].copy_from_slice(&off.to_le_bytes());
        e[20..24].copy_from_slice(&len.to_le_bytes());
        e[24..28].copy_from_slice(&bits.to_le_bytes());
    }
    m[65536..65540].copy_from_slice(&(bs as u32).to_le_bytes());
    m[65540..65544].copy_from_slice(&(fixed as u32).to_le_bytes());
    m[65544..65552].copy_from_slice(&size.to_le_bytes());
    m[65552..65568].copy_from_slice(&super::create::uuid_v4()?);
    m[65568..65572].copy_from_slice(&512u32.to_le_bytes());
    m[65572..65576].copy_from_slice(&512u32.to_le_bytes());
    let b = &mut img[bat_off as usize..];
    for k in 0..p.data_blocks() {
        let value = if block_state_zero {
            STATE_ZERO
        } else if fixed {
            (data_start + k * bs).next_multiple_of(MIB) | STATE_PRESENT
        } else {
            0
        };
        let i = p.bat_index(k) as usize;
        b[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    let len = if fixed { data_start + size } else { data_start };
    super::create::write_new(path, &img, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn header_round_trip_and_choice() {
        let h = Header {
            seq: 5,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let b = h.encode();
        assert_eq!(Header::parse(&b), Some(h.clone()));
        let mut newer = h.clone();
        newer.seq = 6;
        assert_eq!(
            Header::current(Some(h.clone()), Some(newer.clone()))
                .unwrap()
                .0,
            1
        );
        assert!(Header::current(None, None).is_err());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(Header::parse(&bad), None);
    }

    #[test]
    fn log_entries_round_trip() {
        let guid = [7u8; 16];
        let sector: Vec<u8> = (0..4096).map(|i| i as u8).collect();
        let e = encode_log_entry(&guid, 3, 0, 1 << 24, 2 << 20, &sector);
        let mut log = vec![0u8; 1 << 20];
        log[..e.len()].copy_from_slice(&e);
        let run = log_search(&log, &guid);
        assert_eq!(run.len(), 1);
        assert_eq!(run[0].writes[0].0, 2 << 20);
        assert_eq!(run[0].writes[0].1.as_deref(), Some(&sector[..]));
        assert!(log_search(&log, &[8u8; 16]).is_empty());
    }

    #[test]
    fn fuzz_mutated_structures_never_panic() {
        let guid = [7u8; 16];
        let e = encode_log_entry(&guid, 3, 0, 1 << 24, 2 << 20, &[5u8; 4096]);
        for (b, _) in crate::testutil::mutations(&e, 200, 3000) {
            let _ = log_search(&b, &guid);
            let _ = Regions::parse(&b);
            let _ = Params::parse(&b);
            let _ = Header::parse(&b);
        }
    }
}
