//! QEMU's dotted `key=value` option syntax, turned into a nested JSON object.
//!
//! `driver=raw,file.driver=file,file.filename=a.img` becomes
//! `{"driver":"raw","file":{"driver":"file","filename":"a.img"}}`.
//! A comma inside a value is written `,,`. Objects whose keys are all
//! `0`, `1`, ... become arrays, so lists such as quorum's `children` can be
//! written `children.0.driver=...,children.1.driver=...`.
//!
//! Keyval carries no types, but the daemon checks argument types strictly, so
//! values of keys that the schema declares boolean or integer are converted.
//! Only known keys are converted: `detect-zeroes=on` is an enum and must stay
//! a string.

use serde_json::{Map, Value};
use std::fmt;

/// Keys (matched as whole trailing fragments of the dotted path) whose values
/// the schema declares `bool`.
const BOOL_KEYS: &[&str] = &[
    "read-only",
    "cache.direct",
    "cache.no-flush",
    "cache.writeback",
    "lazy-refcounts",
    "once",
    "immediately",
    "floppy",
    "rw",
    "blkverify",
    "rewrite-corrupted",
];

/// Last-fragment prefixes whose values are `bool` (`pass-discard-request`...).
const BOOL_PREFIXES: &[&str] = &["pass-discard-"];

/// Last-fragment suffixes whose values the schema declares `int`.
const INT_SUFFIXES: &[&str] = &[
    "size",
    "align",
    "state",
    "errno",
    "sector",
    "vote-threshold",
    "fat-type",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyvalError(String);

impl fmt::Display for KeyvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyvalError {}

fn err<T>(msg: String) -> Result<T, KeyvalError> {
    Err(KeyvalError(msg))
}

/// Parses `key=value,...` into a nested object.
pub fn parse(input: &str) -> Result<Map<String, Value>, KeyvalError> {
    let mut root = Map::new();
    let mut rest = input;
    while !rest.is_empty() {
        let (key, after_key) = match rest.find([',', '=']) {
            Some(i) if rest.as_bytes()[i] == b'=' => (&rest[..i], &rest[i + 1..]),
            _ => {
                let key = rest.split(',').next().unwrap_or(rest);
                return err(format!("expected '=' after parameter '{key}'"));
            }
        };
        let (value, after_value) = split_value(after_key);
        rest = after_value;

        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|fragment| fragment.is_empty()) {
            return err(format!("invalid parameter '{key}'"));
        }
        let value = convert(key, &path, value);
        insert(&mut root, &path, value, key)?;
    }
    listify(&mut root, "")?;
    Ok(root)
}

/// Splits off one value, undoing `,,` escapes; returns the value and the
/// input after the separating comma.
fn split_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if matches!(chars.peek(), Some((_, ','))) {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &s[i + 1..]);
        }
        value.push(c);
    }
    (value, "")
}

fn convert(key: &str, path: &[&str], value: String) -> Value {
    let last = path.last().copied().unwrap_or(key);
    let is_bool = BOOL_KEYS
        .iter()
        .any(|k| key == *k || key.strip_suffix(k).is_some_and(|p| p.ends_with('.')))
        || BOOL_PREFIXES.iter().any(|p| last.starts_with(p));
    if is_bool {
        match value.as_str() {
            "on" | "true" => return Value::Bool(true),
            "off" | "false" => return Value::Bool(false),
            // Left as a string so the daemon reports the bad value itself.
            _ => return Value::String(value),
        }
    }
    let is_int = INT_SUFFIXES.iter().any(|s| last.ends_with(s));
    if is_int && !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = value.parse::<u64>() {
            return Value::from(n);
        }
    }
    Value::String(value)
}

fn insert(
    root: &mut Map<String, Value>,
    path: &[&str],
    value: Value,
    key: &str,
) -> Result<(), KeyvalError> {
    let Some((last, parents)) = path.split_last() else {
        return err(format!("invalid parameter '{key}'"));
    };
    let mut map = root;
    for (depth, fragment) in parents.iter().enumerate() {
        let entry = map
            .entry((*fragment).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => {
                let prefix = path[..=depth].join(".");
                return err(format!("parameter '{prefix}' used inconsistently"));
            }
        };
    }
    if let Some(Value::Object(_)) = map.get(*last) {
        return err(format!("parameter '{key}' used inconsistently"));
    }
    // As in QEMU, a repeated key takes its last value.
    map.insert((*last).to_string(), value);
    Ok(())
}

/// Turns every object whose keys are exactly `0..n` into an array.
fn listify(map: &mut Map<String, Value>, prefix: &str) -> Result<(), KeyvalError> {
    for (k, v) in map.iter_mut() {
        if let Value::Object(child) = v {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            listify(child, &path)?;
            if let Some(list) = as_list(child, &path)? {
                *v = Value::Array(list);
            }
        }
    }
    Ok(())
}

fn as_list(map: &mut Map<String, Value>, path: &str) -> Result<Option<Vec<Value>>, KeyvalError> {
    let is_index =
        |k: &str| k == "0" || (!k.starts_with('0') && k.bytes().all(|b| b.is_ascii_digit()));
    let indices = map.keys().filter(|k| is_index(k)).count();
    if indices == 0 {
        return Ok(None);
    }
    if indices != map.len() {
        return err(format!("parameter '{path}' mixes list indices and names"));
    }
    let mut list = Vec::with_capacity(map.len());
    for i in 0..map.len() {
        match map.remove(&i.to_string()) {
            Some(v) => list.push(v),
            None => return err(format!("parameter '{path}.{i}' missing")),
        }
    }
    Ok(Some(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str) -> Value {
        match parse(s) {
            Ok(m) => Value::Object(m),
            Err(e) => panic!("parse({s:?}) failed: {e}"),
        }
    }

    fn fails(s: &str) -> String {
        match parse(s) {
            Ok(m) => panic!("parse({s:?}) unexpectedly gave {m:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn nested_keys() {
        assert_eq!(
            ok("driver=raw,id=disk0,file.driver=file,file.filename=a.img"),
            json!({"driver": "raw", "id": "disk0",
                   "file": {"driver": "file", "filename": "a.img"}})
        );
    }

    #[test]
    fn empty_input_is_empty_object() {
        assert_eq!(ok(""), json!({}));
    }

    #[test]
    fn escaped_commas() {
        assert_eq!(
            ok("file.filename=a,,b.img"),
            json!({"file": {"filename": "a,b.img"}})
        );
        assert_eq!(ok("a=x,,,b=y"), json!({"a": "x,", "b": "y"}));
        assert_eq!(ok("a=,,,,"), json!({"a": ",,"}));
    }

    #[test]
    fn values_may_hold_equals_signs_and_be_empty() {
        assert_eq!(ok("a=b=c,d="), json!({"a": "b=c", "d": ""}));
    }

    #[test]
    fn trailing_comma_is_accepted() {
        assert_eq!(ok("a=b,"), json!({"a": "b"}));
    }

    #[test]
    fn booleans_only_for_known_keys() {
        assert_eq!(
            ok("read-only=on,cache.direct=off,cache.no-flush=true,file.cache.writeback=false"),
            json!({"read-only": true,
                   "cache": {"direct": false, "no-flush": true},
                   "file": {"cache": {"writeback": false}}})
        );
        assert_eq!(
            ok("detect-zeroes=on,id=off,lazy-refcounts=on,pass-discard-request=off"),
            json!({"detect-zeroes": "on", "id": "off",
                   "lazy-refcounts": true, "pass-discard-request": false})
        );
        // Not a bool spelling: passed through for the daemon to reject.
        assert_eq!(ok("read-only=maybe"), json!({"read-only": "maybe"}));
        // A key that merely ends with the same letters is not boolean.
        assert_eq!(ok("xread-only=on"), json!({"xread-only": "on"}));
    }

    #[test]
    fn integers_only_for_known_keys() {
        assert_eq!(
            ok("align=512,vote-threshold=2,fat-type=16,cluster-size=65536,filename=123"),
            json!({"align": 512, "vote-threshold": 2, "fat-type": 16,
                   "cluster-size": 65536, "filename": "123"})
        );
        assert_eq!(ok("align=-1,size=1G"), json!({"align": "-1", "size": "1G"}));
        assert_eq!(
            ok("size=99999999999999999999999"),
            json!({"size": "99999999999999999999999"})
        );
    }

    #[test]
    fn numbered_keys_become_lists() {
        assert_eq!(
            ok("driver=quorum,vote-threshold=2,\
                children.0.driver=file,children.0.filename=a,\
                children.1.driver=file,children.1.filename=b,children.1.read-only=on"),
            json!({"driver": "quorum", "vote-threshold": 2, "children": [
                {"driver": "file", "filename": "a"},
                {"driver": "file", "filename": "b", "read-only": true}]})
        );
        assert_eq!(
            ok("inject-error.0.event=read_aio,inject-error.0.errno=5,\
                inject-error.0.once=on,set-state.0.event=l2_load,\
                set-state.0.state=1,set-state.0.new_state=2"),
            json!({"inject-error": [{"event": "read_aio", "errno": 5, "once": true}],
                   "set-state": [{"event": "l2_load", "state": 1, "new_state": 2}]})
        );
    }

    #[test]
    fn list_order_follows_indices_not_input() {
        assert_eq!(ok("l.1=b,l.0=a"), json!({"l": ["a", "b"]}));
    }

    #[test]
    fn repeated_key_last_wins() {
        assert_eq!(ok("a=1,a=2"), json!({"a": "2"}));
    }

    #[test]
    fn errors() {
        assert_eq!(fails("driver"), "expected '=' after parameter 'driver'");
        assert_eq!(fails("a=b,c,d=e"), "expected '=' after parameter 'c'");
        assert_eq!(fails("=x"), "invalid parameter ''");
        assert_eq!(fails("a..b=x"), "invalid parameter 'a..b'");
        assert_eq!(fails("file.=x"), "invalid parameter 'file.'");
        assert_eq!(fails("a=1,a.b=2"), "parameter 'a' used inconsistently");
        assert_eq!(fails("a.b=2,a=1"), "parameter 'a' used inconsistently");
        assert_eq!(fails("l.0=a,l.2=c"), "parameter 'l.1' missing");
        assert_eq!(
            fails("l.0=a,l.x=c"),
            "parameter 'l' mixes list indices and names"
        );
    }
}
