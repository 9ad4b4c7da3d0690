//! The NBD server against real clients: qemu-img/qemu-io over UNIX and TCP
//! sockets (compare, writes, map), nbdinfo and nbdcopy, many clients and
//! requests at once, hostile clients written here on raw sockets, and the
//! QMP commands with their errors.

use blkfs_engine::nbd::proto::{self, Request};
use blkfs_tests::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const M: u64 = 1 << 20;

/// Fails clearly when a client tool is missing (never skips).
fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing: install {package} (.ci/run does) to run the NBD tests"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

fn unix_url(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// Starts the server on a UNIX socket in QEMU 2.1's form.
fn start_unix(q: &mut Qmp, sock: &Path) {
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}),
    );
}

/// `qemu-img map --output=json` as (start, length, zero, data), adjacent
/// entries with the same flags merged: what NBD's base:allocation carries.
fn map(args: &[&str]) -> Vec<(u64, u64, bool, bool)> {
    let mut a = vec!["map", "--output=json"];
    a.extend_from_slice(args);
    let v: Value = serde_json::from_str(&qemu_img(&a)).unwrap();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let (z, d) = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        match out.last_mut() {
            Some(last) if last.2 == z && last.3 == d => last.1 += l,
            _ => out.push((s, l, z, d)),
        }
    }
    out
}

/// A qcow2 chain with data in both layers, a zero cluster over base data,
/// and holes.
fn chain(dir: &TestDir) -> String {
    let base = qcow2_image(dir, "base.qcow2", "cluster_size=65536", "64M");
    qemu_io(
        "qcow2",
        base.as_ref(),
        &[
            "write -P 0x11 0 8M",
            "write -P 0x12 20M 1M",
            "write -P 0x13 40M 64k",
        ],
    );
    let top = qcow2_overlay(dir, "top.qcow2", &base, "qcow2");
    qemu_io(
        "qcow2",
        top.as_ref(),
        &[
            "write -P 0x44 4M 2M",
            "write -z 20M 512k",
            "write -P 0x45 50M 3M",
        ],
    );
    top
}

#[test]
fn qemu_img_compares_and_maps_over_unix_and_tcp() {
    let dir = TestDir::new("nbd-qemu-img");
    let top = chain(&dir);
    let raw = raw_image(&dir, "r.raw", "16M");
    qemu_io(
        "raw",
        raw.as_ref(),
        &["write -P 0x5a 1M 3M", "write -P 0x5b 15M 1M"],
    );
    let d = Daemon::start(
        &dir,
        &[qcow2_spec("d0", &top), raw_spec("d1", &raw, json!({}))],
    );
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0"}));
    q.ok("nbd-server-add", json!({"device": "d1", "writable": true}));
    let u0 = unix_url(&sock, "d0");
    assert!(images_identical(top.as_ref(), "qcow2", u0.as_ref(), "raw"));
    let u1 = unix_url(&sock, "d1");
    assert!(images_identical(raw.as_ref(), "raw", u1.as_ref(), "raw"));
    // The chain's allocation as the client sees it: data, holes, zeroes.
    let local = map(&["-U", "-f", "qcow2", &top]);
    assert_eq!(map(&["-f", "raw", &u0]), local);
    assert!(local.iter().any(|e| e.2 && !e.3), "{local:?}");
    assert_eq!(map(&["-f", "raw", &u1]), map(&["-U", "-f", "raw", &raw]));

    // TCP, in the flat form of later QEMU, after a stop.
    q.ok("nbd-server-stop", json!({}));
    assert!(!sock.exists(), "the UNIX socket is removed at stop");
    let port = free_port().to_string();
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "host": "127.0.0.1", "port": port}}),
    );
    q.ok("nbd-server-add", json!({"device": "d0", "name": "chain"}));
    let t0 = format!("nbd://127.0.0.1:{port}/chain");
    assert!(images_identical(top.as_ref(), "qcow2", t0.as_ref(), "raw"));
    assert_eq!(map(&["-f", "raw", &t0]), local);
    d.quit();
}

#[test]
fn writes_land_and_read_only_exports_refuse() {
    let dir = TestDir::new("nbd-writes");
    let top = chain(&dir);
    let raw = raw_image(&dir, "r.raw", "16M");
    let d = Daemon::start(
        &dir,
        &[qcow2_spec("d0", &top), raw_spec("d1", &raw, json!({}))],
    );
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    q.ok("nbd-server-add", json!({"device": "d1", "writable": true}));
    q.ok("nbd-server-add", json!({"device": "d1", "name": "ro"}));
    let u0 = unix_url(&sock, "d0");
    qemu_io(
        "raw",
        u0.as_ref(),
        &[
            "write -P 0x71 100k 300k",
            "write -P 0x72 -f 30M 64k", // FUA
            "write -z 4M 64k",
            "write -z -u 50M 1M", // may unmap
            "discard 60M 1M",
            "flush",
            "read -P 0x71 100k 300k",
            "read -P 0 4M 64k",
        ],
    );
    let u1 = unix_url(&sock, "d1");
    qemu_io(
        "raw",
        u1.as_ref(),
        &["write -P 0x73 0 1M", "write -P 0x74 16380k 4k"],
    );
    // Read-only: qemu-io cannot even open it for writing; reads work.
    let ro = unix_url(&sock, "ro");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &ro])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote"), "{text}");
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x73 0 1M", &ro],
    );
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // A raw client that writes anyway gets EPERM.
    let mut c = Client::go_unix(&sock, "ro", false);
    c.send(&req(proto::CMD_WRITE, 0, 0, 4096), &[1; 4096]);
    assert_eq!(c.simple_reply(), (proto::EPERM, 1));
    drop(c);
    d.quit();
    qemu_io(
        "qcow2",
        top.as_ref(),
        &[
            "read -P 0x71 100k 300k",
            "read -P 0x72 30M 64k",
            "read -P 0 4M 64k",
            "read -P 0 50M 1M",
            "read -P 0x11 0 100k", // base data around the write
        ],
    );
    assert_no_corruption(&top);
    qemu_io(
        "raw",
        raw.as_ref(),
        &["read -P 0x73 0 1M", "read -P 0x74 16380k 4k"],
    );
}

#[test]
fn nbdinfo_lists_and_nbdcopy_copies() {
    need("nbdinfo", "libnbd-bin");
    need("nbdcopy", "libnbd-bin");
    let dir = TestDir::new("nbd-libnbd");
    let top = chain(&dir);
    let raw = raw_image(&dir, "r.raw", "5M");
    let d = Daemon::start(
        &dir,
        &[qcow2_spec("d0", &top), raw_spec("d1", &raw, json!({}))],
    );
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0"}));
    q.ok("nbd-server-add", json!({"device": "d1", "writable": true}));
    let list: Value =
        serde_json::from_str(&run("nbdinfo", &["--list", "--json", &unix_url(&sock, "")])).unwrap();
    let exports = list["exports"].as_array().unwrap();
    let size_of = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))["export-size"]
            .as_u64()
    };
    assert_eq!(size_of("d0"), Some(64 * M));
    assert_eq!(size_of("d1"), Some(5 * M));
    let one: Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &unix_url(&sock, "d0")])).unwrap();
    let e = &one["exports"][0];
    assert_eq!(e["is_read_only"], true, "{one}");
    assert_eq!(e["can_flush"], true, "{one}");
    assert_eq!(e["can_multi_conn"], true, "{one}");
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{one}"
    );
    let copy = dir.file("copy.raw");
    run("nbdcopy", &[&unix_url(&sock, "d0"), &copy]);
    assert!(images_identical(
        copy.as_ref(),
        "raw",
        top.as_ref(),
        "qcow2"
    ));
    // And back: a file onto the writable export, four connections.
    let src = dir.file("src.raw");
    std::fs::write(&src, pattern(9, 5 * M as usize)).unwrap();
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            &src,
            &unix_url(&sock, "d1"),
        ],
    );
    d.quit();
    assert!(images_identical(src.as_ref(), "raw", raw.as_ref(), "raw"));
}

#[test]
fn many_clients_with_many_requests_in_flight() {
    need("nbdcopy", "libnbd-bin");
    let dir = TestDir::new("nbd-many");
    let img = qcow2_image(&dir, "a.qcow2", "", "64M");
    let d = Daemon::start(&dir, &[qcow2_spec("d0", &img)]);
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let url = unix_url(&sock, "d0");
    // Six writers at once, each with 64 writes in flight on its own 8 MiB
    // (allocating clusters concurrently), then its reads in flight.
    let writers: Vec<_> = (0..6u64)
        .map(|i| {
            let mut args = vec!["-f".to_string(), "raw".to_string()];
            for verb in ["aio_write", "aio_read"] {
                for c in region(i, verb) {
                    args.extend(["-c".to_string(), c]);
                }
                args.extend(["-c".into(), "aio_flush".into()]);
            }
            args.push(url.clone());
            Command::new("qemu-io")
                .args(&args)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for w in writers {
        let out = w.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(!text.contains("Pattern verification failed"), "{text}");
        assert!(!text.contains("failed"), "{text}");
    }
    // Then readers on many connections while a writer keeps going.
    let spawn_copy = |n: usize| {
        Command::new("nbdcopy")
            .args([
                &format!("--connections={n}"),
                "--requests=64",
                "--request-size=65536",
                &url,
                &dir.file(&format!("copy{n}.raw")),
            ])
            .spawn()
            .unwrap()
    };
    let copies: Vec<_> = [1, 4, 8].into_iter().map(spawn_copy).collect();
    qemu_io(
        "raw",
        url.as_ref(),
        &["aio_write -P 0x99 60M 1M", "aio_flush"],
    );
    for mut c in copies {
        assert!(c.wait().unwrap().success());
    }
    for n in [1, 4, 8] {
        let f = dir.file(&format!("copy{n}.raw"));
        // Everything but the range written during the copy matches.
        let mut cmds: Vec<String> = (0..6).flat_map(|i| region(i, "read")).collect();
        cmds.extend(["read -P 0 48M 12M".into(), "read -P 0 61M 3M".into()]);
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io("raw", f.as_ref(), &refs);
    }
    d.quit();
    let cmds: Vec<String> = (0..6).flat_map(|i| region(i, "read")).collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", img.as_ref(), &refs);
    qemu_io("qcow2", img.as_ref(), &["read -P 0x99 60M 1M"]);
    assert_no_corruption(&img);
}

/// qemu-io commands (`verb` -P pattern offset 128k) over writer `i`'s
/// 8 MiB: 64 chunks, patterns varying by chunk.
fn region(i: u64, verb: &str) -> Vec<String> {
    (0..64u64)
        .map(|j| {
            let off = i * 8 * M + j * 128 * 1024;
            format!("{verb} -P {} {off} 128k", 0x20 + i * 8 + j % 8)
        })
        .collect()
}

// ---- A client on a raw socket, for what well-behaved clients never send.

fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
    Request {
        flags,
        kind,
        cookie: 1,
        offset,
        len,
    }
}

fn option(opt: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = b"IHAVEOPT".to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&[0, 0]);
    p
}

struct Client {
    s: UnixStream,
}

impl Client {
    /// Connected, greeting read, fixed newstyle flags sent.
    fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Client { s };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    /// Reads one option reply: (type, payload).
    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).unwrap();
        (kind, p)
    }

    /// In transmission on `name`, with structured replies or not.
    fn go_unix(sock: &Path, name: &str, structured: bool) -> Client {
        let mut c = Client::connect(sock);
        if structured {
            c.s.write_all(&option(proto::OPT_STRUCTURED_REPLY, &[]))
                .unwrap();
            assert_eq!(c.option_reply().0, proto::REP_ACK);
        }
        c.s.write_all(&option(proto::OPT_GO, &go_payload(name)))
            .unwrap();
        loop {
            let (kind, p) = c.option_reply();
            match kind {
                proto::REP_INFO => continue,
                proto::REP_ACK => return c,
                _ => panic!("GO failed: {kind:#x} {}", String::from_utf8_lossy(&p)),
            }
        }
    }

    fn send(&mut self, r: &Request, payload: &[u8]) {
        self.s.write_all(&proto::encode_request(r)).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// (errno, cookie) of a simple reply (no data follows).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// A structured chunk: (flags, type, payload).
    fn chunk(&mut self) -> (u16, u16, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("structured reply chunk");
        assert_eq!(&h[..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            p,
        )
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// The daemon still answers QMP and a well-behaved client still reads.
fn still_serving(q: &mut Qmp, sock: &Path) {
    q.ok("query-version", json!({}));
    qemu_io(
        "raw",
        unix_url(sock, "d0").as_ref(),
        &["read -P 0x66 0 64k"],
    );
}

#[test]
fn hostile_clients_hurt_no_one() {
    let dir = TestDir::new("nbd-hostile");
    let raw = raw_image(&dir, "r.raw", "4M");
    qemu_io("raw", raw.as_ref(), &["write -P 0x66 0 4M"]);
    let d = Daemon::start(&dir, &[raw_spec("d0", &raw, json!({}))]);
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    // A client that stays connected, idle, throughout.
    let mut idle = Client::go_unix(&sock, "d0", true);

    // Bad option magic: dropped.
    let mut c = Client::connect(&sock);
    c.s.write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0").unwrap();
    assert!(c.closed());
    still_serving(&mut q, &sock);
    // Unknown client flags; a truncated handshake; an option too long for
    // QEMU (40 MiB); one too long for us (100 KiB), refused but alive.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(&[0, 0, 0, 0x80]).unwrap();
    drop(c);
    let mut c = Client::connect(&sock);
    c.s.write_all(&option(proto::OPT_GO, &go_payload("d0"))[..20])
        .unwrap();
    drop(c);
    let mut c = Client::connect(&sock);
    c.s.write_all(&option(99, &[])[..12]).unwrap();
    c.s.write_all(&(40u32 << 20).to_be_bytes()).unwrap();
    assert!(c.closed());
    let mut c = Client::connect(&sock);
    c.s.write_all(&option(proto::OPT_GO, &vec![7; 100 << 10]))
        .unwrap();
    assert_eq!(c.option_reply().0, proto::REP_ERR_TOO_BIG);
    c.s.write_all(&option(proto::OPT_GO, &go_payload("nope")))
        .unwrap();
    assert_eq!(c.option_reply().0, proto::REP_ERR_UNKNOWN);
    c.s.write_all(&option(proto::OPT_STARTTLS, &[])).unwrap();
    assert_eq!(c.option_reply().0, proto::REP_ERR_POLICY);
    drop(c);
    still_serving(&mut q, &sock);

    // Transmission, simple replies: oversized read (EINVAL, still
    // connected), out-of-range read (EINVAL) and write (ENOSPC, payload
    // consumed), unknown command, bad flags; then an oversized write
    // (EINVAL, then closed: its payload is not read).
    let mut c = Client::go_unix(&sock, "d0", false);
    c.send(&req(proto::CMD_READ, 0, 0, 64 << 20), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_READ, 0, 4 * M - 512, 1024), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_READ, 0, u64::MAX - 10, 100), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_WRITE, 0, 4 * M, 512), &[9; 512]);
    assert_eq!(c.simple_reply().0, proto::ENOSPC);
    c.send(&req(42, 0, 0, 0), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_FLUSH, 0x8000, 0, 0), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_BLOCK_STATUS, 0, 0, 4096), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    c.send(&req(proto::CMD_READ, 0, 4096, 512), &[]);
    assert_eq!(c.simple_reply(), (0, 1));
    let mut data = vec![0u8; 512];
    c.s.read_exact(&mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x66));
    c.send(&req(proto::CMD_WRITE, 0, 0, 33 << 20), &[]);
    assert_eq!(c.simple_reply().0, proto::EINVAL);
    assert!(c.closed());
    still_serving(&mut q, &sock);

    // Structured replies: an error chunk, block status with REQ_ONE
    // refused without a negotiated context.
    let mut c = Client::go_unix(&sock, "d0", true);
    c.send(&req(proto::CMD_READ, 0, 4 * M, 1), &[]);
    let (flags, kind, p) = c.chunk();
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR)
    );
    assert_eq!(&p[..4], &proto::EINVAL.to_be_bytes());
    c.send(&req(proto::CMD_READ, proto::CMD_FLAG_DF, 0, 8), &[]);
    let (_, kind, p) = c.chunk();
    assert_eq!(kind, proto::REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&p[8..], &[0x66; 8]);
    drop(c);

    // Disconnect in the middle of a write's payload, and of a header.
    let mut c = Client::go_unix(&sock, "d0", false);
    c.send(&req(proto::CMD_WRITE, 0, 0, 1 << 20), &[0x13; 1000]);
    drop(c);
    let mut c = Client::go_unix(&sock, "d0", false);
    c.s.write_all(&proto::encode_request(&req(proto::CMD_READ, 0, 0, 8))[..10])
        .unwrap();
    drop(c);
    // Garbage after the handshake: dropped.
    let mut c = Client::go_unix(&sock, "d0", false);
    c.s.write_all(&pattern(3, 4096)).unwrap();
    assert!(c.closed());
    // Many requests sent without reading a reply, then gone.
    let mut c = Client::go_unix(&sock, "d0", false);
    for _ in 0..300 {
        c.send(&req(proto::CMD_READ, 0, 0, 1 << 20), &[]);
    }
    drop(c);
    still_serving(&mut q, &sock);

    // The idle client was never disturbed.
    idle.send(&req(proto::CMD_READ, 0, 0, 4), &[]);
    let (_, kind, p) = idle.chunk();
    assert_eq!(kind, proto::REPLY_TYPE_OFFSET_DATA);
    assert_eq!(&p[8..], &[0x66; 4]);
    drop(idle);
    d.quit();
    // Nothing the hostile clients sent reached the image.
    qemu_io("raw", raw.as_ref(), &["read -P 0x66 0 4M"]);
}

#[test]
fn qmp_commands_and_their_errors() {
    let dir = TestDir::new("nbd-qmp");
    let raw = raw_image(&dir, "r.raw", "4M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &raw, json!({}))]);
    let mut q = d.qmp();
    let cmds = q.ok("query-commands", json!({}));
    for c in [
        "nbd-server-start",
        "nbd-server-add",
        "nbd-server-remove",
        "nbd-server-stop",
    ] {
        assert!(
            cmds.as_array().unwrap().iter().any(|x| x["name"] == c),
            "{c}"
        );
    }
    assert_eq!(
        q.err("nbd-server-stop", json!({})),
        ("GenericError".into(), "NBD server not running".into())
    );
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "d0"})).1,
        "NBD server not running"
    );
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    assert_eq!(
        q.err(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "path": dir.file("other.sock")}})
        )
        .1,
        "NBD server already running"
    );
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "nope"})),
        ("DeviceNotFound".into(), "Device 'nope' not found".into())
    );
    q.ok("nbd-server-add", json!({"device": "d0"}));
    assert_eq!(
        q.err("nbd-server-add", json!({"device": "d0", "writable": true}))
            .1,
        "NBD server already exporting device 'd0'"
    );
    q.ok("nbd-server-add", json!({"device": "d0", "name": "second"}));
    assert_eq!(
        q.err("nbd-server-remove", json!({"name": "nope"})).1,
        "Export 'nope' is not found"
    );
    assert!(q
        .err("nbd-server-remove", json!({"name": "d0", "mode": "soft"}))
        .1
        .contains("does not accept value 'soft'"));
    // Safe removal refuses while a client uses the export; hard closes it.
    let mut c = Client::go_unix(&sock, "second", false);
    assert_eq!(
        q.err("nbd-server-remove", json!({"name": "second"})).1,
        "export 'second' still in use"
    );
    q.ok(
        "nbd-server-remove",
        json!({"name": "second", "mode": "hard"}),
    );
    assert!(c.closed());
    // Gone for new clients too.
    let mut c = Client::connect(&sock);
    c.s.write_all(&option(proto::OPT_GO, &go_payload("second")))
        .unwrap();
    assert_eq!(c.option_reply().0, proto::REP_ERR_UNKNOWN);
    // Stop with clients connected: in transmission (one with a request in
    // flight, whose reply fits in the socket's buffer) and in the
    // handshake. They see the connection close.
    let mut busy = Client::go_unix(&sock, "d0", false);
    busy.send(&req(proto::CMD_READ, 0, 0, 64 << 10), &[]);
    let mut idle = Client::go_unix(&sock, "d0", true);
    let mut haggling = Client::connect(&sock);
    q.ok("nbd-server-stop", json!({}));
    assert_eq!(
        busy.simple_reply(),
        (0, 1),
        "the request in flight is answered"
    );
    let mut data = vec![0u8; 64 << 10];
    busy.s.read_exact(&mut data).unwrap();
    assert!(busy.closed());
    assert!(idle.closed());
    assert!(haggling.closed());
    assert!(UnixStream::connect(&sock).is_err());
    // The daemon stays up, and the server starts again.
    q.ok("query-version", json!({}));
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    qemu_io(
        "raw",
        unix_url(&sock, "d0").as_ref(),
        &["write -P 0x21 0 64k"],
    );
    // Quit with a client connected: a clean exit.
    let mut c = Client::go_unix(&sock, "d0", false);
    d.quit();
    assert!(c.closed());
    qemu_io("raw", raw.as_ref(), &["read -P 0x21 0 64k"]);
}

/// GO on any stream (here TCP); panics unless the export is entered.
fn go_on(s: &mut (impl Read + Write), name: &str) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&option(proto::OPT_GO, &go_payload(name)))
        .unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).unwrap();
        match kind {
            proto::REP_INFO => continue,
            proto::REP_ACK => return,
            _ => panic!("GO failed: {kind:#x}"),
        }
    }
}

#[test]
fn tcp_clients_are_closed_by_remove_stop_and_quit() {
    let dir = TestDir::new("nbd-tcp-close");
    let raw = raw_image(&dir, "r.raw", "4M");
    let d = Daemon::start(&dir, &[raw_spec("d0", &raw, json!({}))]);
    let mut q = d.qmp();
    let port = free_port();
    let addr = json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}});
    q.ok("nbd-server-start", json!({"addr": addr.clone()}));
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let connect = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let closed = |s: &mut std::net::TcpStream| matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_));
    let mut a = connect();
    go_on(&mut a, "d0");
    q.ok("nbd-server-remove", json!({"name": "d0", "mode": "hard"}));
    assert!(closed(&mut a));
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let (mut b, mut c) = (connect(), connect());
    go_on(&mut b, "d0");
    q.ok("nbd-server-stop", json!({}));
    assert!(closed(&mut b));
    // c never read its greeting: all it gets is the greeting, then the end.
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 18);
    q.ok("nbd-server-start", json!({"addr": addr}));
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let mut e = connect();
    go_on(&mut e, "d0");
    d.quit();
    assert!(closed(&mut e));
}

/// nbdfuse, killed and its mount detached on drop even when the test fails.
struct NbdFuse {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        lazy_umount(&self.dir);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbdfuse_mounts_an_export_as_a_file() {
    need("nbdfuse", "nbdfuse");
    let dir = TestDir::new("nbd-nbdfuse");
    let img = raw_image(&dir, "a.img", "8M");
    qemu_io("raw", img.as_ref(), &["write -P 0x3d 0 8M"]);
    let d = Daemon::start(&dir, &[raw_spec("d0", &img, json!({}))]);
    let mut q = d.qmp();
    let sock = dir.join("nbd.sock");
    start_unix(&mut q, &sock);
    q.ok("nbd-server-add", json!({"device": "d0", "writable": true}));
    let fdir = dir.join("nbdfuse");
    std::fs::create_dir_all(&fdir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fdir.join("disk"))
        .arg(unix_url(&sock, "d0"))
        .spawn()
        .expect("start nbdfuse");
    let fuse = NbdFuse {
        child,
        dir: fdir.clone(),
    };
    // nbdfuse writes its pid file once the file is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(std::time::Instant::now() < deadline, "nbdfuse not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let file = fdir.join("disk");
    let data = std::fs::read(&file).unwrap();
    assert_same_bytes(&data, &vec![0x3d; 8 << 20], "the export through nbdfuse");
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &pattern(4, 65536), M).unwrap();
    f.sync_all().unwrap();
    drop(f);
    drop(fuse);
    q.ok("nbd-server-stop", json!({}));
    d.quit();
    let disk = std::fs::read(&img).unwrap();
    assert_eq!(
        &disk[M as usize..M as usize + 65536],
        &pattern(4, 65536)[..]
    );
}
