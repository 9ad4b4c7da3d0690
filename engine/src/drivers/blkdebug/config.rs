//! blkdebug's config file: QEMU's QemuOpts ini format.
//!
//! ```text
//! # a comment
//! [inject-error]
//! event = "l2_load"
//! errno = "5"
//!
//! [set-state]
//! event = "cluster_alloc"
//! state = "1"
//! new_state = "2"
//! ```
//!
//! Sections are `[inject-error]` or `[set-state]` (optionally with an id,
//! `[set-state "s1"]`, which is ignored); values are always quoted. Parsing
//! is strict: an unknown section or key, a bad or repeated value, a line of
//! another shape or a section without an event is an error naming the file
//! and line.

use super::rules::validate_inject;
use crate::error::{Error, Result};
use crate::options::{BlkdebugEvent, InjectError, SetState};

/// The rules of a config file, in file order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Config {
    pub inject_error: Vec<InjectError>,
    pub set_state: Vec<SetState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    InjectError,
    SetState,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::InjectError => "inject-error",
            Kind::SetState => "set-state",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Kind::InjectError => &["event", "state", "errno", "sector", "once", "immediately"],
            Kind::SetState => &["event", "state", "new_state"],
        }
    }
}

/// One section being read: its kind, its line and its `key = value` lines.
struct Section<'a> {
    kind: Kind,
    line: usize,
    values: Vec<(&'a str, &'a str, usize)>,
}

/// Reads and parses the config file at `path`.
pub fn read(path: &str) -> Result<Config> {
    let text = std::fs::read(path).map_err(|e| {
        Error::generic(format!("Could not read blkdebug config file '{path}': {e}"))
    })?;
    let text = std::str::from_utf8(&text)
        .map_err(|e| Error::generic(format!("blkdebug config file '{path}' is not UTF-8: {e}")))?;
    parse(text, path)
}

/// Parses config text; `file` names it in error messages.
pub fn parse(text: &str, file: &str) -> Result<Config> {
    let err = |line: usize, msg: String| err_at(file, (line, msg));
    let mut cfg = Config::default();
    let mut cur: Option<Section> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(head) = line.strip_prefix('[') {
            let head = head
                .strip_suffix(']')
                .ok_or_else(|| err(n, format!("'{line}': a section header must end with ']'")))?;
            let name = match head.split_once(char::is_whitespace) {
                None => head,
                Some((name, id)) => {
                    quoted(id.trim())
                        .ok_or_else(|| err(n, format!("'{line}': a section id must be quoted")))?;
                    name
                }
            };
            let kind = match name {
                "inject-error" => Kind::InjectError,
                "set-state" => Kind::SetState,
                _ => {
                    return Err(err(
                        n,
                        format!(
                            "unknown section '[{name}]' (expected [inject-error] or [set-state])"
                        ),
                    ))
                }
            };
            if let Some(s) = cur.take() {
                finish(s, &mut cfg).map_err(|m| err_at(file, m))?;
            }
            cur = Some(Section {
                kind,
                line: n,
                values: Vec::new(),
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(n, format!("'{line}': expected key = \"value\"")));
        };
        let key = key.trim();
        let value = quoted(value.trim())
            .ok_or_else(|| err(n, format!("the value of '{key}' must be in double quotes")))?;
        let Some(s) = cur.as_mut() else {
            return Err(err(n, format!("'{key}' is outside any section")));
        };
        if !s.kind.keys().contains(&key) {
            return Err(err(
                n,
                format!(
                    "unknown key '{key}' in [{}] (expected one of: {})",
                    s.kind.name(),
                    s.kind.keys().join(", ")
                ),
            ));
        }
        if s.values.iter().any(|(k, _, _)| *k == key) {
            return Err(err(n, format!("'{key}' is given twice in this section")));
        }
        s.values.push((key, value, n));
    }
    if let Some(s) = cur.take() {
        finish(s, &mut cfg).map_err(|m| err_at(file, m))?;
    }
    Ok(cfg)
}

/// The fuzz target's entry: parses arbitrary bytes (never panics).
pub fn fuzz_parse(data: &[u8]) -> Result<Config> {
    let text = std::str::from_utf8(data).map_err(|e| Error::generic(format!("not UTF-8: {e}")))?;
    parse(text, "fuzz")
}

fn err_at(file: &str, (line, msg): (usize, String)) -> Error {
    Error::generic(format!("{file}:{line}: {msg}"))
}

/// The text between a pair of double quotes making up all of `s`.
fn quoted(s: &str) -> Option<&str> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('"')).then_some(inner)
}

/// Turns a finished section into a rule; errors carry their line.
fn finish(s: Section, cfg: &mut Config) -> std::result::Result<(), (usize, String)> {
    let get = |key: &str| s.values.iter().find(|(k, _, _)| *k == key);
    let int = |key: &str| -> std::result::Result<Option<i64>, (usize, String)> {
        get(key)
            .map(|&(_, v, line)| {
                parse_int(v).ok_or_else(|| (line, format!("'{key}' must be a number, not '{v}'")))
            })
            .transpose()
    };
    let boolean = |key: &str| -> std::result::Result<Option<bool>, (usize, String)> {
        get(key)
            .map(|&(_, v, line)| {
                parse_bool(v).ok_or_else(|| {
                    (
                        line,
                        format!("'{key}' must be on/off/yes/no/true/false, not '{v}'"),
                    )
                })
            })
            .transpose()
    };
    let event = match get("event") {
        None => return Err((s.line, format!("[{}] needs an 'event'", s.kind.name()))),
        Some(&(_, v, line)) => BlkdebugEvent::ALL
            .iter()
            .find(|(name, _)| *name == v)
            .map(|&(_, e)| e)
            .ok_or_else(|| (line, format!("unknown event '{v}'")))?,
    };
    match s.kind {
        Kind::InjectError => {
            let e = InjectError {
                event,
                state: int("state")?,
                errno: int("errno")?,
                sector: int("sector")?,
                once: boolean("once")?,
                immediately: boolean("immediately")?,
            };
            validate_inject(&e).map_err(|e| (s.line, e.msg))?;
            cfg.inject_error.push(e);
        }
        Kind::SetState => {
            let new_state = int("new_state")?
                .ok_or_else(|| (s.line, "[set-state] needs a 'new_state'".to_string()))?;
            cfg.set_state.push(SetState {
                event,
                state: int("state")?,
                new_state,
            });
        }
    }
    Ok(())
}

/// A QemuOpts number: decimal or 0x-prefixed hex, optionally negative.
fn parse_int(v: &str) -> Option<i64> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && !hex.starts_with('+') => {
            i64::from_str_radix(hex, 16).ok()?
        }
        Some(_) => return None,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    Some(if neg { -n } else { n })
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
# Fail the first L2 update after the first cluster allocation.
[set-state]
event = "cluster_alloc"
state = "1"
new_state = "2"

  [inject-error]
  event = "l2_update"
  state = "2"
  errno = "28"
  sector = "0x10"
  once = "on"
  immediately = "no"

[inject-error "second"]
event="read_aio"
"#;

    #[test]
    fn a_good_file() {
        let c = parse(GOOD, "good.conf").unwrap();
        assert_eq!(
            c.set_state,
            vec![SetState {
                event: BlkdebugEvent::ClusterAlloc,
                state: Some(1),
                new_state: 2
            }]
        );
        assert_eq!(
            c.inject_error,
            vec![
                InjectError {
                    event: BlkdebugEvent::L2Update,
                    state: Some(2),
                    errno: Some(28),
                    sector: Some(16),
                    once: Some(true),
                    immediately: Some(false),
                },
                InjectError {
                    event: BlkdebugEvent::ReadAio,
                    state: None,
                    errno: None,
                    sector: None,
                    once: None,
                    immediately: None,
                }
            ]
        );
        assert_eq!(parse("", "empty").unwrap(), Config::default());
    }

    fn error(text: &str) -> String {
        parse(text, "t.conf").unwrap_err().msg
    }

    #[test]
    fn each_error_names_file_and_line() {
        let cases: &[(&str, &str)] = &[
            ("[nope]\n", "t.conf:1: unknown section '[nope]'"),
            (
                "[inject-error\n",
                "t.conf:1: '[inject-error': a section header must end",
            ),
            (
                "[set-state id]\n",
                "t.conf:1: '[set-state id]': a section id must be quoted",
            ),
            (
                "event = \"read_aio\"\n",
                "t.conf:1: 'event' is outside any section",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n",
                "t.conf:3: unknown key 'foo' in [inject-error]",
            ),
            (
                "[set-state]\nevent = \"read_aio\"\nerrno = \"5\"\n",
                "t.conf:3: unknown key 'errno' in [set-state]",
            ),
            (
                "[inject-error]\nevent = read_aio\n",
                "t.conf:2: the value of 'event' must be in double quotes",
            ),
            (
                "[inject-error]\njunk\n",
                "t.conf:2: 'junk': expected key = \"value\"",
            ),
            (
                "\n[inject-error]\nerrno = \"5\"\n",
                "t.conf:2: [inject-error] needs an 'event'",
            ),
            (
                "[inject-error]\nevent = \"nope\"\n",
                "t.conf:2: unknown event 'nope'",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nerrno = \"five\"\n",
                "t.conf:3: 'errno' must be a number, not 'five'",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
                "t.conf:3: 'once' must be on/off/yes/no/true/false, not 'maybe'",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nevent = \"write_aio\"\n",
                "t.conf:3: 'event' is given twice",
            ),
            (
                "[set-state]\nevent = \"read_aio\"\n[inject-error]\n",
                "t.conf:1: [set-state] needs a 'new_state'",
            ),
            (
                "[inject-error]\nevent = \"read_aio\"\nerrno = \"-3\"\n",
                "t.conf:1: Invalid errno -3",
            ),
        ];
        for (text, want) in cases {
            let got = error(text);
            assert!(
                got.starts_with(want),
                "{text:?}: got {got:?}, want {want:?}"
            );
        }
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_int("42"), Some(42));
        assert_eq!(parse_int("0x1f"), Some(31));
        assert_eq!(parse_int("-1"), Some(-1));
        for bad in [
            "",
            "-",
            "0x",
            "1.5",
            "+3",
            "0x+1",
            "99999999999999999999",
            " 1",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
        assert_eq!(parse_bool("yes"), Some(true));
        assert_eq!(parse_bool("off"), Some(false));
        assert_eq!(parse_bool("1"), None);
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let msg = read("/nonexistent/blkdebug.conf").unwrap_err().msg;
        assert!(
            msg.starts_with("Could not read blkdebug config file '/nonexistent/blkdebug.conf'"),
            "{msg}"
        );
    }

    #[test]
    fn fuzz_mutated_configs_never_panic() {
        let base = GOOD.as_bytes().to_vec();
        let mut next = crate::testutil::xorshift(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"[]\"=#\n -x0123456789abcdefonyes_";
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % b.len() as u64) as usize;
                match next() % 3 {
                    0 => b[at] = alphabet[(next() % alphabet.len() as u64) as usize],
                    1 => {
                        b.remove(at);
                    }
                    _ => b[at] = next() as u8,
                }
            }
            let len = (next() % (b.len() as u64 + 1)) as usize;
            let b = if next().is_multiple_of(4) {
                &b[..len]
            } else {
                &b[..]
            };
            if fuzz_parse(b).is_ok() {
                ok += 1;
            }
        }
        // Mutations in comments and values of free form must still parse.
        assert!(ok > 0);
    }
}
