//! VMDK sparse extent header and text descriptor parsing on arbitrary bytes.
#![no_main]

use blkfs_engine::drivers::vmdk::{Descriptor, SparseHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = SparseHeader::parse(data);
    let _ = Descriptor::parse(&String::from_utf8_lossy(data));
});
