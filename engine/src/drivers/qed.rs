//! QED images: a header cluster, an L1 table of L2 table offsets, L2
//! tables of cluster offsets (0: unallocated, 1: zeroes), everything
//! appended at the end of the file; a backing file by name.
//!
//! blkfs writes a new cluster (and a new L2 table) and flushes before a
//! table entry points at it, so its images never need QEMU's check; an
//! image QEMU left with the need-check flag is repaired on a read-write
//! open as QEMU does (invalid offsets cleared).

use super::bytes::{le32, le64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::{read_at, write_at};
use super::wait;
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const MAGIC: u32 = 0x0044_4551;
const HEADER_LEN: usize = 64;
const F_BACKING_FILE: u64 = 1;
const F_NEED_CHECK: u64 = 2;
const F_BACKING_FORMAT_NO_PROBE: u64 = 4;
const KNOWN_FEATURES: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
const OFF_FEATURES: u64 = 16;
const ZERO_CLUSTER: u64 = 1;
const DEFAULT_CLUSTER: u64 = 64 << 10;
const DEFAULT_TABLE: u64 = 4;
/// L2 tables kept in memory.
const L2_CACHE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster_size: u64,
    pub table_size: u64,
    pub header_size: u64,
    pub features: u64,
    pub l1_offset: u64,
    pub size: u64,
    pub backing_file: Option<String>,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("QED image is corrupt: {msg}"))
}

fn valid_cluster_size(cs: u64) -> bool {
    cs.is_power_of_two() && (4096..=64 << 20).contains(&cs)
}

fn valid_table_size(ts: u64) -> bool {
    ts.is_power_of_two() && (1..=16).contains(&ts)
}

impl Header {
    /// `b`: the header cluster's first bytes (the backing name included).
    pub fn parse(b: &[u8], file_size: u64) -> Result<Header> {
        if b.len() < HEADER_LEN || le32(b, 0) != MAGIC {
            return Err(invalid("Image not in QED format"));
        }
        let features = le64(b, 16);
        if features & !KNOWN_FEATURES != 0 {
            return Err(invalid(format!(
                "Unsupported QED features: {:x}",
                features & !KNOWN_FEATURES
            )));
        }
        let cluster_size = le32(b, 4) as u64;
        if !valid_cluster_size(cluster_size) {
            return Err(invalid("QED cluster size is invalid"));
        }
        let table_size = le32(b, 8) as u64;
        if !valid_table_size(table_size) {
            return Err(invalid("QED table size is invalid"));
        }
        let h = Header {
            cluster_size,
            table_size,
            header_size: le32(b, 12) as u64,
            features,
            l1_offset: le64(b, 40),
            size: le64(b, 48),
            backing_file: None,
        };
        if !h.size.is_multiple_of(512) || h.size > h.max_size() {
            return Err(invalid("QED image size is invalid"));
        }
        let file_end = file_size / cluster_size * cluster_size;
        if !h.l1_offset.is_multiple_of(cluster_size)
            || h.l1_offset < h.header_bytes()
            || h.l1_offset
                .checked_add(h.table_bytes())
                .is_none_or(|e| e > file_end)
        {
            return Err(invalid("QED table offset is invalid"));
        }
        if h.header_size == 0
            || h.header_size > 0x8000
            || h.header_size
                .checked_mul(cluster_size)
                .is_none_or(|b| b > file_end)
        {
            return Err(invalid("QED header size is too large"));
        }
        let name_off = le32(b, 56) as u64;
        let name_len = le32(b, 60) as u64;
        if name_off + name_len > h.header_bytes() || name_len > 64 << 10 {
            return Err(invalid("QED backing filename offset is invalid"));
        }
        let backing_file = if features & F_BACKING_FILE != 0 {
            let name = b
                .get(name_off as usize..(name_off + name_len) as usize)
                .ok_or_else(|| invalid("QED backing filename offset is invalid"))?;
            Some(String::from_utf8_lossy(name).into_owned())
        } else {
            None
        };
        Ok(Header { backing_file, ..h })
    }

    fn header_bytes(&self) -> u64 {
        self.header_size * self.cluster_size
    }

    fn table_bytes(&self) -> u64 {
        self.table_size * self.cluster_size
    }

    fn entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    fn max_size(&self) -> u64 {
        self.entries()
            .saturating_mul(self.entries())
            .saturating_mul(self.cluster_size)
    }
}

struct State {
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    /// The end of the file, cluster-aligned: appends go there.
    end: u64,
}

pub struct Qed {
    file: Arc<Node>,
    h: Header,
    read_only: bool,
    /// The virtual size (`block_resize` grows it).
    size: AtomicU64,
    /// The header's features and backing name (`change-backing-file`).
    backing: Mutex<(u64, Option<String>)>,
    state: Mutex<State>,
}

impl Qed {
    pub fn open(file: Arc<Node>, read_only: bool) -> Result<Qed> {
        let len = file.size();
        let first = read_at(&file, 0, (len.min(64 << 10)) as usize)?;
        let mut h = Header::parse(&first, len)?;
        if h.header_bytes() > first.len() as u64 && h.backing_file.is_some() {
            // A backing name past the first 64 KiB of a large header cluster.
            let all = read_at(&file, 0, h.header_bytes() as usize)?;
            h = Header::parse(&all, len)?;
        }
        let raw = read_at(&file, h.l1_offset, h.table_bytes() as usize)?;
        let l1 = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let end = len / h.cluster_size * h.cluster_size;
        let q = Qed {
            file,
            read_only,
            size: AtomicU64::new(h.size),
            backing: Mutex::new((h.features, h.backing_file.clone())),
            state: Mutex::new(State {
                l1,
                l2: HashMap::new(),
                end: end.max(h.l1_offset + h.table_bytes()),
            }),
            h,
        };
        if !read_only && q.h.features & F_NEED_CHECK != 0 {
            q.repair()?;
        }
        Ok(q)
    }

    /// Whether `off` may hold a cluster or table of `len` bytes.
    fn valid_offset(&self, off: u64, len: u64, end: u64) -> bool {
        off.is_multiple_of(self.h.cluster_size)
            && off >= self.h.header_bytes()
            && off.checked_add(len).is_some_and(|e| e <= end)
    }

    /// The L2 table at `off`, loaded on first use.
    fn l2<'s>(&self, s: &'s mut State, off: u64) -> Result<&'s mut Vec<u64>> {
        if !s.l2.contains_key(&off) {
            if !self.valid_offset(off, self.h.table_bytes(), s.end) {
                return Err(corrupt(format!(
                    "L2 table at {off:#x} lies outside the file"
                )));
            }
            let raw = read_at(&self.file, off, self.h.table_bytes() as usize)?;
            // At most 64 MiB of tables (QED's can be 1 GiB each).
            if s.l2.len() >= L2_CACHE.min(((64 << 20) / self.h.table_bytes()).max(1) as usize) {
                s.l2.clear();
            }
            s.l2.insert(off, raw.chunks_exact(8).map(|c| le64(c, 0)).collect());
        }
        s.l2.get_mut(&off)
            .ok_or_else(|| Error::io(libc::EIO, "QED L2 table vanished from the cache"))
    }

    fn split(&self, b: u64) -> (usize, usize) {
        let n = self.h.entries();
        ((b / n) as usize, (b % n) as usize)
    }

    /// QEMU's check with repair, for an image left with the need-check
    /// flag: table entries pointing outside the file become 0, then the
    /// flag goes.
    fn repair(&self) -> Result<()> {
        let mut s = self.state.lock();
        let end = s.end;
        let tb = self.h.table_bytes();
        for i in 0..s.l1.len() {
            let off = s.l1[i];
            if off == 0 {
                continue;
            }
            if !self.valid_offset(off, tb, end) {
                log::warn!("QED repair: L1 entry {i} ({off:#x}) cleared");
                s.l1[i] = 0;
                write_at(
                    &self.file,
                    self.h.l1_offset + i as u64 * 8,
                    &0u64.to_le_bytes(),
                )?;
                continue;
            }
            let cs = self.h.cluster_size;
            let table = self.l2(&mut s, off)?;
            let bad: Vec<usize> = table
                .iter()
                .enumerate()
                .filter(|(_, &e)| e > ZERO_CLUSTER && !self.valid_offset(e, cs, end))
                .map(|(j, _)| j)
                .collect();
            for j in bad {
                log::warn!("QED repair: L2 entry {j} of table {off:#x} cleared");
                table[j] = 0;
                write_at(&self.file, off + j as u64 * 8, &0u64.to_le_bytes())?;
            }
        }
        wait(|d| self.file.flush(d))?;
        let features = self.h.features & !F_NEED_CHECK;
        write_at(&self.file, OFF_FEATURES, &features.to_le_bytes())?;
        wait(|d| self.file.flush(d))
    }

    /// Writes `bytes` at `at` of the header, durably; through a short-lived
    /// read-write descriptor when the node is read-only (a backing image
    /// whose name a job rewrites).
    fn write_header_field(&self, at: u64, bytes: &[u8]) -> Result<()> {
        if self.read_only {
            return self.file.driver.write_through(at, bytes);
        }
        write_at(&self.file, at, bytes)?;
        wait(|d| self.file.flush(d))
    }

    /// Points guest cluster `b` at `value` (a new cluster or ZERO_CLUSTER),
    /// whose data is already written: in its L2 table, or in a new table
    /// (appended, then flushed) that L1 then points at.
    fn set_entry(&self, b: u64, value: u64) -> Result<()> {
        let (l1i, l2i) = self.split(b);
        let mut s = self.state.lock();
        let l2_off = *s
            .l1
            .get(l1i)
            .ok_or_else(|| Error::io(libc::EINVAL, format!("cluster {b} is past the L1 table")))?;
        if l2_off != 0 {
            self.l2(&mut s, l2_off)?;
            drop(s);
            wait(|d| self.file.flush(d))?;
            write_at(&self.file, l2_off + l2i as u64 * 8, &value.to_le_bytes())?;
            let mut s = self.state.lock();
            if let Some(t) = s.l2.get_mut(&l2_off) {
                t[l2i] = value;
            }
            return Ok(());
        }
        let off = s.end;
        s.end += self.h.table_bytes();
        drop(s);
        let mut table = vec![0u64; self.h.entries() as usize];
        table[l2i] = value;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        write_at(&self.file, off, &raw)?;
        wait(|d| self.file.flush(d))?;
        write_at(
            &self.file,
            self.h.l1_offset + l1i as u64 * 8,
            &off.to_le_bytes(),
        )?;
        let mut s = self.state.lock();
        s.l1[l1i] = off;
        s.l2.insert(off, table);
        Ok(())
    }
}

impl Layout for Qed {
    fn format_name(&self) -> &'static str {
        "qed"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn block_size(&self) -> u64 {
        self.h.cluster_size
    }

    fn lookup(&self, b: u64) -> Result<(Block, u64)> {
        let (l1i, l2i) = self.split(b);
        let n = self.h.entries() as usize;
        let mut s = self.state.lock();
        let l2_off = s.l1.get(l1i).copied().unwrap_or(0);
        if l2_off == 0 {
            return Ok((Block::Unallocated, (n - l2i) as u64));
        }
        let end = s.end;
        let table = self.l2(&mut s, l2_off)?;
        let e = table[l2i];
        let same = |want: u64| table[l2i..].iter().take_while(|&&x| x == want).count() as u64;
        Ok(match e {
            0 => (Block::Unallocated, same(0)),
            ZERO_CLUSTER => (Block::Zero, same(ZERO_CLUSTER)),
            e if self.valid_offset(e, self.h.cluster_size, end) => (Block::Data(e), 1),
            e => {
                return Err(Error::io(
                    libc::EINVAL,
                    format!("QED cluster {b} maps to {e:#x}, outside the file"),
                ))
            }
        })
    }

    fn writable(&self) -> bool {
        true
    }

    fn checkable(&self) -> bool {
        true
    }

    fn allocate(&self, b: u64, content: &[u8]) -> Result<()> {
        let at = {
            let mut s = self.state.lock();
            let at = s.end;
            s.end += self.h.cluster_size;
            at
        };
        write_at(&self.file, at, content)?;
        self.set_entry(b, at)
    }

    /// Zero clusters in the map: only where no data is allocated (data
    /// gets zeroes written in place).
    fn zero_block(&self, b: u64) -> Result<bool> {
        if let (Block::Data(_), _) = self.lookup(b)? {
            return Ok(false);
        }
        self.set_entry(b, ZERO_CLUSTER)?;
        Ok(true)
    }

    fn backing_file(&self) -> Option<String> {
        self.backing.lock().1.clone()
    }

    fn backing_format(&self) -> Option<String> {
        (self.backing.lock().0 & F_BACKING_FORMAT_NO_PROBE != 0).then(|| "raw".to_string())
    }

    /// Grows the image: only the header's size changes (QEMU shrinks none).
    fn resize(&self, size: u64) -> Result<()> {
        if !size.is_multiple_of(512) || size > self.h.max_size() {
            return Err(invalid("Invalid image size specified"));
        }
        if size < self.size() {
            return Err(invalid("Shrinking images is currently not supported"));
        }
        self.write_header_field(48, &size.to_le_bytes())?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    /// The name goes after the header fields, in the header cluster(s).
    fn change_backing_file(&self, name: &str, format: Option<&str>) -> Result<()> {
        let cluster = self.h.header_bytes() as usize;
        if HEADER_LEN + name.len() > cluster {
            return Err(Error::io(
                libc::ENOSPC,
                format!(
                    "Could not change backing file to '{name}': the name does not fit the header"
                ),
            ));
        }
        let mut features = self.backing.lock().0 & !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
        if !name.is_empty() {
            features |= F_BACKING_FILE;
            if format == Some("raw") {
                features |= F_BACKING_FORMAT_NO_PROBE;
            }
        }
        let mut tail = vec![0u8; HEADER_LEN - 16];
        tail[..8].copy_from_slice(&features.to_le_bytes());
        let head = read_at(&self.file, 0, HEADER_LEN)?;
        tail[8..40].copy_from_slice(&head[24..56]);
        let (off, len) = if name.is_empty() {
            (0u32, 0u32)
        } else {
            (HEADER_LEN as u32, name.len() as u32)
        };
        tail[40..44].copy_from_slice(&off.to_le_bytes());
        tail[44..48].copy_from_slice(&len.to_le_bytes());
        tail.extend_from_slice(name.as_bytes());
        self.write_header_field(16, &tail)?;
        *self.backing.lock() = (features, (!name.is_empty()).then(|| name.to_string()));
        Ok(())
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        v["cluster-size"] = serde_json::json!(self.h.cluster_size);
    }
}

/// Creates a QED image as `qemu-img create -f qed` does.
pub fn create(
    path: &str,
    size: u64,
    backing: Option<(&str, Option<&str>)>,
    cluster_size: Option<u64>,
    table_size: Option<u64>,
) -> Result<()> {
    let cs = cluster_size.unwrap_or(DEFAULT_CLUSTER);
    if !valid_cluster_size(cs) {
        return Err(invalid(
            "QED cluster size must be within range [4096, 67108864] and power of 2",
        ));
    }
    let ts = table_size.unwrap_or(DEFAULT_TABLE);
    if !valid_table_size(ts) {
        return Err(invalid(
            "QED table size must be within range [1, 16] and power of 2",
        ));
    }
    let size = size.next_multiple_of(512);
    let entries = ts * cs / 8;
    let max = entries * entries * cs;
    if size > max {
        return Err(invalid(format!(
            "QED image size must be a non-zero multiple of cluster size and less than {max} bytes"
        )));
    }
    let mut h = vec![0u8; HEADER_LEN];
    let mut features = 0;
    if let Some((name, format)) = backing {
        if HEADER_LEN + name.len() > cs as usize {
            return Err(invalid("QED backing file name is too long"));
        }
        features |= F_BACKING_FILE;
        if format == Some("raw") {
            features |= F_BACKING_FORMAT_NO_PROBE;
        }
        h[56..60].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[60..64].copy_from_slice(&(name.len() as u32).to_le_bytes());
        h.extend_from_slice(name.as_bytes());
    }
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(cs as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(ts as u32).to_le_bytes());
    h[12..16].copy_from_slice(&1u32.to_le_bytes());
    h[16..24].copy_from_slice(&features.to_le_bytes());
    h[40..48].copy_from_slice(&cs.to_le_bytes());
    h[48..56].copy_from_slice(&size.to_le_bytes());
    // The L1 table after the header cluster: zeroes (a hole).
    super::create::write_new(path, &h, cs + ts * cs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cs: u32, ts: u32, size: u64, features: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&cs.to_le_bytes());
        h[8..12].copy_from_slice(&ts.to_le_bytes());
        h[12..16].copy_from_slice(&1u32.to_le_bytes());
        h[16..24].copy_from_slice(&features.to_le_bytes());
        h[40..48].copy_from_slice(&(cs as u64).to_le_bytes());
        h[48..56].copy_from_slice(&size.to_le_bytes());
        h
    }

    #[test]
    fn parses_a_default_header() {
        let h = Header::parse(&header(65536, 4, 10 << 20, 0), 327_680).unwrap();
        assert_eq!(
            (h.entries(), h.l1_offset, h.backing_file),
            (32768, 65536, None)
        );
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        for (h, len, msg) in [
            (
                header(65536, 4, 10 << 20, 8),
                327_680,
                "Unsupported QED features",
            ),
            (header(1000, 4, 10 << 20, 0), 327_680, "cluster size"),
            (header(65536, 3, 10 << 20, 0), 327_680, "table size"),
            (header(65536, 4, 1001, 0), 327_680, "image size"),
            (header(65536, 4, 10 << 20, 0), 100_000, "table offset"),
        ] {
            let e = Header::parse(&h, len).unwrap_err();
            assert!(e.to_string().contains(msg), "{e}");
        }
        let mut h = header(65536, 4, 10 << 20, F_BACKING_FILE);
        h[56..60].copy_from_slice(&65530u32.to_le_bytes());
        h[60..64].copy_from_slice(&100u32.to_le_bytes());
        assert!(Header::parse(&h, 327_680).is_err());
    }

    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let mut base = header(65536, 4, 10 << 20, F_BACKING_FILE);
        base[56..60].copy_from_slice(&64u32.to_le_bytes());
        base[60..64].copy_from_slice(&8u32.to_le_bytes());
        base.extend_from_slice(b"base.img");
        for (h, r) in crate::testutil::mutations(&base, 72, 20_000) {
            let _ = Header::parse(&h, r % (1 << 24));
        }
    }
}
