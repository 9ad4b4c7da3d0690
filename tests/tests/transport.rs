//! The FUSE transports: requests reach the daemon through io_uring queue
//! entries (`--transport uring`) or through reads of /dev/fuse
//! (`--transport dev`), and both serve the same bytes. The rest of the
//! suite runs once per transport (scripts/test.sh).

use blkfs_tests::*;
use serde_json::json;
use std::os::unix::fs::FileExt;

/// Completions posted on the daemon's io_uring instances, from their
/// fdinfo (`CqTail`); with `aio=threads` the engine has no ring of its own,
/// so only FUSE queue entries count.
fn ring_completions(pid: u32) -> u64 {
    let mut total = 0;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("daemon fds");
    for fd in fds.flatten() {
        let is_ring = std::fs::read_link(fd.path())
            .map(|t| t.to_string_lossy().contains("io_uring"))
            .unwrap_or(false);
        if !is_ring {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("CqTail:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn uring_enabled() -> bool {
    let p = "/sys/module/fuse/parameters/enable_uring";
    std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "Y")
}

/// Reads and writes 200 blocks through the mount and checks them against
/// the image; returns the daemon's ring completions before and after.
fn exercise(transport: &str, name: &str) -> (u64, u64) {
    let dir = TestDir::new(name);
    let img = raw_image(&dir, "disk.raw", "8M");
    qemu_io("raw", img.as_ref(), &["write -P 0x3c 0 4M"]);
    let spec = raw_spec("d0", &img, json!({"aio": "threads"}));
    let d = Daemon::start_with(&dir, &[spec], &["--transport", transport])
        .unwrap_or_else(|e| panic!("daemon with --transport {transport}: {e}"));
    let f = rw(&d, "d0");
    let before = ring_completions(d.pid());
    let data = pattern(11, 4096);
    let mut got = vec![0u8; 4096];
    for i in 0..100u64 {
        f.read_exact_at(&mut got, i * 4096).expect("read");
        assert_same_bytes(&got, &[0x3c; 4096], "the image's data");
        f.write_all_at(&data, (4 << 20) + i * 4096).expect("write");
    }
    f.sync_all().expect("fsync");
    let after = ring_completions(d.pid());
    drop(f);
    d.quit();
    let expect = dir.join("expect.raw");
    std::fs::copy(&img, &expect).expect("copy");
    let g = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .expect("open");
    for i in 0..100u64 {
        g.write_all_at(&data, (4 << 20) + i * 4096)
            .expect("write expect");
    }
    drop(g);
    assert!(
        images_identical(img.as_ref(), "raw", &expect, "raw"),
        "the image differs from what was written through --transport {transport}"
    );
    (before, after)
}

#[test]
fn the_io_uring_transport_carries_every_request() {
    assert!(
        uring_enabled(),
        "FUSE over io_uring is off: as root, echo 1 > /sys/module/fuse/parameters/enable_uring \
         (scripts/test.sh does this)"
    );
    let (before, after) = exercise("uring", "transport-uring");
    // 100 reads + 100 writes + the fsync, each one completion at least.
    assert!(
        after - before >= 201,
        "only {} ring completions for 201 requests",
        after - before
    );
}

#[test]
fn the_dev_fuse_transport_uses_no_ring() {
    let (before, after) = exercise("dev", "transport-dev");
    assert_eq!(
        (before, after),
        (0, 0),
        "a ring is in use with --transport dev"
    );
}

#[test]
fn an_unknown_transport_is_refused() {
    let (code, err) = run_blkfs(
        &[
            "--mount",
            "/nonexistent/m",
            "--qmp",
            "/nonexistent/q",
            "--transport",
            "tcp",
        ],
        std::time::Duration::from_secs(10),
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("tcp") && err.contains("uring"), "{err}");
}

/// A 1 MiB read of a qcow2 image whose 4 KiB clusters lie in reverse order
/// on disk is 256 disk reads on the worker's own ring, twice what its
/// submission queue holds: the overflow must carry them, in order.
#[test]
fn a_read_of_more_pieces_than_the_ring_holds_is_whole() {
    assert!(
        uring_enabled(),
        "FUSE over io_uring is off (see scripts/test.sh)"
    );
    let dir = TestDir::new("transport-fragmented");
    let img = qcow2_image(&dir, "frag.qcow2", "cluster_size=4096", "4M");
    let cmds: Vec<String> = (0..256u64)
        .rev()
        .map(|i| format!("write -P {} {} 4k", i % 251 + 1, i * 4096))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", img.as_ref(), &cmds);
    let spec = json!({"driver": "qcow2", "id": "d0", "cache": {"direct": true},
                      "file": {"driver": "file", "filename": img, "aio": "native"}})
    .to_string();
    let d = Daemon::start_with(&dir, &[spec], &["--transport", "uring"])
        .unwrap_or_else(|e| panic!("daemon: {e}"));
    let f = std::fs::File::open(d.dev("d0")).expect("open");
    let mut got = vec![0u8; 1 << 20];
    for _ in 0..4 {
        f.read_exact_at(&mut got, 0).expect("read 1 MiB");
        for (i, block) in got.chunks(4096).enumerate() {
            let want = (i as u64 % 251 + 1) as u8;
            assert!(
                block.iter().all(|&b| b == want),
                "block {i} of the 1 MiB read is not its pattern {want:#x}"
            );
        }
    }
    drop(f);
    d.quit();
}
