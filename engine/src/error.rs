//! One error type for the whole engine: a kind (which decides the QMP error
//! class and the errno seen through FUSE) plus a human-readable message.

use std::fmt;
use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad arguments, unsupported options, anything without a finer class.
    Generic,
    CommandNotFound,
    DeviceNotFound,
    DeviceNotActive,
    DeviceEncrypted,
    /// An I/O failure carrying the errno the kernel (or a driver) reported.
    Io(i32),
    /// Image metadata is inconsistent; the request fails with EIO and the
    /// device reports BLOCK_IMAGE_CORRUPTED.
    Corrupt,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub msg: String,
    /// For `Corrupt`: the image access that found it, when there was one
    /// (BLOCK_IMAGE_CORRUPTED's `offset`, `size` and `fatal`).
    pub corruption: Option<Corruption>,
}

/// The offending image access of a corruption, and whether the image was
/// marked corrupt for it (QEMU's `fatal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corruption {
    pub offset: u64,
    pub size: u64,
    pub fatal: bool,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
            corruption: None,
        }
    }

    pub fn generic(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Generic, msg)
    }

    pub fn io(errno: i32, msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io(errno), msg)
    }

    pub fn from_io(e: &io::Error, context: impl fmt::Display) -> Self {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        Self::io(errno, format!("{context}: {e}"))
    }

    pub fn from_errno(errno: i32, context: impl fmt::Display) -> Self {
        Self::from_io(&io::Error::from_raw_os_error(errno), context)
    }

    pub fn device_not_found(name: &str) -> Self {
        Self::new(
            ErrorKind::DeviceNotFound,
            format!("Device '{name}' not found"),
        )
    }

    /// Prefixes the message with more context, keeping the kind.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The QMP error class of this error.
    pub fn class(&self) -> &'static str {
        match self.kind {
            ErrorKind::Generic | ErrorKind::Io(_) | ErrorKind::Corrupt => "GenericError",
            ErrorKind::CommandNotFound => "CommandNotFound",
            ErrorKind::DeviceNotFound => "DeviceNotFound",
            ErrorKind::DeviceNotActive => "DeviceNotActive",
            ErrorKind::DeviceEncrypted => "DeviceEncrypted",
        }
    }

    /// The errno a FUSE caller sees for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::Io(e) if e > 0 => e,
            ErrorKind::Io(_) | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::DeviceNotFound => libc::ENOENT,
            ErrorKind::DeviceEncrypted => libc::EACCES,
            ErrorKind::DeviceNotActive => libc::ENOMEDIUM,
            ErrorKind::Generic | ErrorKind::CommandNotFound => libc::EINVAL,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_classes_and_errnos() {
        let e = Error::device_not_found("d0");
        assert_eq!(e.class(), "DeviceNotFound");
        assert_eq!(e.errno(), libc::ENOENT);
        let e = Error::from_errno(libc::ENOSPC, "write");
        assert_eq!(e.class(), "GenericError");
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(e.msg.starts_with("write: "));
        assert_eq!(Error::io(0, "x").errno(), libc::EIO);
    }
}
