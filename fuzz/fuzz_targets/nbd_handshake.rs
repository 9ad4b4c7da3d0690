//! The NBD server's option haggling on arbitrary client bytes (against two
//! exports), then the rest of the bytes as transmission requests, parsed
//! and checked; and the option payload parsers on the raw input.
#![no_main]

use blkfs_engine::nbd::handshake::{negotiate, Catalog, End, ExportInfo};
use blkfs_engine::nbd::proto;
use libfuzzer_sys::fuzz_target;
use std::io::{self, Cursor, Read, Write};

struct Exports;

impl Catalog for Exports {
    fn list(&self) -> Vec<(String, String)> {
        vec![("d0".into(), String::new()), ("".into(), "empty".into())]
    }
    fn info(&self, name: &str) -> Option<ExportInfo> {
        (name == "d0" || name.is_empty()).then(|| ExportInfo {
            size: 1 << 30,
            flags: proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH,
            description: Some("fuzz".into()),
        })
    }
    fn attach(&self, name: &str) -> bool {
        name == "d0"
    }
}

struct Pipe<'a> {
    input: Cursor<&'a [u8]>,
    written: usize,
}

impl Read for Pipe<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.written += b.len();
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    for opt in [proto::OPT_GO, proto::OPT_SET_META_CONTEXT] {
        let _ = proto::parse_info(opt, data);
        let _ = proto::parse_meta(opt, data);
    }
    let mut p = Pipe {
        input: Cursor::new(data),
        written: 0,
    };
    let Ok(End::Go(n)) = negotiate(&mut p, &Exports) else {
        return;
    };
    let rest = &data[p.input.position() as usize..];
    let limits = proto::Limits {
        size: 1 << 30,
        read_only: rest.first().is_some_and(|b| b & 1 == 1),
        structured: n.structured,
        block_status: n.block_status,
    };
    for chunk in rest.chunks_exact(proto::REQUEST_SIZE) {
        let Ok(hdr) = <&[u8; proto::REQUEST_SIZE]>::try_from(chunk) else {
            return;
        };
        let Ok(r) = proto::parse_request(hdr) else {
            return;
        };
        assert_eq!(proto::parse_request(&proto::encode_request(&r)), Ok(r));
        if proto::check_request(&r, &limits).is_ok() {
            // What passes the checks lies inside the export, and what
            // carries data fits the buffer limit.
            assert!(r.offset + u64::from(r.len) <= limits.size);
            let data = matches!(
                r.kind,
                proto::CMD_READ | proto::CMD_WRITE | proto::CMD_CACHE
            );
            assert!(!data || r.len <= proto::MAX_BUFFER);
        }
    }
});
