//! The NBD server commands (not in block-core.json; QEMU's, from 2.1):
//! `nbd-server-start`, `nbd-server-add`, and the later
//! `nbd-server-remove`; `nbd-server-stop`.

use crate::args::Args;
use crate::error::{Error, Result};
use crate::nbd::Address;
use crate::Engine;
use serde_json::{json, Value};

#[derive(Clone, Copy)]
enum Kind {
    Unix,
    Inet,
    Fd,
    Vsock,
}

/// A SocketAddress: QEMU 2.1's simple union (`{"type": "unix", "data":
/// {"path": P}}`) or the later flat form (`{"type": "unix", "path": P}`).
fn address(mut a: Args) -> Result<Address> {
    let kinds = [
        ("unix", Kind::Unix),
        ("inet", Kind::Inet),
        ("fd", Kind::Fd),
        ("vsock", Kind::Vsock),
    ];
    let kind = a
        .enumeration("type", &kinds)?
        .ok_or_else(|| a.missing("type"))?;
    let mut d = match a.object("data")? {
        Some(d) => {
            a.finish()?;
            d
        }
        None => a,
    };
    let addr = match kind {
        Kind::Unix => Address::Unix(d.req("path", Args::str)?.into()),
        Kind::Inet => Address::Inet {
            host: d.req("host", Args::str)?,
            port: d.req("port", Args::str)?,
        },
        Kind::Fd | Kind::Vsock => {
            return Err(Error::generic(
                "Only 'unix' and 'inet' socket addresses are supported",
            ))
        }
    };
    d.finish()?;
    Ok(addr)
}

pub fn nbd_server_start(e: &Engine, mut a: Args) -> Result<Value> {
    let addr = a.object("addr")?.ok_or_else(|| a.missing("addr"))?;
    a.finish()?;
    e.nbd.start(&address(addr)?)?;
    Ok(json!({}))
}

pub fn nbd_server_add(e: &Engine, mut a: Args) -> Result<Value> {
    let device = a.req("device", Args::str)?;
    let writable = a.bool("writable")?.unwrap_or(false);
    let name = a.str("name")?;
    a.finish()?;
    if !e.nbd.is_running() {
        return Err(Error::generic("NBD server not running"));
    }
    let dev = e.graph.device(&device)?;
    e.nbd
        .add(name.as_deref().unwrap_or(&device), dev, writable)?;
    Ok(json!({}))
}

pub fn nbd_server_remove(e: &Engine, mut a: Args) -> Result<Value> {
    let name = a.req("name", Args::str)?;
    let hard = a
        .enumeration("mode", &[("safe", false), ("hard", true)])?
        .unwrap_or(false);
    a.finish()?;
    e.nbd.remove(&name, hard)?;
    super::export_cmds::sweep_nbd_exports(e);
    Ok(json!({}))
}

pub fn nbd_server_stop(e: &Engine, a: Args) -> Result<Value> {
    a.finish()?;
    e.nbd.stop()?;
    super::export_cmds::sweep_nbd_exports(e);
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::commands::execute;

    #[test]
    fn socket_addresses() {
        let parse = |v: Value| address(Args::new(v, "addr", false).unwrap());
        assert_eq!(
            parse(json!({"type": "unix", "data": {"path": "/s"}})).unwrap(),
            Address::Unix("/s".into())
        );
        assert_eq!(
            parse(json!({"type": "inet", "host": "h", "port": "1"})).unwrap(),
            Address::Inet {
                host: "h".into(),
                port: "1".into()
            }
        );
        assert_eq!(
            parse(json!({"type": "inet", "data": {"host": "h", "port": 1}}))
                .unwrap_err()
                .msg,
            "Invalid parameter type for 'addr.data.port', expected: string"
        );
        assert_eq!(
            parse(json!({"type": "tcp", "path": "/s"})).unwrap_err().msg,
            "Parameter 'addr.type' does not accept value 'tcp'"
        );
        assert!(parse(json!({"type": "unix", "data": {"path": "/s"}, "x": 1})).is_err());
        assert!(parse(json!({"type": "fd", "str": "3"})).is_err());
    }

    #[test]
    fn commands_without_a_server() {
        let e = Engine::new();
        let err = execute(&e, "nbd-server-stop", json!({})).unwrap_err();
        assert_eq!(err.msg, "NBD server not running");
        let err = execute(&e, "nbd-server-add", json!({"device": "d0"})).unwrap_err();
        assert_eq!(err.msg, "NBD server not running");
        let err = execute(&e, "nbd-server-remove", json!({"name": "d0"})).unwrap_err();
        assert_eq!(err.msg, "NBD server not running");
    }
}
