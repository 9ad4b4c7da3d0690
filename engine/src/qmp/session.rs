//! One QMP connection's protocol state: greeting, capabilities negotiation,
//! message validation and `id` echo.

use crate::error::{Error, ErrorKind};
use crate::Engine;
use serde_json::{json, Map, Value};
use std::sync::Arc;

pub struct Session {
    engine: Arc<Engine>,
    negotiated: bool,
}

/// What the transport must do with a handled message.
pub struct Outcome {
    pub reply: Value,
    /// Capabilities were just negotiated: start sending events.
    pub negotiated_now: bool,
    /// `quit` succeeded: send the reply, then shut the daemon down.
    pub quit: bool,
}

impl Session {
    pub fn new(engine: Arc<Engine>) -> Session {
        Session {
            engine,
            negotiated: false,
        }
    }

    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": crate::qmp::commands::version(), "capabilities": []}})
    }

    /// Handles one framed message (raw JSON text).
    pub fn handle(&mut self, msg: &[u8]) -> Outcome {
        let parsed: Result<Value, _> = serde_json::from_slice(msg);
        let mut quit = false;
        let (id, result) = match parsed {
            Err(e) => (None, Err(Error::generic(format!("JSON parse error, {e}")))),
            Ok(Value::Object(m)) => {
                quit = self.negotiated && m.get("execute").and_then(Value::as_str) == Some("quit");
                self.execute(m)
            }
            Ok(_) => (None, Err(Error::generic("QMP input must be a JSON object"))),
        };
        let negotiated_now = matches!(&result, Ok(Step::Negotiated));
        let quit = quit && result.is_ok();
        let mut reply = match result {
            Ok(Step::Negotiated) => json!({"return": {}}),
            Ok(Step::Return(v)) => json!({ "return": v }),
            Err(e) => json!({"error": {"class": e.class(), "desc": e.msg}}),
        };
        if let Some(id) = id {
            reply["id"] = id;
        }
        Outcome {
            reply,
            negotiated_now,
            quit,
        }
    }

    fn execute(&mut self, mut m: Map<String, Value>) -> (Option<Value>, Result<Step, Error>) {
        let id = m.remove("id");
        (id, self.execute_inner(m))
    }

    fn execute_inner(&mut self, mut m: Map<String, Value>) -> Result<Step, Error> {
        let name = match m.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(Error::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            None => return Err(Error::generic("QMP input lacks member 'execute'")),
        };
        let args = match m.remove("arguments") {
            None => Value::Object(Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => {
                return Err(Error::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if let Some(k) = m.keys().next() {
            return Err(Error::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        if name == "qmp_capabilities" {
            if self.negotiated {
                return Err(Error::new(
                    ErrorKind::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ));
            }
            check_capabilities(args)?;
            self.negotiated = true;
            return Ok(Step::Negotiated);
        }
        if !self.negotiated {
            return Err(Error::new(
                ErrorKind::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        self.engine.execute(&name, args).map(Step::Return)
    }
}

enum Step {
    Negotiated,
    Return(Value),
}

fn check_capabilities(args: Value) -> Result<(), Error> {
    let mut a = crate::args::Args::new(args, "", false)?;
    if let Some(caps) = a.list("enable")? {
        if let Some(c) = caps.first() {
            return Err(Error::generic(format!(
                "Capability '{}' is not supported",
                c.as_str().unwrap_or("?")
            )));
        }
    }
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(s: &mut Session, msg: &str) -> Value {
        s.handle(msg.as_bytes()).reply
    }

    #[test]
    fn negotiation_and_id_echo() {
        let mut s = Session::new(Engine::new());
        assert!(s.greeting()["QMP"]["version"]["qemu"]["major"].is_u64());
        let r = reply(&mut s, r#"{"execute":"query-block","id":7}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 7);
        let out = s.handle(br#"{"execute":"qmp_capabilities","id":{"x":[1]}}"#);
        assert!(out.negotiated_now);
        assert_eq!(out.reply, json!({"return": {}, "id": {"x": [1]}}));
        let r = reply(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            reply(&mut s, r#"{"execute":"query-block"}"#),
            json!({"return": []})
        );
    }

    #[test]
    fn malformed_messages() {
        let mut s = Session::new(Engine::new());
        reply(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        for (msg, desc) in [
            ("[1]", "QMP input must be a JSON object"),
            (
                r#"{"execute": 1}"#,
                "QMP input member 'execute' must be a string",
            ),
            (r#"{"arguments": {}}"#, "QMP input lacks member 'execute'"),
            (
                r#"{"execute":"quit","arguments":[]}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (
                r#"{"execute":"quit","foo":1}"#,
                "QMP input member 'foo' is unexpected",
            ),
        ] {
            let r = reply(&mut s, msg);
            assert_eq!(r["error"]["class"], "GenericError", "{msg}");
            assert_eq!(r["error"]["desc"], desc, "{msg}");
        }
        let r = reply(&mut s, "{\"execute\":");
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error"));
        let r = reply(&mut s, r#"{"execute":"no-such"}"#);
        assert_eq!(r["error"]["class"], "CommandNotFound");
    }

    /// Random byte streams through the framing and the session: every
    /// frame gets a reply object, nothing panics.
    #[test]
    fn fuzz_random_streams() {
        let mut s = Session::new(Engine::new());
        s.handle(br#"{"execute":"qmp_capabilities"}"#);
        let mut split = crate::qmp::framing::Splitter::default();
        let alphabet = br#"{}[]":,\ ax1-.eEtruefalsn{"execute":"query-block","arguments":{"x":[1,{}]},"id":7}"#;
        let mut x: u64 = 88172645463325252;
        let mut frames = Vec::new();
        for _ in 0..3000 {
            let chunk: Vec<u8> = (0..(x % 64) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            x = x.wrapping_add(1);
            split.push(&chunk, &mut frames);
            for msg in frames.drain(..).flatten() {
                let r = s.handle(&msg).reply;
                assert!(r.get("return").is_some() || r.get("error").is_some(), "{r}");
            }
        }
    }
}
