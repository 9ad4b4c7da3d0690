//! `blkctl create`: images that qemu-img checks clean, describes as asked,
//! and that both qemu-io and the daemon write correctly.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

fn create(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin("blkctl"))
        .arg("create")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn info(img: &str) -> Value {
    serde_json::from_str(&qemu_img(&["info", "--output=json", img])).unwrap()
}

#[test]
fn created_images_are_valid_and_usable() {
    let dir = TestDir::new("create");
    for (name, opts, size, cluster, compat) in [
        ("a.qcow2", "cluster_size=65536", "64M", 65536, "1.1"),
        (
            "b.qcow2",
            "cluster_size=512,refcount_bits=1",
            "20M",
            512,
            "1.1",
        ),
        (
            "c.qcow2",
            "compat=0.10,cluster_size=2M",
            "1G",
            2 << 20,
            "0.10",
        ),
        (
            "d.qcow2",
            "refcount_bits=64,lazy_refcounts=on",
            "3G",
            65536,
            "1.1",
        ),
    ] {
        let img = dir.file(name);
        assert_eq!(create(&["-o", opts, &img, size]).0, 0, "{name}");
        qemu_img(&["check", &img]);
        let i = info(&img);
        assert_eq!(i["cluster-size"], cluster, "{name}: {i}");
        assert_eq!(
            i["format-specific"]["data"]["compat"], compat,
            "{name}: {i}"
        );
        qemu_io(
            "qcow2",
            img.as_ref(),
            &["write -P 0x31 1000 70000", "read -P 0x31 1000 70000"],
        );
        qemu_img(&["check", &img]);
    }
    // A chain made by blkctl alone, used through the daemon.
    let base = dir.file("base.raw");
    assert_eq!(create(&["-f", "raw", &base, "8M"]).0, 0);
    qemu_io("raw", base.as_ref(), &["write -P 0x44 0 8M"]);
    let top = dir.file("top.qcow2");
    assert_eq!(create(&["-b", "base.raw", "-F", "raw", &top]).0, 0);
    let i = info(&top);
    assert_eq!(i["virtual-size"], 8 << 20);
    assert_eq!(i["backing-filename"], "base.raw");
    assert_eq!(i["backing-filename-format"], "raw");
    let d = Daemon::start(
        &dir,
        &[
            json!({"driver": "qcow2", "id": "d0", "file": {"driver": "file", "filename": top}})
                .to_string(),
        ],
    );
    let f = OpenOptions::new().write(true).open(d.dev("d0")).unwrap();
    f.write_all_at(&pattern(5, 10_000), 123_456).unwrap();
    drop(f);
    assert!(d.terminate().success());
    qemu_img(&["check", &top]);
    let expected = dir.file("expected.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &base, &expected]);
    OpenOptions::new()
        .write(true)
        .open(&expected)
        .unwrap()
        .write_all_at(&pattern(5, 10_000), 123_456)
        .unwrap();
    assert!(images_identical(
        top.as_ref(),
        "qcow2",
        expected.as_ref(),
        "raw"
    ));
}

#[test]
fn bad_create_options_are_refused() {
    let dir = TestDir::new("create-bad");
    let img = dir.file("x.qcow2");
    for (args, want) in [
        (vec!["-o", "cluster_size=1000", &img, "1M"], "power of two"),
        (vec!["-o", "compat=2.0", &img, "1M"], "compat"),
        (vec!["-o", "refcount_bits=3", &img, "1M"], "refcount_bits"),
        (
            vec!["-o", "bogus=1", &img, "1M"],
            "Invalid parameter 'bogus'",
        ),
        (vec![&img], "size"),
        (vec!["-f", "bochs", &img, "1M"], "not supported"),
        (vec![&img, "12Q"], "invalid size"),
    ] {
        let (code, err) = create(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
