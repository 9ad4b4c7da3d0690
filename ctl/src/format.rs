//! Turning JSON values from replies into table cells.

use serde_json::Value;

const UNITS: [&str; 7] = ["B", "K", "M", "G", "T", "P", "E"];

/// Binary-prefixed size with one decimal, e.g. `64.0M`; exact below 1 KiB.
pub fn human_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    // Compare against the rounded value so 1048575 prints 1.0M, not 1024.0K.
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// A size cell: human-readable when it is a non-negative integer, raw
/// otherwise, `-` when absent.
pub fn size_cell(v: Option<&Value>) -> String {
    match v.and_then(Value::as_u64) {
        Some(n) => human_size(n),
        None => cell(v),
    }
}

pub fn bool_cell(v: Option<&Value>) -> String {
    match v {
        Some(Value::Bool(true)) => "yes".to_string(),
        Some(Value::Bool(false)) => "no".to_string(),
        _ => cell(v),
    }
}

pub fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(1023), "1023B");
        assert_eq!(human_size(1024), "1.0K");
        assert_eq!(human_size(1536), "1.5K");
        assert_eq!(human_size(64 << 20), "64.0M");
        assert_eq!(human_size((1 << 20) - 1), "1.0M");
        assert_eq!(human_size(1 << 30), "1.0G");
        assert_eq!(human_size(u64::MAX), "16.0E");
    }

    #[test]
    fn cells() {
        assert_eq!(size_cell(Some(&json!(1073741824))), "1.0G");
        assert_eq!(size_cell(Some(&json!(-1))), "-1");
        assert_eq!(size_cell(None), "-");
        assert_eq!(bool_cell(Some(&json!(true))), "yes");
        assert_eq!(bool_cell(Some(&json!(false))), "no");
        assert_eq!(cell(Some(&json!("a.img"))), "a.img");
        assert_eq!(cell(Some(&json!(42))), "42");
        assert_eq!(cell(Some(&Value::Null)), "-");
    }
}
