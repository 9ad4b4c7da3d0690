//! Run-time device policies: `block_set_io_throttle` and `cont`.

use crate::args::Args;
use crate::drivers::Encryption;
use crate::error::{Error, ErrorKind, Result};
use crate::policy::throttle::{ThrottleConfig, AVG_NAMES, MAX_NAMES};
use crate::qmp::device_cmds::chain;
use crate::Engine;
use serde_json::{json, Value};

pub fn block_set_io_throttle(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let (mut avg, mut max) = ([0i64; 6], [0i64; 6]);
    for i in 0..6 {
        avg[i] = a.req(AVG_NAMES[i], Args::int)?;
        max[i] = a.int(MAX_NAMES[i])?.unwrap_or(0);
    }
    let iops_size = a.int("iops_size")?.unwrap_or(0);
    a.finish()?;
    let cfg = ThrottleConfig::new(avg, max, iops_size)?;
    e.graph.device(&device)?.set_throttle(cfg)?;
    Ok(json!({}))
}

/// Resumes every device the error policy stopped. Refused while an
/// encrypted image still lacks its key, as QEMU does.
pub fn cont(e: &Engine, a: Args) -> Result<Value> {
    a.finish()?;
    // Exports' devices stop under their error policy too.
    let devices = e.graph.all_devices();
    for d in &devices {
        let missing = chain(&d.root())
            .find(|n| n.driver.encryption() == Encryption::Encrypted { key_missing: true });
        if let Some(n) = missing {
            return Err(Error::new(
                ErrorKind::DeviceEncrypted,
                format!("'{}' ({}) is encrypted", d.id, n.driver.filename()),
            ));
        }
    }
    let mut resumed = false;
    for d in &devices {
        resumed |= d.cont();
    }
    if resumed {
        e.events.emit("RESUME", json!({}));
    }
    Ok(json!({}))
}
