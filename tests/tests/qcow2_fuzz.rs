//! Corrupted qcow2 metadata opened by the engine itself: every open, read
//! and write must end in a result (usually an error), never a panic, and
//! never touch bytes past the image's own metadata and data.

use blkfs_engine::drivers::wait;
use blkfs_engine::io::Buf;
use blkfs_engine::options::BlockdevOptions;
use blkfs_engine::Engine;
use blkfs_tests::*;
use serde_json::json;

#[test]
fn corrupted_metadata_never_panics() {
    let dir = TestDir::new("q2-fuzz");
    let good = qcow2_image(&dir, "good.qcow2", "cluster_size=4096", "4M");
    qemu_io(
        "qcow2",
        good.as_ref(),
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 2M 64k",
            "write -z 3M 64k",
        ],
    );
    let pristine = std::fs::read(&good).unwrap();
    let img = dir.file("fuzzed.qcow2");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut opened, mut failed_io) = (0, 0);
    for _ in 0..80 {
        let mut bytes = pristine.clone();
        // Metadata lives in the first clusters of a fresh image.
        for _ in 0..1 + next() % 4 {
            let at = (next() % (bytes.len().min(8 * 4096) as u64)) as usize;
            bytes[at] = next() as u8;
        }
        std::fs::write(&img, &bytes).unwrap();
        let engine = Engine::new();
        let spec =
            json!({"driver": "qcow2", "id": "d", "file": {"driver": "file", "filename": img}});
        let Ok(added) = engine.graph.add(&BlockdevOptions::from_json(spec).unwrap()) else {
            continue;
        };
        opened += 1;
        let dev = added.device.expect("device");
        for off in (0..4u64 << 20).step_by(256 << 10) {
            if wait(|d| dev.read(off, 64 << 10, d)).is_err() {
                failed_io += 1;
            }
            let _ = wait(|d| dev.write(off + 1000, Buf::from_slice(&[0x5a; 5000]), d));
        }
        let _ = wait(|d| dev.write_zeroes(1 << 20, 1 << 20, false, d));
        let _ = wait(|d| dev.flush(d));
    }
    // The mutations must reach both the open checks and the I/O paths.
    assert!(opened > 0, "no mutated image opened");
    assert!(
        opened < 80 || failed_io > 0,
        "no mutation was ever detected"
    );
}
