//! Image creation for every writable format, with the options `qemu-img
//! create -o` takes for it: used by `blkctl create` and by the jobs that
//! create their targets (`mode=absolute-paths`).

use crate::error::{Error, Result};
use std::os::unix::fs::FileExt;

/// What to create, besides the format.
#[derive(Debug, Clone, Default)]
pub struct NewImage {
    pub size: u64,
    /// The backing file's name as the image records it, and its format.
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// `-o` options: (name, value), in order.
    pub options: Vec<(String, String)>,
}

/// Formats this module creates.
pub const FORMATS: &[&str] = &[
    "raw",
    "qcow2",
    "qed",
    "vmdk",
    "vdi",
    "vpc",
    "parallels",
    "cow",
];

/// Splits `-o a=b,c=d` into its options.
pub fn parse_options(s: &str) -> Result<Vec<(String, String)>> {
    s.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Error::generic(format!("option '{kv}' needs a value")))
        })
        .collect()
}

/// A size as qemu-img reads it: bytes, or with a K/M/G/T/P/E suffix (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['b', 'B']).unwrap_or(t);
    let shift = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        Some('P') => 50,
        Some('E') => 60,
        _ => 0,
    };
    // Every suffix is one ASCII character, so slicing it off is safe.
    let num = if shift == 0 { t } else { &t[..t.len() - 1] };
    // u64's parser would take a sign; sizes have none.
    if !num.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("invalid size '{s}'"));
    }
    let bad = || format!("invalid size '{s}'");
    let too_large = || format!("size '{s}' is too large");
    // As qemu-img: a fraction needs a unit ("1.5G"); bytes are whole.
    let (whole, frac) = match num.split_once('.') {
        Some(_) if shift == 0 => return Err(format!("invalid size '{s}': fractional bytes")),
        Some((w, f)) if !f.is_empty() && f.len() <= 18 && f.bytes().all(|b| b.is_ascii_digit()) => {
            (w, Some(f))
        }
        Some(_) => return Err(bad()),
        None => (num, None),
    };
    let n: u64 = whole.parse().map_err(|_| bad())?;
    let mut bytes = n.checked_mul(1 << shift).ok_or_else(too_large)?;
    if let Some(f) = frac {
        let digits: u128 = f.parse().map_err(|_| bad())?;
        let part = (digits << shift) / 10u128.pow(f.len() as u32);
        bytes = bytes
            .checked_add(u64::try_from(part).map_err(|_| too_large())?)
            .ok_or_else(too_large)?;
    }
    Ok(bytes)
}

fn on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(Error::generic(format!(
            "Parameter '{k}' expects 'on' or 'off'"
        ))),
    }
}

/// `subformat=dynamic|fixed` (vpc, vhdx): whether fixed.
fn fixed_subformat(v: &str) -> Result<bool> {
    match v {
        "dynamic" => Ok(false),
        "fixed" => Ok(true),
        _ => Err(Error::generic(format!(
            "Invalid subformat '{v}' (dynamic or fixed)"
        ))),
    }
}

fn unknown(format: &str, k: &str) -> Error {
    Error::generic(format!("Invalid parameter '{k}' for format '{format}'"))
}

/// Creates the image at `path` as `qemu-img create -f FORMAT` would.
pub fn create(path: &str, format: &str, img: &NewImage) -> Result<()> {
    let with_backing = super::has_backing_file(format);
    if img.backing_file.is_some() && !with_backing {
        return Err(Error::generic(format!(
            "Backing file not supported for file format '{format}'"
        )));
    }
    match format {
        "raw" => {
            if let Some((k, _)) = img.options.first() {
                return Err(unknown(format, k));
            }
            let f = super::file::create_locked(path)?;
            f.set_len(img.size)
                .map_err(|e| Error::from_io(&e, format!("Could not resize '{path}'")))
        }
        "qcow2" => super::qcow2::create::create(path, &qcow2_options(img)?),
        "vdi" => {
            let mut fixed = false;
            for (k, v) in &img.options {
                match k.as_str() {
                    "static" => fixed = on_off(k, v)?,
                    _ => return Err(unknown(format, k)),
                }
            }
            super::vdi::create(path, img.size, fixed)
        }
        "qed" => {
            let (mut cluster, mut table) = (None, None);
            for (k, v) in &img.options {
                let n = parse_size(v).map_err(Error::generic)?;
                match k.as_str() {
                    "cluster_size" => cluster = Some(n),
                    "table_size" => table = Some(n),
                    _ => return Err(unknown(format, k)),
                }
            }
            let backing = img
                .backing_file
                .as_deref()
                .map(|b| (b, img.backing_format.as_deref()));
            super::qed::create(path, img.size, backing, cluster, table)
        }
        "vmdk" => {
            let mut o = super::vmdk::CreateOptions {
                backing_file: img.backing_file.clone(),
                ..Default::default()
            };
            if img.backing_format.as_deref().is_some_and(|f| f != "vmdk") {
                return Err(Error::generic("backing_fmt must be 'vmdk' if present"));
            }
            for (k, v) in &img.options {
                match k.as_str() {
                    "subformat" => o.subformat = Some(v.clone()),
                    "adapter_type" => o.adapter_type = Some(v.clone()),
                    "hwversion" => o.hwversion = Some(v.clone()),
                    "toolsversion" => o.toolsversion = Some(v.clone()),
                    "compat6" => o.compat6 = on_off(k, v)?,
                    "zeroed_grain" => o.zeroed_grain = on_off(k, v)?,
                    _ => return Err(unknown(format, k)),
                }
            }
            super::vmdk::create(path, img.size, &o)
        }
        "vhdx" => {
            let (mut fixed, mut bs, mut log, mut zero) = (false, None, None, true);
            for (k, v) in &img.options {
                match (k.as_str(), v.as_str()) {
                    ("subformat", _) => fixed = fixed_subformat(v)?,
                    ("block_size", _) => bs = Some(parse_size(v).map_err(Error::generic)?),
                    ("log_size", _) => log = Some(parse_size(v).map_err(Error::generic)?),
                    ("block_state_zero", _) => zero = on_off(k, v)?,
                    _ => return Err(unknown(format, k)),
                }
            }
            super::vhdx::create(path, img.size, fixed, bs, log, zero)
        }
        "cow" => {
            if let Some((k, _)) = img.options.first() {
                return Err(unknown(format, k));
            }
            let backing = img.backing_file.as_deref().ok_or_else(|| {
                Error::generic("A COW image needs a backing file (-b), as uml_mkcow does")
            })?;
            super::cow::create(path, backing, Some(img.size))
        }
        "parallels" => {
            let mut cluster = None;
            for (k, v) in &img.options {
                match k.as_str() {
                    "cluster_size" => cluster = Some(parse_size(v).map_err(Error::generic)?),
                    _ => return Err(unknown(format, k)),
                }
            }
            super::parallels::create(path, img.size, cluster)
        }
        "vpc" => {
            let (mut fixed, mut force_size) = (false, false);
            for (k, v) in &img.options {
                match (k.as_str(), v.as_str()) {
                    ("subformat", _) => fixed = fixed_subformat(v)?,
                    ("force_size", _) => force_size = on_off(k, v)?,
                    _ => return Err(unknown(format, k)),
                }
            }
            super::vpc::create(path, img.size, fixed, force_size)
        }
        _ => {
            if !crate::options::DriverName::ALL
                .iter()
                .any(|(n, _)| *n == format)
            {
                return Err(Error::generic(format!("Invalid block format '{format}'")));
            }
            Err(Error::generic(format!(
                "Creating '{format}' images is not supported by blkfs (it creates {})",
                FORMATS.join(", ")
            )))
        }
    }
}

fn qcow2_options(img: &NewImage) -> Result<super::qcow2::create::CreateOptions> {
    let mut o = super::qcow2::create::CreateOptions {
        size: img.size,
        backing_file: img.backing_file.clone(),
        backing_format: img.backing_format.clone(),
        ..Default::default()
    };
    for (k, v) in &img.options {
        match k.as_str() {
            "cluster_size" => {
                let cs = parse_size(v).map_err(Error::generic)?;
                if !cs.is_power_of_two() {
                    return Err(Error::generic(format!(
                        "cluster_size {cs} is not a power of two"
                    )));
                }
                o.cluster_bits = cs.trailing_zeros();
            }
            "compat" => {
                o.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(Error::generic(format!("compat '{v}' is not 0.10 or 1.1"))),
                }
            }
            "refcount_bits" => {
                let bits: u64 = v
                    .parse()
                    .map_err(|_| Error::generic(format!("invalid refcount_bits '{v}'")))?;
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(Error::generic(format!(
                        "refcount_bits {bits} is not a power of two up to 64"
                    )));
                }
                o.refcount_order = bits.trailing_zeros();
            }
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            _ => return Err(unknown("qcow2", k)),
        }
    }
    Ok(o)
}

/// A random (version 4) UUID, as the formats that carry one record it.
pub fn uuid_v4() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|f| f.read_exact_at(&mut u, 0))
        .map_err(|e| Error::from_io(&e, "Could not read /dev/urandom"))?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

/// Writes a new image file: `head` at offset 0, the file `len` bytes long
/// (sparse past `head`), synced.
pub fn write_new(path: &str, head: &[u8], len: u64) -> Result<()> {
    let f = super::file::create_locked(path)?;
    let io = |r: std::io::Result<()>| {
        r.map_err(|e| Error::from_io(&e, format!("Could not write '{path}'")))
    };
    io(f.write_all_at(head, 0))?;
    io(f.set_len(len.max(head.len() as u64)))?;
    io(f.sync_all())
}
