//! blkdebug config file parsing (QemuOpts ini) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = blkfs_engine::drivers::blkdebug::config::fuzz_parse(data);
});
