//! Running as a service: the logger, `--daemonize`, `--pidfile` and the
//! systemd readiness notification.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `--log-level` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a filter from BLKFS_LOG or RUST_LOG: comma-separated directives,
/// each a level or `module=level`. env_logger would take an unknown bare
/// word for a module name and silently log nothing more.
fn check_filter(var: &str, spec: &str) -> Result<(), String> {
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (module, level) = match directive.split_once('=') {
            Some((m, l)) => (Some(m), l),
            None => (None, directive),
        };
        if module.is_some_and(|m| m.is_empty())
            || !LEVELS.contains(&level.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "{var}: unknown log level in '{directive}': use one of {} (or module=level)",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

/// Sets up logging with timestamps, to stderr or appended to `file`. The
/// level comes from `--log-level`, else BLKFS_LOG, else RUST_LOG (both may
/// hold `module=level` directives), else info.
pub fn init_logging(level: Option<LogLevel>, file: Option<&Path>) -> Result<(), String> {
    let mut b = env_logger::Builder::new();
    b.format_timestamp_millis();
    if let Some(path) = file {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    match level {
        Some(l) => {
            b.filter_level(match l {
                LogLevel::Off => log::LevelFilter::Off,
                LogLevel::Error => log::LevelFilter::Error,
                LogLevel::Warn => log::LevelFilter::Warn,
                LogLevel::Info => log::LevelFilter::Info,
                LogLevel::Debug => log::LevelFilter::Debug,
                LogLevel::Trace => log::LevelFilter::Trace,
            });
        }
        None => {
            let from_env = ["BLKFS_LOG", "RUST_LOG"]
                .iter()
                .find_map(|v| std::env::var(v).ok().map(|s| (*v, s)));
            match from_env {
                Some((var, spec)) => {
                    check_filter(var, &spec)?;
                    b.parse_filters(&spec);
                }
                // blkfs's own lines from info, the libraries' from warn
                // (fuser announces its mount at info).
                None => {
                    b.filter_level(log::LevelFilter::Warn);
                    b.filter_module("blkfs", log::LevelFilter::Info);
                }
            }
        }
    }
    b.try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

/// The end of `--daemonize` that tells the waiting parent how start-up went.
pub struct Readiness {
    pipe: Option<File>,
}

/// Forks before any thread exists. The parent waits until the child
/// reports readiness (exit 0) or a start-up error (printed, exit 1); the
/// child continues in a new session.
pub fn daemonize() -> Result<Readiness, String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(format!(
            "cannot create a pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fresh descriptors from pipe2, owned once each.
    let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded here (called before any thread is spawned).
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            // SAFETY: plain syscall in the child.
            unsafe { libc::setsid() };
            Ok(Readiness { pipe: Some(wr) })
        }
        _ => {
            drop(wr);
            let mut rd = rd;
            let mut msg = String::new();
            let _ = rd.read_to_string(&mut msg);
            match msg.strip_prefix("ready") {
                Some(_) => std::process::exit(0),
                None => {
                    let why = if msg.is_empty() {
                        "the daemon exited during start-up".to_string()
                    } else {
                        msg
                    };
                    eprintln!("blkfs: {why}");
                    std::process::exit(1)
                }
            }
        }
    }
}

impl Readiness {
    /// Not daemonized: nothing to report to.
    pub fn none() -> Readiness {
        Readiness { pipe: None }
    }

    /// Start-up failed: the waiting parent prints `msg`. False when there
    /// is no parent waiting, and the caller must say it.
    pub fn failed(&mut self, msg: &str) -> bool {
        match self.pipe.take() {
            Some(mut p) => p.write_all(msg.as_bytes()).is_ok(),
            None => false,
        }
    }

    /// Start-up is done: the parent exits 0, and the daemon's standard
    /// streams leave the terminal (as qemu-storage-daemon's do).
    pub fn ready(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"ready");
            drop(p);
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors, which stay open.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
        }
    }
}

/// A pid file, locked while the daemon runs so a second daemon with the
/// same file refuses to start; removed on drop.
pub struct PidFile {
    path: PathBuf,
    _file: OwnedFd,
}

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile, String> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("cannot open the pid file {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            return Err(format!(
                "cannot lock the pid file {}: another blkfs runs with it",
                path.display()
            ));
        }
        f.set_len(0)
            .and_then(|()| (&f).write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| format!("cannot write the pid file {}: {e}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            _file: f.into(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Tells systemd (Type=notify) about the daemon's state, when it asked
/// through NOTIFY_SOCKET; a path or an abstract name (`@name`).
pub fn sd_notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => return log::warn!("sd_notify: {e}"),
    };
    let bytes = addr.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), Path::new(&addr)),
    };
    if let Err(e) = sent {
        log::warn!("sd_notify to {}: {e}", addr.to_string_lossy());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_levels_and_module_levels_only() {
        assert!(check_filter("X", "info").is_ok());
        assert!(check_filter("X", "warn,blkfs_engine=debug").is_ok());
        assert!(check_filter("X", "DEBUG").is_ok());
        let e = check_filter("BLKFS_LOG", "verbose").unwrap_err();
        assert!(e.contains("BLKFS_LOG") && e.contains("'verbose'"), "{e}");
        assert!(check_filter("X", "=info").is_err());
        assert!(check_filter("X", "a=loud").is_err());
    }
}
