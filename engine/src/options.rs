//! `BlockdevOptions` of block-core.json as typed Rust values.
//!
//! Parsing is complete for every driver of the schema, so a bad option is
//! rejected with a precise message whether or not the driver is implemented;
//! opening decides what is supported.

use crate::args::Args;
use crate::error::{Error, Result};
use crate::policy::throttle::ThrottleConfig;
use serde_json::Value;

macro_rules! string_enum {
    ($name:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),* }
        impl $name {
            pub const ALL: &'static [(&'static str, $name)] = &[$(($s, $name::$variant)),*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),* }
            }
        }
    };
}

string_enum!(DriverName {
    File = "file", HostDevice = "host_device", HostCdrom = "host_cdrom",
    HostFloppy = "host_floppy", Http = "http", Https = "https", Ftp = "ftp",
    Ftps = "ftps", Tftp = "tftp", Vvfat = "vvfat", Blkdebug = "blkdebug",
    Blkverify = "blkverify", Bochs = "bochs", Cloop = "cloop", Cow = "cow",
    Dmg = "dmg", Parallels = "parallels", Qcow = "qcow", Qcow2 = "qcow2",
    Qed = "qed", Raw = "raw", Vdi = "vdi", Vhdx = "vhdx", Vmdk = "vmdk",
    Vpc = "vpc", Quorum = "quorum",
});
string_enum!(Discard { Ignore = "ignore", Unmap = "unmap" });
string_enum!(DetectZeroes { Off = "off", On = "on", Unmap = "unmap" });
string_enum!(Aio { Threads = "threads", Native = "native" });
string_enum!(OnOffAuto { On = "on", Off = "off", Auto = "auto" });
string_enum!(OnError { Report = "report", Ignore = "ignore", Enospc = "enospc", Stop = "stop" });
string_enum!(BlkdebugEvent {
    L1Update = "l1_update", L1GrowAllocTable = "l1_grow.alloc_table",
    L1GrowWriteTable = "l1_grow.write_table", L1GrowActivateTable = "l1_grow.activate_table",
    L2Load = "l2_load", L2Update = "l2_update", L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc.cow_read", L2AllocWrite = "l2_alloc.write",
    ReadAio = "read_aio", ReadBackingAio = "read_backing_aio", ReadCompressed = "read_compressed",
    WriteAio = "write_aio", WriteCompressed = "write_compressed", VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save", CowRead = "cow_read", CowWrite = "cow_write",
    ReftableLoad = "reftable_load", ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update", RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update", RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc", RefblockAllocHookup = "refblock_alloc.hookup",
    RefblockAllocWrite = "refblock_alloc.write",
    RefblockAllocWriteBlocks = "refblock_alloc.write_blocks",
    RefblockAllocWriteTable = "refblock_alloc.write_table",
    RefblockAllocSwitchTable = "refblock_alloc.switch_table", ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes", ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os", FlushToDisk = "flush_to_disk",
});

/// `BlockdevCacheOptions`; absent members are inherited from the parent node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheOptions {
    pub writeback: Option<bool>,
    pub direct: Option<bool>,
    pub no_flush: Option<bool>,
}

/// `BlockdevRef`: an inline definition or the name of an existing node.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    Definition(Box<BlockdevOptions>),
    Reference(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct InjectError {
    pub event: BlkdebugEvent,
    pub state: Option<i64>,
    pub errno: Option<i64>,
    pub sector: Option<i64>,
    pub once: Option<bool>,
    pub immediately: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetState {
    pub event: BlkdebugEvent,
    pub state: Option<i64>,
    pub new_state: i64,
}

/// The driver-specific branch of the union.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    /// `BlockdevOptionsFile` of file and host_*.
    File {
        filename: String,
        /// `locking` (file, host_device, host_cdrom only): QEMU's image locks.
        locking: Option<OnOffAuto>,
    },
    /// `BlockdevOptionsFile` of http, https, ftp, ftps and tftp.
    Curl(CurlOptions),
    Vvfat {
        dir: String,
        fat_type: Option<i64>,
        floppy: Option<bool>,
        rw: Option<bool>,
    },
    /// `BlockdevOptionsGenericFormat` and its COW and qcow2 extensions;
    /// `backing` is `Some(None)` when given as "" (no backing file).
    Format {
        file: BlockdevRef,
        backing: Option<Option<BlockdevRef>>,
        qcow2: Qcow2Options,
    },
    Blkdebug {
        image: BlockdevRef,
        config: Option<String>,
        align: Option<i64>,
        inject_error: Vec<InjectError>,
        set_state: Vec<SetState>,
    },
    Blkverify {
        test: BlockdevRef,
        raw: BlockdevRef,
    },
    Quorum {
        blkverify: Option<bool>,
        children: Vec<BlockdevRef>,
        vote_threshold: i64,
        rewrite_corrupted: Option<bool>,
    },
}

/// The curl protocols' options: `filename` (the URL) and QEMU's curl keys
/// that block-core.json of QEMU 2.1 lacks (extension keys, as in later QEMU).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurlOptions {
    pub url: String,
    /// `readahead`: bytes fetched past each read (a multiple of 512).
    pub readahead: Option<u64>,
    /// `timeout`: seconds a transfer may take.
    pub timeout: Option<u64>,
    /// `sslverify`: check the server's certificate and name (https, ftps).
    pub sslverify: Option<bool>,
    /// `cookie`: sent with every request (`name=value; name2=value2`).
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Options {
    pub lazy_refcounts: Option<bool>,
    pub pass_discard_request: Option<bool>,
    pub pass_discard_snapshot: Option<bool>,
    pub pass_discard_other: Option<bool>,
    /// Bytes of the metadata caches (QEMU's `l2-cache-size`,
    /// `refcount-cache-size` and their sum `cache-size`).
    pub l2_cache_size: Option<u64>,
    pub refcount_cache_size: Option<u64>,
    pub cache_size: Option<u64>,
    /// `overlap-check` (an extension key, as in later QEMU): the kinds of
    /// metadata writes are checked against, bit `i` for `OVERLAP_KINDS[i]`
    /// (QEMU's `QCOW2_OL_*_BITNR`); `None` means the `cached` template.
    pub overlap_check: Option<u8>,
}

string_enum!(OverlapMode { None = "none", Constant = "constant", Cached = "cached", All = "all" });

/// The per-kind keys of `overlap-check`, in QEMU's bit order.
pub const OVERLAP_KINDS: [&str; 8] = [
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
];

impl OverlapMode {
    /// The kinds the template checks: `constant` is the header, active L1,
    /// refcount table and snapshot table; `cached` adds active L2, refcount
    /// blocks and inactive L1; `all` adds inactive L2.
    pub fn mask(self) -> u8 {
        match self {
            OverlapMode::None => 0,
            OverlapMode::Constant => 0b0010_1011,
            OverlapMode::Cached => 0b0111_1111,
            OverlapMode::All => 0xff,
        }
    }
}

/// `overlap-check`: a template name, or an object with an optional
/// `template` and a boolean per kind overriding it (QEMU's
/// `Qcow2OverlapChecks`).
fn parse_overlap_check(a: &mut Args) -> Result<Option<u8>> {
    let path = a.path("overlap-check");
    match a.take("overlap-check") {
        None => Ok(None),
        Some(Value::String(s)) => OverlapMode::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, m)| Some(m.mask()))
            .ok_or_else(|| {
                Error::generic(format!(
                    "Unsupported value '{s}' for qcow2 option '{path}'. Allowed are any of the following: none, constant, cached, all"
                ))
            }),
        Some(v @ Value::Object(_)) => {
            let mut o = Args::new(v, &path, a.is_lenient())?;
            let template = o.enumeration("template", OverlapMode::ALL)?;
            let mut mask = template.unwrap_or(OverlapMode::Cached).mask();
            for (i, key) in OVERLAP_KINDS.iter().enumerate() {
                match o.bool(key)? {
                    Some(true) => mask |= 1 << i,
                    Some(false) => mask &= !(1 << i),
                    None => {}
                }
            }
            o.finish()?;
            Ok(Some(mask))
        }
        Some(_) => Err(Error::generic(format!(
            "Invalid parameter type for '{path}', expected: string or object"
        ))),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    pub driver: DriverName,
    pub id: Option<String>,
    pub node_name: Option<String>,
    pub discard: Option<Discard>,
    pub cache: CacheOptions,
    pub aio: Option<Aio>,
    pub rerror: Option<OnError>,
    pub werror: Option<OnError>,
    pub read_only: Option<bool>,
    /// `force-share`: share every permission with other users (read-only nodes only).
    pub force_share: Option<bool>,
    pub detect_zeroes: Option<DetectZeroes>,
    /// `x-passthrough` (blkfs extension): the kernel does the device's I/O.
    pub passthrough: Option<bool>,
    pub specific: DriverOptions,
    /// The format was probed, not given (`--blockdev` without a driver):
    /// a probed raw image refuses writes that would make it probe as
    /// another format.
    pub probed: bool,
}

impl BlockdevOptions {
    /// Parses a JSON object (strict types).
    pub fn from_json(v: Value) -> Result<Self> {
        Self::parse(Args::new(v, "", false)?)
    }

    /// Parses QEMU's dotted key=value form.
    pub fn from_keyval(s: &str) -> Result<Self> {
        Self::parse(Args::new(crate::args::parse_keyval(s)?, "", true)?)
    }

    /// A `--blockdev` argument of the daemon: the options plus, for a
    /// device, QEMU's `-drive` throttling keys (`throttling.iops-total=...`).
    pub fn from_daemon_cli(s: &str) -> Result<(Self, Option<ThrottleConfig>)> {
        let (mut v, lenient) = cli_value(s)?;
        let probed = probe_missing_driver(&mut v, lenient)?;
        let cfg = take_throttling(&mut v, lenient)?;
        let mut opts = Self::parse(Args::new(v, "", lenient)?)?;
        opts.probed = probed;
        check_throttling_target(&opts, &cfg)?;
        Ok((opts, cfg))
    }

    /// The same spec for a client (`blkctl add`): checked by the daemon's
    /// parser, returned as the typed JSON `blockdev-add` takes, with the
    /// throttling limits apart (they go to block_set_io_throttle). No
    /// probing: the daemon's blockdev-add needs the driver.
    pub fn qmp_from_cli(s: &str) -> Result<(Value, Option<ThrottleConfig>)> {
        let (mut v, lenient) = cli_value(s)?;
        let cfg = take_throttling(&mut v, lenient)?;
        let (opts, typed) = crate::args::typed(v, |v| Self::parse(Args::new(v, "", lenient)?))?;
        check_throttling_target(&opts, &cfg)?;
        Ok((typed, cfg))
    }

    pub fn parse(mut a: Args) -> Result<Self> {
        let driver = a
            .enumeration("driver", DriverName::ALL)?
            .ok_or_else(|| a.missing("driver"))?;
        let cache = match a.object("cache")? {
            None => CacheOptions::default(),
            Some(mut c) => {
                let opts = CacheOptions {
                    writeback: c.bool("writeback")?,
                    direct: c.bool("direct")?,
                    no_flush: c.bool("no-flush")?,
                };
                c.finish()?;
                opts
            }
        };
        let opts = BlockdevOptions {
            driver,
            id: a.str("id")?,
            node_name: a.str("node-name")?,
            discard: a.enumeration("discard", Discard::ALL)?,
            cache,
            aio: a.enumeration("aio", Aio::ALL)?,
            rerror: a.enumeration("rerror", OnError::ALL)?,
            werror: a.enumeration("werror", OnError::ALL)?,
            read_only: a.bool("read-only")?,
            force_share: a.bool("force-share")?,
            detect_zeroes: a.enumeration("detect-zeroes", DetectZeroes::ALL)?,
            passthrough: a.bool("x-passthrough")?,
            specific: parse_specific(driver, &mut a)?,
            probed: false,
        };
        a.finish()?;
        Ok(opts)
    }
}

/// The JSON value of a command-line spec, and whether it came from key=value.
/// A `--blockdev` without a driver over a file (`file.filename=...`):
/// the format is probed from the file's first bytes (raw when no magic
/// matches). True when it was.
fn probe_missing_driver(v: &mut Value, lenient: bool) -> Result<bool> {
    let Some(m) = v.as_object_mut() else {
        return Ok(false);
    };
    if m.contains_key("driver") {
        return Ok(false);
    }
    let file = match m.get_mut("file") {
        Some(Value::Object(f)) if f.get("filename").is_some_and(Value::is_string) => {
            // As QEMU: a URL's scheme names its protocol driver.
            let by_url = f
                .get("filename")
                .and_then(Value::as_str)
                .and_then(crate::drivers::curl::Protocol::of_url)
                .map_or("file", crate::drivers::curl::Protocol::name);
            f.entry("driver").or_insert_with(|| Value::from(by_url));
            Value::Object(f.clone())
        }
        _ => {
            return Err(Error::generic(
                "Parameter 'driver' is missing (it can be left out only over a file, whose format is then probed)",
            ))
        }
    };
    let file = BlockdevOptions::parse(Args::new(file, "file", lenient)?)?;
    let curl = crate::drivers::curl::Protocol::from_name(file.driver.as_str());
    let format = match (file.specific, curl) {
        (DriverOptions::Curl(o), Some(protocol)) => crate::drivers::curl::probe(protocol, &o)?,
        (DriverOptions::File { filename, .. }, _) => crate::drivers::probe::probe(&filename)?,
        _ => return Err(Error::generic("Parameter 'driver' is missing")),
    };
    m.insert("driver".into(), Value::from(format));
    Ok(true)
}

fn cli_value(s: &str) -> Result<(Value, bool)> {
    if s.trim_start().starts_with('{') {
        let v = serde_json::from_str(s)
            .map_err(|e| Error::generic(format!("Invalid JSON in blockdev options: {e}")))?;
        Ok((v, false))
    } else {
        Ok((crate::args::parse_keyval(s)?, true))
    }
}

/// Takes out and parses the `throttling` group of a spec.
fn take_throttling(v: &mut Value, lenient: bool) -> Result<Option<ThrottleConfig>> {
    v.as_object_mut()
        .and_then(|m| m.remove("throttling"))
        .map(|t| parse_throttling(Args::new(t, "throttling", lenient)?))
        .transpose()
}

fn check_throttling_target(opts: &BlockdevOptions, cfg: &Option<ThrottleConfig>) -> Result<()> {
    if cfg.is_some() && opts.id.is_none() {
        return Err(Error::generic(
            "'throttling' applies to a device: it needs an 'id'",
        ));
    }
    Ok(())
}

/// QEMU's `-drive` throttling group, in bucket order.
fn parse_throttling(mut a: Args) -> Result<ThrottleConfig> {
    const KEYS: [&str; 6] = [
        "bps-total",
        "bps-read",
        "bps-write",
        "iops-total",
        "iops-read",
        "iops-write",
    ];
    let (mut avg, mut max) = ([0i64; 6], [0i64; 6]);
    for i in 0..6 {
        avg[i] = a.int(KEYS[i])?.unwrap_or(0);
        max[i] = a.int(&format!("{}-max", KEYS[i]))?.unwrap_or(0);
    }
    let size = a.int("iops-size")?.unwrap_or(0);
    a.finish()?;
    ThrottleConfig::new(avg, max, size)
}

fn parse_ref(a: &mut Args, key: &str) -> Result<Option<BlockdevRef>> {
    let path = a.path(key);
    a.take(key)
        .map(|v| ref_from_value(v, &path, a.is_lenient()))
        .transpose()
}

fn ref_from_value(v: Value, path: &str, lenient: bool) -> Result<BlockdevRef> {
    match v {
        Value::String(s) => Ok(BlockdevRef::Reference(s)),
        v @ Value::Object(_) => Ok(BlockdevRef::Definition(Box::new(BlockdevOptions::parse(
            Args::new(v, path, lenient)?,
        )?))),
        _ => Err(Error::generic(format!(
            "Invalid parameter type for '{path}', expected: object or string"
        ))),
    }
}

fn parse_specific(driver: DriverName, a: &mut Args) -> Result<DriverOptions> {
    use DriverName::*;
    Ok(match driver {
        File | HostDevice | HostCdrom | HostFloppy => DriverOptions::File {
            filename: a.req("filename", Args::str)?,
            locking: match driver {
                File | HostDevice | HostCdrom => a.enumeration("locking", OnOffAuto::ALL)?,
                _ => None,
            },
        },
        Http | Https | Ftp | Ftps | Tftp => DriverOptions::Curl(CurlOptions {
            url: a.req("filename", Args::str)?,
            readahead: size(a, "readahead")?,
            timeout: a.uint("timeout")?,
            sslverify: a.bool("sslverify")?,
            cookie: a.str("cookie")?,
        }),
        Vvfat => DriverOptions::Vvfat {
            dir: a.req("dir", Args::str)?,
            fat_type: a.int("fat-type")?,
            floppy: a.bool("floppy")?,
            rw: a.bool("rw")?,
        },
        Blkdebug => DriverOptions::Blkdebug {
            image: parse_ref(a, "image")?.ok_or_else(|| a.missing("image"))?,
            config: a.str("config")?,
            align: a.int("align")?,
            inject_error: parse_list(a, "inject-error", parse_inject_error)?,
            set_state: parse_list(a, "set-state", parse_set_state)?,
        },
        Blkverify => DriverOptions::Blkverify {
            test: parse_ref(a, "test")?.ok_or_else(|| a.missing("test"))?,
            raw: parse_ref(a, "raw")?.ok_or_else(|| a.missing("raw"))?,
        },
        Quorum => {
            let path = a.path("children");
            let lenient = a.is_lenient();
            let children = a
                .take("children")
                .map(|v| children_list(v, &path, lenient))
                .transpose()?
                .ok_or_else(|| a.missing("children"))?;
            DriverOptions::Quorum {
                blkverify: a.bool("blkverify")?,
                children,
                vote_threshold: a.req("vote-threshold", Args::int)?,
                rewrite_corrupted: a.bool("rewrite-corrupted")?,
            }
        }
        Bochs | Cloop | Dmg | Parallels | Raw | Vdi | Vhdx | Vpc | Cow | Qcow | Qcow2 | Qed
        | Vmdk => {
            let file = parse_ref(a, "file")?.ok_or_else(|| a.missing("file"))?;
            let cow = matches!(driver, Cow | Qcow | Qcow2 | Qed | Vmdk);
            let backing = if cow {
                match a.take("backing") {
                    None => None,
                    Some(Value::String(s)) if s.is_empty() => Some(None),
                    Some(v) => Some(Some(ref_from_value(v, &a.path("backing"), a.is_lenient())?)),
                }
            } else {
                None
            };
            let qcow2 = if driver == Qcow2 {
                Qcow2Options {
                    lazy_refcounts: a.bool("lazy-refcounts")?,
                    pass_discard_request: a.bool("pass-discard-request")?,
                    pass_discard_snapshot: a.bool("pass-discard-snapshot")?,
                    pass_discard_other: a.bool("pass-discard-other")?,
                    overlap_check: parse_overlap_check(a)?,
                    l2_cache_size: size(a, "l2-cache-size")?,
                    refcount_cache_size: size(a, "refcount-cache-size")?,
                    cache_size: size(a, "cache-size")?,
                }
            } else {
                Qcow2Options::default()
            };
            DriverOptions::Format {
                file,
                backing,
                qcow2,
            }
        }
    })
}

/// A QAPI `size`: a non-negative integer; in key=value form also with
/// QEMU's suffixes (`64k`, `1M`, `2G`, `1T`, powers of 1024).
fn size(a: &mut Args, key: &str) -> Result<Option<u64>> {
    let bad = |a: &Args| {
        Error::generic(format!(
            "Parameter '{}' expects a non-negative number below 2^64",
            a.path(key)
        ))
    };
    match a.take(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| bad(a)),
        Some(Value::String(s)) if a.is_lenient() => {
            let s = s.trim();
            let (digits, shift) = match s.char_indices().last() {
                Some((i, c)) if c.is_ascii_alphabetic() => {
                    let shift = match c.to_ascii_lowercase() {
                        'b' => 0,
                        'k' => 10,
                        'm' => 20,
                        'g' => 30,
                        't' => 40,
                        'p' => 50,
                        'e' => 60,
                        _ => return Err(bad(a)),
                    };
                    (&s[..i], shift)
                }
                _ => (s, 0),
            };
            let n: u64 = digits.parse().map_err(|_| bad(a))?;
            let n = n.checked_mul(1u64 << shift).ok_or_else(|| bad(a))?;
            crate::args::note_converted(a.path(key), Value::from(n));
            Ok(Some(n))
        }
        Some(_) => Err(Error::generic(format!(
            "Invalid parameter type for '{}', expected: integer",
            a.path(key)
        ))),
    }
}

/// Keyval has no arrays: `children.0.driver=...` arrives as an object with
/// numeric keys, which is accepted in lenient mode.
fn list_items(v: Value, path: &str, lenient: bool) -> Result<Vec<(String, Value)>> {
    match v {
        Value::Array(items) => Ok(items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("{path}[{i}]"), v))
            .collect()),
        Value::Object(m) if lenient => {
            let mut items: Vec<(usize, Value)> = Vec::new();
            for (k, v) in m {
                let i = k
                    .parse::<usize>()
                    .map_err(|_| Error::generic(format!("Parameter '{path}.{k}' is unexpected")))?;
                items.push((i, v));
            }
            items.sort_by_key(|(i, _)| *i);
            Ok(items
                .into_iter()
                .map(|(i, v)| (format!("{path}.{i}"), v))
                .collect())
        }
        _ => Err(Error::generic(format!(
            "Invalid parameter type for '{path}', expected: array"
        ))),
    }
}

fn children_list(v: Value, path: &str, lenient: bool) -> Result<Vec<BlockdevRef>> {
    list_items(v, path, lenient)?
        .into_iter()
        .map(|(p, v)| ref_from_value(v, &p, lenient))
        .collect()
}

fn parse_list<T>(a: &mut Args, key: &str, f: fn(Args) -> Result<T>) -> Result<Vec<T>> {
    let path = a.path(key);
    let lenient = a.is_lenient();
    match a.take(key) {
        None => Ok(Vec::new()),
        Some(v) => list_items(v, &path, lenient)?
            .into_iter()
            .map(|(p, v)| f(Args::new(v, &p, lenient)?))
            .collect(),
    }
}

fn blkdebug_event(a: &mut Args) -> Result<BlkdebugEvent> {
    a.enumeration("event", BlkdebugEvent::ALL)?
        .ok_or_else(|| a.missing("event"))
}

fn parse_inject_error(mut a: Args) -> Result<InjectError> {
    let e = InjectError {
        event: blkdebug_event(&mut a)?,
        state: a.int("state")?,
        errno: a.int("errno")?,
        sector: a.int("sector")?,
        once: a.bool("once")?,
        immediately: a.bool("immediately")?,
    };
    a.finish()?;
    Ok(e)
}

fn parse_set_state(mut a: Args) -> Result<SetState> {
    let s = SetState {
        event: blkdebug_event(&mut a)?,
        state: a.int("state")?,
        new_state: a.req("new_state", Args::int)?,
    };
    a.finish()?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_client_gets_the_spec_typed_as_qmp_takes_it() {
        let (v, t) = BlockdevOptions::qmp_from_cli(
            "driver=quorum,id=q,vote-threshold=2,children.0=n0,\
             children.1.driver=qcow2,children.1.l2-cache-size=1M,\
             children.1.file.driver=file,children.1.file.filename=/a,\
             children.1.file.cache.direct=on,throttling.iops-total=7",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"driver": "quorum", "id": "q", "vote-threshold": 2, "children": ["n0",
                {"driver": "qcow2", "l2-cache-size": 1 << 20, "file": {"driver": "file",
                 "filename": "/a", "cache": {"direct": true}}}]})
        );
        assert_eq!(t.map(|t| t.avg[3]), Some(7));
        // Exactly what QMP's strict parser accepts.
        BlockdevOptions::from_json(v).unwrap();
        let e = BlockdevOptions::qmp_from_cli("driver=raw,id=x,file=n,bogus=1").unwrap_err();
        assert_eq!(e.msg, "Parameter 'bogus' is unexpected");
    }

    #[test]
    fn json_and_keyval_agree() {
        let j = BlockdevOptions::from_json(json!({
            "driver": "raw", "id": "d0", "read-only": true, "cache": {"direct": true},
            "file": {"driver": "file", "filename": "a.img", "aio": "native"}
        }))
        .unwrap();
        let k = BlockdevOptions::from_keyval(
            "driver=raw,id=d0,read-only=on,cache.direct=on,file.driver=file,file.filename=a.img,file.aio=native",
        )
        .unwrap();
        assert_eq!(j, k);
        assert_eq!(j.read_only, Some(true));
        assert_eq!(j.cache.direct, Some(true));
        let DriverOptions::Format {
            file: BlockdevRef::Definition(f),
            ..
        } = &j.specific
        else {
            panic!("raw must parse as a format");
        };
        assert_eq!(f.aio, Some(Aio::Native));
    }

    #[test]
    fn daemon_cli_throttling() {
        let (o, t) = BlockdevOptions::from_daemon_cli(
            "driver=raw,id=d0,file.driver=file,file.filename=a,throttling.iops-total=100,throttling.iops-total-max=200,throttling.iops-size=4096",
        )
        .unwrap();
        assert_eq!(o.id.as_deref(), Some("d0"));
        let t = t.unwrap();
        assert_eq!((t.avg[3], t.max[3], t.iops_size), (100, 200, 4096));
        let (_, t) = BlockdevOptions::from_daemon_cli(
            r#"{"driver":"raw","id":"d0","file":"f","throttling":{"bps-read":1000}}"#,
        )
        .unwrap();
        assert_eq!(t.unwrap().avg[1], 1000);
        let e = |s| BlockdevOptions::from_daemon_cli(s).unwrap_err().msg;
        assert_eq!(
            e("driver=raw,file=f,throttling.bps-total=1"),
            "'throttling' applies to a device: it needs an 'id'"
        );
        assert_eq!(
            e("driver=raw,id=d,file=f,throttling.bogus=1"),
            "Parameter 'throttling.bogus' is unexpected"
        );
        assert!(
            e("driver=raw,id=d,file=f,throttling.bps-total=1,throttling.bps-read=1")
                .contains("cannot be used at the same time")
        );
    }

    #[test]
    fn precise_errors() {
        let e = |v| BlockdevOptions::from_json(v).unwrap_err().msg;
        assert_eq!(e(json!({})), "Parameter 'driver' is missing");
        assert_eq!(
            e(json!({"driver": "nope"})),
            "Parameter 'driver' does not accept value 'nope'"
        );
        assert_eq!(e(json!({"driver": "raw"})), "Parameter 'file' is missing");
        assert_eq!(
            e(json!({"driver": "raw", "file": {"driver": "file"}})),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            e(json!({"driver": "file", "filename": "x", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            e(json!({"driver": "raw", "file": 5})),
            "Invalid parameter type for 'file', expected: object or string"
        );
        assert_eq!(
            e(json!({"driver": "raw", "file": "f", "backing": "b"})),
            "Parameter 'backing' is unexpected"
        );
    }

    #[test]
    fn locking_and_force_share() {
        let o = BlockdevOptions::from_keyval(
            "driver=raw,read-only=on,force-share=on,file.driver=file,file.filename=a,file.locking=off",
        )
        .unwrap();
        assert_eq!(o.force_share, Some(true));
        let DriverOptions::Format {
            file: BlockdevRef::Definition(f),
            ..
        } = &o.specific
        else {
            panic!("raw must parse as a format");
        };
        assert_eq!(
            f.specific,
            DriverOptions::File {
                filename: "a".into(),
                locking: Some(OnOffAuto::Off)
            }
        );
        let e = |v| BlockdevOptions::from_json(v).unwrap_err().msg;
        assert_eq!(
            e(json!({"driver": "file", "filename": "x", "locking": "maybe"})),
            "Parameter 'locking' does not accept value 'maybe'"
        );
        assert_eq!(
            e(json!({"driver": "file", "filename": "x", "locking": true})),
            e(json!({"driver": "file", "filename": "x", "locking": 1}))
        );
        // Not a key of the curl protocols.
        assert_eq!(
            e(json!({"driver": "http", "filename": "x", "locking": "on"})),
            "Parameter 'locking' is unexpected"
        );
    }

    #[test]
    fn qcow2_overlap_check() {
        let mask = |v: serde_json::Value| {
            let mut o = json!({"driver": "qcow2", "file": "f"});
            if !v.is_null() {
                o["overlap-check"] = v;
            }
            match BlockdevOptions::from_json(o).map(|o| o.specific) {
                Ok(DriverOptions::Format { qcow2, .. }) => Ok(qcow2.overlap_check),
                Ok(_) => panic!("qcow2 must parse as a format"),
                Err(e) => Err(e.msg),
            }
        };
        assert_eq!(mask(Value::Null), Ok(None));
        assert_eq!(mask(json!("none")), Ok(Some(0)));
        assert_eq!(mask(json!("constant")), Ok(Some(0b0010_1011)));
        assert_eq!(mask(json!("cached")), Ok(Some(0x7f)));
        assert_eq!(mask(json!("all")), Ok(Some(0xff)));
        assert_eq!(mask(json!({"inactive-l2": true})), Ok(Some(0xff)));
        assert_eq!(
            mask(json!({"template": "none", "active-l1": true, "refcount-block": true})),
            Ok(Some(0b1_0010))
        );
        assert_eq!(
            mask(json!({"template": "all", "main-header": false})),
            Ok(Some(0xfe))
        );
        assert_eq!(
            mask(json!("some")),
            Err("Unsupported value 'some' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all".into())
        );
        assert_eq!(
            mask(json!({"template": "x"})),
            Err("Parameter 'overlap-check.template' does not accept value 'x'".into())
        );
        assert_eq!(
            mask(json!({"active-l3": true})),
            Err("Parameter 'overlap-check.active-l3' is unexpected".into())
        );
        assert_eq!(
            mask(json!({"active-l1": "on"})),
            Err("Invalid parameter type for 'overlap-check.active-l1', expected: boolean".into())
        );
        assert_eq!(
            mask(json!(3)),
            Err("Invalid parameter type for 'overlap-check', expected: string or object".into())
        );
        // The dotted forms.
        let k = |s: &str| match BlockdevOptions::from_keyval(s).map(|o| o.specific) {
            Ok(DriverOptions::Format { qcow2, .. }) => Ok(qcow2.overlap_check),
            Ok(_) => panic!("qcow2 must parse as a format"),
            Err(e) => Err(e.msg),
        };
        assert_eq!(k("driver=qcow2,file=f,overlap-check=all"), Ok(Some(0xff)));
        assert_eq!(
            k("driver=qcow2,file=f,overlap-check.template=none,overlap-check.active-l1=on"),
            Ok(Some(0b10))
        );
        assert_eq!(
            k("driver=qcow2,file=f,overlap-check.inactive-l2=yes"),
            Ok(Some(0xff))
        );
        assert!(k("driver=qcow2,file=f,overlap-check=all,overlap-check.active-l1=on").is_err());
        // Only qcow2 has it.
        assert_eq!(
            BlockdevOptions::from_json(
                json!({"driver": "raw", "file": "f", "overlap-check": "all"})
            )
            .unwrap_err()
            .msg,
            "Parameter 'overlap-check' is unexpected"
        );
    }

    #[test]
    fn qcow2_cache_sizes() {
        let q = |o: BlockdevOptions| match o.specific {
            DriverOptions::Format { qcow2, .. } => qcow2,
            _ => panic!("not a format"),
        };
        let o = BlockdevOptions::from_keyval(
            "driver=qcow2,file=f,l2-cache-size=4M,refcount-cache-size=262144,cache-size=1g",
        )
        .unwrap();
        let o = q(o);
        assert_eq!(o.l2_cache_size, Some(4 << 20));
        assert_eq!(o.refcount_cache_size, Some(262144));
        assert_eq!(o.cache_size, Some(1 << 30));
        let o = BlockdevOptions::from_json(
            json!({"driver": "qcow2", "file": "f", "l2-cache-size": 65536}),
        )
        .unwrap();
        assert_eq!(q(o).l2_cache_size, Some(65536));
        let e = |v| BlockdevOptions::from_json(v).unwrap_err().msg;
        assert_eq!(
            e(json!({"driver": "qcow2", "file": "f", "cache-size": "1M"})),
            "Invalid parameter type for 'cache-size', expected: integer"
        );
        assert_eq!(
            e(json!({"driver": "qcow2", "file": "f", "cache-size": -1})),
            "Parameter 'cache-size' expects a non-negative number below 2^64"
        );
        assert_eq!(
            e(json!({"driver": "raw", "file": "f", "cache-size": 1})),
            "Parameter 'cache-size' is unexpected"
        );
        let e = |s| BlockdevOptions::from_keyval(s).unwrap_err().msg;
        assert_eq!(
            e("driver=qcow2,file=f,l2-cache-size=1X"),
            "Parameter 'l2-cache-size' expects a non-negative number below 2^64"
        );
        assert_eq!(
            e("driver=qcow2,file=f,l2-cache-size=99999999999T"),
            "Parameter 'l2-cache-size' expects a non-negative number below 2^64"
        );
    }

    #[test]
    fn cow_backing_and_blkdebug_lists() {
        let o = BlockdevOptions::from_json(json!({"driver": "qcow2", "file": "f", "backing": ""}))
            .unwrap();
        let DriverOptions::Format { backing, .. } = o.specific else {
            panic!()
        };
        assert_eq!(backing, Some(None));
        let o = BlockdevOptions::from_keyval(
            "driver=blkdebug,image=img,inject-error.0.event=read_aio,inject-error.0.errno=5",
        )
        .unwrap();
        let DriverOptions::Blkdebug { inject_error, .. } = o.specific else {
            panic!()
        };
        assert_eq!(inject_error[0].errno, Some(5));
    }
}
