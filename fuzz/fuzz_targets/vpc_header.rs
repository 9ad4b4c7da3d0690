//! VHD footer and dynamic header parsing (head, tail and dynamic header cut from the input) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let third = data.len() / 3;
    let (head, rest) = data.split_at(third);
    let (tail, dynamic) = rest.split_at(third);
    let _ = blkfs_engine::drivers::vpc::Header::parse(head, tail, Some(dynamic));
});
