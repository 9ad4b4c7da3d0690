//! Property test: random write / write-zeroes / discard / flush / reopen
//! sequences on a qcow2 image with a (shorter) raw backing file, checked
//! against an in-memory model after every step and by `qemu-img check` and
//! `qemu-img compare` at the end.

use blkfs_engine::drivers::wait;
use blkfs_engine::graph::Device;
use blkfs_engine::io::Buf;
use blkfs_engine::options::BlockdevOptions;
use blkfs_engine::Engine;
use blkfs_tests::*;
use serde_json::json;
use std::sync::Arc;

const SIZE: usize = 3 << 20;
const BACKING: usize = 2 << 20;

fn open(img: &str) -> (Arc<Engine>, Arc<Device>) {
    let engine = Engine::new();
    // No image locks: the test reopens the image in-process while the old
    // engine's last completions may still hold its descriptor for a moment.
    let spec = json!({"driver": "qcow2", "id": "d",
        "file": {"driver": "file", "filename": img, "locking": "off"}});
    let added = engine
        .graph
        .add(&BlockdevOptions::from_json(spec).unwrap())
        .unwrap();
    let dev = added.device.unwrap();
    (engine, dev)
}

fn run_case(cluster: u64, compat: &str, seed: u64) {
    let dir = TestDir::new(&format!("q2-model-{cluster}-{compat}-{seed}"));
    let base = dir.file("base.raw");
    std::fs::write(&base, pattern(seed, BACKING)).unwrap();
    let img = dir.file("top.qcow2");
    let opts = format!("cluster_size={cluster},compat={compat}");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        &base,
        "-F",
        "raw",
        &img,
        &SIZE.to_string(),
    ]);
    // The model, and which bytes are defined (discarded ones may read as anything).
    let mut model = pattern(seed, BACKING);
    model.resize(SIZE, 0);
    let mut defined = vec![true; SIZE];
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut _engine, mut dev) = open(&img);
    for step in 0..120 {
        let off = rng.below(SIZE as u64 - 1) as usize;
        // Mostly small requests, sometimes several clusters.
        let max = if rng.below(4) == 0 { 4 * cluster } else { 3000 };
        let len = (1 + rng.below(max) as usize).min(SIZE - off);
        match rng.below(10) {
            0..=5 => {
                let data = pattern(seed * 1000 + step, len);
                wait(|d| dev.write(off as u64, Buf::from_slice(&data), d)).unwrap();
                model[off..off + len].copy_from_slice(&data);
                defined[off..off + len].fill(true);
            }
            6 => {
                wait(|d| dev.write_zeroes(off as u64, len as u64, rng.below(2) == 0, d)).unwrap();
                model[off..off + len].fill(0);
                defined[off..off + len].fill(true);
            }
            7 => {
                wait(|d| dev.discard(off as u64, len as u64, d)).unwrap();
                defined[off..off + len].fill(false);
            }
            8 => wait(|d| dev.flush(d)).unwrap(),
            _ => {
                drop(dev);
                (_engine, dev) = open(&img);
            }
        }
        // Check a window around the request and one random window.
        for (start, n) in [
            (
                off.saturating_sub(cluster as usize),
                len + 2 * cluster as usize,
            ),
            (rng.below(SIZE as u64) as usize, 70_000),
        ] {
            let n = n.min(SIZE - start);
            let got = wait(|d| dev.read(start as u64, n, d)).unwrap();
            for i in 0..n {
                if defined[start + i] {
                    assert_eq!(
                        got[i],
                        model[start + i],
                        "cluster {cluster} compat {compat} seed {seed} step {step}: byte {} differs",
                        start + i
                    );
                }
            }
        }
    }
    // Make discarded bytes whatever the image says, then let qemu compare all.
    let all = wait(|d| dev.read(0, SIZE, d)).unwrap();
    for i in 0..SIZE {
        if !defined[i] {
            model[i] = all[i];
        }
    }
    drop(dev);
    let expected = dir.file("expected.raw");
    std::fs::write(&expected, &model).unwrap();
    let check = std::process::Command::new("qemu-img")
        .args(["check", &img])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert!(
        images_identical(img.as_ref(), "qcow2", expected.as_ref(), "raw"),
        "qemu-img disagrees with the model"
    );
}

#[test]
fn random_operations_match_the_model() {
    for (cluster, compat) in [
        (512, "1.1"),
        (4096, "1.1"),
        (65536, "1.1"),
        (4096, "0.10"),
        (65536, "0.10"),
    ] {
        for seed in 1..=3 {
            run_case(cluster, compat, seed);
        }
    }
}
