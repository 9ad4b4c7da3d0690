//! One libcurl transfer at a time on a reusable easy handle: the size
//! query at open, ranged reads with their checks, a whole-file download
//! (tftp), and the retry policy for transient failures.

use crate::error::{Error, Result};
use crate::io::Buf;
use curl::easy::{Easy2, Handler, WriteError};
use std::time::Duration;

/// The protocols of the curl driver, named as their drivers and schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Https,
    Ftp,
    Ftps,
    Tftp,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Http,
        Protocol::Https,
        Protocol::Ftp,
        Protocol::Ftps,
        Protocol::Tftp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Ftp => "ftp",
            Protocol::Ftps => "ftps",
            Protocol::Tftp => "tftp",
        }
    }

    pub fn from_name(name: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The protocol of a URL by its scheme (`http://...`), case-insensitive.
    pub fn of_url(url: &str) -> Option<Protocol> {
        let (scheme, _) = url.split_once("://")?;
        Protocol::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(scheme))
    }

    fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// What every handle of a node is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub protocol: Protocol,
    pub timeout: Duration,
    pub sslverify: bool,
    pub cookie: Option<String>,
}

/// Where the body of a transfer goes.
enum Sink {
    /// HEAD / FTP SIZE: libcurl may pass header-like text as body; dropped.
    Discard,
    /// A ranged read: exactly this many bytes are expected.
    Exact { buf: Buf, got: usize },
    /// A whole-file download, refused past `limit` bytes.
    Grow { data: Vec<u8>, limit: usize },
}

/// Why the body callback stopped a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// An HTTP range request answered with another status (a server that
    /// ignores ranges answers 200 with the whole file).
    NotPartial(u32),
    /// A 206 for another range than the one asked for.
    WrongRange(Option<u64>),
    TooLong,
    TooBig(usize),
}

/// The per-transfer state libcurl's callbacks fill.
pub struct Collector {
    sink: Sink,
    /// Checks for a ranged HTTP read: the start the reply must begin at.
    partial_from: Option<u64>,
    status: Option<u32>,
    accept_ranges: bool,
    content_length: Option<u64>,
    content_range_start: Option<u64>,
    refused: Option<Refusal>,
}

impl Collector {
    fn new() -> Collector {
        Collector {
            sink: Sink::Discard,
            partial_from: None,
            status: None,
            accept_ranges: false,
            content_length: None,
            content_range_start: None,
            refused: None,
        }
    }

    fn reset(&mut self, sink: Sink, partial_from: Option<u64>) {
        *self = Collector {
            sink,
            partial_from,
            ..Collector::new()
        };
    }

    /// Checks done once the headers of the final response are in.
    fn check_reply(&self) -> Option<Refusal> {
        let start = self.partial_from?;
        if self.status != Some(206) {
            return Some(Refusal::NotPartial(self.status.unwrap_or(0)));
        }
        (self.content_range_start != Some(start))
            .then_some(Refusal::WrongRange(self.content_range_start))
    }
}

impl Handler for Collector {
    fn write(&mut self, data: &[u8]) -> std::result::Result<usize, WriteError> {
        if self.refused.is_none() {
            self.refused = self.check_reply();
        }
        if self.refused.is_some() {
            // Fewer bytes than given: libcurl aborts with a write error.
            return Ok(0);
        }
        match &mut self.sink {
            Sink::Discard => {}
            Sink::Exact { buf, got } => {
                let Some(dst) = buf.get_mut(*got..*got + data.len()) else {
                    self.refused = Some(Refusal::TooLong);
                    return Ok(0);
                };
                dst.copy_from_slice(data);
                *got += data.len();
            }
            Sink::Grow { data: all, limit } => {
                if all.len() + data.len() > *limit {
                    self.refused = Some(Refusal::TooBig(*limit));
                    return Ok(0);
                }
                all.extend_from_slice(data);
            }
        }
        Ok(data.len())
    }

    fn header(&mut self, line: &[u8]) -> bool {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if line.starts_with("HTTP/") {
            // A new response (after a redirect or a 100 Continue): start over.
            self.status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            self.accept_ranges = false;
            self.content_length = None;
            self.content_range_start = None;
            return true;
        }
        let Some((name, value)) = line.split_once(':') else {
            return true;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "accept-ranges" => self.accept_ranges = value.eq_ignore_ascii_case("bytes"),
            "content-length" => self.content_length = value.parse().ok(),
            "content-range" => self.content_range_start = parse_content_range_start(value),
            _ => {}
        }
        true
    }
}

/// The first byte of `bytes FIRST-LAST/TOTAL`.
fn parse_content_range_start(v: &str) -> Option<u64> {
    let rest = v.strip_prefix("bytes")?.trim_start();
    rest.split_once('-')?.0.trim().parse().ok()
}

pub type Handle = Easy2<Collector>;

/// A handle configured for `cfg`; connections it opens are kept for the
/// next transfer on it.
pub fn handle(cfg: &Config) -> Result<Handle> {
    let mut h = Easy2::new(Collector::new());
    let r = (|| -> std::result::Result<(), curl::Error> {
        h.url(&cfg.url)?;
        // Redirects stay on http(s)/ftp(s): libcurl's default redirect
        // protocols since 7.65.2, and the URL's own scheme is checked at open.
        h.follow_location(true)?;
        h.max_redirections(8)?;
        h.fail_on_error(true)?;
        h.timeout(cfg.timeout)?;
        h.connect_timeout(cfg.timeout)?;
        h.ssl_verify_peer(cfg.sslverify)?;
        h.ssl_verify_host(cfg.sslverify)?;
        if let Some(c) = &cfg.cookie {
            h.cookie(c)?;
        }
        Ok(())
    })();
    r.map_err(|e| curl_error(&e, None))?;
    Ok(h)
}

/// What the server says about the file, from a HEAD (FTP: SIZE).
pub struct Head {
    pub size: Option<u64>,
    pub accept_ranges: bool,
}

pub fn head(h: &mut Handle) -> Result<Head> {
    h.get_mut().reset(Sink::Discard, None);
    let r = h.nobody(true).and_then(|()| h.perform());
    r.map_err(|e| curl_error(&e, h.response_code().ok()))?;
    let c = h.get_ref();
    let size = c.content_length.or_else(|| {
        h.content_length_download()
            .ok()
            .filter(|l| *l >= 0.0)
            .map(|l| l as u64)
    });
    Ok(Head {
        size,
        accept_ranges: c.accept_ranges,
    })
}

/// A failed transfer, and whether trying again may help.
pub struct Failure {
    pub error: Error,
    pub transient: bool,
}

/// Reads `len` bytes at `start` of a file of `size` bytes with one ranged
/// request; anything but exactly those bytes is an error.
pub fn read_range(
    h: &mut Handle,
    cfg: &Config,
    start: u64,
    len: usize,
    size: u64,
) -> std::result::Result<Buf, Failure> {
    let whole = start == 0 && len as u64 == size;
    // A 200 for the whole file is the right bytes; for any other range only a 206 is.
    let partial_from = (cfg.protocol.is_http() && !whole).then_some(start);
    let sink = Sink::Exact {
        buf: Buf::recycled(len),
        got: 0,
    };
    h.get_mut().reset(sink, partial_from);
    let range = format!("{start}-{}", start + len as u64 - 1);
    let r = h.range(&range).and_then(|()| h.perform());
    let c = h.get_mut();
    let sink = std::mem::replace(&mut c.sink, Sink::Discard);
    let refused = c.refused.or_else(|| c.check_reply());
    if let Some(why) = refused {
        return Err(Failure {
            error: refusal_error(why, start),
            transient: false,
        });
    }
    if let Err(e) = r {
        let code = h.response_code().ok();
        return Err(Failure {
            transient: is_transient(&e, code),
            error: curl_error(&e, code),
        });
    }
    match sink {
        Sink::Exact { buf, got } if got == len => Ok(buf),
        Sink::Exact { got, .. } => Err(Failure {
            error: Error::io(
                libc::EIO,
                format!("short read: the server sent {got} of {len} bytes"),
            ),
            transient: true,
        }),
        _ => Err(Failure {
            error: Error::io(libc::EIO, "transfer lost its buffer"),
            transient: false,
        }),
    }
}

/// Downloads the whole file, refusing one larger than `limit` bytes.
pub fn read_all(h: &mut Handle, limit: usize) -> Result<Vec<u8>> {
    let sink = Sink::Grow {
        data: Vec::new(),
        limit,
    };
    h.get_mut().reset(sink, None);
    let r = h.perform();
    let c = h.get_mut();
    let sink = std::mem::replace(&mut c.sink, Sink::Discard);
    if let Some(why) = c.refused {
        return Err(refusal_error(why, 0));
    }
    r.map_err(|e| curl_error(&e, h.response_code().ok()))?;
    match sink {
        Sink::Grow { data, .. } => Ok(data),
        _ => Err(Error::io(libc::EIO, "transfer lost its buffer")),
    }
}

/// Runs `attempt` up to [`ATTEMPTS`] times while it fails transiently,
/// waiting longer before each new try; `what` names it in the log.
pub fn with_retries<T>(
    what: &str,
    mut attempt: impl FnMut() -> std::result::Result<T, Failure>,
) -> Result<T> {
    let mut wait = FIRST_BACKOFF;
    let mut tries = 1;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(f) if f.transient && tries < ATTEMPTS => {
                log::warn!("{what}: {}; retrying in {wait:?}", f.error);
                std::thread::sleep(wait);
                wait *= 4;
                tries += 1;
            }
            Err(f) => return Err(f.error),
        }
    }
}

/// Tries of one read before it fails (QEMU makes one; a dropped connection
/// or a 503 should not reach the guest as EIO at once).
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

fn is_transient(e: &curl::Error, code: Option<u32>) -> bool {
    e.is_couldnt_connect()
        || e.is_operation_timedout()
        || e.is_recv_error()
        || e.is_send_error()
        || e.is_got_nothing()
        || e.is_partial_file()
        || e.is_again()
        || (e.is_http_returned_error() && code.is_some_and(|c| c >= 500 || c == 429))
}

fn curl_error(e: &curl::Error, code: Option<u32>) -> Error {
    let what = match (e.is_http_returned_error(), code) {
        (true, Some(c)) if c > 0 => format!("HTTP error {c}"),
        _ => match e.extra_description() {
            Some(extra) => format!("{} ({extra})", e.description()),
            None => e.description().to_string(),
        },
    };
    Error::io(libc::EIO, what)
}

fn refusal_error(why: Refusal, start: u64) -> Error {
    let what = match why {
        Refusal::NotPartial(status) => format!(
            "server does not support byte ranges (a range request got HTTP {status}, not 206)"
        ),
        Refusal::WrongRange(got) => format!(
            "server answered a range request at offset {start} with {}",
            got.map_or("no Content-Range".to_string(), |g| format!(
                "a range at offset {g}"
            ))
        ),
        Refusal::TooLong => "server sent more bytes than asked for".to_string(),
        Refusal::TooBig(limit) => format!(
            "the file is larger than {limit} bytes, the most read whole (tftp has no byte ranges)"
        ),
    };
    Error::io(libc::EIO, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(Protocol::of_url("http://h/x"), Some(Protocol::Http));
        assert_eq!(Protocol::of_url("HTTPS://h/x"), Some(Protocol::Https));
        assert_eq!(Protocol::of_url("tftp://h/x"), Some(Protocol::Tftp));
        assert_eq!(Protocol::of_url("nbd://h/x"), None);
        assert_eq!(Protocol::of_url("/a/http://"), None);
        assert_eq!(Protocol::of_url("http:/h"), None);
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(parse_content_range_start("bytes  0-0/1"), Some(0));
        assert_eq!(parse_content_range_start("bytes */1000"), None);
        assert_eq!(parse_content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn headers_and_body_checks() {
        let mut c = Collector::new();
        let sink = Sink::Exact {
            buf: Buf::zeroed(4),
            got: 0,
        };
        c.reset(sink, Some(8));
        // A redirect first: its headers must not count.
        assert!(c.header(b"HTTP/1.1 302 Found\r\n"));
        assert!(c.header(b"Content-Range: bytes 8-11/100\r\n"));
        assert!(c.header(b"HTTP/1.1 200 OK\r\n"));
        assert!(c.header(b"Accept-Ranges: bytes\r\n"));
        assert!(c.header(b"Content-Length: 100\r\n"));
        assert_eq!(c.write(b"abcd").ok(), Some(0));
        assert_eq!(c.refused, Some(Refusal::NotPartial(200)));
        assert!(c.accept_ranges);
        assert_eq!(c.content_length, Some(100));

        c.reset(
            Sink::Exact {
                buf: Buf::zeroed(4),
                got: 0,
            },
            Some(8),
        );
        c.header(b"HTTP/1.1 206 Partial Content\r\n");
        c.header(b"content-range: bytes 8-11/100\r\n");
        assert_eq!(c.write(b"ab").ok(), Some(2));
        assert_eq!(c.write(b"cd").ok(), Some(2));
        assert_eq!(c.write(b"e").ok(), Some(0));
        assert_eq!(c.refused, Some(Refusal::TooLong));

        c.reset(
            Sink::Exact {
                buf: Buf::zeroed(4),
                got: 0,
            },
            Some(8),
        );
        c.header(b"HTTP/1.1 206 Partial Content\r\n");
        c.header(b"Content-Range: bytes 0-3/100\r\n");
        assert_eq!(c.write(b"abcd").ok(), Some(0));
        assert_eq!(c.refused, Some(Refusal::WrongRange(Some(0))));

        c.reset(
            Sink::Grow {
                data: Vec::new(),
                limit: 3,
            },
            None,
        );
        assert_eq!(c.write(b"ab").ok(), Some(2));
        assert_eq!(c.write(b"cd").ok(), Some(0));
        assert_eq!(c.refused, Some(Refusal::TooBig(3)));
    }
}
