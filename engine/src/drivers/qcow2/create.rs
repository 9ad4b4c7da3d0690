//! Image creation: header (+ backing format extension and backing name),
//! refcount table, refcount blocks and an empty L1 table, in qemu-img's
//! layout. Everything else is allocated on demand by the driver.

use super::header::{COMPAT_LAZY_REFCOUNTS, MAGIC};
use super::meta::rc_set;
use crate::error::{Error, Result};
use std::io::Write;
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    pub refcount_order: u32,
    pub lazy_refcounts: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            lazy_refcounts: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

fn invalid(msg: impl Into<String>) -> Error {
    Error::generic(format!("qcow2 create: {}", msg.into()))
}

/// Writes a new, empty image at `path` (replacing any file there).
pub fn create(path: &str, o: &CreateOptions) -> Result<()> {
    if !(9..=21).contains(&o.cluster_bits) {
        return Err(invalid(
            "cluster size must be a power of two between 512 B and 2 MiB",
        ));
    }
    if o.version != 2 && o.version != 3 {
        return Err(invalid("compat must be 0.10 or 1.1"));
    }
    if o.refcount_order > 6 || (o.version == 2 && o.refcount_order != 4) {
        return Err(invalid("refcount_bits must be 1..64 (16 with compat=0.10)"));
    }
    if o.lazy_refcounts && o.version == 2 {
        return Err(invalid("lazy refcounts need compat=1.1"));
    }
    let cs = 1u64 << o.cluster_bits;
    let l1_size = o.size.div_ceil(cs).div_ceil(cs / 8);
    if l1_size * 8 > 32 << 20 {
        return Err(invalid(format!(
            "size {} is too large for {cs}-byte clusters",
            o.size
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let per_block = cs * 8 / (1u64 << o.refcount_order);
    // Header, refcount table, refcount blocks, L1: the blocks must cover all of them.
    let mut blocks = 1;
    while (2 + blocks + l1_clusters).div_ceil(per_block) > blocks {
        blocks += 1;
    }
    if blocks > cs / 8 {
        return Err(invalid(
            "metadata does not fit a one-cluster refcount table",
        ));
    }
    let total = 2 + blocks + l1_clusters;
    let l1_offset = (2 + blocks) * cs;

    let mut header = vec![0u8; cs as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut header, 0, MAGIC);
    put32(&mut header, 4, o.version);
    put32(&mut header, 20, o.cluster_bits);
    put64(&mut header, 24, o.size);
    put32(&mut header, 36, l1_size as u32);
    put64(&mut header, 40, l1_offset);
    put64(&mut header, 48, cs);
    put32(&mut header, 56, 1);
    let mut at = 72;
    if o.version == 3 {
        put64(
            &mut header,
            80,
            if o.lazy_refcounts {
                COMPAT_LAZY_REFCOUNTS
            } else {
                0
            },
        );
        put32(&mut header, 96, o.refcount_order);
        put32(&mut header, 100, 112);
        at = 112;
    }
    if let Some(fmt) = &o.backing_format {
        put32(&mut header, at, EXT_BACKING_FORMAT);
        put32(&mut header, at + 4, fmt.len() as u32);
        header[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
        at += 8 + fmt.len().next_multiple_of(8);
    }
    at += 8; // end of extensions
    if let Some(b) = &o.backing_file {
        if b.len() > 1023 || at + b.len() > cs as usize {
            return Err(invalid("backing file name too long"));
        }
        put64(&mut header, 8, at as u64);
        put32(&mut header, 16, b.len() as u32);
        header[at..at + b.len()].copy_from_slice(b.as_bytes());
    }
    let mut reftable = vec![0u8; cs as usize];
    let mut refblocks = vec![0u8; (blocks * cs) as usize];
    for i in 0..blocks {
        put64(&mut reftable, i as usize * 8, (2 + i) * cs);
    }
    for c in 0..total {
        rc_set(&mut refblocks, c as usize, 1 << o.refcount_order, 1);
    }
    let f = crate::drivers::file::create_locked(path)?;
    let io = |r: std::io::Result<()>| {
        r.map_err(|e| Error::from_io(&e, format!("Could not write '{path}'")))
    };
    io(f.write_all_at(&header, 0))?;
    io(f.write_all_at(&reftable, cs))?;
    io(f.write_all_at(&refblocks, 2 * cs))?;
    io(f.set_len(total * cs))?;
    io((&f).flush())?;
    io(f.sync_all())
}
