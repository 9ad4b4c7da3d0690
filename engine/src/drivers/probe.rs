//! Format detection by magic, used only where an image does not name the
//! format of its backing file (and by the offline `blkctl` commands).

use crate::error::{Error, Result};
use std::io::Read;

/// How many leading bytes the magics below need.
const PROBE_LEN: usize = 512;

/// The format of the image whose first bytes are `head`: every format
/// whose magic QEMU recognises, otherwise "raw" (a raw image can hold
/// anything, so it is never taken for another format unless its bytes
/// say so). `name` is the file name: QEMU knows dmg images by it.
pub fn probe_bytes(head: &[u8], name: &str) -> &'static str {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let be32 = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le32 = |off: usize| {
        head.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // qcow and qcow2 share the magic; the version tells them apart.
    if be32(0) == Some(super::qcow2::header::MAGIC) {
        return if be32(4) == Some(1) { "qcow" } else { "qcow2" };
    }
    if le32(0) == Some(super::qed::MAGIC) {
        return "qed";
    }
    if le32(0x40) == Some(super::vdi::SIGNATURE) {
        return "vdi";
    }
    if at(0, super::vpc::COOKIE) {
        return "vpc";
    }
    if at(0, b"vhdxfile") {
        return "vhdx";
    }
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        return "vmdk";
    }
    if (at(0, super::parallels::MAGIC_OLD) || at(0, super::parallels::MAGIC_EXT))
        && le32(16) == Some(2)
    {
        return "parallels";
    }
    if at(0, super::bochs::MAGIC) && at(32, b"Redolog\0") {
        return "bochs";
    }
    if at(0, super::cloop::PREAMBLE) {
        return "cloop";
    }
    if be32(0) == Some(super::cow::MAGIC) && be32(4) == Some(3) {
        return "cow";
    }
    if name.ends_with(".dmg") {
        return "dmg";
    }
    "raw"
}

/// The format of the image at `path` (a local file, or a URL of the curl
/// protocols read with their default options), by [`probe_bytes`].
pub fn probe(path: &str) -> Result<&'static str> {
    if let Some(p) = super::curl::Protocol::of_url(path) {
        let o = crate::options::CurlOptions {
            url: path.to_string(),
            ..Default::default()
        };
        return super::curl::probe(p, &o);
    }
    let mut head = Vec::with_capacity(PROBE_LEN);
    let f = std::fs::File::open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{path}'")))?;
    f.take(PROBE_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| Error::from_io(&e, format!("Could not read '{path}'")))?;
    Ok(probe_bytes(&head, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_data_stays_raw() {
        assert_eq!(probe_bytes(&[0u8; 512], "a.img"), "raw");
        assert_eq!(probe_bytes(b"QFI", "a.img"), "raw");
        assert_eq!(probe_bytes(b"", "a.img"), "raw");
    }

    #[test]
    fn magics() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&super::super::vdi::SIGNATURE.to_le_bytes());
        assert_eq!(probe_bytes(&vdi, "x"), "vdi");
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x01", "x"), "qcow");
        assert_eq!(probe_bytes(b"QFI\xfb\0\0\0\x03", "x"), "qcow2");
        assert_eq!(probe_bytes(b"QED\0", "x"), "qed");
        assert_eq!(probe_bytes(b"conectix", "x"), "vpc");
        assert_eq!(probe_bytes(b"", "x.dmg"), "dmg");
    }
}
