//! The QMP socket: one reader and one writer thread per client. The reader
//! frames and handles messages; the writer sends replies and events in the
//! order they were queued, so a slow client never blocks the engine.

use blkfs_engine::qmp::framing::{Frame, Splitter};
use blkfs_engine::qmp::Session;
use blkfs_engine::Engine;
use crossbeam_channel::{bounded, Sender};
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Binds the control socket (mode 0600). A stale socket file is replaced;
/// one that a live server still answers on is an error.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use by a running server", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot set permissions of {}: {e}", path.display()))?;
    Ok(listener)
}

/// Most QMP clients connected at once: each costs two threads, and a
/// management stack needs a handful. Past it a client gets an error and
/// is closed, so a flood of idle connections cannot exhaust the daemon.
pub const MAX_CLIENTS: usize = 128;

/// Messages queued for one client before its events stop.
const EVENT_BACKLOG: usize = 4096;

/// Stack of a client thread: opening a backing chain recurses once per
/// image (up to 1024). Reserved, not touched, unless a chain is that deep.
const CLIENT_STACK: usize = 16 << 20;

pub fn serve(listener: UnixListener, engine: Arc<Engine>) {
    let connected = Arc::new(AtomicUsize::new(0));
    let spawned = std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(mut s) => {
                        if connected.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                            connected.fetch_sub(1, Ordering::SeqCst);
                            refuse(&mut s);
                            continue;
                        }
                        let slot = Slot(connected.clone());
                        let engine = engine.clone();
                        if let Err(e) = std::thread::Builder::new()
                            .name("qmp-client".into())
                            .stack_size(CLIENT_STACK)
                            .spawn(move || {
                                let _slot = slot;
                                client(s, engine)
                            })
                        {
                            log::error!("cannot start a QMP client thread: {e}");
                        }
                    }
                    Err(e) => log::warn!("QMP accept failed: {e}"),
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the QMP accept thread: {e}");
    }
}

/// A connected client's place under [`MAX_CLIENTS`], given back on drop
/// (also when its thread could not start).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Tells a client past the cap why it is closed. Non-blocking: a client
/// that does not read must not stall the accept loop.
fn refuse(s: &mut UnixStream) {
    log::warn!("QMP: refusing a client: {MAX_CLIENTS} are connected");
    let msg = json!({"error": {"class": "GenericError",
        "desc": format!("Too many QMP connections: at most {MAX_CLIENTS} clients may be connected at once")}});
    let _ = s.set_nonblocking(true);
    let _ = s.write_all(format!("{msg}\n").as_bytes());
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn client(stream: UnixStream, engine: Arc<Engine>) {
    let Ok(mut write_half) = stream.try_clone() else {
        return;
    };
    // Replies wait for room; events to a client that does not read are
    // dropped once this many are queued (see EventBus::emit).
    let (tx, rx) = bounded::<String>(EVENT_BACKLOG);
    let writer = std::thread::Builder::new()
        .name("qmp-writer".into())
        .spawn(move || {
            for mut line in rx.iter() {
                line.push('\n');
                if write_half.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
            let _ = write_half.shutdown(std::net::Shutdown::Write);
        });
    let Ok(writer) = writer else {
        return;
    };
    let mut session = Session::new(engine.clone());
    let subscription = read_loop(stream, &mut session, &engine, &tx);
    if let Some(id) = subscription.id {
        engine.events.unsubscribe(id);
    }
    drop(tx);
    // Everything queued (the reply to quit included) is written before quitting.
    let _ = writer.join();
    if subscription.quit {
        engine.request_quit();
    }
}

struct LoopEnd {
    id: Option<u64>,
    quit: bool,
}

fn read_loop(
    mut stream: UnixStream,
    session: &mut Session,
    engine: &Engine,
    tx: &Sender<String>,
) -> LoopEnd {
    let mut end = LoopEnd {
        id: None,
        quit: false,
    };
    if tx.send(session.greeting().to_string()).is_err() {
        return end;
    }
    let mut splitter = Splitter::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return end,
            Ok(n) => n,
        };
        splitter.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let reply = match frame {
                Ok(msg) => {
                    let out = session.handle(&msg);
                    if out.negotiated_now {
                        end.id = Some(engine.events.subscribe(tx.clone()));
                    }
                    end.quit |= out.quit;
                    out.reply
                }
                Err(desc) => json!({"error": {"class": "GenericError", "desc": desc}}),
            };
            if tx.send(reply.to_string()).is_err() {
                return end;
            }
            if end.quit {
                return end;
            }
        }
    }
}
