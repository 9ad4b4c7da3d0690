//! The `rerror`/`werror` policies and the io-status they leave behind.

use crate::error::{Error, ErrorKind};
use crate::options::OnError;

/// `BlockErrorAction`: what was done about a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Report,
    Ignore,
    Stop,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Report => "report",
            Action::Ignore => "ignore",
            Action::Stop => "stop",
        }
    }
}

/// The action a policy takes for an error, or None when the error is not
/// an I/O failure (a bad request, a missing key): those are always reported.
pub fn action(policy: OnError, e: &Error) -> Option<Action> {
    if !matches!(e.kind, ErrorKind::Io(_) | ErrorKind::Corrupt) {
        return None;
    }
    Some(match policy {
        OnError::Report => Action::Report,
        OnError::Ignore => Action::Ignore,
        OnError::Stop => Action::Stop,
        OnError::Enospc if e.errno() == libc::ENOSPC => Action::Stop,
        OnError::Enospc => Action::Report,
    })
}

/// `BlockDeviceIoStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IoStatus {
    Ok = 0,
    Failed = 1,
    NoSpace = 2,
}

impl IoStatus {
    pub fn of(e: &Error) -> IoStatus {
        if e.errno() == libc::ENOSPC {
            IoStatus::NoSpace
        } else {
            IoStatus::Failed
        }
    }

    pub fn from_u8(v: u8) -> IoStatus {
        match v {
            1 => IoStatus::Failed,
            2 => IoStatus::NoSpace,
            _ => IoStatus::Ok,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_map_errors_to_actions() {
        let eio = Error::from_errno(libc::EIO, "w");
        let enospc = Error::from_errno(libc::ENOSPC, "w");
        assert_eq!(action(OnError::Enospc, &enospc), Some(Action::Stop));
        assert_eq!(action(OnError::Enospc, &eio), Some(Action::Report));
        assert_eq!(action(OnError::Stop, &eio), Some(Action::Stop));
        assert_eq!(action(OnError::Ignore, &eio), Some(Action::Ignore));
        assert_eq!(action(OnError::Report, &enospc), Some(Action::Report));
        assert_eq!(action(OnError::Stop, &Error::generic("bad")), None);
        assert_eq!(IoStatus::of(&enospc), IoStatus::NoSpace);
        assert_eq!(IoStatus::of(&eio).as_str(), "failed");
    }
}
