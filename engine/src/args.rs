//! Strict reading of QMP arguments and blockdev options.
//!
//! Every member is taken out of the object exactly once; whatever is left at
//! the end is an unexpected parameter. Errors name the full dotted path of the
//! member, as QEMU does ("Parameter 'file.filename' is missing").
//!
//! Options that came from QEMU's dotted key=value syntax carry every scalar
//! as a string; `lenient` mode accepts those strings for booleans and integers.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::cell::RefCell;

thread_local! {
    /// While [`typed`] runs: the typed value of every string a lenient
    /// read converted, by dotted path.
    static CONVERTED: RefCell<Option<Vec<(String, Value)>>> = const { RefCell::new(None) };
}

/// Records that the lenient string at `path` means `v`.
pub(crate) fn note_converted(path: String, v: Value) {
    CONVERTED.with(|c| {
        if let Some(list) = c.borrow_mut().as_mut() {
            list.push((path, v));
        }
    });
}

/// Runs a lenient `parse` of the key=value object `v` and returns, beside
/// its result, `v` with the types the parser gave its strings (numbers,
/// booleans) and numbered objects as arrays: what QMP's strict parser
/// takes. One parser decides the types for both.
pub fn typed<T>(v: Value, parse: impl FnOnce(Value) -> Result<T>) -> Result<(T, Value)> {
    CONVERTED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = parse(v.clone());
    let converted = CONVERTED
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    let out = r?;
    let mut v = v;
    for (path, typed) in converted {
        let pointer: String = path
            .split('.')
            .map(|p| format!("/{}", p.replace('~', "~0").replace('/', "~1")))
            .collect();
        if let Some(slot) = v.pointer_mut(&pointer) {
            *slot = typed;
        }
    }
    Ok((out, numbered_to_arrays(v)))
}

/// Objects whose keys are all `0`, `1`, ... (keyval's lists) become arrays.
fn numbered_to_arrays(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let numbered = !m.is_empty() && m.keys().all(|k| k.parse::<usize>().is_ok());
            let mut items: Vec<(String, Value)> = m
                .into_iter()
                .map(|(k, v)| (k, numbered_to_arrays(v)))
                .collect();
            if numbered {
                items.sort_by_key(|(k, _)| k.parse::<usize>().unwrap_or(usize::MAX));
                Value::Array(items.into_iter().map(|(_, v)| v).collect())
            } else {
                Value::Object(items.into_iter().collect())
            }
        }
        other => other,
    }
}

pub struct Args {
    map: Map<String, Value>,
    prefix: String,
    lenient: bool,
}

impl Args {
    /// `what` names the object in the error when `v` is not one.
    pub fn new(v: Value, prefix: &str, lenient: bool) -> Result<Args> {
        match v {
            Value::Object(map) => Ok(Args {
                map,
                prefix: prefix.to_string(),
                lenient,
            }),
            Value::Null if prefix.is_empty() => Ok(Args {
                map: Map::new(),
                prefix: String::new(),
                lenient,
            }),
            _ => Err(Error::generic(format!(
                "Invalid parameter type for '{}', expected: object",
                if prefix.is_empty() {
                    "arguments"
                } else {
                    prefix
                }
            ))),
        }
    }

    pub fn is_lenient(&self) -> bool {
        self.lenient
    }

    /// Full dotted name of a member, for error messages.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.prefix, key)
        }
    }

    fn type_error(&self, key: &str, expected: &str) -> Error {
        Error::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.path(key)
        ))
    }

    pub fn missing(&self, key: &str) -> Error {
        Error::generic(format!("Parameter '{}' is missing", self.path(key)))
    }

    /// Takes a member as raw JSON.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn req<T>(&mut self, key: &str, f: fn(&mut Self, &str) -> Result<Option<T>>) -> Result<T> {
        f(self, key)?.ok_or_else(|| self.missing(key))
    }

    pub fn str(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.type_error(key, "string")),
        }
    }

    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.lenient => {
                let b = match s.as_str() {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => {
                        return Err(Error::generic(format!(
                            "Parameter '{}' expects 'on' or 'off'",
                            self.path(key)
                        )))
                    }
                };
                note_converted(self.path(key), Value::Bool(b));
                Ok(Some(b))
            }
            Some(_) => Err(self.type_error(key, "boolean")),
        }
    }

    pub fn int(&mut self, key: &str) -> Result<Option<i64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "integer")),
            Some(Value::String(s)) if self.lenient => {
                let n = s.parse::<i64>().map_err(|_| {
                    Error::generic(format!("Parameter '{}' expects an integer", self.path(key)))
                })?;
                note_converted(self.path(key), Value::from(n));
                Ok(Some(n))
            }
            Some(_) => Err(self.type_error(key, "integer")),
        }
    }

    /// An integer that must not be negative.
    pub fn uint(&mut self, key: &str) -> Result<Option<u64>> {
        match self.int(key)? {
            None => Ok(None),
            Some(v) if v >= 0 => Ok(Some(v as u64)),
            Some(_) => Err(Error::generic(format!(
                "Parameter '{}' expects a non-negative integer",
                self.path(key)
            ))),
        }
    }

    /// A member whose value is one of `allowed`.
    pub fn enumeration<T: Copy>(&mut self, key: &str, allowed: &[(&str, T)]) -> Result<Option<T>> {
        let Some(s) = self.str(key)? else {
            return Ok(None);
        };
        allowed
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| Some(*v))
            .ok_or_else(|| {
                Error::generic(format!(
                    "Parameter '{}' does not accept value '{s}'",
                    self.path(key)
                ))
            })
    }

    /// A nested object, read with the same rules.
    pub fn object(&mut self, key: &str) -> Result<Option<Args>> {
        match self.take(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Args::new(v, &self.path(key), self.lenient).map(Some),
            Some(_) => Err(self.type_error(key, "object")),
        }
    }

    pub fn list(&mut self, key: &str) -> Result<Option<Vec<Value>>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(v)) => Ok(Some(v)),
            Some(_) => Err(self.type_error(key, "array")),
        }
    }

    /// Fails on any member nobody asked for.
    pub fn finish(self) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::generic(format!(
                "Parameter '{}' is unexpected",
                self.path(k)
            ))),
        }
    }
}

/// Parses QEMU's dotted key=value syntax (`driver=raw,file.filename=a.img`)
/// into a nested JSON object whose scalars are all strings. A comma inside a
/// value is written twice.
pub fn parse_keyval(s: &str) -> Result<Value> {
    let mut root = Map::new();
    for (key, val) in split_pairs(s)? {
        let mut parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(Error::generic(format!("Invalid parameter '{key}'")));
        }
        let last = parts.pop().unwrap_or_default();
        let mut cur = &mut root;
        for p in parts {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            cur = match entry {
                Value::Object(m) => m,
                _ => {
                    return Err(Error::generic(format!(
                        "Parameter '{key}' conflicts with a scalar at '{p}'"
                    )))
                }
            };
        }
        if cur.insert(last.to_string(), Value::String(val)).is_some() {
            return Err(Error::generic(format!("Parameter '{key}' given twice")));
        }
    }
    Ok(Value::Object(root))
}

fn split_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let mut key = String::new();
        let mut has_value = false;
        for c in chars.by_ref() {
            if c == '=' {
                has_value = true;
                break;
            }
            if c == ',' {
                return Err(Error::generic(format!(
                    "Expected '=' after parameter '{key}'"
                )));
            }
            key.push(c);
        }
        if !has_value {
            return Err(Error::generic(format!(
                "Expected '=' after parameter '{key}'"
            )));
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                } else {
                    break;
                }
            }
            val.push(c);
        }
        if key.is_empty() {
            return Err(Error::generic("Invalid parameter ''"));
        }
        pairs.push((key, val));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keyval_nests_and_unescapes() {
        let v = parse_keyval("driver=raw,id=d0,file.driver=file,file.filename=a,,b.img").unwrap();
        assert_eq!(
            v,
            json!({"driver":"raw","id":"d0","file":{"driver":"file","filename":"a,b.img"}})
        );
        assert!(parse_keyval("driver").is_err());
        assert!(parse_keyval("a=1,a=2").is_err());
        assert!(parse_keyval("a=1,a.b=2").is_err());
        assert!(parse_keyval("a..b=1").is_err());
    }

    #[test]
    fn strict_types_and_leftovers() {
        let mut a = Args::new(json!({"s": 1, "b": "on", "x": true}), "", false).unwrap();
        assert_eq!(
            a.str("s").unwrap_err().msg,
            "Invalid parameter type for 's', expected: string"
        );
        assert!(a.bool("b").is_err());
        assert_eq!(a.str("missing").unwrap(), None);
        assert_eq!(a.finish().unwrap_err().msg, "Parameter 'x' is unexpected");
    }

    #[test]
    fn lenient_accepts_strings() {
        let mut a = Args::new(json!({"b": "on", "n": "42", "o": {"k": "off"}}), "", true).unwrap();
        assert_eq!(a.bool("b").unwrap(), Some(true));
        assert_eq!(a.int("n").unwrap(), Some(42));
        let mut o = a.object("o").unwrap().unwrap();
        assert_eq!(o.bool("k").unwrap(), Some(false));
        assert_eq!(o.path("k"), "o.k");
        o.finish().unwrap();
        a.finish().unwrap();
    }

    #[test]
    fn enums_and_missing() {
        let mut a = Args::new(json!({"e": "zz"}), "p", false).unwrap();
        let r = a.enumeration("e", &[("a", 1), ("b", 2)]);
        assert_eq!(
            r.unwrap_err().msg,
            "Parameter 'p.e' does not accept value 'zz'"
        );
        assert_eq!(
            a.req("f", Args::str).unwrap_err().msg,
            "Parameter 'p.f' is missing"
        );
    }
}
