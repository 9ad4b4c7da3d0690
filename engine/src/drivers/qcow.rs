//! The qcow (version 1) format.
//!
//! A 48-byte big-endian header, an L1 table of L2 table offsets, L2 tables
//! of cluster offsets. No refcounts: new L2 tables and clusters are
//! appended at the end of the file. An L2 entry with bit 63 set is a
//! compressed cluster (raw deflate): its byte size sits in the bits above
//! `63 - cluster_bits`, its offset below. Encrypted images use the legacy
//! AES of [`super::aes_legacy`].
//!
//! Reads are split into runs of clusters that map alike, each sent straight
//! to the file or backing node (compressed clusters are inflated on the
//! spot). Writes in place on allocated clusters go straight to the file;
//! the others run on a worker thread, serialised: data first, a flush, then
//! the L1/L2 entries.

use super::aes_legacy::{self, Cipher, Key};
use super::bytes::{be32, be64};
use super::deflate;
use super::join::Join;
use super::segments::{self, ClusterMapping, LayerStatus};
use super::{wait, Done, Driver, Encryption, Status};
use crate::drivers::qcow2::meta::{read_at, write_at};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use crate::io::Buf;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub const MAGIC: u32 = 0x5146_49fb;
const HEADER_LEN: usize = 48;
const COMPRESSED: u64 = 1 << 63;
/// Longest backing file name (QEMU's limit).
const MAX_BACKING_NAME: u32 = 1023;
/// Largest L1 table accepted (as for qcow2: 32 MiB of entries).
const MAX_L1_BYTES: u64 = 32 << 20;
/// L2 tables kept in memory before the cache is dropped.
const L2_CACHE_TABLES: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub backing_file: Option<String>,
    pub mtime: u32,
    /// Virtual size in bytes (whole sectors, as QEMU sees it).
    pub size: u64,
    pub cluster_bits: u32,
    pub l2_bits: u32,
    /// 0: none, 1: AES.
    pub crypt_method: u32,
    pub l1_table_offset: u64,
    /// Entries in the L1 table (derived from the size).
    pub l1_size: u64,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::io(libc::EINVAL, format!("qcow: {msg}"))
}

fn corrupt(msg: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("qcow image is corrupt: {msg}"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses the start of an image whose file is `file_size` bytes; `buf`
    /// holds the first 64 KiB (or the whole file), which must include the
    /// backing file name.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < HEADER_LEN {
            return Err(invalid("file too small for a header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = be32(buf, 4);
        if version != 1 {
            return Err(invalid(format!("unsupported version {version}")));
        }
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        let cluster_bits = buf[32] as u32;
        let l2_bits = buf[33] as u32;
        let h = Header {
            backing_file: None,
            mtime: be32(buf, 20),
            size: be64(buf, 24) / 512 * 512,
            cluster_bits,
            l2_bits,
            crypt_method: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            l1_size: 0,
        };
        if !(9..=16).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} out of range (9..=16)"
            )));
        }
        // L2 tables of 512 bytes to 64 KiB.
        if !(6..=13).contains(&l2_bits) {
            return Err(invalid(format!("l2_bits {l2_bits} out of range (6..=13)")));
        }
        if h.crypt_method > 1 {
            return Err(invalid(format!(
                "unknown encryption method {}",
                h.crypt_method
            )));
        }
        if h.size == 0 {
            return Err(invalid("virtual size is smaller than one sector"));
        }
        let shift = cluster_bits + l2_bits;
        let l1_size = h.size.div_ceil(1 << shift);
        if h.size > 1 << 62 || l1_size * 8 > MAX_L1_BYTES {
            return Err(invalid(format!("virtual size {} is too large", h.size)));
        }
        let l1_end = h
            .l1_table_offset
            .checked_add(l1_size * 8)
            .filter(|&e| e <= file_size);
        if h.l1_table_offset < HEADER_LEN as u64 || l1_end.is_none() {
            return Err(invalid(format!(
                "L1 table at {:#x} ({l1_size} entries) lies outside the file",
                h.l1_table_offset
            )));
        }
        let mut h = Header { l1_size, ..h };
        if backing_offset != 0 {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return Err(invalid(format!(
                    "invalid backing file name length {backing_len}"
                )));
            }
            let end = backing_offset.checked_add(backing_len as u64);
            let Some(end) = end.filter(|&e| e <= buf.len() as u64 && e <= file_size) else {
                return Err(invalid(format!(
                    "backing file name at {backing_offset:#x} lies outside the header area"
                )));
            };
            if backing_offset < HEADER_LEN as u64 {
                return Err(invalid("backing file name overlaps the header"));
            }
            let name = &buf[backing_offset as usize..end as usize];
            let name =
                std::str::from_utf8(name).map_err(|_| invalid("backing file name is not UTF-8"))?;
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }
}

/// Reads and validates the header of the image in `file`.
pub fn read_header(file: &Node) -> Result<Header> {
    let size = file.size();
    let head = read_at(file, 0, size.min(64 << 10) as usize)?;
    Header::parse(&head, size)
}

/// Where one guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    Unallocated,
    Data(u64),
    Compressed { host: u64, len: u64 },
}

impl Mapping {
    /// An L2 entry: 0, a cluster offset, or bit 63 with the compressed
    /// byte count above bit `63 - cluster_bits` and the offset below.
    fn decode(e: u64, cluster_bits: u32) -> Mapping {
        let shift = 63 - cluster_bits;
        if e == 0 {
            Mapping::Unallocated
        } else if e & COMPRESSED != 0 {
            Mapping::Compressed {
                host: e & ((1 << shift) - 1),
                len: (e >> shift) & ((1 << cluster_bits) - 1),
            }
        } else {
            Mapping::Data(e)
        }
    }
}

impl ClusterMapping for Mapping {
    fn offset_by(self, by: u64) -> Mapping {
        match self {
            Mapping::Data(h) => Mapping::Data(h + by),
            m => m,
        }
    }

    fn continues(&self, len: usize, next: &Mapping) -> bool {
        match (self, next) {
            (Mapping::Data(h1), Mapping::Data(h2)) => h1 + len as u64 == *h2,
            (Mapping::Unallocated, Mapping::Unallocated) => true,
            _ => false,
        }
    }

    fn status(&self, has_backing: bool) -> LayerStatus {
        match *self {
            Mapping::Data(h) => (true, false, Some(h), true),
            Mapping::Compressed { .. } => (true, false, None, true),
            Mapping::Unallocated => (false, !has_backing, None, false),
        }
    }
}

/// Cached tables and the end of the file, where allocations go.
struct Meta {
    l1: Vec<u64>,
    l2: HashMap<u64, Vec<u64>>,
    end: u64,
}

pub struct QcowDriver {
    file: Arc<Node>,
    backing: super::backing::Slot,
    header: Header,
    cs: u64,
    meta: Mutex<Meta>,
    /// Serialises writes that take the slow path (allocation, read-modify-write).
    writer: Mutex<()>,
    key: Key,
}

type Segment = segments::Segment<Mapping>;
type Segments = segments::Segments<Mapping>;

impl QcowDriver {
    pub fn open(file: Arc<Node>, header: Header, backing: Option<Arc<Node>>) -> Result<Self> {
        let raw = read_at(&file, header.l1_table_offset, header.l1_size as usize * 8)?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| be64(c, 0))
            .collect::<Vec<u64>>();
        let cs = header.cluster_size();
        let end = file.size().next_multiple_of(cs);
        let key = Key::new(header.crypt_method == 1);
        Ok(QcowDriver {
            file,
            backing: super::backing::Slot::new(backing),
            cs,
            meta: Mutex::new(Meta {
                l1,
                l2: HashMap::new(),
                end,
            }),
            writer: Mutex::new(()),
            key,
            header,
        })
    }

    fn l2_entries(&self) -> u64 {
        1 << self.header.l2_bits
    }

    /// The L2 table at `off`, loaded (and checked to lie in the file) on first use.
    fn l2_table<'m>(&self, meta: &'m mut Meta, off: u64) -> Result<&'m mut Vec<u64>> {
        if !meta.l2.contains_key(&off) {
            let bytes = self.l2_entries() * 8;
            if !off.is_multiple_of(8) || off.checked_add(bytes).is_none_or(|e| e > meta.end) {
                return Err(corrupt(format!(
                    "L2 table at {off:#x} lies outside the file"
                )));
            }
            let raw = read_at(&self.file, off, bytes as usize)?;
            if meta.l2.len() >= L2_CACHE_TABLES {
                meta.l2.clear();
            }
            meta.l2
                .insert(off, raw.chunks_exact(8).map(|c| be64(c, 0)).collect());
        }
        meta.l2
            .get_mut(&off)
            .ok_or_else(|| Error::io(libc::EIO, "L2 table vanished from the cache"))
    }

    fn lookup(&self, meta: &mut Meta, cluster: u64) -> Result<Mapping> {
        let l1i = (cluster >> self.header.l2_bits) as usize;
        let l2_off = meta.l1.get(l1i).copied().unwrap_or(0);
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let end = meta.end;
        let e = self.l2_table(meta, l2_off)?[(cluster & (self.l2_entries() - 1)) as usize];
        match Mapping::decode(e, self.header.cluster_bits) {
            Mapping::Data(h) if !h.is_multiple_of(512) || h >= end => Err(corrupt(format!(
                "cluster {cluster} maps to {h:#x}, unaligned or outside the file"
            ))),
            Mapping::Compressed { host, len } if host >= end || len == 0 => Err(corrupt(format!(
                "compressed cluster {cluster} at {host:#x} is invalid"
            ))),
            m => Ok(m),
        }
    }

    /// The segments of `offset..offset+len`; contiguous data clusters and
    /// unallocated runs are merged.
    fn plan(&self, offset: u64, len: usize) -> Result<Segments> {
        let mut meta = self.meta.lock();
        segments::plan(offset, len, self.cs, usize::MAX, |c| {
            self.lookup(&mut meta, c).map(|m| (m, 1))
        })
    }

    /// One compressed cluster, inflated whole.
    fn read_compressed(&self, host: u64, len: u64) -> Result<Buf> {
        if self.key.is_encrypted() {
            return Err(corrupt("compressed cluster in an encrypted image"));
        }
        deflate::read_compressed(&self.file, host, len, self.cs, |raw, out| {
            deflate::inflate(raw, out).map_err(corrupt)
        })
    }

    /// Reads one segment into `buf`; decrypts data when encrypted.
    fn read_segment(&self, cipher: &Option<Arc<Cipher>>, s: Segment, buf: Buf, done: Done<Buf>) {
        match s.map {
            Mapping::Data(host) => match cipher {
                Some(c) => {
                    aes_legacy::read_decrypted(&self.file, c.clone(), s.guest, host, buf, done)
                }
                None => self.file.read(host, buf, done),
            },
            Mapping::Unallocated => self.backing.read(s.guest, buf, done),
            Mapping::Compressed { host, len } => {
                let at = (s.guest % self.cs) as usize;
                done(self.read_compressed(host, len).map(|c| {
                    let mut buf = buf;
                    buf.copy_from_slice(&c[at..at + s.len]);
                    buf
                }))
            }
        }
    }

    /// Writes one guest cluster's piece: in place when the cluster is
    /// allocated, otherwise into a new cluster holding the old content
    /// (backing data or the inflated compressed cluster) with the write on top.
    /// Called with `writer` held.
    fn write_cluster(&self, cipher: Option<&Cipher>, guest: u64, data: &[u8]) -> Result<()> {
        let cluster = guest / self.cs;
        let in_cluster = guest % self.cs;
        let old = self.lookup(&mut self.meta.lock(), cluster)?;
        if let Mapping::Data(host) = old {
            return match cipher {
                Some(c) => {
                    aes_legacy::write_encrypted(&self.file, c, guest, host + in_cluster, data)
                }
                None => write_at(&self.file, host + in_cluster, data),
            };
        }
        let base = cluster * self.cs;
        let mut content = match old {
            _ if data.len() as u64 == self.cs => Buf::from_slice(data),
            Mapping::Compressed { host, len } => self.read_compressed(host, len)?,
            _ => {
                let len = self.cs.min(self.header.size - base) as usize;
                let mut b = Buf::zeroed(self.cs as usize);
                let src = wait(|d| self.backing.read(base, Buf::zeroed(len), d))?;
                b[..len].copy_from_slice(&src);
                b
            }
        };
        let i = in_cluster as usize;
        content[i..i + data.len()].copy_from_slice(data);
        if let Some(c) = cipher {
            c.encrypt(base, &mut content);
        }
        self.allocate(cluster, &content)
    }

    /// Appends `content` as the new cluster `cluster` (and an L2 table when
    /// needed): data and table first, a flush, then the entries pointing there.
    fn allocate(&self, cluster: u64, content: &[u8]) -> Result<()> {
        let l1i = (cluster >> self.header.l2_bits) as usize;
        let (mut l2_off, mut end) = {
            let meta = self.meta.lock();
            let l2 = meta.l1.get(l1i).copied().ok_or_else(|| {
                Error::io(
                    libc::EINVAL,
                    format!("cluster {cluster} is past the L1 table"),
                )
            })?;
            (l2, meta.end)
        };
        let new_table = l2_off == 0;
        if new_table {
            let bytes = self.l2_entries() * 8;
            l2_off = end;
            end += bytes.next_multiple_of(self.cs);
            write_at(&self.file, l2_off, &vec![0u8; bytes as usize])?;
        }
        let host = end;
        end += self.cs;
        write_at(&self.file, host, content)?;
        wait(|d| self.file.flush(d))?;
        let mut meta = self.meta.lock();
        meta.end = end;
        if new_table {
            let at = self.header.l1_table_offset + l1i as u64 * 8;
            write_at(&self.file, at, &l2_off.to_be_bytes())?;
            meta.l1[l1i] = l2_off;
            meta.l2.insert(l2_off, vec![0; self.l2_entries() as usize]);
        }
        let l2i = cluster & (self.l2_entries() - 1);
        write_at(&self.file, l2_off + l2i * 8, &host.to_be_bytes())?;
        self.l2_table(&mut meta, l2_off)?[l2i as usize] = host;
        Ok(())
    }

    /// Synchronous write of a guest range, cluster by cluster.
    fn write_range(&self, offset: u64, data: &[u8]) -> Result<()> {
        let cipher = self.key.cipher()?;
        let _w = self.writer.lock();
        let mut at = 0;
        while at < data.len() {
            let guest = offset + at as u64;
            let n = ((self.cs - guest % self.cs) as usize).min(data.len() - at);
            self.write_cluster(cipher.as_deref(), guest, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Zeroes a range: unallocated clusters with no backing file already read
    /// as zeroes; everything else gets zero data (qcow has no zero flag).
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        self.key.cipher()?;
        let mut o = offset;
        while o < offset + len {
            let n = (self.cs - o % self.cs).min(offset + len - o);
            let m = self.lookup(&mut self.meta.lock(), o / self.cs)?;
            if m != Mapping::Unallocated || self.backing.is_some() {
                self.write_range(o, &vec![0u8; n as usize])?;
            }
            o += n;
        }
        Ok(())
    }
}

impl Driver for Arc<QcowDriver> {
    fn format_name(&self) -> &'static str {
        "qcow"
    }

    fn size(&self) -> u64 {
        self.header.size
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let plan = self
            .key
            .cipher()
            .and_then(|c| Ok((c, self.plan(offset, buf.len())?)));
        let (cipher, segs) = match plan {
            Ok(p) => p,
            Err(e) => return done(Err(e)),
        };
        // One segment: the caller's buffer goes down as it is.
        if let [s] = segs[..] {
            return self.read_segment(&cipher, s, buf, done);
        }
        let join = Join::new(buf, segs.len(), done);
        for s in segs {
            let j = join.clone();
            let piece = Buf::recycled(s.len);
            self.read_segment(&cipher, s, piece, Box::new(move |r| j.fill(s.at, r)));
        }
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let cipher = match self.key.cipher() {
            Ok(c) => c,
            Err(e) => return done(Err(e)),
        };
        // In place on allocated data: straight to the file (encrypted whole
        // sectors too); anything else takes the serialised slow path.
        if cipher.is_none() || aes_legacy::whole_sectors(offset, buf.len()) {
            match self.plan(offset, buf.len()).as_deref() {
                Ok(
                    &[Segment {
                        map: Mapping::Data(host),
                        ..
                    }],
                ) => {
                    return match &cipher {
                        Some(c) => {
                            aes_legacy::write_sectors(&self.file, c, offset, host, buf, done)
                        }
                        None => self.file.write(host, buf, done),
                    }
                }
                Ok(_) => {}
                Err(e) => return done(Err(e.clone())),
            }
        }
        let me = self.clone();
        crate::io::spawn_blocking(move || {
            let r = me.write_range(offset, &buf);
            done(r.map(|()| buf));
        });
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool, done: Done<()>) {
        let me = self.clone();
        crate::io::spawn_blocking(move || done(me.zero_range(offset, len)));
    }

    /// Only a hint, and qcow cannot deallocate: nothing to do once unlocked.
    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(self.key.cipher().map(drop))
    }

    fn flush(&self, done: Done<()>) {
        self.file.flush(done)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        // Cluster by cluster up to 1 MiB: enough for SEEK_DATA/HOLE and mapping.
        super::segments::block_status(
            self.header.size,
            offset,
            len,
            self.backing.is_some(),
            self.key.is_encrypted(),
            |len| self.plan(offset, len.min(1 << 20) as usize),
        )
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
        self.header.backing_file.clone()
    }

    fn encryption(&self) -> Encryption {
        self.key.encryption()
    }

    fn set_password(&self, password: &str) -> Result<()> {
        self.key.set_password(password)
    }

    fn image_info(&self, v: &mut serde_json::Value) {
        v["cluster-size"] = serde_json::json!(self.cs);
        if self.key.is_encrypted() {
            v["encrypted"] = serde_json::json!(true);
        }
        if let Some(b) = &self.header.backing_file {
            v["backing-filename"] = serde_json::json!(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: u64 = 1 << 20;

    /// The header `qemu-img create -f qcow -b base.raw -F raw a.qcow 4M` writes.
    fn fixture() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(b"QFI\xfb"); //                    magic
        b[4..8].copy_from_slice(&1u32.to_be_bytes()); //           version 1
        b[8..16].copy_from_slice(&48u64.to_be_bytes()); //         backing_file_offset
        b[16..20].copy_from_slice(&8u32.to_be_bytes()); //         backing_file_size
        b[20..24].copy_from_slice(&0x6543_2100u32.to_be_bytes()); // mtime
        b[24..32].copy_from_slice(&(4u64 << 20).to_be_bytes()); // size: 4 MiB
        b[32] = 12; //                                             cluster_bits: 4 KiB
        b[33] = 9; //                                              l2_bits: 512 entries
                   // 34..36: padding; 36..40: crypt_method 0
        b[40..48].copy_from_slice(&56u64.to_be_bytes()); //        l1_table_offset
        b[48..56].copy_from_slice(b"base.raw"); //                 backing file name
        b
    }

    #[test]
    fn parses_fixture() {
        let h = Header::parse(&fixture(), FILE).unwrap();
        assert_eq!(
            h,
            Header {
                backing_file: Some("base.raw".into()),
                mtime: 0x6543_2100,
                size: 4 << 20,
                cluster_bits: 12,
                l2_bits: 9,
                crypt_method: 0,
                l1_table_offset: 56,
                // 4 MiB / (4 KiB * 512) = 2 L2 tables.
                l1_size: 2,
            }
        );
        let mut b = fixture();
        b[39] = 1;
        assert_eq!(Header::parse(&b, FILE).unwrap().crypt_method, 1);
    }

    #[test]
    fn rejects_bad_fields() {
        // (byte offset, new value, expected error).
        let cases: [(usize, u8, &str); 13] = [
            (0, 0, "bad magic"),
            (7, 2, "unsupported version 2"),
            (32, 8, "cluster_bits 8"),
            (32, 17, "cluster_bits 17"),
            (33, 5, "l2_bits 5"),
            (33, 14, "l2_bits 14"),
            (39, 2, "unknown encryption method 2"),
            (24, 0x40, "too large"),
            (45, 0x10, "L1 table at 0x100038"),
            (47, 8, "L1 table at 0x8"),
            (19, 0, "backing file name length 0"),
            (18, 4, "backing file name length 1032"),
            (14, 2, "outside the header area"),
        ];
        for (at, value, want) in cases {
            let mut b = fixture();
            b[at] = value;
            let e = Header::parse(&b, FILE).unwrap_err();
            assert!(
                e.msg.contains(want),
                "byte {at}: expected '{want}', got '{}'",
                e.msg
            );
        }
        let mut b = fixture();
        b[24..32].copy_from_slice(&511u64.to_be_bytes());
        assert!(Header::parse(&b, FILE).unwrap_err().msg.contains("smaller"));
        assert!(Header::parse(&fixture()[..40], FILE).is_err());
        // The L1 table must fit in the file.
        assert!(Header::parse(&fixture(), 60)
            .unwrap_err()
            .msg
            .contains("L1 table"));
    }

    #[test]
    fn decodes_l2_entries() {
        assert_eq!(Mapping::decode(0, 12), Mapping::Unallocated);
        assert_eq!(Mapping::decode(0x5000, 12), Mapping::Data(0x5000));
        // Written by qemu-io 'write -c' (4 KiB clusters): 22 bytes at 0x2000.
        assert_eq!(
            Mapping::decode(0x80b0_0000_0000_2000, 12),
            Mapping::Compressed {
                host: 0x2000,
                len: 22
            }
        );
        // 64 KiB clusters: the size field starts at bit 47.
        assert_eq!(
            Mapping::decode((1 << 63) | (300 << 47) | 0x1_0000, 16),
            Mapping::Compressed {
                host: 0x1_0000,
                len: 300
            }
        );
    }

    /// Random mutations of a valid header never panic.
    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let base = fixture();
        let mut next = crate::testutil::xorshift(0x9E37_79B9_7F4A_7C15);
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 6 {
                let at = (next() % 64) as usize;
                b[at] = next() as u8;
            }
            let len = if next().is_multiple_of(8) {
                (next() % 80) as usize
            } else {
                b.len()
            };
            if Header::parse(&b[..len], next() % 0x2000).is_ok() {
                ok += 1;
            }
        }
        assert!(ok > 0);
    }
}
