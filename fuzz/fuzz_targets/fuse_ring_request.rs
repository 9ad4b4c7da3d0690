//! The FUSE io_uring request decoder on arbitrary header and payload bytes:
//! it answers an errno or an operation whose slices lie inside the payload,
//! and a reply header written after it always reads back.
#![no_main]

#[path = "../../fs/src/fuse_abi.rs"]
#[allow(dead_code)]
mod fuse_abi;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = fuse_abi::RING_HEADER_LEN.min(data.len());
    let (hdr, payload) = data.split_at(split);
    let mut hdr = hdr.to_vec();
    hdr.resize(fuse_abi::RING_HEADER_LEN, 0);
    let claimed = fuse_abi::payload_size(&hdr).unwrap_or(0) as usize;
    let args = &payload[..claimed.min(payload.len())];
    if let Ok((h, op)) = fuse_abi::decode(&hdr, args) {
        if let fuse_abi::Op::Write { data, .. } = op {
            assert!(data.len() <= args.len());
        }
        fuse_abi::put_reply(&mut hdr, h.unique, Err(libc::EIO));
        assert_eq!(fuse_abi::payload_size(&hdr), Some(0));
    }
});
