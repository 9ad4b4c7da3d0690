//! QMP framing and sessions (argument validation, blockdev options) on arbitrary bytes.
#![no_main]

use blkfs_engine::qmp::framing::Splitter;
use blkfs_engine::qmp::Session;
use blkfs_engine::Engine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut s = Session::new(Engine::new());
    s.handle(br#"{"execute":"qmp_capabilities"}"#);
    let mut split = Splitter::default();
    let mut frames = Vec::new();
    split.push(data, &mut frames);
    for msg in frames.into_iter().flatten() {
        // Never open real files or sockets from fuzz input.
        let opens = |w: &[u8]| w == b"blockdev-add" || w == b"nbd-server-s";
        if msg.windows(12).any(opens) {
            continue;
        }
        let _ = s.handle(&msg);
    }
    // The daemon's --blockdev parser (JSON or dotted keys, throttling keys),
    // which covers every driver's options (overlap-check, cache sizes, locking).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = blkfs_engine::options::BlockdevOptions::from_daemon_cli(text);
        // blkctl's: the same parse, giving the typed JSON back.
        let _ = blkfs_engine::options::BlockdevOptions::qmp_from_cli(text);
    }
});
