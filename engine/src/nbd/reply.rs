//! The reply side of a connection. Replies are sent from whichever thread
//! completes a request, in any order; such a thread must never block, so
//! it writes only what the socket takes at once and leaves the rest to
//! the connection's writer thread. A [`Budget`] bounds the requests and
//! bytes in flight: a request holds a [`Ticket`] until its reply is
//! written or dropped.

use super::sock::Stream;
use crate::io::Buf;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

/// Requests in flight per connection (QEMU allows 16; fio at QD32 and
/// nbdcopy's 64 need more to keep the device busy).
pub const MAX_REQUESTS: usize = 128;
/// Payload bytes in flight per connection; a single larger request
/// (up to 32 MiB) still goes alone.
pub const MAX_BYTES: u64 = 64 << 20;

/// Replies the writer gathers into one sendmsg (at most 2 iovecs each,
/// within IOV_MAX).
const BATCH: usize = 64;

#[derive(Default)]
pub struct Budget {
    used: Mutex<(usize, u64)>,
    cv: Condvar,
}

/// A request's share of the budget, given back when dropped.
pub struct Ticket {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut u = self.budget.used.lock();
        u.0 -= 1;
        u.1 -= self.bytes;
        self.budget.cv.notify_all();
    }
}

impl Budget {
    /// Waits until one more request of `bytes` fits.
    pub fn acquire(self: &Arc<Self>, bytes: u64) -> Ticket {
        let mut u = self.used.lock();
        while u.0 >= MAX_REQUESTS || (u.1 > 0 && u.1 + bytes > MAX_BYTES) {
            self.cv.wait(&mut u);
        }
        u.0 += 1;
        u.1 += bytes;
        Ticket {
            budget: self.clone(),
            bytes,
        }
    }

    /// Waits (until `deadline`) for every ticket to be given back.
    pub fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        let mut u = self.used.lock();
        while u.0 > 0 {
            match deadline {
                Some(d) => {
                    if self.cv.wait_until(&mut u, d).timed_out() {
                        return u.0 == 0;
                    }
                }
                None => self.cv.wait(&mut u),
            }
        }
        true
    }
}

/// One reply: a header (and small payload), then data.
pub struct Reply {
    head: Vec<u8>,
    data: Option<Buf>,
    sent: usize,
    _ticket: Ticket,
}

impl Reply {
    pub fn new(head: Vec<u8>, data: Option<Buf>, ticket: Ticket) -> Reply {
        Reply {
            head,
            data,
            sent: 0,
            _ticket: ticket,
        }
    }

    fn len(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |d| d.len())
    }

    /// The parts still to send.
    fn rest(&self) -> [&[u8]; 2] {
        let h = self.head.len();
        let data: &[u8] = self.data.as_deref().unwrap_or(&[]);
        if self.sent < h {
            [&self.head[self.sent..], data]
        } else {
            [&[], &data[self.sent - h..]]
        }
    }

    /// Writes what is left; Ok(true) once all of it is out.
    fn write(&mut self, s: &Stream, nonblocking: bool) -> std::io::Result<bool> {
        write_batch(std::slice::from_mut(self), s, nonblocking)
    }
}

/// Writes `replies` in order, gathered into as few sendmsg calls as the
/// socket allows; Ok(true) once all are out.
fn write_batch(replies: &mut [Reply], s: &Stream, nonblocking: bool) -> std::io::Result<bool> {
    let mut first = 0;
    while first < replies.len() {
        let parts: Vec<&[u8]> = replies[first..].iter().flat_map(|r| r.rest()).collect();
        let mut n = match s.send(&parts, nonblocking) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        };
        while n > 0 && first < replies.len() {
            let r = &mut replies[first];
            let step = n.min(r.len() - r.sent);
            r.sent += step;
            n -= step;
            if r.sent == r.len() {
                first += 1;
            }
        }
        while first < replies.len() && replies[first].sent == replies[first].len() {
            first += 1;
        }
    }
    Ok(true)
}

#[derive(Default)]
struct State {
    queue: VecDeque<Reply>,
    /// The writer thread is sending the reply it took off the queue.
    busy: bool,
    /// The socket failed: replies are dropped.
    dead: bool,
    /// No more replies will come: the writer ends once the queue is empty.
    finishing: bool,
}

pub struct Sender {
    stream: Arc<Stream>,
    st: Mutex<State>,
    cv: Condvar,
}

impl Sender {
    pub fn new(stream: Arc<Stream>) -> Sender {
        Sender {
            stream,
            st: Mutex::default(),
            cv: Condvar::new(),
        }
    }

    /// Sends `r` now as far as the socket takes it without waiting (under
    /// the lock, so replies never interleave); the writer does the rest.
    pub fn send(&self, mut r: Reply) {
        let mut st = self.st.lock();
        if st.dead {
            return;
        }
        if st.queue.is_empty() && !st.busy {
            match r.write(&self.stream, true) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => return self.kill(st, e),
            }
        }
        st.queue.push_back(r);
        self.cv.notify_all();
    }

    fn kill(&self, mut st: parking_lot::MutexGuard<State>, e: std::io::Error) {
        log::debug!("nbd: reply not sent ({e}); dropping the connection");
        st.dead = true;
        let dropped = std::mem::take(&mut st.queue);
        self.cv.notify_all();
        drop(st);
        self.stream.shutdown(Shutdown::Both);
        drop(dropped);
    }

    /// The writer thread: sends queued replies, blocking, several at a
    /// time, until [`Sender::finish`] and an empty queue, or a dead socket.
    pub fn run(&self) {
        loop {
            let mut batch: Vec<Reply> = {
                let mut st = self.st.lock();
                loop {
                    if st.dead {
                        return;
                    }
                    if !st.queue.is_empty() {
                        st.busy = true;
                        let n = st.queue.len().min(BATCH);
                        break st.queue.drain(..n).collect();
                    }
                    if st.finishing {
                        return;
                    }
                    self.cv.wait(&mut st);
                }
            };
            let res = write_batch(&mut batch, &self.stream, false);
            let mut st = self.st.lock();
            st.busy = false;
            if let Err(e) = res {
                self.kill(st, e);
            }
            drop(batch);
        }
    }

    pub fn finish(&self) {
        self.st.lock().finishing = true;
        self.cv.notify_all();
    }
}
