//! Raw deflate (no zlib header), as qcow and qcow2 store compressed clusters.

/// Inflates `input` into exactly `out.len()` bytes; the error says why not.
pub fn inflate(input: &[u8], out: &mut [u8]) -> std::result::Result<(), String> {
    use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
    let mut d = DecompressorOxide::new();
    let (_, _, n) = decompress(
        &mut d,
        input,
        out,
        0,
        inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
    );
    if n != out.len() {
        return Err(format!(
            "compressed cluster inflates to {n} bytes, {} expected",
            out.len()
        ));
    }
    Ok(())
}
