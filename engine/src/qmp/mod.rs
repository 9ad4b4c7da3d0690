//! The QMP control plane: framing, per-connection protocol state, the
//! command table, and the event bus. Transport (the socket) lives in `fs/`.

pub mod commands;
pub mod device_cmds;
pub mod events;
pub mod export_cmds;
pub mod framing;
pub mod info;
pub mod job_cmds;
pub mod nbd_cmds;
pub mod policy_cmds;
pub mod session;

pub use events::EventBus;
pub use session::Session;
