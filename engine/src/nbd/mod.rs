//! NBD server (QEMU's `nbd-server-start`/`-add`/`-remove`/`-stop`): the
//! devices of the daemon exported over the Network Block Device protocol.
//!
//! - [`proto`]: wire constants; messages decoded and encoded as pure
//!   functions; the checks a request passes before it reaches the device.
//! - [`handshake`]: fixed newstyle option haggling over any byte stream.
//! - `conn`: one client: handshake, then requests read on its thread and
//!   submitted to the device, replies sent from the completions.
//! - `reply`: replies that never block a completion thread; the bound on
//!   requests and bytes in flight.
//! - `server`: the listener, the exports and the connections.
//! - `sock`: UNIX and TCP sockets behind one type.
//!
//! What is supported and how it differs from QEMU: docs/nbd.md.

mod conn;
pub mod handshake;
pub mod proto;
mod reply;
mod server;
mod sock;

pub use server::{Address, Export, Server, MAX_CONNECTIONS};
