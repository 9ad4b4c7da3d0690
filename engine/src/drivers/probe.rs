//! Format detection by magic, used only where an image does not name the
//! format of its backing file.

use crate::error::{Error, Result};
use std::io::Read;

/// The format of the image at `path`: "qcow" or "qcow2" by magic and version, otherwise "raw"
/// (a raw image can hold anything, so it is never taken for another format).
pub fn probe(path: &str) -> Result<&'static str> {
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{path}'")))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::from_io(&e, format!("Could not read '{path}'")))?;
    let be32 =
        |at: usize| u32::from_be_bytes([magic[at], magic[at + 1], magic[at + 2], magic[at + 3]]);
    // qcow and qcow2 share the magic; the version tells them apart.
    Ok(match (n, be32(0), be32(4)) {
        (8, super::qcow2::header::MAGIC, 1) => "qcow",
        (8, super::qcow2::header::MAGIC, _) => "qcow2",
        _ => "raw",
    })
}
