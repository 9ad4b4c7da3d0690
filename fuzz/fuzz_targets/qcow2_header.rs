//! qcow2 header, extension, L2 entry and snapshot table parsing on arbitrary bytes.
#![no_main]

use blkfs_engine::drivers::qcow2::entry::Mapping;
use blkfs_engine::drivers::qcow2::header::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let file_size = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let _ = Header::parse(&data[8..], file_size);
    for e in data.chunks_exact(8) {
        let v = u64::from_be_bytes(e.try_into().unwrap_or_default());
        for bits in [9, 12, 16, 21] {
            let _ = Mapping::decode(v, bits, true);
        }
    }
    let _ = blkfs_engine::drivers::qcow2::snapshot::parse_for_fuzzing(&data[8..]);
});
