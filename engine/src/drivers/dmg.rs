//! Apple disk images (UDIF `.dmg`, read-only): a `koly` trailer, block
//! tables (`mish`) in the resource fork or in an XML plist, and chunks of
//! sectors stored raw, as zeroes, or compressed with zlib or bzip2.

use super::bytes::{be32, be64};
use super::mapped::{Block, Layout};
use super::qcow2::meta::read_at;
use crate::error::{Error, Result};
use crate::graph::Node;
use parking_lot::Mutex;
use std::sync::Arc;

const KOLY: &[u8; 4] = b"koly";
const MISH: u32 = 0x6d69_7368;
const SECTOR: u64 = 512;
const CHUNK_ZERO: u32 = 0;
const CHUNK_RAW: u32 = 1;
const CHUNK_IGNORE: u32 = 2;
const CHUNK_ADC: u32 = 0x8000_0004;
const CHUNK_ZLIB: u32 = 0x8000_0005;
const CHUNK_BZIP2: u32 = 0x8000_0006;
const CHUNK_LZFSE: u32 = 0x8000_0007;
const CHUNK_COMMENT: u32 = 0x7fff_fffe;
const CHUNK_LAST: u32 = 0xffff_ffff;
/// QEMU's limits on one chunk.
const MAX_CHUNK_BYTES: u64 = 64 << 20;
const MAX_CHUNK_SECTORS: u64 = 131_072;
const MAX_XML: u64 = 16 << 20;
const MISH_HEADER: usize = 204;
const CHUNK_ENTRY: usize = 40;

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::generic(msg.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Zero,
    Raw,
    Zlib,
    Bzip2,
}

/// A run of guest sectors and where they are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub kind: Kind,
    pub sector: u64,
    pub sectors: u64,
    /// In the file.
    pub offset: u64,
    pub length: u64,
}

/// The trailer's fields blkfs uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Koly {
    /// Where the trailer starts.
    pub at: u64,
    pub data_fork: u64,
    pub rsrc: (u64, u64),
    pub xml: (u64, u64),
    pub sectors: u64,
}

impl Koly {
    /// Finds the trailer in `tail`, the file's last bytes (`tail_at` is
    /// where they start), as QEMU does: starting in its last 1023 bytes.
    pub fn find(tail: &[u8], tail_at: u64, len: u64) -> Result<Koly> {
        if len < 512 {
            return Err(invalid("dmg file must be at least 512 bytes long"));
        }
        // The first `koly` with a whole trailer after it.
        let i = (0..=tail.len().saturating_sub(512))
            .find(|&i| tail.get(i..i + 4) == Some(KOLY))
            .ok_or_else(|| invalid("Could not locate UDIF trailer in dmg file"))?;
        let k = &tail[i..i + 512];
        let at = tail_at + i as u64;
        let koly = Koly {
            at,
            data_fork: be64(k, 0x18),
            rsrc: (be64(k, 0x28), be64(k, 0x30)),
            xml: (be64(k, 0xd8), be64(k, 0xe0)),
            sectors: be64(k, 0x1ec),
        };
        let bad = |what: &str| invalid(format!("dmg trailer: invalid {what}"));
        if koly.data_fork > at {
            return Err(bad("data fork offset"));
        }
        for (name, (off, len)) in [("resource fork", koly.rsrc), ("XML", koly.xml)] {
            if len != 0 && (off >= at || len > at - off) {
                return Err(bad(name));
            }
        }
        if koly.sectors > i64::MAX as u64 / SECTOR {
            return Err(bad("sector count"));
        }
        Ok(koly)
    }
}

/// The chunks of one `mish` blob (None when `blob` is not one); `base`:
/// the data fork's offset. Chunk types blkfs cannot read are returned in
/// `unknown`.
pub fn parse_mish(blob: &[u8], base: u64, unknown: &mut Vec<u32>) -> Result<Option<Vec<Chunk>>> {
    if blob.len() < MISH_HEADER + CHUNK_ENTRY || be32(blob, 0) != MISH {
        return Ok(None);
    }
    let first = be64(blob, 8);
    let data_offset = be64(blob, 0x18);
    let mut out = Vec::new();
    for (n, e) in blob[MISH_HEADER..].chunks_exact(CHUNK_ENTRY).enumerate() {
        let kind = match be32(e, 0) {
            CHUNK_ZERO | CHUNK_IGNORE => Kind::Zero,
            CHUNK_RAW => Kind::Raw,
            CHUNK_ZLIB => Kind::Zlib,
            CHUNK_BZIP2 => Kind::Bzip2,
            CHUNK_COMMENT | CHUNK_LAST => continue,
            t => {
                unknown.push(t);
                continue;
            }
        };
        let sector = first
            .checked_add(be64(e, 8))
            .ok_or_else(|| invalid(format!("sector of chunk {n} overflows")))?;
        let sectors = be64(e, 0x10);
        let length = be64(e, 0x20);
        if sector
            .checked_add(sectors)
            .is_none_or(|end| end > i64::MAX as u64 / SECTOR)
        {
            return Err(invalid(format!("chunk {n} lies past any disk size")));
        }
        if kind != Kind::Zero {
            if length > MAX_CHUNK_BYTES {
                return Err(invalid(format!(
                    "length {length} for chunk {n} is larger than max ({MAX_CHUNK_BYTES})"
                )));
            }
            if sectors > MAX_CHUNK_SECTORS {
                return Err(invalid(format!(
                    "sector count {sectors} for chunk {n} is larger than max ({MAX_CHUNK_SECTORS})"
                )));
            }
        }
        let offset = base
            .checked_add(data_offset)
            .and_then(|o| o.checked_add(be64(e, 0x18)))
            .ok_or_else(|| invalid(format!("offset of chunk {n} overflows")))?;
        out.push(Chunk {
            kind,
            sector,
            sectors,
            offset,
            length,
        });
    }
    Ok(Some(out))
}

/// The `mish` blobs of a resource fork: items of `[u32 length][bytes]`
/// in its data area.
pub fn resource_blobs(fork: &[u8]) -> Result<Vec<&[u8]>> {
    let bad = || invalid("dmg: invalid resource fork");
    if fork.len() < 16 {
        return Err(bad());
    }
    let (data_off, data_len) = (be32(fork, 0) as usize, be32(fork, 8) as usize);
    if data_len == 0
        || data_off
            .checked_add(data_len)
            .is_none_or(|e| e > fork.len())
    {
        return Err(bad());
    }
    let mut data = &fork[data_off..data_off + data_len];
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.len() < 4 {
            return Err(bad());
        }
        let n = be32(data, 0) as usize;
        if n == 0 || n > data.len() - 4 {
            return Err(bad());
        }
        out.push(&data[4..4 + n]);
        data = &data[4 + n..];
    }
    Ok(out)
}

/// The decoded `<data>` elements of an XML plist.
pub fn xml_blobs(xml: &[u8]) -> Result<Vec<Vec<u8>>> {
    let text = String::from_utf8_lossy(xml);
    let mut out = Vec::new();
    let mut rest = &text[..];
    while let Some(i) = rest.find("<data>") {
        let after = &rest[i + 6..];
        let end = after
            .find("</data>")
            .ok_or_else(|| invalid("dmg: unterminated <data> in the XML plist"))?;
        out.push(base64(&after[..end])?);
        rest = &after[end + 7..];
    }
    Ok(out)
}

/// Standard base64, whitespace ignored.
fn base64(s: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            c if c.is_ascii_whitespace() => continue,
            _ => return Err(invalid("dmg: invalid base64 in the XML plist")),
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

pub struct Dmg {
    file: Arc<Node>,
    size: u64,
    /// Sorted by sector.
    chunks: Vec<Chunk>,
    /// The last chunk decompressed.
    last: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl Dmg {
    pub fn open(file: Arc<Node>) -> Result<Dmg> {
        let len = file.size();
        let tail_at = len.saturating_sub(1023);
        let tail = read_at(&file, tail_at, (len - tail_at) as usize)?;
        let koly = Koly::find(&tail, tail_at, len)?;
        let mut unknown = Vec::new();
        let mut chunks = Vec::new();
        let mut add = |blob: &[u8]| -> Result<()> {
            if let Some(c) = parse_mish(blob, koly.data_fork, &mut unknown)? {
                chunks.extend(c);
            }
            Ok(())
        };
        if koly.rsrc.1 != 0 {
            let fork = read_at(&file, koly.rsrc.0, koly.rsrc.1 as usize)?;
            for blob in resource_blobs(&fork)? {
                add(blob)?;
            }
        } else if koly.xml.1 != 0 {
            if koly.xml.1 > MAX_XML {
                return Err(invalid("dmg: the XML plist is larger than 16 MiB"));
            }
            let xml = read_at(&file, koly.xml.0, koly.xml.1 as usize)?;
            for blob in xml_blobs(&xml)? {
                add(&blob)?;
            }
        } else {
            return Err(invalid("dmg: the trailer names no block tables"));
        }
        if !unknown.is_empty() {
            unknown.dedup();
            log::warn!(
                "{}: chunks of types {} (ADC {CHUNK_ADC:#x}, LZFSE {CHUNK_LZFSE:#x}) cannot be read: reading them fails with EIO",
                file.driver.filename(),
                unknown.iter().map(|t| format!("{t:#x}")).collect::<Vec<_>>().join(", ")
            );
        }
        chunks.sort_by_key(|c| c.sector);
        Ok(Dmg {
            file,
            size: koly.sectors * SECTOR,
            chunks,
            last: Mutex::new(None),
        })
    }

    /// The chunk holding `sector`, by index.
    fn chunk_at(&self, sector: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.sector <= sector);
        let i = i.checked_sub(1)?;
        let c = &self.chunks[i];
        (sector - c.sector < c.sectors).then_some(i)
    }

    /// Chunk `i` decompressed whole.
    fn inflate(&self, i: usize) -> Result<Arc<Vec<u8>>> {
        if let Some((id, data)) = &*self.last.lock() {
            if *id == i as u64 {
                return Ok(data.clone());
            }
        }
        let c = &self.chunks[i];
        let raw = read_at(&self.file, c.offset, c.length as usize)?;
        let mut out = vec![0u8; (c.sectors * SECTOR) as usize];
        let eio =
            |e: String| Error::io(libc::EIO, format!("dmg chunk at sector {}: {e}", c.sector));
        match c.kind {
            Kind::Zlib => super::deflate::inflate_zlib(&raw, &mut out).map_err(eio)?,
            Kind::Bzip2 => bunzip(&raw, &mut out).map_err(eio)?,
            _ => return Err(eio("not a compressed chunk".into())),
        }
        let out = Arc::new(out);
        *self.last.lock() = Some((i as u64, out.clone()));
        Ok(out)
    }
}

/// Decompresses a bzip2 stream into exactly `out.len()` bytes.
fn bunzip(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut d = bzip2::read::BzDecoder::new(input);
    d.read_exact(out).map_err(|e| format!("bzip2: {e}"))?;
    Ok(())
}

impl Layout for Dmg {
    fn format_name(&self) -> &'static str {
        "dmg"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u64 {
        SECTOR
    }

    fn lookup(&self, s: u64) -> Result<(Block, u64)> {
        let Some(i) = self.chunk_at(s) else {
            return Err(Error::io(
                libc::EIO,
                format!("dmg: no chunk this image can read holds sector {s}"),
            ));
        };
        let c = &self.chunks[i];
        let (k, left) = (s - c.sector, c.sector + c.sectors - s);
        Ok(match c.kind {
            Kind::Zero => (Block::Zero, left),
            Kind::Raw if (k + 1) * SECTOR <= c.length => (
                Block::Data(c.offset + k * SECTOR),
                left.min(c.length / SECTOR - k),
            ),
            // Past the stored bytes of a raw chunk: QEMU reads zeroes there too.
            Kind::Raw => (Block::Zero, 1),
            Kind::Zlib | Kind::Bzip2 => (Block::Special(i as u64), left),
        })
    }

    fn read_special(&self, id: u64, guest: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.inflate(id as usize)?;
        let at = (guest - self.chunks[id as usize].sector * SECTOR) as usize;
        let src = data
            .get(at..at + buf.len())
            .ok_or_else(|| Error::io(libc::EIO, "dmg: read past a chunk"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(base64("aGVs\n bG8=").unwrap(), b"hello");
        assert!(base64("a*b").is_err());
    }

    #[test]
    fn koly_bounds_are_checked() {
        let mut k = vec![0u8; 512];
        k[..4].copy_from_slice(KOLY);
        k[0x1ec..0x1f4].copy_from_slice(&20u64.to_be_bytes());
        let ok = Koly::find(&k, 1000, 1512).unwrap();
        assert_eq!((ok.at, ok.sectors), (1000, 20));
        k[0x18..0x20].copy_from_slice(&5000u64.to_be_bytes());
        assert!(Koly::find(&k, 1000, 1512).is_err());
        assert!(Koly::find(&[0u8; 600], 0, 600).is_err());
    }

    #[test]
    fn fuzz_mutated_tables_never_panic() {
        let mut blob = vec![0u8; MISH_HEADER + 3 * CHUNK_ENTRY];
        blob[..4].copy_from_slice(&MISH.to_be_bytes());
        for (n, t) in [CHUNK_ZLIB, CHUNK_RAW, CHUNK_ZERO].into_iter().enumerate() {
            let e = MISH_HEADER + n * CHUNK_ENTRY;
            blob[e..e + 4].copy_from_slice(&t.to_be_bytes());
            blob[e + 8..e + 16].copy_from_slice(&(n as u64 * 8).to_be_bytes());
            blob[e + 16..e + 24].copy_from_slice(&8u64.to_be_bytes());
        }
        for (b, r) in crate::testutil::mutations(&blob, blob.len(), 20_000) {
            let _ = parse_mish(&b, r >> 20, &mut Vec::new());
            let _ = resource_blobs(&b);
            let _ = xml_blobs(&b);
        }
    }
}
