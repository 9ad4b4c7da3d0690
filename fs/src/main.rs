//! `blkfs`: exports block devices as files in a FUSE mount, steered over a
//! QMP control socket.

mod demo;
mod fuse;
mod fuse_abi;
mod qmp_server;
mod ring;

use blkfs_engine::options::BlockdevOptions;
use blkfs_engine::Engine;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "blkfs",
    version,
    about = "Export disk images as plain files in a FUSE mount, steered over QMP"
)]
struct Cli {
    /// Directory to mount the export on (created when missing).
    #[arg(long, required_unless_present = "demo")]
    mount: Option<PathBuf>,
    /// Path of the QMP control socket.
    #[arg(long, required_unless_present = "demo")]
    qmp: Option<PathBuf>,
    /// A block device to open at start: BlockdevOptions as JSON or as dotted key=value.
    #[arg(long = "blockdev", value_name = "SPEC")]
    blockdevs: Vec<String>,
    /// Create a sample image under ./blkfs-demo and export it there.
    #[arg(long)]
    demo: bool,
    /// FUSE reader threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
    /// How FUSE requests reach the daemon: io_uring where the kernel offers
    /// it (auto), io_uring or fail (uring), or /dev/fuse reads (dev).
    #[arg(long, value_enum, env = "BLKFS_TRANSPORT", default_value = "auto")]
    transport: fuse::Transport,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("blkfs: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(mut cli: Cli) -> Result<(), String> {
    if cli.demo {
        let d = demo::prepare()?;
        cli.mount.get_or_insert(d.mount);
        cli.qmp.get_or_insert(d.socket);
        cli.blockdevs.push(d.blockdev);
    }
    let (Some(mount), Some(socket)) = (cli.mount, cli.qmp) else {
        return Err("--mount and --qmp are required".into());
    };
    // Signals are taken by one thread with sigwait; block them before any
    // other thread exists so none of those receives them.
    let signals = block_signals();
    let engine = Engine::new();
    for spec in &cli.blockdevs {
        let (opts, throttle) = BlockdevOptions::from_daemon_cli(spec)
            .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        let added = engine
            .graph
            .add(&opts)
            .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        if let (Some(d), Some(t)) = (added.device, throttle) {
            d.set_throttle(t)
                .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        }
    }
    std::fs::create_dir_all(&mount)
        .map_err(|e| format!("cannot create {}: {e}", mount.display()))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("blkfs".into()),
        fuser::MountOption::Subtype("blkfs".into()),
        fuser::MountOption::NoAtime,
    ];
    config.n_threads = Some(cli.threads as usize);
    config.clone_fd = true;
    let export = fuse::Export::new(engine.clone(), cli.transport);
    let listener = export.resize_listener();
    let session = fuser::Session::new(fuse::BlkFs(export.clone()), &mount, &config)
        .map_err(|e| format!("cannot mount {}: {e}", mount.display()))?;
    engine.graph.on_resize(listener(session.notifier()));
    let transport = export.connect(&session)?;
    let background = session
        .spawn()
        .map_err(|e| format!("cannot start the FUSE session: {e}"))?;
    // Dropping `background` unmounts, so every error path below leaves no mount.
    let listener = qmp_server::bind(&socket)?;
    qmp_server::serve(listener, engine.clone());
    spawn_signal_thread(signals, engine.clone());
    if cli.demo {
        demo::print_usage(&mount, &socket);
    }
    log::info!(
        "ready: {} devices under {}, QMP on {}, FUSE transport {transport}",
        engine.graph.devices().len(),
        mount.display(),
        socket.display()
    );

    let _ = engine.quit_requests().recv();
    // NBD clients first: their requests in flight finish, and no new
    // ones wait at the drained devices' gates.
    engine.nbd.shut_down();
    // Jobs first: a cancelled job leaves its images consistent (a mirror
    // stays on its source) before the devices drain.
    engine.jobs.cancel_all(std::time::Duration::from_secs(30));
    engine.graph.shut_down();
    for e in engine.graph.flush_all() {
        eprintln!("blkfs: flush failed: {e}");
    }
    if let Err(e) = background.umount_and_join() {
        // Busy (a file is still open): detach lazily so no dead mount stays behind.
        log::info!("unmount: {e}; detaching lazily");
        lazy_umount(&mount).map_err(|e| format!("cannot unmount {}: {e}", mount.display()))?;
    }
    for e in engine.graph.close_all() {
        eprintln!("blkfs: close failed: {e}");
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn lazy_umount(path: &std::path::Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: plain syscall on a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } < 0 {
        let e = std::io::Error::last_os_error();
        // Already gone is fine.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(())
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn spawn_signal_thread(set: libc::sigset_t, engine: Arc<Engine>) {
    let r = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: waits on a signal set that is blocked in every thread.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                log::info!("signal {sig}: shutting down");
                engine.request_quit();
            }
        });
    if let Err(e) = r {
        log::error!("cannot start the signal thread: {e}");
    }
}

/// Minimal stderr logger; level from BLKFS_LOG (error, warn, info, debug).
fn init_logging() {
    struct Stderr;
    impl log::Log for Stderr {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= log::max_level()
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                eprintln!("blkfs: {}: {}", r.level().as_str().to_lowercase(), r.args());
            }
        }
        fn flush(&self) {}
    }
    let level = match std::env::var("BLKFS_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") => log::LevelFilter::Debug,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(level);
    }
}
