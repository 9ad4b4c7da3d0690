//! The NBD server: one listening socket, the exports, and the connections
//! (a thread each). Exports and connections share one lock, so a
//! connection is bound to an export only while that export is listed,
//! and removing an export finds every connection that uses it.

use super::conn;
use super::handshake::{Catalog, ExportInfo};
use super::proto::*;
use super::sock::{Listener, Stream};
use crate::device::Device;
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::net::{Shutdown, TcpListener, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections served at once; more are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a closing connection may take to finish its requests and
/// send their replies before its socket is shut down under it.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Then how long to wait for its thread before giving up on it (a device
/// stopped by its error policy holds requests until `cont`).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Inet { host: String, port: String },
}

/// A named export of a device. Nothing ties it to how the device came to
/// be: a bare node's export will get an anonymous device.
pub struct Export {
    pub name: String,
    pub device: Arc<Device>,
    pub writable: bool,
}

impl Export {
    /// Transmission flags as QEMU sets them: commands that write are
    /// advertised on read-only exports too, and fail with EPERM.
    fn flags(&self) -> u16 {
        let mut f = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_CACHE
            // Every connection goes through the same device, so a flush
            // on one covers the writes completed on all.
            | FLAG_CAN_MULTI_CONN;
        if !self.writable || self.device.read_only() {
            f |= FLAG_READ_ONLY;
        }
        f
    }
}

/// A connection as the server sees it.
pub(super) struct ConnHandle {
    id: u64,
    pub stream: Arc<Stream>,
    closing: AtomicBool,
    export: Mutex<Option<Arc<Export>>>,
}

impl ConnHandle {
    pub fn export(&self) -> Option<Arc<Export>> {
        self.export.lock().clone()
    }

    /// Stops reading requests; those in flight still get their replies.
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.stream.shutdown(Shutdown::Read);
    }
}

#[derive(Default)]
struct State {
    exports: Vec<Arc<Export>>,
    conns: Vec<Arc<ConnHandle>>,
    next_id: u64,
    stopping: bool,
}

#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Signalled when a connection ends.
    gone: Condvar,
}

impl Shared {
    pub fn catalog(self: &Arc<Self>, conn: &Arc<ConnHandle>) -> ConnCatalog {
        ConnCatalog {
            shared: self.clone(),
            conn: conn.clone(),
        }
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let st = self.state.lock();
        st.exports.iter().find(|e| e.name == name).cloned()
    }

    /// Closes `conns` and waits until they are gone: gracefully first,
    /// then with their sockets shut down. False if some remain.
    fn close_and_wait(&self, conns: &[Arc<ConnHandle>]) -> bool {
        for c in conns {
            c.close();
        }
        let alive = |st: &State| {
            st.conns
                .iter()
                .filter(|c| conns.iter().any(|x| x.id == c.id))
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut st = self.state.lock();
        let deadline = Instant::now() + DRAIN_GRACE;
        while !alive(&st).is_empty() && !self.gone.wait_until(&mut st, deadline).timed_out() {}
        let left = alive(&st);
        if left.is_empty() {
            return true;
        }
        log::warn!(
            "nbd: {} connections still busy after {DRAIN_GRACE:?}; shutting their sockets down",
            left.len()
        );
        for c in &left {
            c.stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + CLOSE_WAIT;
        while !alive(&st).is_empty() && !self.gone.wait_until(&mut st, deadline).timed_out() {}
        alive(&st).is_empty()
    }

    fn accept_loop(self: Arc<Self>, listener: Arc<Listener>) {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    if self.state.lock().stopping {
                        return;
                    }
                    // Out of descriptors or a connection reset before it
                    // was taken: try again shortly.
                    log::warn!("nbd: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.admit(stream);
        }
    }

    fn admit(self: &Arc<Self>, stream: Stream) {
        let handle = {
            let mut st = self.state.lock();
            if st.stopping {
                return;
            }
            if st.conns.len() >= MAX_CONNECTIONS {
                log::warn!("nbd: {MAX_CONNECTIONS} clients connected; refusing another");
                return;
            }
            st.next_id += 1;
            let h = Arc::new(ConnHandle {
                id: st.next_id,
                stream: Arc::new(stream),
                closing: AtomicBool::new(false),
                export: Mutex::new(None),
            });
            st.conns.push(h.clone());
            h
        };
        let shared = self.clone();
        let h = handle.clone();
        let r = std::thread::Builder::new()
            .name(format!("nbd-conn-{}", handle.id))
            .spawn(move || {
                conn::serve(shared.clone(), h.clone());
                let mut st = shared.state.lock();
                st.conns.retain(|c| c.id != h.id);
                shared.gone.notify_all();
            });
        if let Err(e) = r {
            log::warn!("nbd: cannot start a connection thread: {e}");
            self.state.lock().conns.retain(|c| c.id != handle.id);
        }
    }
}

/// The exports as one connection's handshake sees them.
pub(super) struct ConnCatalog {
    shared: Arc<Shared>,
    conn: Arc<ConnHandle>,
}

impl Catalog for ConnCatalog {
    fn list(&self) -> Vec<(String, String)> {
        let st = self.shared.state.lock();
        st.exports
            .iter()
            .map(|e| (e.name.clone(), String::new()))
            .collect()
    }

    fn info(&self, name: &str) -> Option<ExportInfo> {
        self.shared.find(name).map(|e| ExportInfo {
            size: e.device.size(),
            flags: e.flags(),
            description: None,
        })
    }

    fn attach(&self, name: &str) -> bool {
        let st = self.shared.state.lock();
        if st.stopping || self.conn.closing.load(Ordering::SeqCst) {
            return false;
        }
        let Some(e) = st.exports.iter().find(|e| e.name == name) else {
            return false;
        };
        *self.conn.export.lock() = Some(e.clone());
        true
    }
}

struct Running {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    acceptor: Option<JoinHandle<()>>,
    /// The UNIX socket to remove when the server stops.
    path: Option<PathBuf>,
}

/// The NBD server of the daemon, started and stopped over QMP.
#[derive(Default)]
pub struct Server {
    running: Mutex<Option<Running>>,
}

fn not_running() -> Error {
    Error::generic("NBD server not running")
}

impl Server {
    pub fn start(&self, addr: &Address) -> Result<()> {
        let mut running = self.running.lock();
        if running.is_some() {
            return Err(Error::generic("NBD server already running"));
        }
        let (listener, path) = listen(addr)?;
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let (s, l) = (shared.clone(), listener.clone());
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || s.accept_loop(l))
                .map_err(|e| Error::generic(format!("cannot start the NBD server: {e}")))?
        };
        *running = Some(Running {
            shared,
            listener,
            acceptor: Some(acceptor),
            path,
        });
        Ok(())
    }

    /// Exports `device` as `name` (QEMU 2.1 names it after the device).
    pub fn add(&self, name: &str, device: Arc<Device>, writable: bool) -> Result<()> {
        let running = self.running.lock();
        let r = running.as_ref().ok_or_else(not_running)?;
        if name.len() > MAX_STRING {
            return Err(Error::generic(format!(
                "export name '{name:.80}...' too long"
            )));
        }
        let mut st = r.shared.state.lock();
        if st.exports.iter().any(|e| e.name == name) {
            return Err(Error::generic(format!(
                "NBD server already exporting device '{name}'"
            )));
        }
        // A read-only device is exported read-only, as QEMU 2.1 does.
        let writable = writable && !device.read_only();
        st.exports.push(Arc::new(Export {
            name: name.to_string(),
            device,
            writable,
        }));
        Ok(())
    }

    /// Removes an export; `hard`: even while clients use it (they are
    /// disconnected once their requests in flight finish).
    pub fn remove(&self, name: &str, hard: bool) -> Result<()> {
        let running = self.running.lock();
        let r = running.as_ref().ok_or_else(not_running)?;
        let users = {
            let mut st = r.shared.state.lock();
            let Some(pos) = st.exports.iter().position(|e| e.name == name) else {
                return Err(Error::generic(format!("Export '{name}' is not found")));
            };
            let exp = st.exports[pos].clone();
            let users: Vec<_> = st
                .conns
                .iter()
                .filter(|c| c.export().is_some_and(|e| Arc::ptr_eq(&e, &exp)))
                .cloned()
                .collect();
            if !hard && !users.is_empty() {
                return Err(Error::generic(format!("export '{name}' still in use")));
            }
            st.exports.remove(pos);
            users
        };
        if !r.shared.close_and_wait(&users) {
            log::warn!("nbd: export '{name}' removed; some of its clients are still finishing");
        }
        Ok(())
    }

    /// Closes the listener and every connection (after their requests in
    /// flight), and forgets the exports.
    pub fn stop(&self) -> Result<()> {
        let mut r = self.running.lock().take().ok_or_else(not_running)?;
        let conns = {
            let mut st = r.shared.state.lock();
            st.stopping = true;
            st.exports.clear();
            st.conns.clone()
        };
        r.listener.shutdown();
        if let Some(a) = r.acceptor.take() {
            let _ = a.join();
        }
        if !r.shared.close_and_wait(&conns) {
            log::warn!("nbd: server stopped; some clients are still finishing");
        }
        if let Some(p) = &r.path {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// At daemon shutdown: stops the server if it runs.
    pub fn shut_down(&self) {
        let _ = self.stop();
    }

    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }

    /// The names `device` is exported under.
    pub fn names_of(&self, device: &Device) -> Vec<String> {
        let running = self.running.lock();
        let Some(r) = running.as_ref() else {
            return Vec::new();
        };
        let st = r.shared.state.lock();
        st.exports
            .iter()
            .filter(|e| std::ptr::eq(Arc::as_ptr(&e.device), device))
            .map(|e| e.name.clone())
            .collect()
    }
}

fn listen(addr: &Address) -> Result<(Listener, Option<PathBuf>)> {
    match addr {
        Address::Unix(path) => {
            // A socket left behind by an earlier run is replaced, as QEMU does.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(|e| {
                Error::from_io(&e, format!("Failed to bind socket to {}", path.display()))
            })?;
            Ok((Listener::Unix(l), Some(path.clone())))
        }
        Address::Inet { host, port } => {
            let port: u16 = port
                .parse()
                .map_err(|_| Error::generic(format!("Failed to parse port '{port}'")))?;
            let host = match host.as_str() {
                "" => "0.0.0.0",
                h => h.trim_start_matches('[').trim_end_matches(']'),
            };
            let addrs: Vec<_> = (host, port)
                .to_socket_addrs()
                .map_err(|e| {
                    Error::from_io(&e, format!("address resolution failed for {host}:{port}"))
                })?
                .collect();
            let mut last = None;
            for a in &addrs {
                match TcpListener::bind(a) {
                    Ok(l) => return Ok((Listener::Tcp(l), None)),
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) => Error::from_io(&e, "Failed to bind socket"),
                None => Error::generic(format!("address resolution failed for {host}:{port}")),
            })
        }
    }
}
