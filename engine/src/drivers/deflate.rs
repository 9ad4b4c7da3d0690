//! Compressed clusters as qcow and qcow2 store them: raw deflate (no zlib
//! header), and reading one cluster whole; zlib streams for cloop and dmg.

use crate::error::Result;
use crate::graph::Node;
use crate::io::Buf;

/// Reads the compressed cluster stored as `len` bytes at `host` and
/// decompresses it into a `cluster_size` buffer. `len` is only an upper
/// bound, so the read stops at the end of the file.
pub fn read_compressed(
    file: &Node,
    host: u64,
    len: u64,
    cluster_size: u64,
    decompress: impl FnOnce(&[u8], &mut [u8]) -> Result<()>,
) -> Result<Buf> {
    let avail = file.size().saturating_sub(host).min(len);
    let raw = super::qcow2::meta::read_at(file, host, avail as usize)?;
    let mut out = Buf::zeroed(cluster_size as usize);
    decompress(&raw, &mut out)?;
    Ok(out)
}

/// Inflates raw deflate `input` into exactly `out.len()` bytes; the error
/// says why not.
pub fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    inflate_with(input, out, false)
}

/// [`inflate`] of a zlib stream (with its header, as cloop and dmg store blocks).
pub fn inflate_zlib(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    inflate_with(input, out, true)
}

/// Inflates a zlib stream into at most `out.len()` bytes: how many it made
/// (a vmdk image's last grain holds only the bytes before the end).
pub fn inflate_zlib_upto(input: &[u8], out: &mut [u8]) -> std::result::Result<usize, String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    let mut d = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER;
    let (status, _, n) = decompress(&mut d, input, out, 0, flags);
    match status {
        miniz_oxide::inflate::TINFLStatus::Done => Ok(n),
        s => Err(format!("compressed data is invalid ({s:?})")),
    }
}

fn inflate_with(input: &[u8], out: &mut [u8], zlib: bool) -> std::result::Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    let mut d = DecompressorOxide::new();
    let mut flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    if zlib {
        flags |= inflate_flags::TINFL_FLAG_PARSE_ZLIB_HEADER;
    }
    let (_, _, n) = decompress(&mut d, input, out, 0, flags);
    if n != out.len() {
        return Err(format!(
            "compressed cluster inflates to {n} bytes, {} expected",
            out.len()
        ));
    }
    Ok(())
}
