//! qcow2 metadata overlap checks (`overlap-check`): images made by qemu-img
//! and qemu-io, then corrupted with plain file writes so that a guest
//! cluster (or an L2 table) points into metadata. Every write that would
//! land on that metadata must be refused with EIO, reported with
//! BLOCK_IMAGE_CORRUPTED (offset, size, fatal), set the corrupt bit, and
//! leave the metadata bytes as they were.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const CS: u64 = 65536;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// A guest cluster whose entry in any of these one-cluster tables is zero.
const FAR_CLUSTER: u64 = 1000;

fn be64(f: &File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at).expect("read image");
    u64::from_be_bytes(b)
}

fn put64(img: &str, at: u64, v: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open image");
    f.write_all_at(&v.to_be_bytes(), at).expect("write image");
}

fn cluster(img: &str, off: u64) -> Vec<u8> {
    let f = File::open(img).expect("open image");
    let mut b = vec![0u8; CS as usize];
    f.read_exact_at(&mut b, off).expect("read image");
    b
}

/// Where qemu-img put the metadata of an image.
#[derive(Debug, Clone, Copy)]
struct Layout {
    l1: u64,
    l2: u64,
    reftable: u64,
    refblock: u64,
    snapshots: u64,
    inactive_l1: u64,
    inactive_l2: u64,
}

/// A 64 MiB v3 image with guest cluster 0 written; with `snapshot`, a
/// snapshot of it is taken and cluster 0 written again, so the snapshot's
/// L2 table is inactive only.
fn make_image(dir: &TestDir, snapshot: bool) -> (String, Layout) {
    let img = qcow2_image(dir, "base.qcow2", "compat=1.1", "64M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x11 0 64k"]);
    if snapshot {
        qemu_img(&["snapshot", "-c", "s1", &img]);
        qemu_io("qcow2", img.as_ref(), &["write -P 0x22 0 64k"]);
    }
    let f = File::open(&img).expect("open image");
    let (l1, reftable) = (be64(&f, 40), be64(&f, 48));
    let mut lay = Layout {
        l1,
        l2: be64(&f, l1) & MASK,
        reftable,
        refblock: be64(&f, reftable) & MASK,
        snapshots: 0,
        inactive_l1: 0,
        inactive_l2: 0,
    };
    if snapshot {
        lay.snapshots = be64(&f, 64);
        lay.inactive_l1 = be64(&f, lay.snapshots);
        lay.inactive_l2 = be64(&f, lay.inactive_l1) & MASK;
        assert_ne!(
            lay.inactive_l2, lay.l2,
            "the active L2 table was not copied"
        );
    }
    (img, lay)
}

/// How the image is corrupted and what is done through the mount.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    /// L2 entry of cluster 0 = target | COPIED; pwrite (the fast path).
    Write,
    /// Same entry; FALLOC_FL_ZERO_RANGE over the cluster.
    Zero,
    /// Same entry; punch hole with discard=unmap.
    Discard,
    /// L2 entry without COPIED; pwrite (copy-on-write, then the old
    /// cluster's reference would be dropped).
    Cow,
    /// L2 entry = target | COPIED | zero flag; a partial pwrite reuses the
    /// preallocated cluster.
    Reuse,
    /// L1 entry 0 = target: a write to an unallocated cluster updates the
    /// "L2 table" there.
    AllocL2,
}

const CASES: [Case; 6] = [
    Case::Write,
    Case::Zero,
    Case::Discard,
    Case::Cow,
    Case::Reuse,
    Case::AllocL2,
];

/// The L2 entry pointing at `target`, or for the header (offset 0 means
/// "unallocated" in a data entry) a compressed cluster inside it.
fn entry(case: Case, target: u64) -> u64 {
    if target == 0 {
        return COMPRESSED | 0x200;
    }
    match case {
        Case::Cow => target,
        Case::Reuse => target | COPIED | 1,
        _ => target | COPIED,
    }
}

fn corrupt(img: &str, lay: &Layout, case: Case, target: u64) {
    match case {
        Case::AllocL2 => put64(img, lay.l1, target | COPIED),
        _ => put64(img, lay.l2, entry(case, target)),
    }
}

fn perform(dev: &File, case: Case) -> Result<(), i32> {
    let data = vec![0x5au8; 512];
    let pwrite = |at| {
        dev.write_all_at(&data, at)
            .map_err(|e| e.raw_os_error().unwrap_or(0))
    };
    match case {
        Case::Write | Case::Cow | Case::Reuse => pwrite(0),
        Case::AllocL2 => pwrite(FAR_CLUSTER * CS),
        Case::Zero => fallocate(dev, libc::FALLOC_FL_ZERO_RANGE, 0, CS),
        Case::Discard => fallocate(
            dev,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            CS,
        ),
    }
}

fn spec(id: &str, img: &str, overlap: Option<&str>) -> String {
    let mut v = json!({"driver": "qcow2", "id": id, "discard": "unmap",
        "file": {"driver": "file", "filename": img}});
    if let Some(o) = overlap {
        v["overlap-check"] = json!(o);
    }
    v.to_string()
}

fn corrupt_bit(img: &str) -> bool {
    let f = File::open(img).expect("open image");
    be64(&f, 72) & 2 != 0
}

/// The target cluster, the header's incompatible bits left out (the
/// corrupt bit is expected to change there).
fn metadata(img: &str, target: u64) -> Vec<u8> {
    let mut b = cluster(img, target);
    if target == 0 {
        b[72..80].fill(0);
    }
    b
}

/// Runs every case against metadata of `name` at `target`, each on its
/// own copy of the image, all in one daemon.
fn refuse_all(kind: &str, target: fn(&Layout) -> u64, snapshot: bool, overlap: Option<&str>) {
    let dir = TestDir::new(&format!("overlap-{}", kind.replace(' ', "-")));
    let (base, lay) = make_image(&dir, snapshot);
    let target = target(&lay);
    let cases: Vec<Case> = CASES
        .into_iter()
        .filter(|&c| {
            // An L1 entry may point at an active L2 table; the header
            // cannot be an L2 table (offset 0 is "unallocated").
            !(c == Case::AllocL2 && (kind == "active L2 table" || target == 0))
        })
        .collect();
    let mut specs = Vec::new();
    let mut imgs = Vec::new();
    for (i, &case) in cases.iter().enumerate() {
        let img = dir.file(&format!("c{i}.qcow2"));
        std::fs::copy(&base, &img).expect("copy image");
        corrupt(&img, &lay, case, target);
        specs.push(spec(&format!("d{i}"), &img, overlap));
        let before = metadata(&img, target);
        imgs.push((img, before));
    }
    let d = Daemon::start(&dir, &specs);
    let mut q = d.qmp();
    for (i, &case) in cases.iter().enumerate() {
        let id = format!("d{i}");
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.dev(&id))
            .expect("open device");
        assert_eq!(
            perform(&dev, case),
            Err(libc::EIO),
            "{kind}, {case:?}: not refused"
        );
        let ev = q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(20));
        let data = &ev["data"];
        assert_eq!(data["device"], id.as_str(), "{kind}, {case:?}: {ev}");
        assert_eq!(data["fatal"], true, "{kind}, {case:?}: {ev}");
        let msg = data["msg"].as_str().unwrap_or_default();
        let (offset, size) = (
            data["offset"].as_u64().expect("offset"),
            data["size"].as_u64().expect("size"),
        );
        // The header is reached through a compressed entry: every case
        // would drop that reference.
        let verb = match case {
            _ if target == 0 => "free of",
            Case::Write | Case::Reuse | Case::AllocL2 => "write on",
            Case::Zero | Case::Discard | Case::Cow => "free of",
        };
        if case == Case::AllocL2 {
            // The first metadata write that lands in the target refuses:
            // the L2 entry, or the refcount of the new data cluster when
            // the target is the refcount block (an active L2 table now).
            assert!(
                msg.starts_with("Preventing invalid write on metadata (overlaps with "),
                "{kind}: {msg}"
            );
            assert!(
                (target..target + CS).contains(&offset) && size <= CS,
                "{kind}, {case:?}: {ev}"
            );
        } else {
            assert_eq!(
                msg,
                format!("Preventing invalid {verb} metadata (overlaps with {kind})"),
                "{case:?}"
            );
            let (want_off, want_size) = match (case, target) {
                (_, 0) => (0x200, 512),
                (Case::Write, t) => (t, 512),
                (_, t) => (t, CS),
            };
            assert_eq!((offset, size), (want_off, want_size), "{kind}, {case:?}");
        }
        // Reads still work; writes are refused from now on.
        let mut buf = vec![0u8; 512];
        dev.read_exact_at(&mut buf, FAR_CLUSTER * CS)
            .expect("read after refusal");
        assert_eq!(
            dev.write_all_at(&buf, 2 * CS).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EIO)),
            "{kind}, {case:?}: write after refusal"
        );
    }
    q.ok("query-block", json!({}));
    assert!(d.terminate().success());
    for ((img, before), case) in imgs.iter().zip(&cases) {
        assert!(corrupt_bit(img), "{kind}, {case:?}: corrupt bit not set");
        assert!(
            metadata(img, target) == *before,
            "{kind}, {case:?}: metadata changed"
        );
    }
}

#[test]
fn header() {
    refuse_all("qcow2_header", |_| 0, false, None);
}

#[test]
fn active_l1() {
    refuse_all("active L1 table", |l| l.l1, false, None);
}

#[test]
fn active_l2() {
    refuse_all("active L2 table", |l| l.l2, false, None);
}

#[test]
fn refcount_table() {
    refuse_all("refcount table", |l| l.reftable, false, None);
}

#[test]
fn refcount_block() {
    refuse_all("refcount block", |l| l.refblock, false, None);
}

#[test]
fn snapshot_table() {
    refuse_all("snapshot table", |l| l.snapshots, true, None);
}

#[test]
fn inactive_l1() {
    refuse_all("inactive L1 table", |l| l.inactive_l1, true, None);
}

#[test]
fn inactive_l2_with_all() {
    refuse_all("inactive L2 table", |l| l.inactive_l2, true, Some("all"));
}

/// Writes through one device; returns the result, the events seen and the
/// daemon's log.
fn write_once(
    dir: &TestDir,
    img: &str,
    overlap: Option<&str>,
) -> (Result<(), i32>, Vec<Value>, String) {
    let d = Daemon::start(dir, &[spec("d0", img, overlap)]);
    let mut q = d.qmp();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .expect("open device");
    let r = perform(&dev, Case::Write);
    drop(dev);
    // Events are sent before the reply they precede; query-block flushes them.
    q.ok("query-block", json!({}));
    let events: Vec<Value> = q.events.drain(..).collect();
    let log = d.stderr();
    assert!(d.terminate().success());
    (r, events, log)
}

#[test]
fn inactive_l2_is_not_checked_by_cached() {
    let dir = TestDir::new("overlap-inactive-l2-cached");
    let (img, lay) = make_image(&dir, true);
    corrupt(&img, &lay, Case::Write, lay.inactive_l2);
    let (r, events, _) = write_once(&dir, &img, None);
    assert_eq!(r, Ok(()));
    assert!(events.is_empty(), "{events:?}");
    assert!(!corrupt_bit(&img));
    assert_eq!(cluster(&img, lay.inactive_l2)[..512], [0x5a; 512]);
}

/// The reported bug: L1[0] points at the L1 table itself, so guest cluster
/// 0 maps onto it. With the default checks the write is refused; with
/// `overlap-check=none` it goes through (so the check is what refuses).
#[test]
fn l1_entry_pointing_at_the_l1_table() {
    let dir = TestDir::new("overlap-l1-self");
    let (img, lay) = make_image(&dir, false);
    let none = dir.file("none.qcow2");
    let oracle = dir.file("qemu.qcow2");
    put64(&img, lay.l1, lay.l1 | COPIED);
    std::fs::copy(&img, &none).expect("copy image");
    std::fs::copy(&img, &oracle).expect("copy image");
    // QEMU refuses the same write.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512", &oracle])
        .output()
        .expect("run qemu-io");
    let qemu_log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let refusal = "Preventing invalid write on metadata (overlaps with active L1 table)";
    assert!(qemu_log.contains(refusal), "{qemu_log}");
    assert!(corrupt_bit(&oracle));
    let before = cluster(&img, lay.l1);
    let (r, events, log) = write_once(&dir, &img, None);
    assert_eq!(r, Err(libc::EIO));
    assert!(
        log.contains(&format!(
            "qcow2: Marking image as corrupt: {refusal}; further corruption events will be suppressed"
        )),
        "{log}"
    );
    let ev: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "BLOCK_IMAGE_CORRUPTED")
        .collect();
    assert_eq!(ev.len(), 1, "{events:?}");
    assert_eq!(
        ev[0]["data"],
        json!({"device": "d0", "msg": refusal, "offset": lay.l1, "size": 512, "fatal": true})
    );
    assert!(corrupt_bit(&img));
    assert!(cluster(&img, lay.l1) == before, "the L1 table changed");
    let dir2 = TestDir::new("overlap-l1-self-none");
    let (r, events, _) = write_once(&dir2, &none, Some("none"));
    assert_eq!(r, Ok(()));
    assert!(events.is_empty(), "{events:?}");
    assert!(!corrupt_bit(&none));
    assert_eq!(cluster(&none, lay.l1)[..512], [0x5a; 512]);
}

/// The per-kind keys override the template: with only `active-l1` off, the
/// same write lands (on a copy); `overlap-check.template=none` plus
/// `active-l1=on` refuses it again.
#[test]
fn per_kind_switches() {
    let dir = TestDir::new("overlap-switches");
    let (img, lay) = make_image(&dir, false);
    put64(&img, lay.l1, lay.l1 | COPIED);
    let off = dir.file("off.qcow2");
    std::fs::copy(&img, &off).expect("copy image");
    let d = Daemon::start(
        &dir,
        &[
            format!("driver=qcow2,id=on,file.driver=file,file.filename={img},overlap-check.template=none,overlap-check.active-l1=on"),
            json!({"driver": "qcow2", "id": "off", "file": {"driver": "file", "filename": off},
                   "overlap-check": {"active-l1": false, "active-l2": false}})
            .to_string(),
        ],
    );
    let open = |id: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.dev(id))
            .expect("open device")
    };
    assert_eq!(perform(&open("on"), Case::Write), Err(libc::EIO));
    assert_eq!(perform(&open("off"), Case::Write), Ok(()));
    assert!(d.terminate().success());
    assert!(corrupt_bit(&img));
    assert!(!corrupt_bit(&off));
}

/// An allocation that would hand out a metadata cluster is refused before
/// anything is written: here a refcount table entry points at the end of
/// the file, where the next cluster would be allocated.
#[test]
fn allocation_onto_metadata_is_refused() {
    let dir = TestDir::new("overlap-alloc");
    let (img, lay) = make_image(&dir, false);
    let end = std::fs::metadata(&img).expect("stat image").len();
    assert_eq!(end % CS, 0);
    put64(&img, lay.reftable + 8, end);
    let l2_before = cluster(&img, lay.l2);
    let d = Daemon::start(&dir, &[spec("d0", &img, None)]);
    let mut q = d.qmp();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .expect("open device");
    // Guest cluster 1 is unallocated: the write needs a new cluster.
    let r = dev.write_all_at(&[0x77; 4096], CS);
    assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    let ev = q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(20));
    assert_eq!(
        ev["data"],
        json!({"device": "d0", "msg": "Preventing invalid allocation on metadata (overlaps with refcount block)",
               "offset": end, "size": CS, "fatal": true})
    );
    let mut buf = vec![0u8; 4096];
    dev.read_exact_at(&mut buf, 0).expect("read after refusal");
    assert_eq!(buf, vec![0x11; 4096]);
    drop(dev);
    assert!(d.terminate().success());
    assert!(corrupt_bit(&img));
    assert!(cluster(&img, lay.l2) == l2_before, "the L2 table changed");
    assert_eq!(std::fs::metadata(&img).expect("stat image").len(), end);
}

/// Version 2 images have no corrupt bit: the write is refused and reported
/// the same, and writes stay refused while the image is open.
#[test]
fn version_2_image() {
    let dir = TestDir::new("overlap-v2");
    let img = qcow2_image(&dir, "v2.qcow2", "compat=0.10", "64M");
    qemu_io("qcow2", img.as_ref(), &["write -P 0x11 0 64k"]);
    let f = File::open(&img).expect("open image");
    let (l1, reftable) = (be64(&f, 40), be64(&f, 48));
    drop(f);
    let l2 = {
        let f = File::open(&img).expect("open image");
        be64(&f, l1) & MASK
    };
    // Guest cluster 0 points at the refcount table.
    put64(&img, l2, reftable | COPIED);
    let before = cluster(&img, reftable);
    let header = cluster(&img, 0);
    let d = Daemon::start(&dir, &[spec("d0", &img, None)]);
    let mut q = d.qmp();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.dev("d0"))
        .expect("open device");
    assert_eq!(perform(&dev, Case::Write), Err(libc::EIO));
    let ev = q.wait_event("BLOCK_IMAGE_CORRUPTED", Duration::from_secs(20));
    assert_eq!(
        ev["data"]["msg"],
        "Preventing invalid write on metadata (overlaps with refcount table)"
    );
    assert_eq!(ev["data"]["offset"], reftable);
    assert_eq!(
        dev.write_all_at(&[1u8; 512], 4 * CS)
            .map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO))
    );
    drop(dev);
    assert!(d.terminate().success());
    assert!(
        cluster(&img, reftable) == before,
        "the refcount table changed"
    );
    // No corrupt bit to set: the header (extensions after byte 72) is as it was.
    assert!(cluster(&img, 0) == header, "the header changed");
}
