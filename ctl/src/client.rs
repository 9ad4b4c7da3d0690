//! A synchronous QMP client over a UNIX stream socket.
//!
//! A reader thread cuts the server's stream into messages and hands them
//! over a channel, so waits can end at a deadline without losing a message
//! that was half read. Events that arrive while a command waits for its
//! reply are kept, in order, for `next_event` and `wait_event`.

use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum QmpError {
    /// The socket could not be reached or did not complete the handshake.
    Connect {
        socket: PathBuf,
        reason: String,
    },
    /// The server answered with an error reply.
    Command {
        class: String,
        desc: String,
    },
    /// The server closed the connection.
    Closed,
    Timeout(Duration),
    Io(io::Error),
    /// The server sent something that is not QMP.
    Protocol(String),
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Connect { socket, reason } => {
                write!(f, "cannot connect to {}: {reason}", socket.display())
            }
            QmpError::Command { class, desc } => write!(f, "{class}: {desc}"),
            QmpError::Closed => f.write_str("connection closed by the server"),
            QmpError::Timeout(t) => {
                write!(f, "no reply from the server within {} s", t.as_secs())
            }
            QmpError::Io(e) => write!(f, "socket error: {e}"),
            QmpError::Protocol(msg) => write!(f, "protocol error: {msg}"),
        }
    }
}

impl std::error::Error for QmpError {}

/// What to tell a user whose socket does not answer.
fn why_not(socket: &Path, e: &io::Error) -> String {
    use std::os::unix::fs::FileTypeExt;
    let hint = "start blkfs (--qmp PATH) or pass --socket PATH (or set BLKFS_SOCKET)";
    match std::fs::metadata(socket) {
        Err(_) => format!("no blkfs there: {hint}"),
        Ok(m) if !m.file_type().is_socket() => {
            "not a socket: pass the control socket blkfs was started with (--qmp)".to_string()
        }
        Ok(_) if e.kind() == io::ErrorKind::ConnectionRefused => {
            format!("no blkfs is listening (a stale socket?): {hint}")
        }
        Ok(_) => e.to_string(),
    }
}

impl QmpError {
    /// Error reply as the `{"error": ...}` member of a reply.
    fn from_reply(error: &Value) -> QmpError {
        let text = |k: &str| {
            error
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string()
        };
        QmpError::Command {
            class: text("class"),
            desc: text("desc"),
        }
    }
}

fn io_error(e: io::Error, timeout: Option<Duration>) -> QmpError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            QmpError::Timeout(timeout.unwrap_or_default())
        }
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => QmpError::Closed,
        _ => QmpError::Io(e),
    }
}

/// Reads messages until the end of the stream or the first error, which it
/// sends last. The server may split or join messages arbitrarily, so they
/// are cut by a streaming JSON parser rather than by lines.
fn read_messages(stream: UnixStream, tx: mpsc::Sender<Result<Value, QmpError>>) {
    let messages = serde_json::Deserializer::from_reader(BufReader::new(stream)).into_iter();
    for msg in messages {
        let msg = msg.map_err(|e| {
            if e.is_eof() {
                QmpError::Closed
            } else if e.is_io() {
                io_error(io::Error::from(e), None)
            } else {
                QmpError::Protocol(format!("invalid JSON from the server: {e}"))
            }
        });
        let failed = msg.is_err();
        // A send fails only once the client is gone.
        if tx.send(msg).is_err() || failed {
            return;
        }
    }
}

pub struct Client {
    writer: UnixStream,
    messages: Receiver<Result<Value, QmpError>>,
    /// Events read while waiting for a reply, oldest first.
    events: VecDeque<Value>,
    timeout: Option<Duration>,
    next_id: u64,
}

impl Client {
    /// Connects, reads the greeting and negotiates capabilities. `timeout`
    /// bounds every wait for a reply (and `next_event`'s waits); `None`
    /// waits forever.
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Client, QmpError> {
        let connect_err = |reason: String| QmpError::Connect {
            socket: socket.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(socket).map_err(|e| connect_err(why_not(socket, &e)))?;
        let mut client = Client::over(stream, timeout).map_err(|e| connect_err(e.to_string()))?;
        client.handshake().map_err(|e| match e {
            QmpError::Connect { .. } => e,
            QmpError::Closed => connect_err("connection closed during the QMP handshake".into()),
            other => connect_err(other.to_string()),
        })?;
        Ok(client)
    }

    /// A client over a connected stream, before the handshake.
    fn over(stream: UnixStream, timeout: Option<Duration>) -> io::Result<Client> {
        stream.set_write_timeout(timeout)?;
        let reader = stream.try_clone()?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || read_messages(reader, tx))?;
        Ok(Client {
            writer: stream,
            messages: rx,
            events: VecDeque::new(),
            timeout,
            next_id: 1,
        })
    }

    fn handshake(&mut self) -> Result<(), QmpError> {
        let greeting = self.read_message(self.timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        match self.execute("qmp_capabilities", None) {
            Ok(_) => Ok(()),
            Err(e @ QmpError::Command { .. }) => Err(QmpError::Protocol(format!(
                "capabilities negotiation refused: {e}"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Runs command `name` and returns its `return` value; an error reply
    /// becomes `QmpError::Command`.
    pub fn execute(&mut self, name: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut cmd = Map::new();
        cmd.insert("execute".into(), Value::from(name));
        if let Some(args) = arguments {
            cmd.insert("arguments".into(), args);
        }
        let mut reply = self.transact(cmd)?;
        if let Some(error) = reply.get("error") {
            return Err(QmpError::from_reply(error));
        }
        match reply.get_mut("return") {
            Some(ret) => Ok(ret.take()),
            None => Err(QmpError::Protocol(format!("reply without return: {reply}"))),
        }
    }

    /// Sends a command object (adding an `id` when it has none) and returns
    /// the whole reply, error replies included. Events read meanwhile are
    /// kept for `next_event` and `wait_event`.
    pub fn transact(&mut self, mut cmd: Map<String, Value>) -> Result<Value, QmpError> {
        let id = cmd
            .entry("id")
            .or_insert_with(|| {
                let id = json!(format!("blkctl-{}", self.next_id));
                self.next_id += 1;
                id
            })
            .clone();
        let mut line = serde_json::to_vec(&cmd)
            .map_err(|e| QmpError::Protocol(format!("cannot encode command: {e}")))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .and_then(|()| self.writer.flush())
            .map_err(|e| io_error(e, self.timeout))?;

        // The timeout bounds the whole wait, however many events come first.
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let msg = self.read_message(left)?;
            if !msg.is_object() {
                return Err(QmpError::Protocol(format!("not a JSON object: {msg}")));
            }
            if msg.get("return").is_none() && msg.get("error").is_none() {
                if msg.get("event").is_some() {
                    self.events.push_back(msg);
                }
                continue; // or something newer than this client
            }
            // A reply without an id answers a command the server could not
            // even parse; with one command in flight, that is ours.
            match msg.get("id") {
                Some(got) if *got != id => continue,
                _ => return Ok(msg),
            }
        }
    }

    /// Waits for the next event (kept ones first); `None` once the server
    /// has closed the connection.
    pub fn next_event(&mut self) -> Result<Option<Value>, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        loop {
            match self.read_message(self.timeout) {
                Ok(msg) if msg.get("event").is_some() => return Ok(Some(msg)),
                Ok(_) => continue,
                Err(QmpError::Closed) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next event (kept ones first) if one comes before `deadline`;
    /// `None` when none did. A closed connection is `QmpError::Closed`.
    pub fn wait_event(&mut self, deadline: Instant) -> Result<Option<Value>, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_message(Some(left)) {
                Ok(msg) if msg.get("event").is_some() => return Ok(Some(msg)),
                Ok(_) => continue,
                Err(QmpError::Timeout(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message, waiting at most `timeout` (`None`: forever).
    fn read_message(&mut self, timeout: Option<Duration>) -> Result<Value, QmpError> {
        match timeout {
            None => self.messages.recv().map_err(|_| QmpError::Closed)?,
            Some(t) => match self.messages.recv_timeout(t) {
                Ok(msg) => msg,
                // Reported as the configured timeout, which is what the
                // user knows about.
                Err(RecvTimeoutError::Timeout) => Err(QmpError::Timeout(self.timeout.unwrap_or(t))),
                Err(RecvTimeoutError::Disconnected) => Err(QmpError::Closed),
            },
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Ends the reader thread's blocking read.
        let _ = self.writer.shutdown(Shutdown::Both);
    }
}

/// A fake QMP server for tests.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A client (past the handshake) over a socket pair whose server
    /// answers each command with the messages `handler` returns for it (in
    /// order, so events can come before or after the reply); the server
    /// closes the connection when `handler` returns `None`.
    pub fn server(
        mut handler: impl FnMut(&Value) -> Option<Vec<Value>> + Send + 'static,
    ) -> Client {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        std::thread::spawn(move || {
            let Ok(mut w) = theirs.try_clone() else {
                return;
            };
            for line in BufReader::new(theirs).lines() {
                let Ok(line) = line else { return };
                let Ok(cmd) = serde_json::from_str::<Value>(&line) else {
                    return;
                };
                let Some(answer) = handler(&cmd) else { return };
                for m in answer {
                    if w.write_all(format!("{m}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        Client::over(ours, Some(Duration::from_secs(5))).expect("client")
    }

    /// The reply to `cmd` returning `ret`.
    pub fn reply(cmd: &Value, ret: Value) -> Value {
        json!({"return": ret, "id": cmd["id"]})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// A client over one end of a socket pair, and a scripted server that
    /// answers each command line with `script`'s next messages.
    fn pair(script: Vec<Vec<&'static str>>) -> Client {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        std::thread::spawn(move || {
            let mut w = theirs.try_clone().expect("clone");
            let mut lines = BufReader::new(theirs).lines();
            for answer in script {
                if lines.next().is_none() {
                    return;
                }
                for m in answer {
                    if w.write_all(m.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        Client::over(ours, Some(Duration::from_secs(5))).expect("client")
    }

    #[test]
    fn events_between_replies_are_kept_in_order() {
        let mut c = pair(vec![
            vec![
                r#"{"event": "A", "data": {}}"#,
                // Joined and split messages.
                r#"{"event": "B", "data": {}}{"ret"#,
                r#"urn": {"x": 1}, "id": "blkctl-1"}"#,
            ],
            vec![r#"{"return": {}, "id": "blkctl-2"} {"event": "C"}"#],
        ]);
        assert_eq!(c.execute("one", None).unwrap(), json!({"x": 1}));
        assert_eq!(c.events.len(), 2);
        assert_eq!(c.execute("two", None).unwrap(), json!({}));
        for want in ["A", "B", "C"] {
            let e = c.wait_event(Instant::now() + Duration::from_secs(5));
            assert_eq!(e.unwrap().unwrap()["event"], want);
        }
        // The server has closed the connection after its script.
        assert!(matches!(
            c.wait_event(Instant::now() + Duration::from_secs(5)),
            Err(QmpError::Closed)
        ));
    }

    #[test]
    fn wait_event_ends_at_the_deadline_and_reports_a_close() {
        let mut c = pair(vec![vec![r#"{"return": {}, "id": "blkctl-1"}"#]]);
        let start = Instant::now();
        assert!(c
            .wait_event(start + Duration::from_millis(100))
            .unwrap()
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(100));
        // The server answers and closes: the stream is still usable after a
        // timed-out wait, then reports the close.
        c.execute("x", None).unwrap();
        match c.wait_event(Instant::now() + Duration::from_secs(5)) {
            Err(QmpError::Closed) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
        assert!(c.next_event().unwrap().is_none());
    }

    #[test]
    fn error_replies_and_other_ids() {
        let mut c = pair(vec![vec![
            r#"{"return": {}, "id": "someone-else"}"#,
            r#"{"error": {"class": "DeviceNotActive", "desc": "No active block job on device 'd0'"}, "id": "blkctl-1"}"#,
        ]]);
        match c.execute("block-job-cancel", Some(json!({"device": "d0"}))) {
            Err(e @ QmpError::Command { .. }) => assert_eq!(
                e.to_string(),
                "DeviceNotActive: No active block job on device 'd0'"
            ),
            other => panic!("expected an error reply, got {other:?}"),
        }
    }
}
