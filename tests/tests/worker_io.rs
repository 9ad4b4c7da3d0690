//! The reads and writes that a FUSE worker of the io_uring transport
//! submits on its own ring (raw, or allocated qcow2 clusters, over a file
//! with `aio=native`): the same bytes and the same statistics as the
//! engine's path (the same requests on an `aio=threads` device), request
//! by request. Unaligned requests on an O_DIRECT file take the engine's
//! path on both devices. On the /dev/fuse transport both devices take the
//! engine's path, and all of it holds the same.

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

/// Device `id` of format `fmt` on `img`, O_DIRECT, with `aio`.
fn spec(fmt: &str, id: &str, img: &str, aio: &str) -> String {
    json!({"driver": fmt, "id": id, "file": {"driver": "file", "filename": img,
           "aio": aio, "cache": {"direct": true}}})
    .to_string()
}

#[test]
fn raw_worker_transfers_match_the_engines_bytes_and_statistics() {
    same_as_the_engine("raw");
}

/// Every cluster allocated (preallocation=metadata), so writes land in
/// place and the file nodes see only the guest's requests and the loads of
/// L2 tables.
#[test]
fn qcow2_worker_transfers_match_the_engines_bytes_and_statistics() {
    same_as_the_engine("qcow2");
}

fn same_as_the_engine(fmt: &str) {
    let dir = TestDir::new(&format!("worker-io-{fmt}"));
    let prealloc = if fmt == "qcow2" { "metadata" } else { "off" };
    let [a, b] = ["a", "b"].map(|n| {
        let img = dir.file(&format!("{n}.{fmt}"));
        let opts = format!("preallocation={prealloc}");
        qemu_img(&["create", "-q", "-f", fmt, "-o", &opts, &img, "16M"]);
        img
    });
    let d = Daemon::start(
        &dir,
        &[
            spec(fmt, "d0", &a, "threads"),
            spec(fmt, "d1", &b, "native"),
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
                let what = format!("d{n}: read {i} at {off}+{len}");
                assert_same_bytes(&got, &model[at.clone()], &what);
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
        let (p0, p1) = (&s0["parent"]["stats"][k], &s1["parent"]["stats"][k]);
        assert_eq!(p1, p0, "file node {k}: {s0} {s1}");
    }
    for s in [&s0, &s1] {
        for k in ["rd_total_time_ns", "wr_total_time_ns"] {
            assert!(s["stats"][k].as_u64().unwrap() > 0, "{k}: {s}");
            let file = s["parent"]["stats"][k].as_u64().unwrap();
            assert!(file > 0, "file {k}: {s}");
        }
    }
    drop(files);
    d.quit();
    for img in [&a, &b] {
        let flat = format!("{img}.flat");
        qemu_img(&["convert", "-f", fmt, "-O", "raw", img, &flat]);
        assert_same_bytes(&std::fs::read(&flat).unwrap(), &model, img);
        if fmt == "qcow2" {
            assert_check_clean(img);
        }
    }
    assert!(images_identical(a.as_ref(), fmt, b.as_ref(), fmt));
}

/// The counters of a `BlockStats` tree, without its times and names.
fn counts(v: &Value) -> Value {
    let mut out = json!({});
    for k in [
        "rd_operations",
        "rd_bytes",
        "wr_operations",
        "wr_bytes",
        "wr_highest_offset",
    ] {
        out[k] = v["stats"][k].clone();
    }
    for child in ["parent", "backing"] {
        if v.get(child).is_some() {
            out[child] = counts(&v[child]);
        }
    }
    out
}

/// Reads through a qcow2 overlay, some of its clusters allocated: a read
/// of the overlay's clusters or of its backing file's alone may be a
/// worker's own transfer, one that spans both is not. Every node of the
/// chain counts the same requests either way.
#[test]
fn chain_worker_reads_match_the_engines_bytes_and_statistics() {
    let dir = TestDir::new("worker-io-chain");
    let base_data = pattern(1, SIZE as usize);
    let mut model = base_data.clone();
    let ids = ["d0", "d1"];
    let tops = ids.map(|id| {
        let base = dir.file(&format!("{id}-base.raw"));
        std::fs::write(&base, &base_data).unwrap();
        let top = qcow2_overlay(&dir, &format!("{id}.qcow2"), &base, "raw");
        qemu_io(
            "qcow2",
            top.as_ref(),
            &["write -P 0x5a 1M 3M", "write -P 0xa5 9M 64k"],
        );
        top
    });
    model[1 << 20..4 << 20].fill(0x5a);
    model[9 << 20..(9 << 20) + (64 << 10)].fill(0xa5);
    let d = Daemon::start(
        &dir,
        &[
            spec("qcow2", "d0", &tops[0], "threads"),
            spec("qcow2", "d1", &tops[1], "native"),
        ],
    );
    let files = ids.map(|id| rw(&d, id));
    let mut rng = Rng(0xc4a1);
    for i in 0..200 {
        let len = (1 + rng.below(16)) as usize * 4096;
        let off = rng.below(SIZE - len as u64) & !4095;
        for (f, id) in files.iter().zip(ids) {
            let mut got = vec![0u8; len];
            f.read_exact_at(&mut got, off).unwrap();
            let at = off as usize..off as usize + len;
            assert_same_bytes(&got, &model[at], &format!("{id}: read {i} at {off}+{len}"));
        }
    }
    let mut q = d.qmp();
    let (s0, s1) = (stats(&mut q, "d0"), stats(&mut q, "d1"));
    assert_eq!(s0["stats"]["rd_operations"], 200, "{s0}");
    assert!(
        s1["backing"]["stats"]["rd_operations"].as_u64().unwrap() > 0,
        "{s1}"
    );
    assert_eq!(counts(&s1), counts(&s0), "{s0}\n{s1}");
}
