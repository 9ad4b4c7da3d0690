//! One client connection: the handshake, then the transmission phase.
//! This thread reads requests and submits them to the device; replies go
//! out from the completions ([`super::reply`]). When the client leaves,
//! or the export or server is closed (the socket's read side is shut
//! down), the requests in flight finish and their replies are sent
//! before the socket closes.

use super::handshake::{self, End, Negotiated};
use super::proto::{self, *};
use super::reply::{Budget, Reply, Sender, Ticket};
use super::server::{ConnHandle, Export, Shared};
use super::sock::Stream;
use crate::device::Device;
use crate::drivers::Done;
use crate::error::Error;
use crate::io::Buf;
use std::io::{BufReader, Read, Write};
use std::sync::Arc;
use std::time::Duration;

/// A client that has not finished its handshake after this long is
/// dropped (later QEMU's default handshake limit), so silent connections
/// hold no thread for good.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most extents in one block status reply (QEMU's: 1 MiB of them).
const MAX_EXTENTS: usize = (1 << 20) / 8;

/// The connection's reader: buffered, so small headers cost no syscall
/// each; payloads larger than the buffer are read straight into place.
struct Duplex {
    rd: BufReader<StreamRef>,
    stream: Arc<Stream>,
}

struct StreamRef(Arc<Stream>);

impl Read for StreamRef {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(b)
    }
}

impl Read for Duplex {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.rd.read(b)
    }
}

impl Write for Duplex {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        (&*self.stream).write(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves one accepted connection until it ends.
pub(super) fn serve(shared: Arc<Shared>, handle: Arc<ConnHandle>) {
    let stream = handle.stream.clone();
    let peer = stream.peer();
    let mut io = Duplex {
        rd: BufReader::with_capacity(256 << 10, StreamRef(stream.clone())),
        stream: stream.clone(),
    };
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let catalog = shared.catalog(&handle);
    let negotiated = match handshake::negotiate(&mut io, &catalog) {
        Ok(End::Go(n)) => n,
        Ok(End::Abort) => return log::debug!("nbd: {peer}: client aborted the handshake"),
        Err(e) => return log::info!("nbd: {peer}: handshake failed: {e}"),
    };
    let Some(export) = handle.export() else {
        return;
    };
    let _ = stream.set_read_timeout(None);
    log::debug!("nbd: {peer}: serving export '{}'", negotiated.name);
    let conn = Arc::new(Conn {
        dev: export.device.clone(),
        structured: negotiated.structured,
        sender: Sender::new(stream.clone()),
    });
    let writer = {
        let conn = conn.clone();
        std::thread::Builder::new()
            .name("nbd-send".into())
            .spawn(move || conn.sender.run())
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => return log::warn!("nbd: {peer}: cannot start a writer thread: {e}"),
    };
    let budget = Arc::new(Budget::default());
    if let Err(e) = transmit(&mut io, &conn, &export, &negotiated, &budget) {
        log::info!("nbd: {peer}: {e}; disconnecting");
    }
    // Requests in flight finish and their replies go out first.
    budget.wait_idle(None);
    conn.sender.finish();
    let _ = writer.join();
    stream.shutdown(std::net::Shutdown::Both);
}

/// The request loop; Ok when the client disconnected (or the socket was
/// shut down under it), Err for a protocol violation that ends it.
fn transmit(
    io: &mut Duplex,
    conn: &Arc<Conn>,
    export: &Export,
    n: &Negotiated,
    budget: &Arc<Budget>,
) -> Result<(), String> {
    loop {
        let mut hdr = [0u8; REQUEST_SIZE];
        if io.read_exact(&mut hdr).is_err() {
            return Ok(());
        }
        let req = parse_request(&hdr)?;
        if req.kind == CMD_DISC {
            return Ok(());
        }
        if payload_too_big(&req) {
            // The payload is not read, so the stream cannot stay in step.
            let msg = format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len);
            conn.status(budget.acquire(0), req.cookie, Some((EINVAL, &msg)));
            return Err(msg);
        }
        let limits = Limits {
            size: conn.dev.size(),
            read_only: !export.writable || conn.dev.read_only(),
            structured: n.structured,
            block_status: n.block_status,
        };
        let checked = check_request(&req, &limits);
        let bytes = match req.kind {
            CMD_WRITE => u64::from(req.len),
            CMD_READ | CMD_CACHE if checked.is_ok() => u64::from(req.len),
            _ => 0,
        };
        let ticket = budget.acquire(bytes);
        let payload = if req.kind == CMD_WRITE {
            let mut b = Buf::recycled(req.len as usize);
            if let Err(e) = io.read_exact(&mut b) {
                return Err(format!("read failed (CMD_WRITE data): {e}"));
            }
            Some(b)
        } else {
            None
        };
        match checked {
            Ok(()) => conn.clone().run(req, payload, ticket),
            Err(r) => conn.status(ticket, req.cookie, Some((r.errno, &r.msg))),
        }
    }
}

/// What the completions of one connection share.
struct Conn {
    dev: Arc<Device>,
    structured: bool,
    sender: Sender,
}

type Errno = Option<(u32, &'static str)>;

impl Conn {
    /// A reply without data.
    fn status(&self, ticket: Ticket, cookie: u64, err: Option<(u32, &str)>) {
        let head = status_reply(self.structured, cookie, err);
        self.sender.send(Reply::new(head, None, ticket));
    }

    /// A completion that answers with a status reply; `what` names the
    /// operation in an error chunk, as QEMU's messages do.
    fn status_done(self: Arc<Self>, t: Ticket, cookie: u64, what: &'static str) -> Done<()> {
        Box::new(move |r| {
            let err: Errno = r.err().map(|e| {
                log::debug!("nbd: {what}: {e}");
                (nbd_errno(e.errno()), what)
            });
            self.status(t, cookie, err)
        })
    }

    /// `done` after a flush when the request asked for FUA.
    fn then_flush(self: &Arc<Self>, fua: bool, done: Done<()>) -> Done<()> {
        if !fua {
            return done;
        }
        let dev = self.dev.clone();
        Box::new(move |r: crate::error::Result<()>| match r {
            Ok(()) => dev.flush(done),
            Err(e) => done(Err(e)),
        })
    }

    fn run(self: Arc<Self>, req: Request, payload: Option<Buf>, t: Ticket) {
        let (offset, len) = (req.offset, u64::from(req.len));
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let c = req.cookie;
        // Empty ranges succeed without reaching the device.
        if len == 0
            && matches!(
                req.kind,
                CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM | CMD_CACHE
            )
        {
            return self.status(t, c, None);
        }
        match req.kind {
            CMD_READ if fua => {
                // QEMU flushes before a read with FUA.
                let dev = self.dev.clone();
                let me = self.clone();
                dev.flush(Box::new(move |r| match r {
                    Ok(()) => me.read(t, c, offset, len),
                    Err(e) => me.status_done(t, c, "flush failed")(Err(e)),
                }))
            }
            CMD_READ => self.read(t, c, offset, len),
            CMD_WRITE => {
                let Some(buf) = payload else {
                    return self.status(t, c, Some((EINVAL, "missing payload")));
                };
                let dev = self.dev.clone();
                let done = self.then_flush(
                    fua,
                    self.clone().status_done(t, c, "writing to file failed"),
                );
                dev.write(offset, buf, Box::new(move |r| done(r.map(drop))))
            }
            CMD_WRITE_ZEROES => {
                let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                let dev = self.dev.clone();
                let done = self.then_flush(
                    fua,
                    self.clone().status_done(t, c, "writing to file failed"),
                );
                dev.write_zeroes(offset, len, unmap, done)
            }
            CMD_TRIM => {
                let dev = self.dev.clone();
                let done = self.then_flush(fua, self.clone().status_done(t, c, "discard failed"));
                dev.discard(offset, len, done)
            }
            CMD_FLUSH => {
                let dev = self.dev.clone();
                dev.flush(self.status_done(t, c, "flush failed"))
            }
            CMD_CACHE => {
                // A read whose data is dropped: it warms the caches below.
                let dev = self.dev.clone();
                let done = self.status_done(t, c, "caching data failed");
                dev.read(offset, len as usize, Box::new(move |r| done(r.map(drop))))
            }
            CMD_BLOCK_STATUS => {
                let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                let head = match extents(&self.dev, offset, len, one) {
                    Ok(ext) => block_status_chunk(c, BASE_ALLOCATION_ID, &ext),
                    Err(e) => {
                        log::debug!("nbd: block status: {e}");
                        error_chunk(c, nbd_errno(e.errno()), "can't get block status")
                    }
                };
                self.sender.send(Reply::new(head, None, t))
            }
            // check_request lets no other command through.
            _ => self.status(t, c, Some((EINVAL, "invalid request type"))),
        }
    }

    fn read(self: Arc<Self>, t: Ticket, cookie: u64, offset: u64, len: u64) {
        let dev = self.dev.clone();
        dev.read(
            offset,
            len as usize,
            Box::new(move |r| match r {
                Ok(buf) if self.structured && buf.is_empty() => self.status(t, cookie, None),
                Ok(buf) if self.structured => {
                    let head = data_chunk_head(cookie, offset, buf.len() as u32);
                    self.sender.send(Reply::new(head, Some(buf), t))
                }
                Ok(buf) => {
                    let head = proto::simple_reply(cookie, 0).to_vec();
                    self.sender.send(Reply::new(head, Some(buf), t))
                }
                Err(e) => {
                    log::debug!("nbd: read: {e}");
                    let err = (nbd_errno(e.errno()), "reading from file failed");
                    self.status(t, cookie, Some(err))
                }
            }),
        )
    }
}

/// `base:allocation` extents of `offset..offset+len` through the device's
/// backing chain: data or hole, and whether it reads as zeroes.
fn extents(dev: &Device, offset: u64, len: u64, one: bool) -> Result<Vec<(u32, u32)>, Error> {
    let root = dev.root();
    let max = if one { 1 } else { MAX_EXTENTS };
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let e = crate::map::entry_at(&root, pos, end - pos)?;
        let flags = if e.data { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
        // At most `len`, which fits 32 bits.
        let l = e.length.min(end - pos);
        if !push_extent(&mut out, max, l as u32, flags) {
            break;
        }
        pos += l;
    }
    Ok(out)
}
