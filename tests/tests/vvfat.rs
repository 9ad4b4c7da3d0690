//! The vvfat driver through the mount: a host directory tree exported as a
//! FAT disk is a file system `fsck.fat` passes and from which mtools copies
//! every file back (long names, bytes and dates intact), for each FAT type
//! on the hard disk and on floppies; files that shrink or vanish after the
//! open read as zeroes; what cannot be exported is refused with a clear
//! error while the daemon goes on answering.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const SECTOR: u64 = 512;
/// The hard disk's partition starts on the second track (63 sectors).
const PARTITION: u64 = 63 * SECTOR;

/// Fails (never skips) when a tool the checks need is missing.
fn require(tool: &str, package: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        std::env::split_paths(&path).any(|d| d.join(tool).is_file()),
        "{tool} is missing: install {package} (apt-get install {package}); .ci/run does"
    );
}

fn require_tools() {
    require("fsck.fat", "dosfstools");
    require("mcopy", "mtools");
    require("mdir", "mtools");
}

/// Runs an mtools command on the file system image `fs`.
fn mtools(cmd: &str, fs: &Path, args: &[&str]) -> String {
    let fs = fs.to_string_lossy();
    let mut all = vec!["-i", fs.as_ref()];
    all.extend_from_slice(args);
    let out = std::process::Command::new(cmd)
        .args(&all)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {all:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// A tree with what a FAT export must get right: nested and empty
/// directories, exact 8.3 names, lower case, long names, names whose 8.3
/// forms collide (one of them with a host file that already has the
/// generated name), non-ASCII names, an empty file, a file of exactly one
/// cluster, a `big` file with a pattern, a file with a known date.
fn build_tree(src: &Path, cluster: usize, big: usize) {
    write(&src.join("README.TXT"), b"exact short name\n");
    write(&src.join("readme.md"), b"lower case\n");
    write(&src.join("Long File Name With Spaces.txt"), b"long\n");
    for i in 1..=3 {
        write(
            &src.join(format!("collide-{i}-long.txt")),
            format!("{i}\n").as_bytes(),
        );
    }
    write(&src.join("COLLID~1.TXT"), b"here first, really\n");
    write(&src.join("empty"), b"");
    write(&src.join("one-cluster.bin"), &pattern(1, cluster));
    write(&src.join("big.bin"), &pattern(2, big));
    write(&src.join("sub/nested/deeper/file.txt"), b"deep\n");
    write(&src.join("sub/Ünïcödé ñame.txt"), "ünïcödé\n".as_bytes());
    write(&src.join("sub/日本語のファイル名.txt"), "日本\n".as_bytes());
    write(&src.join("sub/odd.cluster+1"), &pattern(3, cluster + 1));
    std::fs::create_dir_all(src.join("sub/empty-dir")).unwrap();
    let dated = src.join("dated.txt");
    write(&dated, b"dated\n");
    run(
        "touch",
        &["-m", "-d", "2021-03-04 05:06:08", &dated.to_string_lossy()],
    );
}

/// A sparse copy of `len` bytes of the mounted disk from `from`.
fn copy_out(disk: &Path, from: u64, len: u64, to: &Path) {
    let mut src = File::open(disk).unwrap();
    src.seek(SeekFrom::Start(from)).unwrap();
    let mut dst = File::create(to).unwrap();
    dst.set_len(len).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = buf.len().min((len - at) as usize);
        src.read_exact(&mut buf[..n]).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at)).unwrap();
            dst.write_all(&buf[..n]).unwrap();
        }
        at += n as u64;
    }
}

/// Every path under `root`, relative, sorted.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// mtools copies back exactly the tree of `src`: names, bytes and file
/// dates (to FAT's two seconds).
fn assert_same_tree(fs: &Path, src: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    mtools(
        "mcopy",
        fs,
        &["-s", "-m", "::/", &format!("{}/", out.display())],
    );
    let (want, got) = (walk(src), walk(out));
    assert_eq!(got, want, "the tree mtools sees differs from the host's");
    for rel in &want {
        let (s, o) = (src.join(rel), out.join(rel));
        if s.is_dir() {
            assert!(o.is_dir(), "{} is not a directory", rel.display());
            continue;
        }
        let what = format!("{}", rel.display());
        assert_same_bytes(
            &std::fs::read(&o).unwrap(),
            &std::fs::read(&s).unwrap(),
            &what,
        );
        let (a, b) = (mtime(&s), mtime(&o));
        let diff = a
            .duration_since(b)
            .or_else(|_| b.duration_since(a))
            .unwrap();
        assert!(
            diff <= Duration::from_secs(2),
            "{what}: dates differ by {diff:?}"
        );
    }
}

/// One export: the disk kind, what fsck.fat must report, the sizes.
struct Case {
    opts: Value,
    floppy: bool,
    /// fsck.fat -v's "N bit entries".
    fat_bits: u32,
    disk_bytes: u64,
    cluster: usize,
    big: usize,
}

/// Exports a fresh tree as `case` says and checks the file system.
fn check_export(name: &str, case: Case) {
    require_tools();
    let dir = TestDir::new(name);
    let src = dir.join("src");
    build_tree(&src, case.cluster, case.big);
    let mut spec = json!({"driver": "vvfat", "id": "d0", "dir": src});
    for (k, v) in obj(&case.opts) {
        spec[k] = v.clone();
    }
    let d = Daemon::start(&dir, &[spec.to_string()]);
    let disk = d.dev("d0");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), case.disk_bytes);

    let mut q = d.qmp();
    let b = query_block(&mut q, "d0");
    let inserted = &b["inserted"];
    assert_eq!(inserted["drv"], "vvfat", "{b}");
    assert_eq!(inserted["ro"], true, "{b}");
    assert_eq!(inserted["image"]["virtual-size"], case.disk_bytes, "{b}");
    let filename = inserted["image"]["filename"].as_str().unwrap();
    assert!(
        filename.starts_with("fat:") && filename.ends_with(&*src.to_string_lossy()),
        "{b}"
    );

    let fs = dir.join("fs.img");
    let mut head = [0u8; 512];
    File::open(&disk).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(&head[510..], &[0x55, 0xaa]);
    if case.floppy {
        copy_out(&disk, 0, case.disk_bytes, &fs);
    } else {
        // The MBR's one partition: from sector 63 to the end.
        let le32 = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap()) as u64;
        assert_eq!(le32(0x1be + 8) * SECTOR, PARTITION);
        assert_eq!(
            (le32(0x1be + 8) + le32(0x1be + 12)) * SECTOR,
            case.disk_bytes
        );
        copy_out(&disk, PARTITION, case.disk_bytes - PARTITION, &fs);
    }

    let report = run("fsck.fat", &["-n", "-v", &fs.to_string_lossy()]);
    assert!(
        report.contains(&format!("{} bit entries", case.fat_bits)),
        "not FAT{}:\n{report}",
        case.fat_bits
    );
    assert!(
        report.contains(&format!("{} bytes per cluster", case.cluster)),
        "{report}"
    );

    let listing = mtools("mdir", &fs, &["-/", "::"]);
    assert!(
        listing.contains("Volume in drive : is QEMU VVFAT"),
        "{listing}"
    );
    // mdir's line of a short name: "NAME     EXT   size date time  long name".
    let line = |short: &str| {
        listing
            .lines()
            .find(|l| l.starts_with(short))
            .unwrap_or_else(|| panic!("mdir lacks {short}:\n{listing}"))
            .trim_end()
    };
    // The host's COLLID~1.TXT keeps its name; the long names that collide count on.
    assert!(line("COLLID~1 TXT").contains(" 19 "), "{listing}");
    for (short, long) in [
        ("COLLID~2 TXT", "collide-1-long.txt"),
        ("COLLID~3 TXT", "collide-2-long.txt"),
        ("COLLID~4 TXT", "collide-3-long.txt"),
        ("LONGFI~1 TXT", "Long File Name With Spaces.txt"),
        ("README   MD ", "readme.md"),
        ("ONE-CL~1 BIN", "one-cluster.bin"),
        ("EMPTY       ", "empty"),
    ] {
        assert!(
            line(short).ends_with(long),
            "{short} is not {long}:\n{listing}"
        );
    }
    // An exact 8.3 name needs no long name.
    let readme = line("README   TXT");
    assert!(
        readme.contains(" 17 ") && readme.split_whitespace().last().unwrap().contains(':'),
        "{readme}"
    );
    let dated = line("DATED    TXT");
    assert!(
        dated.contains("2021-03-04") && dated.contains(" 5:06"),
        "{dated}"
    );
    let sub = mtools("mdir", &fs, &["::/sub"]);
    for long in [
        "Ünïcödé ñame.txt",
        "日本語のファイル名.txt",
        "odd.cluster+1",
        "empty-dir",
    ] {
        assert!(sub.contains(long), "mdir ::/sub lacks {long}:\n{sub}");
    }

    assert_same_tree(&fs, &src, &dir.join("out"));
    d.quit();
}

#[test]
fn hard_disk_fat16_by_default() {
    check_export(
        "vvfat-fat16",
        Case {
            opts: json!({}),
            floppy: false,
            fat_bits: 16,
            disk_bytes: 1024 * 16 * 63 * SECTOR,
            cluster: 8192,
            big: 3 << 20,
        },
    );
}

#[test]
fn hard_disk_fat12() {
    check_export(
        "vvfat-fat12",
        Case {
            opts: json!({"fat-type": 12}),
            floppy: false,
            fat_bits: 12,
            disk_bytes: 64 * 16 * 63 * SECTOR,
            cluster: 8192,
            big: 3 << 20,
        },
    );
}

#[test]
fn hard_disk_fat32() {
    check_export(
        "vvfat-fat32",
        Case {
            opts: json!({"fat-type": 32}),
            floppy: false,
            fat_bits: 32,
            disk_bytes: 1024 * 16 * 63 * SECTOR,
            cluster: 4096,
            big: 5 << 20,
        },
    );
}

#[test]
fn floppy_288_fat12_by_default() {
    check_export(
        "vvfat-floppy",
        Case {
            opts: json!({"floppy": true}),
            floppy: true,
            fat_bits: 12,
            disk_bytes: 80 * 2 * 36 * SECTOR,
            cluster: 1024,
            big: 1 << 20,
        },
    );
}

#[test]
fn floppy_144_fat12() {
    check_export(
        "vvfat-floppy12",
        Case {
            opts: json!({"floppy": true, "fat-type": 12}),
            floppy: true,
            fat_bits: 12,
            disk_bytes: 80 * 2 * 18 * SECTOR,
            cluster: 512,
            big: 700 << 10,
        },
    );
}

#[test]
fn floppy_288_fat16() {
    check_export(
        "vvfat-floppy16",
        Case {
            opts: json!({"floppy": true, "fat-type": 16}),
            floppy: true,
            fat_bits: 16,
            disk_bytes: 80 * 2 * 36 * SECTOR,
            cluster: 512,
            big: 2 << 20,
        },
    );
}

/// Symbolic links are followed; dangling ones and loops are skipped with a
/// warning. Files that shrink after the open read as zeroes past their new
/// end, vanished files as zeroes (with a warning), and the disk stays a
/// clean file system.
#[test]
fn symlinks_and_files_changing_under_the_export() {
    require_tools();
    let dir = TestDir::new("vvfat-changes");
    let src = dir.join("src");
    write(&src.join("target.txt"), b"through a link\n");
    write(&src.join("shrinks.bin"), &pattern(4, 64 << 10));
    write(&src.join("vanishes.bin"), &pattern(5, 16 << 10));
    std::fs::create_dir_all(src.join("loop")).unwrap();
    std::os::unix::fs::symlink("target.txt", src.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("nowhere", src.join("dangling")).unwrap();
    std::os::unix::fs::symlink("..", src.join("loop/up")).unwrap();
    std::os::unix::fs::symlink("self", src.join("self")).unwrap();
    let spec = json!({"driver": "vvfat", "id": "d0", "dir": src, "floppy": true});
    let d = Daemon::start(&dir, &[spec.to_string()]);

    let stderr = d.stderr();
    assert!(stderr.contains("dangling"), "{stderr}");
    assert!(stderr.contains("loop/up"), "{stderr}");
    assert!(stderr.contains("self': dangling"), "{stderr}");
    File::options()
        .write(true)
        .open(src.join("shrinks.bin"))
        .unwrap()
        .set_len(10_000)
        .unwrap();
    std::fs::remove_file(src.join("vanishes.bin")).unwrap();

    // Block status: the used clusters are data, the free ones after them zeroes.
    let size = 80 * 2 * 36 * SECTOR;
    let disk = File::open(d.dev("d0")).unwrap();
    let hole = lseek(&disk, 0, libc::SEEK_HOLE).unwrap() as u64;
    assert!(hole > 64 << 10 && hole < size, "hole at {hole}");
    assert_eq!(lseek(&disk, hole as i64, libc::SEEK_DATA), Err(libc::ENXIO));
    let mut rest = vec![0u8; (size - hole) as usize];
    std::os::unix::fs::FileExt::read_exact_at(&disk, &mut rest, hole).unwrap();
    assert!(rest.iter().all(|&b| b == 0));

    let fs = dir.join("fs.img");
    copy_out(&d.dev("d0"), 0, size, &fs);
    run("fsck.fat", &["-n", &fs.to_string_lossy()]);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    mtools("mcopy", &fs, &["-s", "::/", &format!("{}/", out.display())]);
    assert_eq!(
        walk(&out),
        [
            "link.txt",
            "loop",
            "shrinks.bin",
            "target.txt",
            "vanishes.bin"
        ]
        .map(PathBuf::from)
        .to_vec()
    );
    assert_eq!(
        std::fs::read(out.join("link.txt")).unwrap(),
        b"through a link\n"
    );
    let mut shrunk = pattern(4, 10_000);
    shrunk.resize(64 << 10, 0);
    assert_same_bytes(
        &std::fs::read(out.join("shrinks.bin")).unwrap(),
        &shrunk,
        "shrinks.bin",
    );
    assert_same_bytes(
        &std::fs::read(out.join("vanishes.bin")).unwrap(),
        &vec![0u8; 16 << 10],
        "vanishes.bin",
    );
    assert!(
        d.stderr().contains("vanishes.bin' is gone"),
        "{}",
        d.stderr()
    );
    d.quit();
}

/// What vvfat cannot export is refused by `blockdev-add` with an error
/// that says why, and the daemon goes on: the next command is answered.
#[test]
fn refused_exports_leave_the_daemon_running() {
    require_tools();
    let dir = TestDir::new("vvfat-refused");
    let src = dir.join("src");
    write(&src.join("big.bin"), &pattern(6, 2 << 20));
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let add = |q: &mut Qmp, opts: Value| {
        let mut o = json!({"driver": "vvfat", "id": "x", "dir": src});
        for (k, v) in obj(&opts) {
            o[k] = v.clone();
        }
        let r = q.err("blockdev-add", json!({"options": o}));
        assert_eq!(q.ok("query-block", json!({})), json!([]));
        r.1
    };
    let e = add(&mut q, json!({"rw": true}));
    assert!(e.contains("rw=on") && e.contains("not supported"), "{e}");
    let e = add(&mut q, json!({"read-only": false}));
    assert!(e.contains("read-only"), "{e}");
    let missing = dir.join("missing");
    let e = add(&mut q, json!({"dir": missing}));
    assert!(
        e.contains(&*missing.to_string_lossy()) && e.contains("No such file"),
        "{e}"
    );
    let e = add(&mut q, json!({"floppy": true, "fat-type": 12}));
    assert!(
        e.contains(&format!(
            "'{}' does not fit on a FAT12 floppy (1440 KiB)",
            src.display()
        )),
        "{e}"
    );
    let e = add(&mut q, json!({"fat-type": 24}));
    assert!(e.contains("12, 16 and 32"), "{e}");
    let e = add(&mut q, json!({"floppy": true, "fat-type": 32}));
    assert!(e.contains("FAT32"), "{e}");
    // A file the daemon cannot open (even as root: sysctl files keep their
    // mode) fails the open, naming it.
    let unreadable = Path::new("/proc/sys/vm/compact_memory");
    assert!(
        unreadable.exists(),
        "{} is missing: the test needs a file root cannot read",
        unreadable.display()
    );
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::os::unix::fs::symlink(unreadable, bad.join("write-only")).unwrap();
    let e = add(&mut q, json!({"dir": bad}));
    assert!(
        e.contains(&format!(
            "cannot read '{}'",
            bad.join("write-only").display()
        )) && e.contains("Permission denied"),
        "{e}"
    );
    // Under a writable format node, vvfat would be written: refused too.
    let e = q
        .err(
            "blockdev-add",
            json!({"options": {"driver": "raw", "id": "x",
                "file": {"driver": "vvfat", "dir": src}}}),
        )
        .1;
    assert!(e.contains("read-only"), "{e}");

    // The same directory fits a hard disk, read-only with or without saying so.
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "vvfat", "id": "ok1", "dir": src}}),
    );
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "ok2", "read-only": true,
            "file": {"driver": "vvfat", "dir": src, "floppy": true}}}),
    );
    let mut f = File::open(d.dev("ok2")).unwrap();
    let mut boot = [0u8; 512];
    f.read_exact(&mut boot).unwrap();
    assert_eq!(&boot[0x36..0x3e], b"FAT12   ");
    assert!(File::options().write(true).open(d.dev("ok1")).is_err());
    drop(q);
    d.quit();
}
