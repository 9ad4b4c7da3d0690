//! `x-passthrough`: a raw device on a regular file whose I/O the kernel
//! does itself (FUSE passthrough). The bytes are the file's, the engine
//! sees none of the I/O, and whatever would need to see it is refused.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

fn passthrough_spec(id: &str, file: &str) -> String {
    json!({"driver": "raw", "id": id, "x-passthrough": true,
           "file": {"driver": "file", "filename": file}})
    .to_string()
}

fn ops(q: &mut Qmp, id: &str) -> (u64, u64) {
    let s = device_stats(q, id);
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    (n("rd_operations"), n("wr_operations"))
}

#[test]
fn a_passthrough_device_is_its_file_and_bypasses_the_engine() {
    let dir = TestDir::new("passthrough-data");
    let img = raw_image(&dir, "disk.raw", "8M");
    qemu_io("raw", img.as_ref(), &["write -P 0x11 0 1M"]);
    let d = Daemon::start(&dir, &[passthrough_spec("d0", &img)]);
    let mut q = d.qmp();
    assert_eq!(query_block(&mut q, "d0")["inserted"]["x-passthrough"], true);

    let f = rw(&d, "d0");
    let mut got = vec![0u8; 1 << 20];
    f.read_exact_at(&mut got, 0)
        .expect("read through passthrough");
    assert_same_bytes(&got, &[0x11; 1 << 20], "the image's data");
    let data = pattern(7, 3 << 20);
    f.write_all_at(&data, 2 << 20)
        .expect("write through passthrough");
    f.sync_all().expect("fsync through passthrough");
    // The kernel did all of it: the engine counted nothing.
    assert_eq!(ops(&mut q, "d0"), (0, 0), "I/O went through the engine");
    // No extended attributes, answered so that the kernel stops asking
    // (it asked before every write, which serialized them).
    let path = std::ffi::CString::new(d.dev("d0").to_str().expect("utf-8 path")).expect("path");
    let name = std::ffi::CString::new("user.test").expect("name");
    let mut buf = [0u8; 16];
    // SAFETY: valid NUL-terminated strings and a buffer of the length given.
    let r = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((r, errno), (-1, Some(libc::EOPNOTSUPP)));
    drop(f);
    d.quit();

    // The file holds what was written, and the engine reads the same bytes.
    let expect = dir.file("expect.raw");
    std::fs::copy(&img, &expect).expect("copy the image");
    let mut e = std::fs::OpenOptions::new()
        .write(true)
        .open(&expect)
        .expect("open the copy");
    e.write_all_at(&data, 2 << 20)
        .expect("write the expectation");
    e.flush().expect("flush");
    assert!(images_identical(
        img.as_ref(),
        "raw",
        expect.as_ref(),
        "raw"
    ));
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let f = rw(&d, "d0");
    let mut back = vec![0u8; 3 << 20];
    f.read_exact_at(&mut back, 2 << 20)
        .expect("read through the engine");
    assert_same_bytes(&back, &data, "passthrough's writes read through the engine");
    let mut q = d.qmp();
    assert!(
        ops(&mut q, "d0").0 > 0,
        "the engine path did not count its reads"
    );
    assert!(query_block(&mut q, "d0")["inserted"]
        .get("x-passthrough")
        .is_none());
    drop(f);
    d.quit();
}

#[test]
fn what_must_see_the_io_is_refused_on_a_passthrough_device() {
    let dir = TestDir::new("passthrough-refusals");
    let img = raw_image(&dir, "disk.raw", "8M");
    let d = Daemon::start(&dir, &[passthrough_spec("d0", &img)]);
    let mut q = d.qmp();
    let refused = |(class, desc): (String, String), what: &str| {
        assert_eq!(class, "GenericError", "{what}: {desc}");
        assert!(
            desc.contains("x-passthrough") && desc.contains(what),
            "{what}: {desc}"
        );
    };
    let limits: Value = json!({"device": "d0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                               "iops": 100, "iops_rd": 0, "iops_wr": 0});
    refused(q.err("block_set_io_throttle", limits), "throttling");
    let target = dir.file("target.raw");
    refused(
        q.err(
            "drive-mirror",
            json!({"device": "d0", "target": target, "format": "raw", "sync": "full"}),
        ),
        "block job",
    );
    assert!(
        !std::path::Path::new(&target).exists(),
        "a refused mirror created its target"
    );
    refused(
        q.err(
            "drive-backup",
            json!({"device": "d0", "target": target, "format": "raw", "sync": "full"}),
        ),
        "block job",
    );
    let snap = dir.file("snap.qcow2");
    refused(
        q.err(
            "blockdev-snapshot-sync",
            json!({"device": "d0", "snapshot-file": snap}),
        ),
        "snapshot",
    );
    assert!(!std::path::Path::new(&snap).exists());
    // Clearing limits that were never set is harmless.
    let none = json!({"device": "d0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                      "iops": 0, "iops_rd": 0, "iops_wr": 0});
    q.ok("block_set_io_throttle", none);

    // Devices that cannot be passed through are refused when added.
    let qcow2 = qcow2_image(&dir, "disk.qcow2", "", "8M");
    let other = raw_image(&dir, "other.raw", "8M");
    for (opts, why) in [
        (
            json!({"driver": "qcow2", "id": "q0", "x-passthrough": true,
                   "file": {"driver": "file", "filename": qcow2}}),
            "raw device directly on a regular file",
        ),
        (
            json!({"driver": "raw", "id": "z0", "x-passthrough": true, "detect-zeroes": "on",
                   "file": {"driver": "file", "filename": other}}),
            "detect-zeroes",
        ),
        (
            json!({"driver": "raw", "id": "w0", "x-passthrough": true, "werror": "stop",
                   "file": {"driver": "file", "filename": other}}),
            "werror",
        ),
        (
            json!({"driver": "raw", "node-name": "n0", "x-passthrough": true,
                   "file": {"driver": "file", "filename": other}}),
            "needs an 'id'",
        ),
    ] {
        let (class, desc) = q.err("blockdev-add", json!({"options": opts}));
        assert_eq!(class, "GenericError", "{desc}");
        assert!(desc.contains(why), "expected '{why}' in: {desc}");
    }
    // Nothing of the refused adds holds the image: it can still be added.
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "ok0", "x-passthrough": true,
                           "file": {"driver": "file", "filename": other}}}),
    );
    d.quit();

    // Throttling given on the command line is refused at start.
    let spec = format!(
        "driver=raw,id=d0,x-passthrough=on,file.driver=file,file.filename={img},throttling.iops-total=100"
    );
    let mnt = dir.join("mnt2");
    let sock = dir.join("qmp2.sock");
    let (code, stderr) = run_blkfs(
        &[
            "--mount",
            mnt.to_str().expect("utf-8 path"),
            "--qmp",
            sock.to_str().expect("utf-8 path"),
            "--blockdev",
            &spec,
        ],
        Duration::from_secs(20),
    );
    assert_ne!(code, Some(0), "blkfs started: {stderr}");
    assert!(
        stderr.contains("x-passthrough") && stderr.contains("throttling"),
        "{stderr}"
    );
}
