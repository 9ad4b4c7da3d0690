//! User-Mode Linux COW header parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkfs_engine::drivers::cow::Header::parse(data);
});
