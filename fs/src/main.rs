//! `blkfs`: exports block devices as files in a FUSE mount, steered over a
//! QMP control socket.

mod demo;
mod fuse;
mod fuse_abi;
mod qmp_server;
mod ring;
mod service;

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
    /// Export a node as a file of the mount, as qemu-storage-daemon's
    /// --export: type=fuse,id=NAME,node-name=NODE[,writable=on].
    #[arg(long = "export", value_name = "SPEC")]
    exports: Vec<String>,
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
    /// Log level; overrides BLKFS_LOG and RUST_LOG (which also take
    /// module=level directives). Default: info.
    #[arg(long, value_enum)]
    log_level: Option<service::LogLevel>,
    /// Run in the background once ready: the command returns when the mount
    /// and the socket are up (exit 0) or start-up failed (exit 1).
    #[arg(long)]
    daemonize: bool,
    /// Append the log to this file instead of stderr (which --daemonize
    /// sends to /dev/null once ready).
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Write the daemon's pid to this file, locked while it runs.
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,
    /// Let users other than the daemon's use the mount (FUSE allow_other;
    /// needs `user_allow_other` in /etc/fuse.conf unless run by root).
    #[arg(long)]
    allow_other: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = service::init_logging(cli.log_level, cli.log_file.as_deref()) {
        eprintln!("blkfs: {e}");
        return ExitCode::from(2);
    }
    // Before any thread exists: only the calling thread survives a fork.
    let mut readiness = if cli.daemonize {
        match service::daemonize() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("blkfs: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        service::Readiness::none()
    };
    match run(cli, &mut readiness) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            if !readiness.failed(&msg) {
                eprintln!("blkfs: {msg}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(mut cli: Cli, readiness: &mut service::Readiness) -> Result<(), String> {
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
    let _pidfile = cli
        .pidfile
        .as_deref()
        .map(service::PidFile::create)
        .transpose()?;
    let engine = Engine::new();
    for spec in &cli.blockdevs {
        let (opts, throttle) = BlockdevOptions::from_daemon_cli(spec)
            .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        let added = engine
            .graph
            .add_by_user(&opts)
            .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        if let (Some(d), Some(t)) = (added.device, throttle) {
            d.set_throttle(t)
                .map_err(|e| format!("--blockdev '{spec}': {e}"))?;
        }
    }
    for spec in &cli.exports {
        blkfs_engine::qmp::export_cmds::export_from_cli(&engine, spec)
            .map_err(|e| format!("--export '{spec}': {e}"))?;
    }
    for name in blkfs_engine::qmp::export_cmds::unused_nodes(&engine) {
        log::warn!(
            "node '{name}' is opened but not exported: give it an id, or add \
             --export type=fuse,id=NAME,node-name={name}"
        );
    }
    std::fs::create_dir_all(&mount)
        .map_err(|e| format!("cannot create {}: {e}", mount.display()))?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("blkfs".into()),
        fuser::MountOption::Subtype("blkfs".into()),
        fuser::MountOption::NoAtime,
        // The kernel checks the files' modes and owners (chmod/chown work).
        fuser::MountOption::DefaultPermissions,
    ];
    if cli.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(cli.threads as usize);
    config.clone_fd = true;
    let export = fuse::Export::new(engine.clone(), cli.transport);
    let listener = export.resize_listener();
    let session = fuser::Session::new(fuse::BlkFs(export.clone()), &mount, &config)
        .map_err(|e| format!("cannot mount {}: {e}", mount.display()))?;
    engine.graph.on_resize(listener(session.notifier()));
    export.watch_removals(session.notifier());
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
        "ready: mount {}, socket {}, {} devices, FUSE transport {transport}",
        mount.display(),
        socket.display(),
        engine.graph.devices().len(),
    );
    readiness.ready();
    service::sd_notify("READY=1");

    let _ = engine.quit_requests().recv();
    service::sd_notify("STOPPING=1");
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
