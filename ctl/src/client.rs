//! A synchronous QMP client over a UNIX stream socket.

use serde_json::de::IoRead;
use serde_json::{json, Map, StreamDeserializer, Value};
use std::fmt;
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

type Messages = StreamDeserializer<'static, IoRead<BufReader<UnixStream>>, Value>;

pub struct Client {
    writer: UnixStream,
    // The server may split or join messages arbitrarily, so messages are cut
    // by a streaming JSON parser rather than by lines.
    messages: Messages,
    timeout: Option<Duration>,
    next_id: u64,
}

impl Client {
    /// Connects, reads the greeting and negotiates capabilities. `timeout`
    /// bounds every wait for data from the server; `None` waits forever.
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Client, QmpError> {
        let connect_err = |reason: String| QmpError::Connect {
            socket: socket.to_path_buf(),
            reason,
        };
        let stream = UnixStream::connect(socket).map_err(|e| connect_err(e.to_string()))?;
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|e| connect_err(e.to_string()))?;
        let reader = stream.try_clone().map_err(|e| connect_err(e.to_string()))?;
        let mut client = Client {
            writer: stream,
            messages: serde_json::Deserializer::from_reader(BufReader::new(reader)).into_iter(),
            timeout,
            next_id: 1,
        };
        client.handshake().map_err(|e| match e {
            QmpError::Connect { .. } => e,
            QmpError::Closed => connect_err("connection closed during the QMP handshake".into()),
            other => connect_err(other.to_string()),
        })?;
        Ok(client)
    }

    fn handshake(&mut self) -> Result<(), QmpError> {
        let greeting = self.read_message()?.ok_or(QmpError::Closed)?;
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
    /// dropped.
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

        loop {
            let msg = self.read_message()?.ok_or(QmpError::Closed)?;
            if !msg.is_object() {
                return Err(QmpError::Protocol(format!("not a JSON object: {msg}")));
            }
            if msg.get("return").is_none() && msg.get("error").is_none() {
                continue; // an event, or something newer than this client
            }
            // A reply without an id answers a command the server could not
            // even parse; with one command in flight, that is ours.
            match msg.get("id") {
                Some(got) if *got != id => continue,
                _ => return Ok(msg),
            }
        }
    }

    /// Waits for the next event; `None` once the server has closed the
    /// connection.
    pub fn next_event(&mut self) -> Result<Option<Value>, QmpError> {
        loop {
            match self.read_message() {
                Ok(Some(msg)) if msg.get("event").is_some() => return Ok(Some(msg)),
                Ok(Some(_)) => continue,
                Ok(None) | Err(QmpError::Closed) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn read_message(&mut self) -> Result<Option<Value>, QmpError> {
        match self.messages.next() {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) if e.is_eof() => Err(QmpError::Closed),
            Some(Err(e)) if e.is_io() => Err(io_error(io::Error::from(e), self.timeout)),
            Some(Err(e)) => Err(QmpError::Protocol(format!(
                "invalid JSON from the server: {e}"
            ))),
        }
    }
}
