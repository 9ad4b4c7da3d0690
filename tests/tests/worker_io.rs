//! The reads and writes that a FUSE worker of the io_uring transport
//! submits on its own ring (a raw device over a file with `aio=native`):
//! the same bytes and the same statistics as the engine's path (the same
//! requests on an `aio=threads` device), request by request. Unaligned
//! requests on an O_DIRECT file take the engine's path on both devices.
//! On the /dev/fuse transport both devices take the engine's path, and
//! all of it holds the same.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;

const SIZE: u64 = 16 << 20;

fn stats(q: &mut Qmp, id: &str) -> Value {
    let all = q.ok("query-blockstats", json!({}));
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["device"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no device {id}: {all}"))
}

#[test]
fn worker_transfers_match_the_engines_bytes_and_statistics() {
    let dir = TestDir::new("worker-io");
    let a = raw_image(&dir, "a.img", "16M");
    let b = raw_image(&dir, "b.img", "16M");
    let direct = json!({"direct": true});
    let d = Daemon::start(
        &dir,
        &[
            raw_spec("d0", &a, json!({"aio": "threads", "cache": direct})),
            raw_spec("d1", &b, json!({"aio": "native", "cache": direct})),
        ],
    );
    let files = [rw(&d, "d0"), rw(&d, "d1")];
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x5eed);
    let (mut reads, mut read_bytes, mut writes, mut written, mut highest) = (0, 0, 0, 0, 0);
    for i in 0..300 {
        let aligned = i % 5 != 4;
        let len = if aligned {
            (1 + rng.below(16)) as usize * 4096
        } else {
            1 + rng.below(6000) as usize
        };
        let mut off = rng.below(SIZE - len as u64 - 4096);
        off = if aligned { off & !4095 } else { off };
        let at = off as usize..off as usize + len;
        if i % 3 == 0 {
            for (n, f) in files.iter().enumerate() {
                let mut got = vec![0u8; len];
                f.read_exact_at(&mut got, off).unwrap();
                assert_same_bytes(
                    &got,
                    &model[at.clone()],
                    &format!("d{n}: read {i} at {off}+{len}"),
                );
            }
            reads += 1;
            read_bytes += len as u64;
        } else {
            let data = pattern(i, len);
            for f in &files {
                f.write_all_at(&data, off).unwrap();
            }
            model[at].copy_from_slice(&data);
            writes += 1;
            written += len as u64;
            highest = highest.max(off + len as u64);
        }
    }
    let mut q = d.qmp();
    let (s0, s1) = (stats(&mut q, "d0"), stats(&mut q, "d1"));
    // One request per call: the mount passes reads and writes through.
    let want = json!({"rd_operations": reads, "rd_bytes": read_bytes,
                      "wr_operations": writes, "wr_bytes": written,
                      "wr_highest_offset": highest});
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&s0["stats"][k], v, "d0 {k}: {s0}");
        assert_eq!(&s1["stats"][k], v, "d1 {k}: {s1}");
        // The file nodes saw the same requests, read-modify-writes included.
        assert_eq!(
            s1["parent"]["stats"][k], s0["parent"]["stats"][k],
            "file node {k}: {s0} {s1}"
        );
    }
    for s in [&s0, &s1] {
        for k in ["rd_total_time_ns", "wr_total_time_ns"] {
            assert!(s["stats"][k].as_u64().unwrap() > 0, "{k}: {s}");
            assert!(
                s["parent"]["stats"][k].as_u64().unwrap() > 0,
                "file {k}: {s}"
            );
        }
    }
    drop(files);
    d.quit();
    for img in [&a, &b] {
        assert_same_bytes(&std::fs::read(img).unwrap(), &model, img);
    }
    assert!(images_identical(a.as_ref(), "raw", b.as_ref(), "raw"));
}
