//! The curl protocols: `http`, `https`, `ftp`, `ftps` and `tftp`, a remote
//! file read with libcurl. Read-only, as QEMU's curl driver.
//!
//! - Open: the URL's scheme must be the driver's; the size comes from a HEAD
//!   (FTP: SIZE). An HTTP server must announce `Accept-Ranges: bytes`, as
//!   QEMU requires, and every ranged reply is checked on top: a 206 for
//!   exactly the range asked, else the read fails (a server that ignores
//!   ranges answers 200 with the whole file: never served as data).
//! - Reads: one ranged request fetches the read plus `readahead` bytes
//!   (default 256 KiB) into a small LRU cache ([`cache`]); later reads
//!   inside it come from memory, and reads inside a fetch in flight wait for
//!   it. Transfers run on a pool of threads of their own (libcurl blocks)
//!   with easy handles kept per node for connection reuse; a transient
//!   failure (refused or dropped connection, timeout, 5xx, short body) is
//!   tried again twice, then the read fails with EIO and a log line.
//! - tftp has no byte ranges (QEMU lists the protocol but its reads cannot
//!   work, and later QEMU dropped it): the whole file is downloaded at open,
//!   up to [`TFTP_MAX`] bytes, and served from memory.

mod cache;
mod transfer;

pub use transfer::Protocol;

use super::{Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::NodeOptions;
use crate::io::{self, Buf};
use crate::options::{CurlOptions, DriverName};
use cache::{Cache, Lookup};
use parking_lot::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use transfer::{Config, Handle};

/// QEMU's defaults and bounds for the options.
const DEFAULT_READAHEAD: u64 = 256 << 10;
/// The readahead's bound: a fetch allocates the read plus its readahead.
const MAX_READAHEAD: u64 = 64 << 20;
const DEFAULT_TIMEOUT: u64 = 5;
const MAX_TIMEOUT: u64 = 10_000;
/// The largest file read over tftp (all of it is held in memory).
pub const TFTP_MAX: usize = 64 << 20;
/// Sizes past this are taken for a broken server (QEMU's limit is near
/// 2^63; offsets here must leave room to add a request's length).
const MAX_SIZE: u64 = 1 << 62;
/// Ready segments the readahead cache keeps, and their bytes at most
/// (or two readaheads, when larger).
const CACHE_SEGMENTS: usize = 8;
const CACHE_BYTES: u64 = 16 << 20;
/// Idle easy handles (each with its connection) kept per node.
const IDLE_HANDLES: usize = 8;
/// Threads doing transfers, for all curl nodes: a transfer blocks its
/// thread for up to `timeout` seconds.
const TRANSFER_THREADS: usize = 8;

pub struct CurlDriver {
    protocol: Protocol,
    url: Arc<str>,
    size: u64,
    source: Source,
}

enum Source {
    Ranged(Arc<Remote>),
    /// tftp: the whole file, read at open.
    Whole(Vec<u8>),
}

/// A file read by ranges, shared with the transfers in flight.
struct Remote {
    cfg: Config,
    size: u64,
    readahead: u64,
    idle: Mutex<Vec<Handle>>,
    cache: Mutex<Cache<Waiter>>,
}

/// A read waiting for its segment.
struct Waiter {
    offset: u64,
    buf: Buf,
    done: Done<Buf>,
}

impl Waiter {
    fn fill(mut self, data: &[u8], at: usize) {
        let n = self.buf.len();
        match data.get(at..at + n) {
            Some(src) => {
                self.buf.copy_from_slice(src);
                (self.done)(Ok(self.buf))
            }
            None => (self.done)(Err(Error::io(
                libc::EIO,
                "readahead segment shorter than the read",
            ))),
        }
    }
}

impl CurlDriver {
    pub fn open(driver: DriverName, o: &CurlOptions, opts: &NodeOptions) -> Result<CurlDriver> {
        let protocol = Protocol::from_name(driver.as_str()).ok_or_else(|| {
            Error::generic(format!(
                "Driver '{}' is not a curl protocol",
                driver.as_str()
            ))
        })?;
        Self::open_as(protocol, o, opts)
    }

    fn open_as(protocol: Protocol, o: &CurlOptions, opts: &NodeOptions) -> Result<CurlDriver> {
        if !opts.read_only {
            return Err(super::mapped::read_only_error(protocol.name()));
        }
        let cfg = config(protocol, o)?;
        let url: Arc<str> = cfg.url.as_str().into();
        let opening = |e: Error| e.context(format!("Could not open '{url}'"));
        let mut h = transfer::handle(&cfg).map_err(opening)?;
        let (size, source) = if protocol == Protocol::Tftp {
            let data = transfer::read_all(&mut h, TFTP_MAX).map_err(opening)?;
            (data.len() as u64, Source::Whole(data))
        } else {
            let size = remote_size(&mut h, protocol).map_err(opening)?;
            let readahead = o.readahead.unwrap_or(DEFAULT_READAHEAD);
            let remote = Remote {
                cfg,
                size,
                readahead,
                idle: Mutex::new(Vec::new()),
                cache: Mutex::new(Cache::new(CACHE_SEGMENTS, CACHE_BYTES.max(2 * readahead))),
            };
            (size, Source::Ranged(Arc::new(remote)))
        };
        Ok(CurlDriver {
            protocol,
            url,
            size,
            source,
        })
    }

    /// The first `len` bytes of the file (fewer if it is shorter), read on
    /// the calling thread: for format probing.
    pub fn head_bytes(&self, len: usize) -> Result<Vec<u8>> {
        let n = (len as u64).min(self.size) as usize;
        match &self.source {
            Source::Whole(data) => Ok(data[..n].to_vec()),
            Source::Ranged(_) if n == 0 => Ok(Vec::new()),
            Source::Ranged(r) => r.fetch(0, n as u64).map(|b| b.to_vec()),
        }
    }
}

/// The transfer settings of `o`, checked against the driver's protocol.
fn config(protocol: Protocol, o: &CurlOptions) -> Result<Config> {
    let url = o.url.as_str();
    let name = protocol.name();
    let refuse = |why: &str| Error::generic(format!("Driver '{name}' cannot open '{url}': {why}"));
    if Protocol::of_url(url) != Some(protocol) {
        return Err(refuse(&format!("the URL must start with '{name}://'")));
    }
    if url
        .chars()
        .any(|c| c.is_ascii_whitespace() || c.is_control())
    {
        return Err(refuse("the URL contains spaces or control characters"));
    }
    let authority = url
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') {
        return Err(refuse("the URL names no host"));
    }
    let readahead = o.readahead.unwrap_or(DEFAULT_READAHEAD);
    if !readahead.is_multiple_of(512) || readahead > MAX_READAHEAD {
        return Err(Error::generic(format!(
            "readahead {readahead} must be a multiple of 512, at most {MAX_READAHEAD}"
        )));
    }
    let timeout = o.timeout.unwrap_or(DEFAULT_TIMEOUT);
    if !(1..=MAX_TIMEOUT).contains(&timeout) {
        return Err(Error::generic(format!(
            "timeout {timeout} must be 1 to {MAX_TIMEOUT} seconds"
        )));
    }
    Ok(Config {
        url: url.to_string(),
        protocol,
        timeout: Duration::from_secs(timeout),
        sslverify: o.sslverify.unwrap_or(true),
        cookie: o.cookie.clone(),
    })
}

/// The size the server reports, and (HTTP) its promise of byte ranges.
fn remote_size(h: &mut Handle, protocol: Protocol) -> Result<u64> {
    let head = transfer::head(h)?;
    let size = head
        .size
        .ok_or_else(|| Error::generic("the server did not report the file's size"))?;
    if size > MAX_SIZE {
        return Err(Error::generic(format!(
            "the server reported an implausible size ({size} bytes)"
        )));
    }
    if matches!(protocol, Protocol::Http | Protocol::Https) && !head.accept_ranges {
        return Err(Error::generic(
            "the server does not support byte ranges (no 'Accept-Ranges: bytes')",
        ));
    }
    Ok(size)
}

/// Runs a transfer on the curl threads (they run completions).
fn spawn(job: impl FnOnce() + Send + 'static) {
    static THREADS: OnceLock<crossbeam_channel::Sender<io::Job>> = OnceLock::new();
    let tx = THREADS.get_or_init(|| io::job_threads("blkfs-curl", TRANSFER_THREADS, true));
    io::send_job(tx, Box::new(job));
}

impl Remote {
    fn read(self: &Arc<Self>, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        let fetch_len = (len + self.readahead).min(self.size - offset);
        let waiter = Waiter { offset, buf, done };
        let lookup = self.cache.lock().lookup(offset, len, fetch_len, waiter);
        match lookup {
            Lookup::Hit { waiter, data, at } => waiter.fill(&data, at),
            Lookup::Queued => {}
            Lookup::Fetch { id, start, len } => {
                let me = self.clone();
                spawn(move || me.fetch_segment(id, start, len));
            }
        }
    }

    /// Fetches a segment and answers the reads waiting for it.
    fn fetch_segment(&self, id: u64, start: u64, len: u64) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fetch(start, len)))
            .unwrap_or_else(|_| Err(Error::io(libc::EIO, "the transfer panicked")));
        let data = match r {
            Ok(b) => Ok(Arc::new(b)),
            Err(e) => {
                let e = e.context(format!(
                    "{}: read of {len} bytes at offset {start} failed",
                    self.cfg.url
                ));
                log::error!("{e}");
                Err(Error::io(libc::EIO, e.msg))
            }
        };
        let waiters = self.cache.lock().finish(id, data.as_ref().ok().cloned());
        for w in waiters {
            match &data {
                Ok(d) => {
                    let at = (w.offset - start) as usize;
                    w.fill(d, at)
                }
                Err(e) => (w.done)(Err(e.clone())),
            }
        }
    }

    /// Reads `len` bytes at `start` on this thread, with retries.
    fn fetch(&self, start: u64, len: u64) -> Result<Buf> {
        let pooled = self.idle.lock().pop();
        let mut h = match pooled {
            Some(h) => h,
            None => transfer::handle(&self.cfg)?,
        };
        let what = format!("{}: read at offset {start}", self.cfg.url);
        let r = transfer::with_retries(&what, || {
            transfer::read_range(&mut h, &self.cfg, start, len as usize, self.size)
        });
        let mut idle = self.idle.lock();
        if idle.len() < IDLE_HANDLES {
            idle.push(h);
        }
        r
    }
}

impl Driver for CurlDriver {
    fn format_name(&self) -> &'static str {
        self.protocol.name()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, mut buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        if len == 0 {
            return done(Ok(buf));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return done(Err(Error::io(libc::EIO, "read past the end of the file")));
        }
        match &self.source {
            Source::Whole(data) => {
                let at = offset as usize;
                buf.copy_from_slice(&data[at..at + len as usize]);
                done(Ok(buf))
            }
            Source::Ranged(r) => r.read(offset, buf, done),
        }
    }

    fn write(&self, _offset: u64, _buf: Buf, done: Done<Buf>) {
        done(Err(self.read_only()))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool, done: Done<()>) {
        done(Err(self.read_only()))
    }

    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(Err(self.read_only()))
    }

    fn flush(&self, done: Done<()>) {
        done(Ok(()))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let len = super::status_len(offset, len, self.size)?;
        Ok(Status::data(len, Some(offset)))
    }

    fn allocated_size(&self) -> Option<u64> {
        None
    }

    fn filename(&self) -> String {
        self.url.to_string()
    }
}

impl CurlDriver {
    fn read_only(&self) -> Error {
        Error::io(
            libc::EROFS,
            format!(
                "'{}': the {} driver is read-only",
                self.url,
                self.protocol.name()
            ),
        )
    }
}

/// The format of the image at a URL, from its first bytes.
pub fn probe(protocol: Protocol, o: &CurlOptions) -> Result<&'static str> {
    let ro = NodeOptions {
        read_only: true,
        ..NodeOptions::default()
    };
    let d = CurlDriver::open_as(protocol, o, &ro)?;
    let head = d.head_bytes(512)?;
    Ok(super::probe::probe_bytes(&head, &o.url))
}

/// The URL of a backing file named `name` in the image at `image`: `name`
/// itself when it is a URL, else resolved against the image's URL as QEMU
/// does (its directory, up to the last '/', then `name`). None when
/// `image` is not a URL or `name` is an absolute path (a local file, as in
/// QEMU).
pub fn backing_url(image: &str, name: &str) -> Option<String> {
    if Protocol::of_url(name).is_some() {
        return Some(name.to_string());
    }
    Protocol::of_url(image)?;
    if name.starts_with('/') {
        return None;
    }
    let path_start = image.find("://").map_or(0, |i| i + 3);
    let dir_end = image[path_start..]
        .rfind('/')
        .map_or(image.len(), |i| path_start + i + 1);
    let dir = &image[..dir_end];
    let sep = if dir.ends_with('/') { "" } else { "/" };
    Some(format!("{dir}{sep}{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names() {
        let img = "http://h:8/d/e/top.qcow2";
        assert_eq!(
            backing_url(img, "base.raw").as_deref(),
            Some("http://h:8/d/e/base.raw")
        );
        assert_eq!(
            backing_url(img, "../b/base.raw").as_deref(),
            Some("http://h:8/d/e/../b/base.raw")
        );
        assert_eq!(
            backing_url("http://h", "base.raw").as_deref(),
            Some("http://h/base.raw")
        );
        assert_eq!(
            backing_url(img, "ftp://o/base").as_deref(),
            Some("ftp://o/base")
        );
        assert_eq!(backing_url(img, "/local/base.raw"), None);
        assert_eq!(backing_url("/local/top.qcow2", "base.raw"), None);
        assert_eq!(
            backing_url("/local/top.qcow2", "https://h/b").as_deref(),
            Some("https://h/b")
        );
    }

    #[test]
    fn options_are_checked() {
        let open = |driver, url: &str| {
            let o = CurlOptions {
                url: url.into(),
                ..Default::default()
            };
            config(driver, &o).map(|_| ()).map_err(|e| e.msg)
        };
        assert!(open(Protocol::Http, "http://127.0.0.1:1/x").is_ok());
        assert_eq!(
            open(Protocol::Http, "ftp://127.0.0.1/x").unwrap_err(),
            "Driver 'http' cannot open 'ftp://127.0.0.1/x': the URL must start with 'http://'"
        );
        assert!(open(Protocol::Http, "http:///x")
            .unwrap_err()
            .contains("names no host"));
        assert!(open(Protocol::Http, "http://user@:80/x")
            .unwrap_err()
            .contains("names no host"));
        assert!(open(Protocol::Http, "http://h/a b")
            .unwrap_err()
            .contains("spaces"));
        assert!(open(Protocol::Http, "http://h/a\nHost: x")
            .unwrap_err()
            .contains("control"));
        let with = |readahead, timeout| {
            let o = CurlOptions {
                url: "http://h/x".into(),
                readahead,
                timeout,
                ..Default::default()
            };
            config(Protocol::Http, &o).map(|_| ()).map_err(|e| e.msg)
        };
        assert!(with(Some(0), Some(1)).is_ok());
        assert!(with(Some(1000), None)
            .unwrap_err()
            .contains("multiple of 512"));
        assert!(with(Some(1 << 30), None).is_err());
        assert!(with(None, Some(0)).unwrap_err().contains("timeout"));
        assert!(with(None, Some(10_001)).is_err());
    }
}
