//! host_device, host_cdrom and host_floppy on loop devices (losetup):
//! sizes from the device, O_DIRECT at the device's logical block size,
//! discards reaching the device, removable media reported in query-block,
//! an empty drive reported as such and a medium change seen, and the
//! refusals of files that are not devices.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::os::unix::fs::{FileExt, MetadataExt};

const M: u64 = 1 << 20;

/// A loop device over a file, detached on drop even when the test fails.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &str, extra: &[&str]) -> Loop {
        let mut args = vec!["--find", "--show"];
        args.extend(extra);
        args.push(file);
        let dev = run("losetup", &args).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        Loop { dev }
    }

    /// Re-reads the backing file's size (`losetup -c`): a medium change.
    fn refresh(&self) {
        run("losetup", &["-c", &self.dev]);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

fn host(driver: &str, id: &str, dev: &str, extra: Value) -> String {
    let mut file = json!({"driver": driver, "filename": dev});
    for (k, v) in obj(&extra) {
        file[k] = v.clone();
    }
    json!({"driver": "raw", "id": id, "file": file}).to_string()
}

fn block_info(d: &Daemon, id: &str) -> Value {
    query_block(&mut d.qmp(), id)
}

#[test]
fn host_device_reads_and_writes_a_loop_device() {
    let dir = TestDir::new("hostdev");
    let img = raw_image(&dir, "disk.img", "8M");
    qemu_io("raw", img.as_ref(), &["write -P 0x3c 0 8M"]);
    let lo = Loop::attach(&img, &[]);
    let spec = host(
        "host_device",
        "d0",
        &lo.dev,
        json!({"aio": "native", "cache": {"direct": true}}),
    );
    let d = Daemon::start(&dir, &[spec]);
    let info = block_info(&d, "d0");
    assert_eq!(info["inserted"]["image"]["virtual-size"], 8 * M, "{info}");
    assert_eq!(info["removable"], false, "{info}");
    assert!(info.get("tray_open").is_none(), "{info}");
    let nodes = d.qmp().ok("query-named-block-nodes", json!({}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["drv"] == "host_device" && n["file"] == lo.dev.as_str()),
        "{nodes}"
    );
    let f = rw(&d, "d0");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 4 * M).unwrap();
    assert_eq!(buf, vec![0x3c; 4096]);
    // Unaligned through O_DIRECT: the driver widens to the device's blocks.
    let data = pattern(5, 3000);
    f.write_all_at(&data, M + 100).unwrap();
    let mut back = vec![0u8; 3000];
    f.read_exact_at(&mut back, M + 100).unwrap();
    assert_eq!(back, data);
    // A device's size is fixed.
    let (_, desc) = d
        .qmp()
        .err("block_resize", json!({"device": "d0", "size": 16 * M}));
    assert!(desc.contains("Cannot grow/shrink a block device"), "{desc}");
    d.quit();
    drop(lo);
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[(M + 100) as usize..(M + 3100) as usize], &data[..]);
    assert_eq!(disk[(M + 99) as usize], 0x3c);
    assert_eq!(disk[(M + 3100) as usize], 0x3c);
}

#[test]
fn direct_io_follows_a_4k_logical_block_size() {
    let dir = TestDir::new("hostdev-4k");
    let img = raw_image(&dir, "disk.img", "4M");
    let lo = Loop::attach(&img, &["--sector-size", "4096"]);
    let spec = host(
        "host_device",
        "d0",
        &lo.dev,
        json!({"cache": {"direct": true}}),
    );
    let d = Daemon::start(&dir, &[spec]);
    let f = rw(&d, "d0");
    // 512-byte pieces, which the device itself would refuse under O_DIRECT.
    for i in 0..8u64 {
        f.write_all_at(&[i as u8 + 1; 512], 8192 + i * 512).unwrap();
    }
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, 8192).unwrap();
    for i in 0..8 {
        assert_eq!(back[i * 512..(i + 1) * 512], [i as u8 + 1; 512]);
    }
    d.quit();
}

#[test]
fn qcow2_on_a_host_device_gives_freed_clusters_back_to_it() {
    let dir = TestDir::new("hostdev-discard");
    let img = qcow2_image(&dir, "disk.qcow2", "", "32M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x5e 0 16M"]);
    let before = std::fs::metadata(&img).unwrap().blocks() * 512;
    let lo = Loop::attach(&img, &[]);
    let spec = json!({"driver": "qcow2", "id": "d0", "discard": "unmap",
                      "file": {"driver": "host_device", "filename": lo.dev}});
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let f = rw(&d, "d0");
    // Zeroing with unmap frees the clusters; qcow2 discards them on the device.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        8 * M,
    )
    .unwrap();
    let mut buf = vec![1u8; 4096];
    f.read_exact_at(&mut buf, 4 * M).unwrap();
    assert_eq!(buf, vec![0; 4096]);
    drop(f);
    d.quit();
    drop(lo);
    let after = std::fs::metadata(&img).unwrap().blocks() * 512;
    assert!(
        after + 6 * M <= before,
        "the device got the discards back: {before} -> {after} bytes allocated"
    );
    assert_check_clean(&img);
    let out = qemu_io_ro(
        "qcow2",
        img.as_ref(),
        &["read -P 0 0 8M", "read -P 0x5e 8M 8M"],
    );
    assert!(!out.contains("verification failed"), "{out}");
}

#[test]
fn host_cdrom_reports_its_medium_and_sees_a_change() {
    let dir = TestDir::new("hostcd");
    let disc = dir.file("disc.iso");
    std::fs::File::create(&disc).unwrap();
    let lo = Loop::attach(&disc, &[]);
    let spec = json!({"driver": "raw", "id": "cd0", "read-only": true,
                      "file": {"driver": "host_cdrom", "filename": lo.dev}})
    .to_string();
    let d = Daemon::start(&dir, &[spec]);
    // An empty drive: removable, no medium, no crash.
    let info = block_info(&d, "cd0");
    assert_eq!(info["removable"], true, "{info}");
    assert_eq!(info["locked"], false, "{info}");
    assert_eq!(info["tray_open"], false, "{info}");
    assert!(info.get("inserted").is_none(), "{info}");
    // A disc goes in.
    let data = pattern(11, 2 * M as usize);
    std::fs::write(&disc, &data).unwrap();
    lo.refresh();
    let info = block_info(&d, "cd0");
    assert_eq!(info["inserted"]["drv"], "raw", "{info}");
    assert_eq!(info["inserted"]["image"]["virtual-size"], 2 * M, "{info}");
    let nodes = d.qmp().ok("query-named-block-nodes", json!({}));
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["drv"] == "host_cdrom"),
        "{nodes}"
    );
    let got = std::fs::read(d.dev("cd0")).unwrap();
    assert_same_bytes(&got, &data, "the disc through the mount");
    d.quit();
}

#[test]
fn host_floppy_on_a_loop_device() {
    let dir = TestDir::new("hostfd");
    let img = raw_image(&dir, "floppy.img", "1440K");
    qemu_io("raw", img.as_ref(), &["write -P 0x7a 0 1440k"]);
    let lo = Loop::attach(&img, &[]);
    let d = Daemon::start(&dir, &[host("host_floppy", "fd0", &lo.dev, json!({}))]);
    let info = block_info(&d, "fd0");
    assert_eq!(info["removable"], true, "{info}");
    assert_eq!(info["tray_open"], false, "{info}");
    assert_eq!(
        info["inserted"]["image"]["virtual-size"],
        1440 * 1024,
        "{info}"
    );
    let f = rw(&d, "fd0");
    f.write_all_at(&[0x01; 512], 512).unwrap();
    drop(f);
    d.quit();
    drop(lo);
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(&disk[512..1024], &[0x01; 512]);
    assert_eq!(disk[1024], 0x7a);
}

#[test]
fn host_drivers_refuse_what_is_not_a_device() {
    let dir = TestDir::new("hostdev-refuse");
    let img = raw_image(&dir, "plain.img", "1M");
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    for (driver, want) in [
        ("host_device", "expects either a character or block device"),
        ("host_cdrom", "expects a block device"),
        ("host_floppy", "expects a block device"),
    ] {
        let (class, desc) = q.err(
            "blockdev-add",
            json!({"options": {"driver": "raw", "id": "x",
                               "file": {"driver": driver, "filename": img}}}),
        );
        assert_eq!(class, "GenericError");
        assert!(
            desc.contains(want) && desc.contains(&img),
            "{driver}: {desc}"
        );
    }
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "x",
                           "file": {"driver": "host_device", "filename": dir.file("none")}}}),
    );
    assert!(desc.contains("No such file"), "{desc}");
    q.ok("query-block", json!({}));
}
