//! The curl protocols (http, https, ftp, ftps, tftp) against real servers
//! each test starts on loopback: nginx (http, https), pyftpdlib (ftp,
//! ftps), tftpd-hpa, Python's http.server (no byte ranges) and a small
//! Python server that misbehaves on purpose. Every server belongs to one
//! test and is killed when it ends, panics included. The mount must read
//! exactly the served file's bytes (qemu-img as the oracle for formats),
//! and every failure must be a clear error or EIO, never wrong bytes.

use blkfs_tests::*;
use serde_json::{json, Value};
use std::fs::File;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process owned by a test, in a process group of its own:
/// the group (nginx's workers too) is killed and the leader reaped on drop.
struct Server {
    child: Child,
    port: u16,
    log: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signals the process group this test started.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `cmd` (its output to `log`) and waits until `ready` says the
    /// port is served.
    fn start(cmd: &mut Command, port: u16, log: String, ready: fn(u16) -> bool) -> Server {
        let out = File::create(&log).expect("create server log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut s = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(port) {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("{cmd:?} exited with {st}: {}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} not serving port {port} after 20 s: {}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, scheme: &str, name: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/{name}", self.port)
    }
}

fn tcp_ready(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A UDP port is served once a socket is bound to it (/proc/net/udp).
fn udp_ready(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| t.contains(&needle))
}

fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a free port");
    s.local_addr().expect("local addr").port()
}

/// Fails (never skips) when a server program is missing.
fn need(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} is missing: install the {package} package (.ci/run does)"
    );
}

/// The apt-installed Python, whose modules (pyftpdlib) a pyenv shim lacks.
const PYTHON: &str = "/usr/bin/python3";

fn need_python_module(module: &str, package: &str) {
    let ok = Command::new(PYTHON)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "Python module {module} is missing: install the {package} package (.ci/run does)"
    );
}

/// A self-signed certificate and key in `dir` (cert.pem, key.pem).
fn self_signed(dir: &TestDir) -> (String, String) {
    need("openssl", "openssl");
    let (cert, key) = (dir.file("cert.pem"), dir.file("key.pem"));
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &cert,
        ],
    );
    (cert, key)
}

/// nginx serving `root`, over TLS when `tls` gives a certificate and key;
/// files under `private/` only to requests with the cookie `k=v`.
fn nginx_on(dir: &TestDir, root: &Path, port: u16, tls: Option<&(String, String)>) -> Server {
    need("nginx", "nginx-light");
    let prefix = dir.join(&format!("nginx-{port}"));
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let listen = match tls {
        Some((cert, key)) => format!(
            "listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};"
        ),
        None => format!("listen 127.0.0.1:{port};"),
    };
    let p = prefix.display();
    let conf = format!(
        "worker_processes 2;
# The test directory may not be readable by nginx's usual worker user.
user root;
pid {p}/nginx.pid;
error_log {p}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p};
    uwsgi_temp_path {p}; scgi_temp_path {p};
    server {{
        {listen}
        root {root};
        location /private/ {{
            if ($cookie_k != v) {{ return 403; }}
        }}
    }}
}}
",
        root = root.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).expect("write nginx.conf");
    Server::start(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&prefix)
            .args(["-g", "daemon off;"]),
        port,
        prefix.join("stderr.log").to_string_lossy().into_owned(),
        tcp_ready,
    )
}

fn nginx(dir: &TestDir, root: &Path) -> Server {
    nginx_on(dir, root, free_tcp_port(), None)
}

/// pyftpdlib serving `root` to anonymous users; with a certificate, FTPS
/// with implicit TLS (what libcurl's ftps:// speaks): the control
/// connection is wrapped before the greeting, data connections after PROT P.
fn ftp_server(dir: &TestDir, root: &Path, cert: Option<&str>) -> Server {
    need_python_module("pyftpdlib", "python3-pyftpdlib");
    let script = r#"
import sys, logging
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.servers import FTPServer
root, port, cert = sys.argv[1], int(sys.argv[2]), sys.argv[3]
logging.basicConfig(level=logging.INFO)
authorizer = DummyAuthorizer()
authorizer.add_anonymous(root)
if cert:
    from pyftpdlib.handlers import TLS_FTPHandler, TLS_DTPHandler
    class Implicit(TLS_FTPHandler):
        def handle(self):
            self.secure_connection(self.ssl_context)
        def handle_ssl_established(self):
            TLS_FTPHandler.handle(self)
    class DTP(TLS_DTPHandler):
        # libcurl starts a data connection's handshake before RETR, which
        # pyftpdlib would take for a disconnect.
        def readable(self):
            return self._ssl_accepting or TLS_DTPHandler.readable(self)
    handler = Implicit
    handler.dtp_handler = DTP
    handler.certfile = cert
    handler.tls_data_required = True
else:
    from pyftpdlib.handlers import FTPHandler
    handler = FTPHandler
handler.authorizer = authorizer
FTPServer(("127.0.0.1", port), handler).serve_forever()
"#;
    let port = free_tcp_port();
    Server::start(
        Command::new(PYTHON)
            .args(["-c", script])
            .arg(root)
            .arg(port.to_string())
            .arg(cert.unwrap_or("")),
        port,
        dir.file(&format!("ftp-{port}.log")),
        tcp_ready,
    )
}

/// A raw image of `len` bytes of pseudo-random data with holes.
fn data_file(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let mut data = pattern(seed, len);
    // Some zero stretches, as images have.
    for chunk in data.chunks_mut(1 << 20).step_by(3) {
        let half = chunk.len() / 2;
        chunk[..half].fill(0);
    }
    std::fs::write(path, &data).expect("write data file");
    data
}

fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Adds a read-only raw device over a curl protocol; `extra` goes into the
/// protocol node.
fn add_remote_raw(q: &mut Qmp, id: &str, driver: &str, url: &str, extra: Value) {
    let mut file = json!({"driver": driver, "filename": url});
    for (k, v) in extra.as_object().into_iter().flatten() {
        file[k] = v.clone();
    }
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": id, "read-only": true, "file": file}}),
    );
}

/// The main case: a qcow2 image with a raw backing file named relatively,
/// both served by nginx, read through the mount exactly as qemu-img reads
/// the local image; the same image with its format probed, and with its
/// backing file named by an absolute URL.
#[test]
fn qcow2_over_http_with_backing_chain() {
    let dir = TestDir::new("remote-qcow2");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let base = www.join("base.raw");
    data_file(&base, 1, 8 << 20);
    let top = www.join("top.qcow2");
    let top_s = top.to_string_lossy().into_owned();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &top_s,
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0xa5 1M 1M",
            "write -P 0x5a 3M 8k",
            "write -z 5M 256k",
            "write -P 0x77 7M 100k",
        ],
    );
    let ref_raw = dir.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", &top_s, &ref_raw.to_string_lossy()]);
    let srv = nginx(&dir, &www);
    let url = srv.url("http", "top.qcow2");

    // The backing file by an absolute URL (set unsafely: qemu-img may
    // lack its curl module).
    let abs = www.join("abs.qcow2");
    let abs_s = abs.to_string_lossy().into_owned();
    let base_url = srv.url("http", "base.raw");
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", &abs_s,
    ]);
    qemu_io("qcow2", &abs, &["write -P 0x33 2M 64k"]);
    qemu_img(&["rebase", "-u", "-b", &base_url, "-F", "raw", &abs_s]);
    let mut abs_ref = read_all(&base);
    abs_ref[2 << 20..(2 << 20) + (64 << 10)].fill(0x33);

    let d = Daemon::start(
        &dir,
        &[
            format!("driver=qcow2,id=d0,read-only=on,file.driver=http,file.filename={url}"),
            // No driver: probed as qcow2 through the URL.
            format!("id=probed,read-only=on,file.filename={url}"),
        ],
    );
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "qcow2", "id": "abs", "read-only": true,
            "file": {"driver": "http", "filename": srv.url("http", "abs.qcow2")}}}),
    );
    let want = read_all(&ref_raw);
    for id in ["d0", "probed"] {
        assert_same_bytes(&read_all(&d.dev(id)), &want, id);
    }
    run(
        "cmp",
        &[&d.dev("d0").to_string_lossy(), &ref_raw.to_string_lossy()],
    );
    assert!(images_identical(&d.dev("d0"), "raw", &top, "qcow2"));
    assert_same_bytes(&read_all(&d.dev("abs")), &abs_ref, "absolute URL backing");

    let b = query_block(&mut q, "d0");
    let ins = &b["inserted"];
    assert_eq!(ins["drv"], "qcow2");
    assert_eq!(ins["file"], url.as_str());
    assert_eq!(ins["backing_file"], "base.raw");
    assert_eq!(ins["image"]["full-backing-filename"], base_url.as_str());
    assert_eq!(ins["image"]["backing-image"]["filename"], base_url.as_str());
    assert_eq!(query_block(&mut q, "probed")["inserted"]["drv"], "qcow2");
    // An image whose backing file is itself, by URL: refused at once.
    let lp = www.join("loop.qcow2");
    let lp_s = lp.to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &lp_s, "1M"]);
    qemu_img(&["rebase", "-u", "-b", "loop.qcow2", "-F", "qcow2", &lp_s]);
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "qcow2", "id": "loop", "read-only": true,
            "file": {"driver": "http", "filename": srv.url("http", "loop.qcow2")}}}),
    );
    assert!(desc.contains("backing file loop"), "{desc}");
    let nodes = q.ok("query-named-block-nodes", json!({}));
    let http_nodes = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drv"] == "http")
        .count();
    assert!(http_nodes >= 4, "http protocol nodes: {nodes}");
    d.quit();
}

#[test]
fn raw_over_http() {
    let dir = TestDir::new("remote-http");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    // Not a multiple of the readahead nor of 512: the tail must be exact.
    let want = data_file(&www.join("disk.img"), 2, (3 << 20) + 1234);
    let srv = nginx(&dir, &www);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("http", "disk.img");
    add_remote_raw(
        &mut q,
        "d0",
        "http",
        &url,
        json!({"readahead": 65536, "timeout": 10}),
    );
    assert_same_bytes(&read_all(&d.dev("d0")), &want, "http");
    // Reads at odd offsets, some across segment ends.
    let f = File::open(d.dev("d0")).unwrap();
    for (off, len) in [(0, 1), (65535, 2), (1_000_001, 70_000), (want.len() - 7, 7)] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        assert_same_bytes(&buf, &want[off..off + len], "odd read");
    }
    let b = query_block(&mut q, "d0");
    assert_eq!(b["inserted"]["file"], url.as_str());
    assert_eq!(b["inserted"]["image"]["filename"], url.as_str());
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(
        nodes.as_array().unwrap().iter().any(|n| n["drv"] == "http"),
        "{nodes}"
    );
    // A top-level protocol node is a device too.
    q.ok(
        "blockdev-add",
        json!({"options": {"driver": "http", "id": "bare", "read-only": true, "filename": url}}),
    );
    assert_eq!(query_block(&mut q, "bare")["inserted"]["drv"], "http");
    assert_same_bytes(&read_all(&d.dev("bare")), &want, "bare http");
    // The cookie option: the private copy needs it.
    std::fs::create_dir_all(www.join("private")).unwrap();
    std::fs::copy(www.join("disk.img"), www.join("private/disk.img")).unwrap();
    let private = srv.url("http", "private/disk.img");
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "http", "id": "p", "read-only": true, "filename": private}}),
    );
    assert!(desc.contains("HTTP error 403"), "{desc}");
    add_remote_raw(&mut q, "p", "http", &private, json!({"cookie": "a=b; k=v"}));
    assert_same_bytes(&read_all(&d.dev("p")), &want, "with a cookie");
    // Writes are refused: the device is read-only.
    let w = std::fs::OpenOptions::new().write(true).open(d.dev("d0"));
    assert!(w.is_err(), "a read-only device opened for writing");
    d.quit();
}

#[test]
fn raw_over_https() {
    let dir = TestDir::new("remote-https");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let want = data_file(&www.join("disk.img"), 3, 2 << 20);
    let tls = self_signed(&dir);
    let srv = nginx_on(&dir, &www, free_tcp_port(), Some(&tls));
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("https", "disk.img");
    // The certificate is checked by default: a self-signed one fails.
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "v", "read-only": true,
            "file": {"driver": "https", "filename": url}}}),
    );
    assert!(
        desc.contains("Could not open") && desc.contains(&url),
        "{desc}"
    );
    assert!(desc.to_lowercase().contains("certificate"), "{desc}");
    add_remote_raw(&mut q, "d0", "https", &url, json!({"sslverify": false}));
    assert_same_bytes(&read_all(&d.dev("d0")), &want, "https");
    assert_eq!(query_block(&mut q, "d0")["inserted"]["file"], url.as_str());
    d.quit();
}

#[test]
fn raw_over_ftp() {
    let dir = TestDir::new("remote-ftp");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let want = data_file(&www.join("disk.img"), 4, (2 << 20) + 512);
    let srv = ftp_server(&dir, &www, None);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("ftp", "disk.img");
    add_remote_raw(&mut q, "d0", "ftp", &url, json!({"readahead": 131072}));
    assert_same_bytes(&read_all(&d.dev("d0")), &want, "ftp");
    let f = File::open(d.dev("d0")).unwrap();
    let mut buf = vec![0u8; 5000];
    f.read_exact_at(&mut buf, 1_500_000).unwrap();
    assert_same_bytes(&buf, &want[1_500_000..1_505_000], "ftp at an offset");
    assert_eq!(query_block(&mut q, "d0")["inserted"]["file"], url.as_str());
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "raw", "id": "nope", "read-only": true,
            "file": {"driver": "ftp", "filename": srv.url("ftp", "missing.img")}}}),
    );
    assert!(desc.contains("Could not open"), "{desc}");
    d.quit();
}

#[test]
fn raw_over_ftps() {
    let dir = TestDir::new("remote-ftps");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let want = data_file(&www.join("disk.img"), 5, 1 << 20);
    need_python_module("OpenSSL", "python3-openssl");
    let (cert, key) = self_signed(&dir);
    let pem = dir.file("both.pem");
    let both = [read_all(Path::new(&cert)), read_all(Path::new(&key))].concat();
    std::fs::write(&pem, both).unwrap();
    let srv = ftp_server(&dir, &www, Some(&pem));
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("ftps", "disk.img");
    add_remote_raw(&mut q, "d0", "ftps", &url, json!({"sslverify": false}));
    assert_same_bytes(&read_all(&d.dev("d0")), &want, "ftps");
    d.quit();
}

#[test]
fn raw_over_tftp() {
    let dir = TestDir::new("remote-tftp");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let want = data_file(&www.join("disk.img"), 6, 300_000);
    need("in.tftpd", "tftpd-hpa");
    let port = free_udp_port();
    let srv = Server::start(
        Command::new("in.tftpd")
            .args(["-L", "-s"])
            .arg(&www)
            .arg("-a")
            .arg(format!("127.0.0.1:{port}")),
        port,
        dir.file("tftpd.log"),
        udp_ready,
    );
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("tftp", "disk.img");
    add_remote_raw(&mut q, "d0", "tftp", &url, json!({}));
    assert_same_bytes(&read_all(&d.dev("d0")), &want, "tftp");
    let b = query_block(&mut q, "d0");
    assert_eq!(b["inserted"]["file"], url.as_str());
    assert_eq!(b["inserted"]["image"]["virtual-size"], want.len());
    let (_, desc) = q.err(
        "blockdev-add",
        json!({"options": {"driver": "tftp", "id": "nope", "read-only": true,
            "filename": srv.url("tftp", "missing.img")}}),
    );
    assert!(desc.contains("Could not open"), "{desc}");
    d.quit();
}

/// Every open failure is a QMP error that says what went wrong, and the
/// daemon goes on answering.
#[test]
fn open_errors_are_clear() {
    let dir = TestDir::new("remote-errors");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    data_file(&www.join("disk.img"), 7, 1 << 20);
    let srv = nginx(&dir, &www);
    need_python_module("http.server", "python3");
    let plain_port = free_tcp_port();
    // Python's http.server ignores Range headers (200 with the whole file).
    let plain = Server::start(
        Command::new(PYTHON)
            .args([
                "-m",
                "http.server",
                &plain_port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(&www),
        plain_port,
        dir.file("http.server.log"),
        tcp_ready,
    );
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let ok = srv.url("http", "disk.img");
    let refused = format!("http://127.0.0.1:{}/disk.img", free_tcp_port());
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"driver": "http", "filename": srv.url("http", "missing.img")}),
            "HTTP error 404",
        ),
        (json!({"driver": "http", "filename": refused}), "connect"),
        (
            json!({"driver": "http", "filename": plain.url("http", "disk.img")}),
            "does not support byte ranges",
        ),
        (
            json!({"driver": "http", "filename": "http://nonexistent.invalid/disk.img"}),
            "resolve",
        ),
        (
            json!({"driver": "http", "filename": "http:///disk.img"}),
            "names no host",
        ),
        (
            json!({"driver": "http", "filename": "http://127.0.0.1:99999999/x"}),
            "Could not open",
        ),
        (
            json!({"driver": "http", "filename": format!("{ok} x")}),
            "spaces or control characters",
        ),
        (
            json!({"driver": "http", "filename": srv.url("ftp", "disk.img")}),
            "the URL must start with 'http://'",
        ),
        (
            json!({"driver": "ftp", "filename": ok}),
            "the URL must start with 'ftp://'",
        ),
        (
            json!({"driver": "http", "filename": ok, "readahead": 1000}),
            "multiple of 512",
        ),
        (
            json!({"driver": "http", "filename": ok, "timeout": 0}),
            "timeout",
        ),
        (
            json!({"driver": "http", "filename": ok, "sslverify": "no"}),
            "file.sslverify', expected: boolean",
        ),
        (
            json!({"driver": "http", "filename": ok, "locking": "on"}),
            "file.locking' is unexpected",
        ),
    ];
    for (file, want) in cases {
        let opts = json!({"driver": "raw", "id": "x", "read-only": true, "file": file});
        let (class, desc) = q.err("blockdev-add", json!({"options": opts}));
        assert_eq!(class, "GenericError", "{file}");
        assert!(desc.contains(want), "{file}: '{desc}' lacks '{want}'");
        // The daemon answers the next command.
        q.ok("query-block", json!({}));
    }
    // A writable open is refused, top level or under a format.
    for opts in [
        json!({"driver": "http", "id": "x", "filename": ok}),
        json!({"driver": "raw", "id": "x", "file": {"driver": "http", "filename": ok}}),
        json!({"driver": "qcow2", "id": "x", "read-only": false,
            "file": {"driver": "http", "filename": ok}}),
    ] {
        let (_, desc) = q.err("blockdev-add", json!({"options": opts}));
        assert!(
            desc.contains("Driver 'http' can only open images read-only (set read-only=on)"),
            "{desc}"
        );
    }
    assert_eq!(q.ok("query-block", json!({})), json!([]));
    // And the daemon still opens a good one.
    add_remote_raw(&mut q, "good", "http", &ok, json!({}));
    d.quit();
}

/// A small HTTP server that lies in one way per path.
const LIAR: &str = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
DATA = bytes(range(256)) * 4096  # 1 MiB
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def head(self, length):
        self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.end_headers()
    def do_HEAD(self):
        if self.path == "/huge":
            self.head(9 * 10**18)
        elif self.path == "/absurd":
            self.head(10**30)
        elif self.path == "/stall":
            time.sleep(60)
        elif self.path == "/nosize":
            self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        else:
            self.head(len(DATA))
    def do_GET(self):
        first, last = self.headers["Range"].split("=")[1].split("-")
        first, last = int(first), int(last)
        body = DATA[first:last + 1]
        if self.path == "/full":
            # Announces ranges, then ignores them.
            self.send_response(200)
            self.send_header("Content-Length", str(len(DATA)))
            self.end_headers()
            self.wfile.write(DATA)
            return
        self.send_response(206)
        start = first + 1 if self.path == "/shifted" else first
        self.send_header("Content-Range", "bytes %d-%d/%d" % (start, last, len(DATA)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/short":
            # Half the body, then the connection drops.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// Servers that break their word: reads fail with EIO and never return
/// other bytes than the file's; the daemon stays up.
#[test]
fn lying_servers_never_give_wrong_bytes() {
    let dir = TestDir::new("remote-liar");
    let port = free_tcp_port();
    let srv = Server::start(
        Command::new(PYTHON)
            .args(["-c", LIAR])
            .arg(port.to_string()),
        port,
        dir.file("liar.log"),
        tcp_ready,
    );
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    for (path, want) in [
        ("huge", "implausible size"),
        ("absurd", "Could not open"),
        ("nosize", "did not report the file's size"),
        ("stall", "Timeout was reached"),
    ] {
        let file = json!({"driver": "http", "filename": srv.url("http", path), "timeout": 1});
        let opts = json!({"driver": "raw", "id": "x", "read-only": true, "file": file});
        let (_, desc) = q.err("blockdev-add", json!({"options": opts}));
        assert!(desc.contains(want), "{path}: {desc}");
    }
    for id in ["full", "shifted", "short"] {
        add_remote_raw(
            &mut q,
            id,
            "http",
            &srv.url("http", id),
            json!({"timeout": 2}),
        );
        let f = File::open(d.dev(id)).unwrap();
        let mut buf = vec![0u8; 4096];
        let e = f.read_exact_at(&mut buf, 8192).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{id}: {e}");
        q.ok("query-block", json!({}));
    }
    let log = d.stderr();
    assert!(log.contains("server does not support byte ranges"), "{log}");
    assert!(log.contains("a range at offset 8193"), "{log}");
    assert!(log.contains("/short: read of"), "{log}");
    // A request for the whole file may be answered 200: those are its bytes.
    let whole: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let ahead = json!({"readahead": 1 << 20});
    add_remote_raw(&mut q, "whole", "http", &srv.url("http", "full"), ahead);
    let f = File::open(d.dev("whole")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_same_bytes(&buf, &whole, "whole file");
    d.quit();
}

/// The server goes away after open: reads of data not cached fail with
/// EIO (after retries) while cached data still reads; once it is back,
/// reads work again. The daemon stays up throughout.
#[test]
fn server_gone_mid_way_is_eio() {
    let dir = TestDir::new("remote-gone");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let want = data_file(&www.join("disk.img"), 8, 4 << 20);
    let port = free_tcp_port();
    let srv = nginx_on(&dir, &www, port, None);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("http", "disk.img");
    add_remote_raw(&mut q, "d0", "http", &url, json!({"timeout": 2}));
    let f = File::open(d.dev("d0")).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_same_bytes(&head, &want[..4096], "before");
    drop(srv);
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, 3 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // Inside the readahead of the first read: still served.
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert_same_bytes(&buf, &want[8192..8192 + 4096], "cached");
    q.ok("query-block", json!({}));
    assert!(d.stderr().contains("failed"), "{}", d.stderr());
    let srv = nginx_on(&dir, &www, port, None);
    f.read_exact_at(&mut buf, 3 << 20).unwrap();
    assert_same_bytes(&buf, &want[3 << 20..(3 << 20) + 4096], "after");
    drop(srv);
    d.quit();
}

/// Parallel readers of one device, with a readahead small enough that
/// their reads overlap fetches in flight, all get the file's bytes.
#[test]
fn parallel_readers_get_correct_bytes() {
    let dir = TestDir::new("remote-parallel");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let len = 16 << 20;
    let want = std::sync::Arc::new(data_file(&www.join("disk.img"), 9, len));
    let srv = nginx(&dir, &www);
    let d = Daemon::start(&dir, &[]);
    let mut q = d.qmp();
    let url = srv.url("http", "disk.img");
    add_remote_raw(&mut q, "d0", "http", &url, json!({"readahead": 32768}));
    let dev = d.dev("d0");
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (dev, want) = (dev.clone(), want.clone());
            std::thread::spawn(move || {
                let f = File::open(&dev).unwrap();
                let mut rng = Rng(t + 1);
                for _ in 0..150 {
                    let n = 512 * (1 + rng.below(256) as usize);
                    let off = rng.below((len - n) as u64) as usize;
                    let mut buf = vec![0u8; n];
                    f.read_exact_at(&mut buf, off as u64).unwrap();
                    assert_same_bytes(&buf, &want[off..off + n], "parallel read");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_same_bytes(&read_all(&dev), &want, "whole device");
    d.quit();
}
