//! The qcow2 header and its extensions, validated before anything uses them.

use crate::drivers::bytes::{be32, be64};
use crate::error::{Error, Result};

pub const MAGIC: u32 = 0x5146_49fb;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Largest L1 table accepted (QEMU's limit: 32 MiB of entries).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (QEMU's limit: 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// 0: deflate, 1: zstd.
    pub compression_type: u8,
    /// (type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
}

fn invalid(msg: impl std::fmt::Display) -> Error {
    Error::io(libc::EINVAL, format!("qcow2: {msg}"))
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses the first cluster of an image whose file is `file_size` bytes.
    /// `buf` holds at least the header and its extensions (the first 64 KiB
    /// or the whole file, whichever is smaller).
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(invalid("file too small for a header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!("unsupported version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} out of range (9..=21)"
            )));
        }
        let mut h = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: 0,
            feature_names: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(invalid("file too small for a version 3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.refcount_order > 6 {
                return Err(invalid(format!(
                    "refcount_order {} exceeds 6",
                    h.refcount_order
                )));
            }
            if h.header_length < 104
                || h.header_length as u64 > h.cluster_size()
                || h.header_length as usize > buf.len()
            {
                return Err(invalid(format!(
                    "invalid header_length {}",
                    h.header_length
                )));
            }
        }
        h.parse_extensions(buf)?;
        h.check_features(buf)?;
        h.validate(buf, file_size)?;
        Ok(h)
    }

    /// The header extensions before the end marker: (type, data range in `buf`).
    fn extensions(&self, buf: &[u8]) -> Result<Vec<(u32, std::ops::Range<usize>)>> {
        let end = if self.backing_file_offset_in(buf) > 0 {
            (self.backing_file_offset_in(buf) as usize).min(buf.len())
        } else {
            buf.len().min(self.cluster_size() as usize)
        };
        let mut at = self.extensions_start();
        let mut exts = Vec::new();
        while at + 8 <= end {
            let (typ, len) = (be32(buf, at), be32(buf, at + 4) as usize);
            let data = at + 8;
            if typ == EXT_END {
                break;
            }
            if data + len > end {
                return Err(invalid(format!(
                    "header extension {typ:#x} runs past the extension area"
                )));
            }
            exts.push((typ, data..data + len));
            at = data + len.next_multiple_of(8);
        }
        Ok(exts)
    }

    fn extensions_start(&self) -> usize {
        if self.version == 2 {
            72
        } else {
            self.header_length as usize
        }
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        for (typ, range) in self.extensions(buf)? {
            let bytes = &buf[range];
            match typ {
                EXT_BACKING_FORMAT => {
                    let s = String::from_utf8_lossy(bytes)
                        .trim_end_matches('\0')
                        .to_string();
                    self.backing_format = Some(s);
                }
                EXT_FEATURE_NAMES => {
                    for e in bytes.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..])
                            .trim_end_matches('\0')
                            .to_string();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                // Others (bitmaps, encryption, unknown) are left in place untouched.
                _ => {}
            }
        }
        Ok(())
    }

    /// The first cluster `first` rewritten to record backing file `name` in
    /// `format`, laid out as QEMU's qcow2_update_header does: the header, the
    /// backing format extension, the other extensions in their order, the
    /// end marker, then the name; the rest of the cluster is zero.
    /// An empty `name` removes the backing file (and its format).
    pub fn with_backing(&self, first: &[u8], name: &str, format: Option<&str>) -> Result<Vec<u8>> {
        let format = if name.is_empty() {
            None
        } else {
            check_backing_name(name)?;
            format
        };
        let cs = self.cluster_size() as usize;
        let start = self.extensions_start();
        if first.len() < start {
            return Err(invalid("header cluster is truncated"));
        }
        let mut out = first[..start].to_vec();
        if let Some(f) = format {
            push_ext(&mut out, EXT_BACKING_FORMAT, f.as_bytes());
        }
        for (typ, range) in self.extensions(first)? {
            if typ != EXT_BACKING_FORMAT {
                push_ext(&mut out, typ, &first[range]);
            }
        }
        push_ext(&mut out, EXT_END, &[]);
        let name_at = out.len() as u64;
        out.extend_from_slice(name.as_bytes());
        if out.len() > cs {
            return Err(Error::io(
                libc::ENOSPC,
                "the header, its extensions and the backing file name do not fit in the first cluster",
            ));
        }
        let name_at = if name.is_empty() { 0 } else { name_at };
        out[8..16].copy_from_slice(&name_at.to_be_bytes());
        out[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        out.resize(cs, 0);
        Ok(out)
    }

    fn backing_file_offset_in(&self, buf: &[u8]) -> u64 {
        be64(buf, 8)
    }

    fn check_features(&mut self, buf: &[u8]) -> Result<()> {
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(invalid(
                "external data files are not supported by blkfs yet",
            ));
        }
        if self.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(invalid(
                "extended L2 entries (subclusters) are not supported by blkfs yet",
            ));
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 {
            let ctype = if self.header_length > 104 {
                buf[104]
            } else {
                0
            };
            if ctype > 1 {
                return Err(invalid(format!("unknown compression type {ctype}")));
            }
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 && self.header_length > 104 {
            self.compression_type = buf[104];
        }
        let unknown = self.incompatible & !known;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            let name = self
                .feature_names
                .iter()
                .find(|(t, b, _)| *t == 0 && *b as u32 == bit)
                .map(|(_, _, n)| format!(" ({n})"))
                .unwrap_or_default();
            return Err(invalid(format!(
                "unsupported incompatible feature bit {bit}{name}"
            )));
        }
        Ok(())
    }

    fn validate(&mut self, buf: &[u8], file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.crypt_method > 2 {
            return Err(invalid(format!(
                "unknown encryption method {}",
                self.crypt_method
            )));
        }
        // 1 (legacy AES) is handled by the driver; LUKS is not yet.
        if self.crypt_method == 2 {
            return Err(invalid(
                "LUKS-encrypted qcow2 images are not supported by blkfs yet",
            ));
        }
        check_virtual_size(self.size, self.cluster_bits)?;
        let needed_l1 = l1_entries_for(self.size, self.cluster_bits);
        if (self.l1_size as u64) < needed_l1 {
            return Err(invalid(format!(
                "L1 table has {} entries, {needed_l1} needed",
                self.l1_size
            )));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid("L1 table too large"));
        }
        check_table(
            self.l1_table_offset,
            self.l1_size as u64 * 8,
            cs,
            file_size,
            "L1 table",
        )?;
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "invalid refcount table size ({} clusters)",
                self.refcount_table_clusters
            )));
        }
        check_table(
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_size,
            "refcount table",
        )?;
        if self.nb_snapshots > 0 {
            check_table(self.snapshots_offset, 1, cs, file_size, "snapshot table")?;
        }
        let bf_off = be64(buf, 8);
        let bf_len = be32(buf, 16) as u64;
        if bf_off != 0 {
            if bf_len > 1023 || bf_off + bf_len > cs.min(buf.len() as u64) {
                return Err(invalid("backing file name out of the first cluster"));
            }
            let name = &buf[bf_off as usize..(bf_off + bf_len) as usize];
            self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(())
    }
}

/// Appends one extension (type, length, data padded to 8 bytes).
fn push_ext(out: &mut Vec<u8>, typ: u32, data: &[u8]) {
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(8), 0);
}

/// A backing file name the header can record (QEMU's limit, no NUL).
pub fn check_backing_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::generic("the backing file name is empty"));
    }
    if name.len() > 1023 {
        return Err(Error::generic(format!(
            "the backing file name is {} bytes long, at most 1023 are allowed",
            name.len()
        )));
    }
    if name.contains('\0') {
        return Err(Error::generic("the backing file name contains a NUL byte"));
    }
    Ok(())
}

/// L1 entries needed for a virtual size of `size` bytes.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    size.div_ceil(cs).div_ceil(cs / 8)
}

/// Refuses a virtual size whose L1 table would exceed QEMU's limit.
pub fn check_virtual_size(size: u64, cluster_bits: u32) -> Result<()> {
    if size > (1u64 << 62) || l1_entries_for(size, cluster_bits) > MAX_L1_BYTES / 8 {
        return Err(invalid(format!("virtual size {size} is too large")));
    }
    Ok(())
}

/// A table must be cluster aligned, inside the file and not over the header.
fn check_table(offset: u64, len: u64, cs: u64, file_size: u64, what: &str) -> Result<()> {
    if offset == 0 || !offset.is_multiple_of(cs) {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not a non-zero multiple of the cluster size"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size.next_multiple_of(cs) => Ok(()),
        _ => Err(invalid(format!(
            "{what} at {offset:#x} (+{len}) lies past the end of the file"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A v3 header of a 1 MiB image with 64 KiB clusters: L1 at 0x30000 (1
    /// entry), refcount table at 0x10000 (1 cluster).
    pub fn v3_fixture() -> Vec<u8> {
        let mut b = vec![0u8; 0x1_0000];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes()); //        magic "QFI\xfb"
        b[4..8].copy_from_slice(&3u32.to_be_bytes()); //          version 3
        b[20..24].copy_from_slice(&16u32.to_be_bytes()); //       cluster_bits: 64 KiB
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size: 1 MiB
        b[36..40].copy_from_slice(&1u32.to_be_bytes()); //        l1_size
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); //  l1_table_offset
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); //  refcount_table_offset
        b[56..60].copy_from_slice(&1u32.to_be_bytes()); //        refcount_table_clusters
        b[96..100].copy_from_slice(&4u32.to_be_bytes()); //       refcount_order: 16 bits
        b[100..104].copy_from_slice(&112u32.to_be_bytes()); //    header_length
        b
    }

    const FILE: u64 = 0x40000;

    #[test]
    fn parses_a_valid_header() {
        let h = Header::parse(&v3_fixture(), FILE).unwrap();
        assert_eq!(
            (h.version, h.cluster_size(), h.size, h.refcount_bits()),
            (3, 65536, 1 << 20, 16)
        );
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn backing_name_and_format_extension() {
        let mut b = v3_fixture();
        // Extension: backing format "raw", then the end marker.
        b[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        b[8..16].copy_from_slice(&512u64.to_be_bytes()); // backing_file_offset
        b[16..20].copy_from_slice(&5u32.to_be_bytes()); //  backing_file_size
        b[512..517].copy_from_slice(b"b.img");
        let h = Header::parse(&b, FILE).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some("b.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn rejects_bad_fields() {
        // (byte offset, new value, expected error).
        let cases: [(usize, u8, &str); 13] = [
            (0, 0, "bad magic"),
            (7, 9, "unsupported version 9"),
            (23, 30, "cluster_bits 30"),
            (99, 7, "refcount_order 7"),
            (39, 0, "L1 table has 0 entries"),
            (45, 0x50, "L1 table at 0x500000"),
            (55, 0x11, "refcount table offset 0x10011"),
            (59, 0, "invalid refcount table size"),
            (79, 1 << 5, "unsupported incompatible feature bit 5"),
            (79, 1 << 4, "extended L2"),
            (35, 3, "unknown encryption method 3"),
            (35, 2, "LUKS-encrypted qcow2 images are not supported"),
            (103, 8, "invalid header_length 8"),
        ];
        for (at, value, want) in cases {
            let mut b = v3_fixture();
            b[at] = value;
            let e = Header::parse(&b, FILE).unwrap_err();
            assert!(e.msg.contains(want), "expected '{want}', got '{}'", e.msg);
        }
        assert!(Header::parse(&v3_fixture()[..50], FILE).is_err());
    }

    #[test]
    fn legacy_aes_accepted() {
        let mut b = v3_fixture();
        b[35] = 1; // crypt_method 1: AES
        assert_eq!(Header::parse(&b, FILE).unwrap().crypt_method, 1);
    }

    #[test]
    fn unknown_bit_named_from_feature_table() {
        let mut b = v3_fixture();
        b[79] = 1 << 6;
        b[112..116].copy_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        b[116..120].copy_from_slice(&48u32.to_be_bytes());
        b[120] = 0;
        b[121] = 6;
        b[122..128].copy_from_slice(b"shiny!");
        let e = Header::parse(&b, FILE).unwrap_err();
        assert!(e.msg.contains("bit 6 (shiny!)"), "{}", e.msg);
    }

    #[test]
    fn l1_entries_for_sizes() {
        // 512 B clusters: 64 entries per L2 table, 32 KiB per L1 entry.
        assert_eq!(l1_entries_for(1 << 20, 9), 32);
        assert_eq!(l1_entries_for(1 << 30, 9), 32768);
        assert_eq!(l1_entries_for((1 << 20) + 512, 9), 33);
        // 64 KiB clusters: 512 MiB per L1 entry.
        assert_eq!(l1_entries_for(0, 16), 0);
        assert_eq!(l1_entries_for(1, 16), 1);
        assert_eq!(l1_entries_for(512 << 20, 16), 1);
        assert_eq!(l1_entries_for((512 << 20) + 512, 16), 2);
        // 32 MiB of L1 entries at 64 KiB clusters: 4M entries of 512 MiB.
        assert!(check_virtual_size(1 << 51, 16).is_ok());
        assert!(check_virtual_size((1 << 51) + 512, 16).is_err());
        // 32 MiB of L1 entries at 512 B clusters: 4M entries of 32 KiB.
        assert!(check_virtual_size(1u64 << 37, 9).is_ok());
        assert!(check_virtual_size((1u64 << 37) + 512, 9).is_err());
    }

    #[test]
    fn backing_rewrite_layout() {
        let mut b = v3_fixture();
        let ext = |b: &mut Vec<u8>, at: usize, typ: u32, data: &[u8]| {
            b[at..at + 4].copy_from_slice(&typ.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
            b[at + 8..at + 8 + data.len()].copy_from_slice(data);
        };
        // Unknown extension, then backing format "raw", then feature names.
        ext(&mut b, 112, 0x1234_5678, b"abc");
        ext(&mut b, 128, EXT_BACKING_FORMAT, b"raw");
        let mut feature = [0u8; 48];
        feature[1] = 1;
        feature[2..9].copy_from_slice(b"corrupt");
        ext(&mut b, 144, EXT_FEATURE_NAMES, &feature);
        b[8..16].copy_from_slice(&512u64.to_be_bytes()); // backing_file_offset
        b[16..20].copy_from_slice(&5u32.to_be_bytes()); //  backing_file_size
        b[512..517].copy_from_slice(b"b.img");
        let h = Header::parse(&b, FILE).unwrap();
        let out = h.with_backing(&b, "../base.qcow2", Some("qcow2")).unwrap();
        assert_eq!(out.len(), 0x10000);
        // The fixed header is kept, but for the name's offset and length.
        assert_eq!(out[..8], b[..8]);
        assert_eq!(out[20..112], b[20..112]);
        let mut want = Vec::new();
        want.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes()); // backing format first
        want.extend_from_slice(&5u32.to_be_bytes());
        want.extend_from_slice(b"qcow2\0\0\0"); //                      padded to 8
        want.extend_from_slice(&b[112..128]); //                     unknown, kept
        want.extend_from_slice(&b[144..200]); //                     feature names, kept
        want.extend_from_slice(&[0; 8]); //                          end marker
        want.extend_from_slice(b"../base.qcow2"); //                 the name
        assert_eq!(out[112..112 + want.len()], want[..]);
        assert!(out[112 + want.len()..].iter().all(|&x| x == 0));
        let name_at = 112 + want.len() as u64 - 13;
        assert_eq!(out[8..16], name_at.to_be_bytes());
        assert_eq!(out[16..20], 13u32.to_be_bytes());
        let back = Header::parse(&out, FILE).unwrap();
        assert_eq!(back.backing_file.as_deref(), Some("../base.qcow2"));
        assert_eq!(back.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(back.feature_names, h.feature_names);
        // Without a format the extension goes away.
        let out = h.with_backing(&b, "x", None).unwrap();
        assert_eq!(Header::parse(&out, FILE).unwrap().backing_format, None);
        // An empty name removes the backing file and its format.
        let out = h.with_backing(&b, "", Some("qcow2")).unwrap();
        let back = Header::parse(&out, FILE).unwrap();
        assert_eq!((back.backing_file, back.backing_format), (None, None));
        assert_eq!(out[8..20], [0; 12]);
    }

    #[test]
    fn backing_rewrite_refusals() {
        let b = v3_fixture();
        let h = Header::parse(&b, FILE).unwrap();
        for bad in ["a\0b", &"n".repeat(1024)] {
            assert!(h.with_backing(&b, bad, None).is_err(), "{bad:?}");
        }
        assert!(h.with_backing(&b, &"n".repeat(1023), None).is_ok());
        // 512 B clusters: 112 header bytes + 8 end marker + 1023 do not fit.
        let mut small = h.clone();
        small.cluster_bits = 9;
        let e = small
            .with_backing(&b[..512], &"n".repeat(1023), Some("raw"))
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{}", e.msg);
        assert!(small
            .with_backing(&b[..512], &"n".repeat(392), None)
            .is_ok());
        assert!(small
            .with_backing(&b[..512], &"n".repeat(393), None)
            .is_err());
    }

    /// Random mutations of a valid header (with extensions and a backing
    /// name) must give an error or a header, never a panic.
    #[test]
    fn fuzz_mutated_headers_never_panic() {
        let mut base = v3_fixture();
        base[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        base[116..120].copy_from_slice(&5u32.to_be_bytes());
        base[120..125].copy_from_slice(b"qcow2");
        base[128..132].copy_from_slice(&EXT_FEATURE_NAMES.to_be_bytes());
        base[132..136].copy_from_slice(&48u32.to_be_bytes());
        base[8..16].copy_from_slice(&512u64.to_be_bytes());
        base[16..20].copy_from_slice(&5u32.to_be_bytes());
        base[512..517].copy_from_slice(b"b.img");
        let mut next = crate::testutil::xorshift(0x2545_F491_4F6C_DD1D);
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 6 {
                let at = (next() % 600) as usize;
                b[at] = next() as u8;
            }
            let len = if next().is_multiple_of(8) {
                (next() % 700) as usize
            } else {
                b.len()
            };
            let file_size = next() % 0x80000;
            if Header::parse(&b[..len], file_size).is_ok() {
                ok += 1;
            }
        }
        // Some mutations hit unused bytes: the parser must still accept those.
        assert!(ok > 0);
    }
}
