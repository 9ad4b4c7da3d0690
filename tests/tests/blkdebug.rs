//! The blkdebug filter through the mount: injected errors reach the caller
//! with their errno, rules follow events, sectors, `once` and the state
//! machine, a config file works like the options, `align` keeps data
//! intact, and qcow2 survives metadata write failures without corruption
//! (`qemu-img check` as the oracle).

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// A device of `format` over blkdebug (with `opts`) over `file`. The error
/// policies are explicit so errors keep reaching the caller once they apply.
fn spec(format: &str, id: &str, file: &str, opts: Value) -> String {
    let mut bd = json!({"driver": "blkdebug", "image": {"driver": "file", "filename": file}});
    for (k, v) in obj(&opts) {
        bd[k] = v.clone();
    }
    json!({"driver": format, "id": id, "rerror": "report", "werror": "report", "file": bd})
        .to_string()
}

fn read_errno(f: &File, len: usize, off: u64) -> Option<i32> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).err().map(|e| {
        e.raw_os_error()
            .unwrap_or_else(|| panic!("not an OS error: {e}"))
    })
}

fn write_errno(f: &File, data: &[u8], off: u64) -> Option<i32> {
    f.write_all_at(data, off).err().map(|e| {
        e.raw_os_error()
            .unwrap_or_else(|| panic!("not an OS error: {e}"))
    })
}

/// The daemon still answers and still lists the device.
fn assert_alive(d: &Daemon, id: &str) {
    let block = d.qmp().ok("query-block", json!({}));
    assert!(
        block.as_array().unwrap().iter().any(|b| b["device"] == id),
        "{block}"
    );
}

/// `qemu-img check`: leaks are allowed, corruption is not.
fn assert_no_corruption(img: &str) {
    let v = qemu_img_check(img);
    assert_eq!(v["check-errors"], 0, "{v}");
    assert!(v.get("corruptions").is_none_or(|c| c == 0), "{v}");
}

#[test]
fn read_error_reaches_the_caller_as_eio() {
    let dir = TestDir::new("bd-eio");
    let img = raw_image(&dir, "a.img", "1M");
    qemu_io("raw", img.as_ref(), &["write -P 0x5a 0 1M"]);
    let rules = json!({"inject-error": [{"event": "read_aio", "errno": 5}]});
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    // Writes raise write_aio only: nothing is armed yet.
    assert_eq!(write_errno(&f, &[1; 4096], 8192), None);
    assert_eq!(read_errno(&f, 4096, 0), Some(libc::EIO));
    assert_eq!(read_errno(&f, 512, 512 << 10), Some(libc::EIO), "not once");
    // An armed rule fails every request, as in QEMU, until an event re-arms the list.
    assert_eq!(write_errno(&f, &[2; 4096], 0), Some(libc::EIO));
    assert_alive(&d, "d0");
    let nodes = d.qmp().ok("query-named-block-nodes", json!({}));
    let bd = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["drv"] == "blkdebug")
        .unwrap_or_else(|| panic!("no blkdebug node: {nodes}"));
    assert_eq!(bd["file"], img.as_str());
    assert_eq!(bd["image"]["virtual-size"], 1 << 20);
    d.quit();
    let data = std::fs::read(&img).unwrap();
    assert!(data[8192..12288].iter().all(|&b| b == 1));
    assert!(
        data[..4096].iter().all(|&b| b == 0x5a),
        "failed write left no trace"
    );
}

#[test]
fn errno_and_immediately_are_honoured() {
    let dir = TestDir::new("bd-errno");
    let a = raw_image(&dir, "a.img", "1M");
    let b = raw_image(&dir, "b.img", "1M");
    let d = Daemon::start(
        &dir,
        &[
            spec(
                "raw",
                "d0",
                &a,
                json!({"inject-error": [{"event": "write_aio", "errno": 28}]}),
            ),
            spec(
                "raw",
                "d1",
                &b,
                json!({"inject-error": [
                    {"event": "read_aio", "errno": 1, "immediately": true}
                ]}),
            ),
        ],
    );
    let f = rw(&d, "d0");
    assert_eq!(read_errno(&f, 4096, 0), None);
    assert_eq!(write_errno(&f, &[7; 4096], 0), Some(libc::ENOSPC));
    let g = rw(&d, "d1");
    assert_eq!(read_errno(&g, 4096, 0), Some(libc::EPERM));
    assert_alive(&d, "d1");
}

#[test]
fn sector_rule_fails_only_requests_covering_it() {
    let dir = TestDir::new("bd-sector");
    let img = raw_image(&dir, "a.img", "1M");
    qemu_io("raw", img.as_ref(), &["write -P 0x11 0 1M"]);
    let rules = json!({"inject-error": [{"event": "read_aio", "sector": 16}]});
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    assert_eq!(read_errno(&f, 8192, 0), None, "sectors 0-15");
    assert_eq!(read_errno(&f, 4096, 8192), Some(libc::EIO), "sector 16");
    assert_eq!(read_errno(&f, 300, 8000), Some(libc::EIO), "across 15/16");
    assert_eq!(read_errno(&f, 1, 8192 + 511), Some(libc::EIO), "last byte");
    assert_eq!(read_errno(&f, 4096, 8192 + 512), None, "sector 17 on");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
}

#[test]
fn once_rule_fails_one_request() {
    let dir = TestDir::new("bd-once");
    let img = raw_image(&dir, "a.img", "1M");
    qemu_io("raw", img.as_ref(), &["write -P 0x22 0 1M"]);
    let rules = json!({"inject-error": [{"event": "read_aio", "once": true}]});
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    assert_eq!(read_errno(&f, 4096, 4096), Some(libc::EIO));
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x22));
    f.read_exact_at(&mut buf, 0).unwrap();
}

#[test]
fn flush_raises_flush_events() {
    let dir = TestDir::new("bd-flush");
    let img = raw_image(&dir, "a.img", "1M");
    let rules = json!({"inject-error": [{"event": "flush_to_disk", "once": true}]});
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    assert_eq!(read_errno(&f, 4096, 0), None);
    f.write_all_at(&[3; 4096], 0).unwrap();
    // The flush itself passes (flushes are never failed) but arms the rule.
    f.sync_all().unwrap();
    assert_eq!(read_errno(&f, 4096, 0), Some(libc::EIO));
    assert_eq!(read_errno(&f, 4096, 0), None);
}

/// Rules for the state machine test: fail L2 updates in state 2, which the
/// first cluster allocation enters.
fn state_rules() -> Value {
    json!({
        "inject-error": [{"event": "l2_update", "state": 2, "errno": 5}],
        "set-state": [{"event": "cluster_alloc", "state": 1, "new_state": 2}]
    })
}

const STATE_CONF: &str = r#"# The same rules as state_rules()
[inject-error]
event = "l2_update"
state = "2"
errno = "5"

[set-state]
event = "cluster_alloc"
state = "1"
new_state = "2"
"#;

/// An image whose first cluster is allocated (so its L2 table exists).
fn prepared_qcow2(dir: &TestDir, name: &str) -> String {
    let img = qcow2_image(dir, name, "", "16M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x33 0 64k"]);
    img
}

/// Overwriting an allocated cluster raises no allocation event and works; the
/// first allocating write moves the machine to state 2 and its L2 update fails.
fn check_state_machine(d: Daemon, id: &str, img: &str) {
    let f = rw(&d, id);
    assert_eq!(write_errno(&f, &[0x44; 4096], 0), None);
    // An L2 update in state 1 (a zero write of a whole allocated cluster
    // remaps it, with no allocation) does not fail either.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 65536).expect("zero range in state 1");
    assert_eq!(write_errno(&f, &[0x55; 4096], 1 << 20), Some(libc::EIO));
    assert_alive(&d, id);
    drop(f);
    d.quit();
    assert_no_corruption(img);
    let out = qemu_io_ro(
        "qcow2",
        img.as_ref(),
        &["read -P 0 0 64k", "read -P 0 1M 4k"],
    );
    assert!(out.contains("read 4096/4096"), "{out}");
}

#[test]
fn set_state_gates_error_rules() {
    let dir = TestDir::new("bd-state");
    let img = prepared_qcow2(&dir, "a.qcow2");
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, state_rules())]);
    check_state_machine(d, "d0", &img);
}

#[test]
fn without_the_state_change_the_rule_never_fires() {
    let dir = TestDir::new("bd-nostate");
    let img = prepared_qcow2(&dir, "a.qcow2");
    let rules = json!({"inject-error": [{"event": "l2_update", "state": 2}]});
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    f.write_all_at(&[0x55; 4096], 1 << 20).unwrap();
    f.write_all_at(&[0x66; 4096], 8 << 20).unwrap();
    drop(f);
    d.quit();
    assert_no_corruption(&img);
    qemu_io_ro(
        "qcow2",
        img.as_ref(),
        &["read -P 0x55 1M 4k", "read -P 0x66 8M 4k"],
    );
}

#[test]
fn config_file_rules_work_like_options() {
    let dir = TestDir::new("bd-conf");
    let img = prepared_qcow2(&dir, "a.qcow2");
    let conf = dir.file("blkdebug.conf");
    std::fs::write(&conf, STATE_CONF).unwrap();
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, json!({"config": conf}))]);
    check_state_machine(d, "d0", &img);
}

#[test]
fn config_file_and_option_rules_both_apply() {
    let dir = TestDir::new("bd-both");
    let img = raw_image(&dir, "a.img", "1M");
    let conf = dir.file("blkdebug.conf");
    let text = "[inject-error]\nevent = \"read_aio\"\nerrno = \"1\"\nonce = \"on\"\n";
    std::fs::write(&conf, text).unwrap();
    let opts = json!({
        "config": conf,
        "inject-error": [{"event": "write_aio", "errno": 28, "once": true}]
    });
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, opts)]);
    let f = rw(&d, "d0");
    assert_eq!(read_errno(&f, 4096, 0), Some(libc::EPERM), "from the file");
    assert_eq!(
        write_errno(&f, &[1; 4096], 0),
        Some(libc::ENOSPC),
        "from the options"
    );
    assert_eq!(read_errno(&f, 4096, 0), None);
    assert_eq!(write_errno(&f, &[1; 4096], 0), None);
}

#[test]
fn config_and_align_errors_fail_the_open() {
    let dir = TestDir::new("bd-conferr");
    let img = raw_image(&dir, "a.img", "1M");
    let conf = dir.file("bad.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n",
    )
    .unwrap();
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let add = |opts: Value| {
        let v: Value = serde_json::from_str(&spec("raw", "d1", &img, opts)).unwrap();
        v
    };
    let (class, desc) = q.err("blockdev-add", add(json!({"config": conf})));
    assert_eq!(class, "GenericError");
    assert_eq!(desc, format!("{conf}:3: 'errno' must be a number, not 'x'"));
    let (_, desc) = q.err(
        "blockdev-add",
        add(json!({"config": dir.file("none.conf")})),
    );
    assert!(
        desc.starts_with("Could not read blkdebug config file"),
        "{desc}"
    );
    for align in [3, -4096, 6000] {
        let (_, desc) = q.err("blockdev-add", add(json!({"align": align})));
        assert_eq!(desc, "Invalid alignment");
    }
    let (_, desc) = q.err(
        "blockdev-add",
        add(json!({"inject-error": [{"event": "read_aio", "errno": -1}]})),
    );
    assert!(desc.contains("Invalid errno -1"), "{desc}");
    // Nothing was registered by the failed attempts.
    q.ok("blockdev-add", add(json!({"align": 4096})));
    assert_eq!(list_dir(&d.mnt), ["d1"]);
}

#[test]
fn align_keeps_unaligned_writes_intact() {
    let dir = TestDir::new("bd-align");
    let img = raw_image(&dir, "a.img", "4M");
    qemu_io("raw", img.as_ref(), &["write -P 0x77 0 4M"]);
    let expected = dir.file("expected.img");
    std::fs::copy(&img, &expected).unwrap();
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, json!({"align": 4096}))]);
    // Four threads write interleaved 100-byte pieces: neighbours share 4 KiB
    // blocks, so a read-modify-write that is not serialised loses data.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = rw(&d, "d0");
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let off = 1000 + (i * 4 + t) * 100;
                    f.write_all_at(&pattern(off, 100), off).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let e = OpenOptions::new().write(true).open(&expected).unwrap();
    for i in 0..800u64 {
        let off = 1000 + i * 100;
        e.write_all_at(&pattern(off, 100), off).unwrap();
    }
    let f = rw(&d, "d0");
    let big = pattern(99, 70_001);
    f.write_all_at(&big, (1 << 20) + 3).unwrap();
    e.write_all_at(&big, (1 << 20) + 3).unwrap();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 2_000_001, 12_345).expect("unaligned zero range");
    e.write_all_at(&vec![0; 12_345], 2_000_001).unwrap();
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 3_000_000, 100).expect("zero range in one block");
    e.write_all_at(&[0; 100], 3_000_000).unwrap();
    // Unaligned reads are widened and cut.
    let mut got = vec![0u8; 70_001];
    f.read_exact_at(&mut got, (1 << 20) + 3).unwrap();
    assert!(got == big, "unaligned read back");
    f.sync_all().unwrap();
    drop(f);
    d.quit();
    assert!(
        images_identical(img.as_ref(), "raw", expected.as_ref(), "raw"),
        "image differs from the expected copy"
    );
}

#[test]
fn align_widens_the_range_rules_see() {
    let dir = TestDir::new("bd-alignsec");
    let img = raw_image(&dir, "a.img", "1M");
    // Sector 7 is the last of the first 4 KiB block.
    let opts = json!({"align": 4096, "inject-error": [{"event": "write_aio", "sector": 7}]});
    let d = Daemon::start(&dir, &[spec("raw", "d0", &img, opts)]);
    let f = rw(&d, "d0");
    assert_eq!(
        write_errno(&f, &[1; 10], 100),
        Some(libc::EIO),
        "widened to 0..4096"
    );
    assert_eq!(write_errno(&f, &[1; 10], 4196), None);
    assert_eq!(read_errno(&f, 1, 0), Some(libc::EIO));
}

#[test]
fn qcow2_survives_a_failed_refblock_update() {
    let dir = TestDir::new("bd-refblock");
    let img = qcow2_image(&dir, "a.qcow2", "", "16M");
    let rules = json!({"inject-error": [{"event": "refblock_update", "once": true}]});
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    assert_eq!(write_errno(&f, &pattern(1, 65536), 0), Some(libc::EIO));
    assert_alive(&d, "d0");
    // The rule fired once: the next allocating write succeeds.
    f.write_all_at(&pattern(2, 65536), 4 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    d.quit();
    assert_no_corruption(&img);
    let out = qemu_io_ro("qcow2", img.as_ref(), &["read -P 0 0 64k"]);
    assert!(out.contains("read 65536/65536"), "{out}");
    let raw = dir.file("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &img, &raw]);
    let data = std::fs::read(&raw).unwrap();
    assert!(data[4 << 20..(4 << 20) + 65536] == pattern(2, 65536)[..]);
}

#[test]
fn qcow2_l2_load_error_fails_the_request_only() {
    let dir = TestDir::new("bd-l2load");
    let img = prepared_qcow2(&dir, "a.qcow2");
    let rules = json!({"inject-error": [{"event": "l2_load", "once": true}]});
    let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, rules)]);
    let f = rw(&d, "d0");
    // The L2 table is read on first use, and that read fails.
    assert_eq!(write_errno(&f, &[0x99; 4096], 4096), Some(libc::EIO));
    assert_alive(&d, "d0");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    f.write_all_at(&[0x99; 4096], 4096).unwrap();
    drop(f);
    d.quit();
    assert_no_corruption(&img);
    qemu_io_ro(
        "qcow2",
        img.as_ref(),
        &["read -P 0x33 0 4k", "read -P 0x99 4k 4k"],
    );
}

/// How an event-coverage case prepares its image.
#[derive(Clone, Copy)]
enum Image {
    /// `qemu-img create -o OPTS` (may be empty), nothing written.
    Fresh(&'static str),
    /// Cluster 0 written by qemu-io (its L2 table exists on disk).
    Prepared,
    /// Prepared, then an internal snapshot shares its tables.
    Snapshot,
    /// A raw backing file with data; the qcow2 overlay is empty.
    Backing,
    /// Cluster 0 is compressed.
    Compressed,
}

#[derive(Clone, Copy)]
enum Act {
    Open,
    Read(u64, usize),
    Write(u64, usize),
}

fn event_image(dir: &TestDir, kind: Image) -> String {
    match kind {
        Image::Fresh(opts) => qcow2_image(dir, "a.qcow2", opts, "16M"),
        Image::Prepared => prepared_qcow2(dir, "a.qcow2"),
        Image::Snapshot => {
            let img = prepared_qcow2(dir, "a.qcow2");
            qemu_img(&["snapshot", "-c", "s1", &img]);
            img
        }
        Image::Backing => {
            let base = raw_image(dir, "base.raw", "16M");
            qemu_io("raw", base.as_ref(), &["write -P 0x12 0 1M"]);
            let img = dir.file("a.qcow2");
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", &base, "-F", "raw", &img, "16M",
            ]);
            img
        }
        Image::Compressed => {
            let src = raw_image(dir, "src.raw", "16M");
            qemu_io("raw", src.as_ref(), &["write -P 0x13 0 64k"]);
            let img = dir.file("a.qcow2");
            qemu_img(&[
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", &src, &img,
            ]);
            img
        }
    }
}

/// Every event qcow2 (and the flush path) can raise reaches the blkdebug
/// node below it. Observed through the state machine: the event under test
/// moves to state 2, where the flush arms a one-shot error for the next write.
#[test]
fn qcow2_raises_its_events() {
    let write_fresh = (Image::Fresh(""), Act::Write(0, 65536));
    let many_refblocks = (
        Image::Fresh("cluster_size=512,refcount_bits=64"),
        Act::Write(0, 5 << 19),
    );
    let cases: &[(&str, (Image, Act))] = &[
        ("reftable_load", (Image::Prepared, Act::Open)),
        ("l2_load", (Image::Prepared, Act::Read(0, 4096))),
        ("read_aio", (Image::Prepared, Act::Read(0, 4096))),
        ("write_aio", (Image::Prepared, Act::Write(0, 4096))),
        ("cluster_alloc", write_fresh),
        ("l1_update", write_fresh),
        ("l2_alloc.write", write_fresh),
        ("l2_update", write_fresh),
        ("refblock_load", write_fresh),
        ("refblock_update", write_fresh),
        ("refblock_update_part", write_fresh),
        ("cow_read", (Image::Fresh(""), Act::Write(4096, 4096))),
        ("cow_write", (Image::Fresh(""), Act::Write(4096, 4096))),
        // A zero write without unmap keeps its clusters (as QEMU's): the
        // copy-on-write of a compressed cluster frees one.
        ("cluster_free", (Image::Compressed, Act::Write(0, 4096))),
        (
            "l2_alloc.cow_read",
            (Image::Snapshot, Act::Write(4096, 4096)),
        ),
        ("read_backing_aio", (Image::Backing, Act::Read(0, 4096))),
        ("read_compressed", (Image::Compressed, Act::Read(0, 4096))),
        ("refblock_alloc", many_refblocks),
        ("refblock_alloc.write", many_refblocks),
        ("refblock_alloc.hookup", many_refblocks),
        ("reftable_update", many_refblocks),
        ("reftable_grow", many_refblocks),
        ("refblock_alloc.write_blocks", many_refblocks),
        ("refblock_alloc.write_table", many_refblocks),
        ("refblock_alloc.switch_table", many_refblocks),
        ("flush_to_os", (Image::Prepared, Act::Open)),
        // Never raised: the control that the check can fail.
        ("vmstate_save", (Image::Prepared, Act::Write(0, 4096))),
    ];
    for &(event, (kind, act)) in cases {
        let dir = TestDir::new("bd-events");
        let img = event_image(&dir, kind);
        let rules = json!({
            "set-state": [{"event": event, "new_state": 2}],
            "inject-error": [{"event": "flush_to_disk", "state": 2, "once": true}]
        });
        let d = Daemon::start(&dir, &[spec("qcow2", "d0", &img, rules)]);
        let f = rw(&d, "d0");
        // The armed error fails the first request after the flush that
        // arms it: the act itself (a write that frees a cluster flushes
        // before the refcount drops), the sync, or the write at 0, which
        // always reaches blkdebug (a read may not: zero clusters and
        // backing files are read without it). Once, and only then.
        let act = match act {
            Act::Open => None,
            Act::Read(off, len) => {
                assert_eq!(read_errno(&f, len, off), None, "{event}");
                None
            }
            // One call: a request failing after others succeeded makes
            // it short, which a retrying write would hide.
            Act::Write(off, len) => match f.write_at(&pattern(off, len), off) {
                Ok(n) if n == len => None,
                Ok(_) => Some(libc::EIO),
                Err(e) => e.raw_os_error(),
            },
        };
        let sync = f.sync_all().err().and_then(|e| e.raw_os_error());
        let write = write_errno(&f, &[0xee; 512], 0);
        let errors: Vec<i32> = [act, sync, write].into_iter().flatten().collect();
        let want: &[i32] = if event == "vmstate_save" {
            &[]
        } else {
            &[libc::EIO]
        };
        assert_eq!(errors, want, "event {event}: act, sync, write");
        assert_eq!(write_errno(&f, &[0xee; 512], 0), None, "{event}: once");
        drop(f);
        d.quit();
        assert_no_corruption(&img);
    }
}

/// A qcow2 metadata batch writes its refcounts durably (FUA, which blkdebug
/// sees as a flush) before its L2 entries, with and without the page cache,
/// so a power loss cannot keep an L2 entry whose cluster's refcount never
/// reached the disk. blkdebug sees the order: the flush moves its state to
/// 2, where L2 updates fail.
#[test]
fn qcow2_metadata_batches_make_refcounts_durable_before_l2() {
    let dir = TestDir::new("bd-barrier");
    let rules = json!({
        "inject-error": [{"event": "l2_update", "state": 2, "errno": 5}],
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]
    });
    for direct in [true, false] {
        let img = prepared_qcow2(&dir, &format!("barrier-{direct}.qcow2"));
        let mut s: Value =
            serde_json::from_str(&spec("qcow2", "d0", &img, rules.clone())).expect("spec is JSON");
        s["cache"] = json!({"direct": direct});
        let d = Daemon::start(&dir, &[s.to_string()]);
        let f = rw(&d, "d0");
        // Cluster 1 is new: its refcount and its L2 entry change together.
        let got = write_errno(&f, &[0x55; 65536], 65536);
        assert_eq!(
            got,
            Some(libc::EIO),
            "allocating write, cache.direct={direct}"
        );
        drop(f);
        d.quit();
    }
}

/// A new L2 table's refcount is durable before the L1 entry that points
/// to it is written (through, not in a batch): the FUA write of the
/// refcount moves blkdebug to state 2, where L1 updates fail.
#[test]
fn qcow2_new_table_refcount_is_durable_before_its_l1_entry() {
    let dir = TestDir::new("bd-l1");
    let rules = json!({
        "inject-error": [{"event": "l1_update", "state": 2, "errno": 5}],
        "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}]
    });
    for direct in [true, false] {
        let img = qcow2_image(&dir, &format!("l1-{direct}.qcow2"), "", "16M");
        let mut s: Value =
            serde_json::from_str(&spec("qcow2", "d0", &img, rules.clone())).expect("spec is JSON");
        s["cache"] = json!({"direct": direct});
        let d = Daemon::start(&dir, &[s.to_string()]);
        let f = rw(&d, "d0");
        // The image has no L2 table yet: the first write allocates one.
        let got = write_errno(&f, &[0x5a; 4096], 0);
        assert_eq!(got, Some(libc::EIO), "first write, cache.direct={direct}");
        drop(f);
        d.quit();
        assert_no_corruption(&img);
    }
}

/// The other order: a freed cluster's L2 entry is removed and flushed
/// before its refcount drops (QEMU's dependency of the refcount cache on
/// the L2 cache), so a power loss cannot leave an entry pointing at a
/// cluster counted free. The L2 update moves blkdebug to state 2, where
/// refcount updates fail; the flush moves it on to 3.
#[test]
fn qcow2_freed_cluster_refcount_drops_after_its_l2_removal_is_flushed() {
    let dir = TestDir::new("bd-release");
    let rules = json!({
        "inject-error": [{"event": "refblock_update", "state": 2, "errno": 5}],
        "set-state": [
            {"event": "l2_update", "state": 1, "new_state": 2},
            {"event": "flush_to_disk", "state": 2, "new_state": 3}
        ]
    });
    for direct in [true, false] {
        let img = prepared_qcow2(&dir, &format!("release-{direct}.qcow2"));
        let mut s: Value =
            serde_json::from_str(&spec("qcow2", "d0", &img, rules.clone())).expect("spec is JSON");
        s["cache"] = json!({"direct": direct});
        s["discard"] = json!("unmap");
        let d = Daemon::start(&dir, &[s.to_string()]);
        let f = rw(&d, "d0");
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(&f, punch, 0, 65536).expect("discard of an allocated cluster");
        f.sync_all().expect("flush after the discard");
        drop(f);
        d.quit();
        assert_no_corruption(&img);
        let map: Value =
            serde_json::from_str(&qemu_img(&["map", "--output=json", "-f", "qcow2", &img]))
                .expect("map is JSON");
        assert_eq!(map[0]["start"], 0, "{map}");
        assert_eq!(map[0]["data"], false, "the cluster is unmapped: {map}");
        // check exits non-zero on leaks: the cluster was freed too.
        let check = qemu_img(&["check", "--output=json", "-f", "qcow2", &img]);
        assert!(!check.contains("\"leaks\""), "{check}");
    }
}
