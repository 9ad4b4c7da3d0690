//! cloop header and offset table checks on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkfs_engine::drivers::cloop::Header::parse(data);
    let offsets: Vec<u64> = data
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let _ = blkfs_engine::drivers::cloop::Header::check_offsets(&offsets);
});
