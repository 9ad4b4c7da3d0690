//! Parsing of command-line values shared by several subcommands: sizes,
//! device-or-node targets, throttle limits, passwords.

use blkfs_engine::policy::throttle::{AVG_NAMES, MAX_NAMES};
use serde_json::{Map, Value};
use std::io::BufRead;

/// Parses a size with an optional binary suffix (K, M, G, T, P, E, any
/// case; a trailing B is allowed), as qemu-img does.
pub use blkfs_engine::drivers::create::parse_size;

/// The SIZE of `resize`: absolute, or relative to the current size like
/// qemu-img resize's `+SIZE` and `-SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    To(u64),
    Grow(u64),
    Shrink(u64),
}

impl SizeChange {
    pub fn parse(s: &str) -> Result<SizeChange, String> {
        if let Some(rest) = s.strip_prefix('+') {
            parse_size(rest).map(SizeChange::Grow)
        } else if let Some(rest) = s.strip_prefix('-') {
            parse_size(rest).map(SizeChange::Shrink)
        } else {
            parse_size(s).map(SizeChange::To)
        }
    }

    /// The new size, given the current one.
    pub fn apply(self, current: u64) -> Result<u64, String> {
        match self {
            SizeChange::To(n) => Ok(n),
            SizeChange::Grow(n) => current
                .checked_add(n)
                .ok_or_else(|| format!("{current} + {n} bytes is too large")),
            SizeChange::Shrink(n) => current
                .checked_sub(n)
                .ok_or_else(|| format!("cannot shrink {current} bytes by {n}")),
        }
    }
}

/// A QMP command's arguments.
pub type QmpArgs = Map<String, Value>;

const BOTH: &str = "give either DEVICE or --node NODE, not both";

/// QMP's `device` / `node-name` pair from `DEVICE` or `--node NODE`:
/// exactly one of them.
pub fn device_or_node(device: Option<String>, node: Option<String>) -> Result<QmpArgs, String> {
    let mut target = Map::new();
    match (device, node) {
        (Some(d), None) => target.insert("device".into(), Value::String(d)),
        (None, Some(n)) => target.insert("node-name".into(), Value::String(n)),
        (Some(_), Some(_)) => return Err(BOTH.into()),
        (None, None) => return Err("a DEVICE or --node NODE is needed".into()),
    };
    Ok(target)
}

/// `DEVICE` or `--node NODE`, for commands that take either, followed by
/// the command's own positionals (declared optional, see `resolve`).
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Device (as listed by `blkctl block`)
    // Hyphen values are allowed here because clap checks this positional's
    // setting while the next one (`resize d0 -1M`) is parsed.
    #[arg(value_name = "DEVICE", allow_hyphen_values = true)]
    pub device: Option<String>,
    /// Name a node (as listed by `blkctl nodes`) instead of a device
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

impl Target {
    /// QMP's target and the command's positionals `rest`. clap fills
    /// positionals left to right wherever the options are, so with --node
    /// the DEVICE slot holds the command's first positional.
    pub fn resolve<const N: usize>(
        self,
        rest: [Option<String>; N],
    ) -> Result<(QmpArgs, [Option<String>; N]), String> {
        let Some(node) = self.node else {
            return Ok((device_or_node(self.device, None)?, rest));
        };
        let node_target = device_or_node(None, Some(node))?;
        let Some(first) = self.device else {
            return Ok((node_target, rest));
        };
        match rest.last() {
            Some(None) => {
                let mut shifted = rest;
                shifted.rotate_right(1);
                shifted[0] = Some(first);
                Ok((node_target, shifted))
            }
            // Every slot is taken: a DEVICE was given as well.
            _ => Err(BOTH.into()),
        }
    }
}

/// The name a `device_or_node` target refers to, for messages.
pub fn target_name(target: &QmpArgs) -> &str {
    target
        .get("device")
        .or_else(|| target.get("node-name"))
        .and_then(Value::as_str)
        .unwrap_or("?")
}

/// The limits of `blkctl throttle`, named after block_set_io_throttle's
/// arguments; bytes per second take size suffixes.
#[derive(clap::Args, Debug, Default, Clone)]
#[group(id = "limits", multiple = true)]
pub struct ThrottleLimits {
    /// Total bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps: Option<u64>,
    /// Read bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_rd: Option<u64>,
    /// Write bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_wr: Option<u64>,
    /// Total I/O operations per second
    #[arg(long, value_name = "N")]
    iops: Option<u64>,
    /// Read operations per second
    #[arg(long, value_name = "N")]
    iops_rd: Option<u64>,
    /// Write operations per second
    #[arg(long, value_name = "N")]
    iops_wr: Option<u64>,
    /// Burst of total bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_max: Option<u64>,
    /// Burst of read bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_rd_max: Option<u64>,
    /// Burst of write bytes per second
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    bps_wr_max: Option<u64>,
    /// Burst of total operations per second
    #[arg(long, value_name = "N")]
    iops_max: Option<u64>,
    /// Burst of read operations per second
    #[arg(long, value_name = "N")]
    iops_rd_max: Option<u64>,
    /// Burst of write operations per second
    #[arg(long, value_name = "N")]
    iops_wr_max: Option<u64>,
    /// Requests larger than this count as several operations
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    iops_size: Option<u64>,
}

/// Every limit name, in block_set_io_throttle's order.
pub fn throttle_names() -> impl Iterator<Item = &'static str> {
    AVG_NAMES
        .into_iter()
        .chain(MAX_NAMES)
        .chain(std::iter::once("iops_size"))
}

/// Limits measured in bytes (the others count operations).
pub fn is_byte_limit(name: &str) -> bool {
    name.starts_with("bps") || name == "iops_size"
}

impl ThrottleLimits {
    /// The values in `throttle_names` order.
    fn values(&self) -> [Option<u64>; 13] {
        [
            self.bps,
            self.bps_rd,
            self.bps_wr,
            self.iops,
            self.iops_rd,
            self.iops_wr,
            self.bps_max,
            self.bps_rd_max,
            self.bps_wr_max,
            self.iops_max,
            self.iops_rd_max,
            self.iops_wr_max,
            self.iops_size,
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.values().iter().all(Option::is_none)
    }

    /// block_set_io_throttle's arguments: the limits given, the others as
    /// they are now (`current`: the device's `inserted` from query-block,
    /// where an unset optional limit is absent); `off` sends every limit as 0.
    pub fn arguments(&self, device: &str, off: bool, current: &Value) -> QmpArgs {
        let given: Vec<&str> = throttle_names()
            .zip(self.values())
            .filter_map(|(n, v)| v.map(|_| n))
            .collect();
        let mut args = Map::new();
        args.insert("device".into(), Value::from(device));
        for (i, (name, value)) in throttle_names().zip(self.values()).enumerate() {
            let mandatory = i < AVG_NAMES.len();
            // A total and the read/write limits of its kind exclude each
            // other: naming one side drops the other's current values.
            let replaced = given.iter().any(|g| excludes(g, name));
            let now = current
                .get(name)
                .and_then(Value::as_u64)
                .filter(|_| !replaced);
            let value = if off { Some(0) } else { value.or(now) };
            if let Some(v) = value.or(mandatory.then_some(0)) {
                args.insert(name.into(), Value::from(v));
            }
        }
        args
    }
}

/// Whether limit `a` and limit `b` cannot both be set: a total (`bps`,
/// `bps_max`) and a read/write limit (`bps_rd`, `bps_wr_max`...) of one kind.
fn excludes(a: &str, b: &str) -> bool {
    let parts = |n: &str| {
        let n = n.strip_suffix("_max").unwrap_or(n);
        match n.split_once('_') {
            Some((kind, _)) => (kind.to_string(), false),
            None => (n.to_string(), true),
        }
    };
    let ((ka, ta), (kb, tb)) = (parts(a), parts(b));
    a != "iops_size" && b != "iops_size" && ka == kb && ta != tb
}

/// The first line of `input` without its line ending; `None` at end of input.
pub fn first_line(mut input: impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let end = line.trim_end_matches(['\n', '\r']).len();
    line.truncate(end);
    Ok(Some(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("64KB"), Ok(64 << 10));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size(" 3M "), Ok(3 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.5k"), Ok(512));
        for bad in [
            "", "M", "B", "1X", "1.5", "1.G", "1.5.5G", "-1", "+1", "1 M", "K1", "é",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_size("16E").is_err(), "overflows u64");
        assert!(parse_size("18446744073709551616").is_err());
    }

    #[test]
    fn relative_sizes() {
        assert_eq!(SizeChange::parse("2M"), Ok(SizeChange::To(2 << 20)));
        assert_eq!(SizeChange::parse("+1M"), Ok(SizeChange::Grow(1 << 20)));
        assert_eq!(
            SizeChange::parse("-512K"),
            Ok(SizeChange::Shrink(512 << 10))
        );
        assert!(SizeChange::parse("+").is_err());
        assert!(SizeChange::parse("--1M").is_err());
        assert!(SizeChange::parse("+-1M").is_err());

        assert_eq!(SizeChange::To(5).apply(100), Ok(5));
        assert_eq!(SizeChange::Grow(1 << 20).apply(1 << 20), Ok(2 << 20));
        assert_eq!(SizeChange::Shrink(1 << 20).apply(3 << 20), Ok(2 << 20));
        assert_eq!(SizeChange::Shrink(4).apply(4), Ok(0));
        assert!(SizeChange::Shrink(5).apply(4).is_err());
        assert!(SizeChange::Grow(u64::MAX).apply(1).is_err());
    }

    #[test]
    fn device_or_node_needs_exactly_one() {
        let d = device_or_node(Some("d0".into()), None).unwrap();
        assert_eq!(Value::Object(d.clone()), json!({"device": "d0"}));
        assert_eq!(target_name(&d), "d0");
        let n = device_or_node(None, Some("n0".into())).unwrap();
        assert_eq!(Value::Object(n.clone()), json!({"node-name": "n0"}));
        assert_eq!(target_name(&n), "n0");
        assert!(device_or_node(Some("d".into()), Some("n".into())).is_err());
        assert!(device_or_node(None, None).is_err());
    }

    fn target(device: Option<&str>, node: Option<&str>) -> Target {
        Target {
            device: device.map(str::to_string),
            node: node.map(str::to_string),
        }
    }

    #[test]
    fn target_with_positionals() {
        let s = |v: &str| Some(v.to_string());
        // resize d0 2M
        let (t, [size]) = target(Some("d0"), None).resolve([s("2M")]).unwrap();
        assert_eq!(Value::Object(t), json!({"device": "d0"}));
        assert_eq!(size, s("2M"));
        // resize --node n0 2M: clap put 2M in the DEVICE slot.
        let (t, [size]) = target(Some("2M"), Some("n0")).resolve([None]).unwrap();
        assert_eq!(Value::Object(t), json!({"node-name": "n0"}));
        assert_eq!(size, s("2M"));
        // passwd --node n0 (password from stdin)
        let (t, [pw]) = target(None, Some("n0")).resolve([None]).unwrap();
        assert_eq!(Value::Object(t), json!({"node-name": "n0"}));
        assert_eq!(pw, None);
        // passwd d0
        let (_, [pw]) = target(Some("d0"), None).resolve([None]).unwrap();
        assert_eq!(pw, None);
        // Two own positionals shift together.
        let (_, rest) = target(Some("a"), Some("n0"))
            .resolve([s("b"), None])
            .unwrap();
        assert_eq!(rest, [s("a"), s("b")]);
        // resize --node n0 d0 2M: both a device and a node.
        assert!(target(Some("d0"), Some("n0")).resolve([s("2M")]).is_err());
        assert!(target(None, None).resolve([s("2M")]).is_err());
        let (t, []) = target(None, Some("n0")).resolve([]).unwrap();
        assert_eq!(Value::Object(t), json!({"node-name": "n0"}));
        assert!(target(Some("d0"), Some("n0")).resolve([]).is_err());
    }

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        limits: ThrottleLimits,
    }

    fn limits(args: &[&str]) -> Result<ThrottleLimits, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.limits)
    }

    #[test]
    fn throttle_arguments() {
        let all_avg_zero = json!({"device": "d0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0});
        let none = limits(&[]).unwrap();
        assert!(none.is_empty());
        assert_eq!(
            Value::Object(none.arguments("d0", false, &Value::Null)),
            all_avg_zero
        );

        let l = limits(&["--iops", "100", "--bps-wr", "1M", "--bps-max", "2M"]).unwrap();
        assert!(!l.is_empty());
        let mut want = all_avg_zero.clone();
        want["iops"] = json!(100);
        want["bps_wr"] = json!(1 << 20);
        want["bps_max"] = json!(2 << 20);
        assert_eq!(Value::Object(l.arguments("d0", false, &Value::Null)), want);

        let l = limits(&["--iops-size", "4K", "--iops-rd-max", "7"]).unwrap();
        let args = l.arguments("d0", false, &Value::Null);
        assert_eq!(args["iops_size"], json!(4096));
        assert_eq!(args["iops_rd_max"], json!(7));
        assert_eq!(args.len(), 9);

        // The limits not named keep their current values.
        let now = json!({"bps": 5, "iops_rd": 9, "iops_max": 3, "iops_size": 512});
        let args = limits(&["--iops", "100"])
            .unwrap()
            .arguments("d0", false, &now);
        assert_eq!(
            (
                &args["bps"],
                &args["iops"],
                &args["iops_max"],
                &args["iops_size"]
            ),
            (&json!(5), &json!(100), &json!(3), &json!(512))
        );
        // ... except the read/write limits a total replaces.
        assert_eq!(args["iops_rd"], json!(0));

        assert!(excludes("iops", "iops_wr") && excludes("bps_rd_max", "bps_max"));
        assert!(!excludes("iops", "bps_rd") && !excludes("iops_rd", "iops_wr"));
        assert!(!excludes("iops_size", "iops") && !excludes("iops", "iops_max"));

        // --off: every limit, optional ones included, as 0.
        let off = l.arguments("d0", true, &Value::Null);
        assert_eq!(off.len(), 14);
        assert!(throttle_names().all(|n| off[n] == json!(0)));

        // Operation counts take no size suffix; sizes take no sign.
        assert!(limits(&["--iops", "1K"]).is_err());
        assert!(limits(&["--bps", "-1"]).is_err());
    }

    #[test]
    fn limit_names_and_units() {
        let names: Vec<_> = throttle_names().collect();
        assert_eq!(names.len(), 13);
        assert_eq!(names[0], "bps");
        assert_eq!(names[12], "iops_size");
        assert!(is_byte_limit("bps_rd_max") && is_byte_limit("iops_size"));
        assert!(!is_byte_limit("iops_wr"));
    }

    #[test]
    fn first_line_of_input() {
        assert_eq!(first_line(&b"pw\nrest\n"[..]).unwrap(), Some("pw".into()));
        assert_eq!(first_line(&b"pw\r\n"[..]).unwrap(), Some("pw".into()));
        assert_eq!(
            first_line(&b"no newline"[..]).unwrap(),
            Some("no newline".into())
        );
        assert_eq!(first_line(&b"\n"[..]).unwrap(), Some(String::new()));
        assert_eq!(first_line(&b""[..]).unwrap(), None);
    }
}
