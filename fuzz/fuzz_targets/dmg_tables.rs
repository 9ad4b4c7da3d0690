//! dmg trailer, resource fork, XML plist and mish table parsing on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use blkfs_engine::drivers::dmg;
    let len = data.len() as u64;
    let _ = dmg::Koly::find(data, 0, len);
    let _ = dmg::resource_blobs(data);
    let _ = dmg::xml_blobs(data);
    let _ = dmg::parse_mish(data, 512, &mut Vec::new());
});
