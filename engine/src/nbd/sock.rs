//! Sockets of the NBD server: a listener and a connected stream, each a
//! UNIX or TCP socket, and gathered writes that may be asked not to block.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Errors (not connected any more) are of no interest: the socket is
    /// being given up anyway.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// A name for the log.
    pub fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp".to_string(), |a| a.to_string()),
        }
    }

    /// Writes the start of `parts` with one sendmsg; `nonblocking`: return
    /// what fits now (possibly an error of kind WouldBlock) instead of
    /// waiting.
    pub fn send(&self, parts: &[&[u8]], nonblocking: bool) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        let mut flags = libc::MSG_NOSIGNAL;
        if nonblocking {
            flags |= libc::MSG_DONTWAIT;
        }
        loop {
            // SAFETY: every iovec points into a live slice of `parts`, which
            // outlives the call; the kernel only reads them.
            let n = unsafe { libc::sendmsg(self.fd(), &msg, flags) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Unix(s) => (&*s).read(b),
            Stream::Tcp(s) => (&*s).read(b),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.send(&[b], false)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are small and latency-bound: no Nagle delay.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// Wakes a thread blocked in [`Listener::accept`] (it fails with
    /// EINVAL on Linux) and refuses new connections.
    pub fn shutdown(&self) {
        let fd = match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        // SAFETY: plain syscall on a descriptor this listener owns.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}
