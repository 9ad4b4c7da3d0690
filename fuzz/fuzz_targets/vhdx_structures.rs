//! VHDX header, region table, metadata and log parsing on arbitrary bytes.
#![no_main]

use blkfs_engine::drivers::vhdx::{replayable_entries, Header, Params, Regions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data);
    let _ = Regions::parse(data);
    let _ = Params::parse(data);
    let guid: [u8; 16] = data.get(..16).and_then(|g| g.try_into().ok()).unwrap_or([0; 16]);
    let _ = replayable_entries(data, &guid);
});
