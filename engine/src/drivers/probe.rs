//! Format detection by magic, used only where an image does not name the
//! format of its backing file.

use crate::error::{Error, Result};
use std::io::Read;

/// The format of the image at `path`: "qcow2" by its magic, otherwise "raw"
/// (a raw image can hold anything, so it is never taken for another format).
pub fn probe(path: &str) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::from_io(&e, format!("Could not open '{path}'")))?;
    let n = f
        .read(&mut magic)
        .map_err(|e| Error::from_io(&e, format!("Could not read '{path}'")))?;
    Ok(
        if n == 4 && u32::from_be_bytes(magic) == super::qcow2::header::MAGIC {
            "qcow2"
        } else {
            "raw"
        },
    )
}
