//! QED header parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let file_size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let _ = blkfs_engine::drivers::qed::Header::parse(&data[8..], file_size);
});
