//! blkctl: command-line client for the blkfs QMP control socket.

mod args;
mod client;
mod format;
mod jobs;
mod offline;
mod paths;
mod table;

use args::{SizeChange, Target, ThrottleLimits};
use blkfs_engine::policy::throttle::ThrottleConfig;
use clap::{CommandFactory, Parser, Subcommand};
use client::{Client, QmpError};
use format::{bool_cell, cell, human_size, size_cell};
use serde_json::{json, Map, Value};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use table::{Align, Table};

const DEFAULT_SOCKET: &str = "./blkfs.sock";
const SOCKET_ENV: &str = "BLKFS_SOCKET";
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit statuses, for scripts (documented in `--help`).
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NO_CONNECTION: u8 = 3;

#[derive(Parser)]
#[command(
    name = "blkctl",
    version,
    about = "Command-line QMP client for the blkfs daemon",
    after_help = "Exit status: 0 done; 1 the command failed (the daemon's error, a failed \
job); 2 usage error; 3 no connection to the daemon (no socket, nobody listening, \
connection lost); 4 `job wait`: the job's result cannot be known. `check` exits as \
qemu-img check does (2 corruption, 3 leaks only). With --json, errors are printed \
on stdout as {\"error\": {\"class\": ..., \"desc\": ...}}."
)]
struct Cli {
    /// QMP control socket of the daemon [default: $BLKFS_SOCKET, else ./blkfs.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Print machine-readable JSON instead of tables and messages
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send a raw QMP command and print the whole reply
    ///
    /// Either a complete command object, e.g.
    /// '{"execute": "query-block"}', or a command name followed by an
    /// optional arguments object, e.g. block_resize '{"device": "disk0",
    /// "size": 1073741824}'. An "id" is added when missing.
    Qmp {
        /// Command object, or command name
        #[arg(value_parser = parse_qmp_target, value_name = "COMMAND")]
        command: QmpTarget,
        /// Arguments object (only with a command name)
        #[arg(value_parser = parse_json_object, value_name = "ARGUMENTS")]
        arguments: Option<Map<String, Value>>,
    },
    /// Add a block device (blockdev-add)
    ///
    /// SPEC is what `blkfs --blockdev` takes, checked by the same parser: a
    /// JSON object or QEMU's dotted key=value form, e.g.
    /// driver=raw,id=disk0,file.driver=file,file.filename=a.img
    /// (a comma inside a value is written ","), `throttling.*` keys
    /// included. Relative file names are made absolute here (the daemon's
    /// working directory is not yours).
    Add {
        #[arg(value_parser = parse_spec, value_name = "SPEC")]
        spec: AddSpec,
    },
    /// List block devices (query-block)
    Block,
    /// List named block driver nodes (query-named-block-nodes)
    Nodes,
    /// Show I/O statistics of block devices (query-blockstats)
    Stats,
    /// Print events as JSON lines until the daemon closes the connection
    Events,
    /// Show the daemon's version (query-version)
    Version,
    /// Ask the daemon to exit (quit)
    Quit,
    /// Set a device's I/O limits (block_set_io_throttle), or show them
    ///
    /// Without any limit, shows the current ones (from query-block; with
    /// --json as one object, unset limits 0). Limits not given are set to 0
    /// (unlimited), as block_set_io_throttle replaces them all; byte rates
    /// take suffixes (512K, 1M, 1G).
    Throttle {
        /// Device
        device: String,
        #[command(flatten)]
        limits: ThrottleLimits,
        /// Remove every limit
        #[arg(long, conflicts_with = "limits")]
        off: bool,
    },
    /// Change the size of a device or node (block_resize)
    #[command(override_usage = "blkctl resize [OPTIONS] (DEVICE | --node NODE) SIZE")]
    Resize {
        #[command(flatten)]
        target: Target,
        /// New size (suffixes K, M, G, T), or +SIZE / -SIZE relative to the
        /// current size
        // Optional for clap only: see Target::resolve.
        #[arg(allow_hyphen_values = true)]
        size: Option<String>,
        /// Allow a size smaller than the current one (data past it is lost)
        #[arg(long)]
        shrink: bool,
    },
    /// Put a new overlay image on top of a device (blockdev-snapshot-sync)
    ///
    /// The device's current image becomes the overlay's backing file and
    /// new writes go to FILE, which is created (as qcow2 by default) unless
    /// --existing is given.
    #[command(override_usage = "blkctl snapshot [OPTIONS] (DEVICE | --node NODE) FILE")]
    Snapshot {
        #[command(flatten)]
        target: Target,
        /// Overlay image file
        file: Option<String>,
        /// node-name of the overlay
        #[arg(long, value_name = "NAME")]
        node_name: Option<String>,
        /// Format of the overlay [default: qcow2]
        #[arg(long, value_name = "FMT")]
        format: Option<String>,
        /// FILE exists already, with the right backing file: do not create it
        #[arg(long)]
        existing: bool,
    },
    /// Change the backing file name recorded in an image of a device's
    /// chain (change-backing-file)
    ChangeBacking {
        /// Device whose chain holds the image
        device: String,
        /// node-name of the image to change
        image_node: String,
        /// Backing file name to record
        backing_file: String,
    },
    /// Give the password of a device's encrypted images (block_passwd)
    ///
    /// Without PASSWORD or --password-file, the password is the first line
    /// of standard input, so it does not show in the process list.
    #[command(override_usage = "blkctl passwd [OPTIONS] (DEVICE | --node NODE) [PASSWORD]")]
    Passwd {
        #[command(flatten)]
        target: Target,
        /// Password (visible to other users in the process list)
        password: Option<String>,
        /// Read the password from the first line of this file
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Resume the devices stopped by their error policy (cont)
    Cont,
    /// Delete a device with the nodes only it uses, or a node added by
    /// itself (blockdev-del); refused while the device's file is open
    Del {
        #[command(flatten)]
        target: Target,
    },
    /// Copy the data of a device's backing chain into its image, so the
    /// image no longer needs it (block-stream)
    ///
    /// Without --wait, returns once the job has started (`blkctl jobs`
    /// lists it, `blkctl job wait` waits for it).
    Stream(jobs::StreamArgs),
    /// Merge images of a device's backing chain into a lower one
    /// (block-commit)
    ///
    /// Without --top, this is an active commit: once the data is merged it
    /// becomes ready and lasts until `blkctl job complete` (or --complete).
    Commit(jobs::CommitArgs),
    /// Copy a device to a new image while it stays in use (drive-mirror)
    ///
    /// Once the target is in sync the job becomes ready and keeps it in
    /// sync until `blkctl job complete` (the device switches to the target,
    /// or --complete) or `blkctl job cancel` (it does not).
    Mirror(jobs::MirrorArgs),
    /// Copy a point-in-time image of a device while it stays in use
    /// (drive-backup)
    Backup(jobs::BackupArgs),
    /// List block jobs (query-block-jobs)
    Jobs,
    /// Wait for, pause, resume, complete or cancel a device's block job, or
    /// change its speed
    Job {
        #[command(subcommand)]
        action: jobs::JobAction,
    },
    /// Check an image's consistency (qcow2, qed, vdi, vhdx, vmdk,
    /// parallels), like `qemu-img check` (no daemon needed; refused while
    /// another process writes the image, and with -r while anyone uses it;
    /// -r for qcow2 only). Exit 2 on corruption, 3 on leaks.
    Check {
        /// Image file
        image: String,
        /// Repair leaked clusters, or all errors
        #[arg(long, short = 'r', value_parser = ["leaks", "all"])]
        repair: Option<String>,
        /// Open the image even if another process writes it (results may be
        /// inconsistent; not with -r), like qemu-img's -U
        #[arg(long = "force-share", short = 'U')]
        force_share: bool,
    },
    /// Create an image, like `qemu-img create` (no daemon needed)
    Create {
        /// Image format: qcow2 or raw
        #[arg(long, short = 'f', default_value = "qcow2")]
        format: String,
        /// Backing file (relative names are relative to the image)
        #[arg(long, short = 'b')]
        backing: Option<String>,
        /// Format of the backing file
        #[arg(long = "backing-format", short = 'F')]
        backing_format: Option<String>,
        /// qcow2 options: cluster_size=N,compat=0.10|1.1,refcount_bits=N,lazy_refcounts=on|off
        #[arg(long, short = 'o')]
        options: Option<String>,
        /// Image file
        image: String,
        /// Virtual size (suffixes k, M, G, T); defaults to the backing file's
        size: Option<String>,
    },
    /// Print the allocation map of an image and its backing chain, like
    /// `qemu-img map` (opens the image read-only; no daemon needed; refused
    /// while another process writes the image unless -U)
    Map {
        /// Image file
        image: String,
        /// Image format (probed when absent)
        #[arg(long, short = 'f')]
        format: Option<String>,
        /// Open the image even if another process writes it, like qemu-img's -U
        #[arg(long = "force-share", short = 'U')]
        force_share: bool,
    },
    /// Print a shell completion script (no daemon needed), e.g.
    /// `source <(blkctl completions bash)`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page in roff (no daemon needed), e.g.
    /// `blkctl man | man -l -`
    Man,
}

/// The subcommands that work without a daemon: their help leaves out --socket.
const OFFLINE: &[&str] = &["check", "create", "map", "completions", "man"];

/// blkctl's command line, with --socket hidden where it does not apply.
fn cli_command() -> clap::Command {
    let mut cmd = Cli::command();
    for name in OFFLINE {
        // A subcommand's own arg of the same id stops the global one
        // reaching it: this one is accepted and ignored, and not listed.
        cmd = cmd.mut_subcommand(name, |c| {
            c.arg(
                clap::Arg::new("socket")
                    .long("socket")
                    .value_name("PATH")
                    .value_parser(clap::value_parser!(PathBuf))
                    .hide(true),
            )
        });
    }
    cmd
}

#[derive(Clone)]
enum QmpTarget {
    Object(Map<String, Value>),
    Name(String),
}

fn parse_json_object(s: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn parse_qmp_target(s: &str) -> Result<QmpTarget, String> {
    if s.trim_start().starts_with('{') {
        parse_json_object(s).map(QmpTarget::Object)
    } else if s.is_empty() {
        Err("empty command name".into())
    } else {
        Ok(QmpTarget::Name(s.to_string()))
    }
}

/// `blkctl add`'s SPEC: blockdev-add's options and the throttling limits.
#[derive(Clone, Debug)]
struct AddSpec {
    options: Value,
    throttle: Option<ThrottleConfig>,
}

fn parse_spec(s: &str) -> Result<AddSpec, String> {
    let (mut options, throttle) =
        blkfs_engine::options::BlockdevOptions::qmp_from_cli(s).map_err(|e| e.to_string())?;
    paths::absolutize_spec(&mut options)?;
    Ok(AddSpec { options, throttle })
}

/// Why a subcommand stopped early.
enum Failure {
    Qmp(QmpError),
    /// Writing our own output failed.
    Output(io::Error),
    /// Arguments of a subcommand that clap alone cannot check.
    Usage {
        command: &'static str,
        message: String,
    },
    /// Anything else, e.g. a device missing from a query reply.
    Other(String),
    /// A message and the exit status to end with.
    Exit {
        message: String,
        code: u8,
    },
}

impl From<QmpError> for Failure {
    fn from(e: QmpError) -> Self {
        Failure::Qmp(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Output(e)
    }
}

type Outcome = Result<ExitCode, Failure>;

fn usage(command: &'static str, message: impl Into<String>) -> Failure {
    Failure::Usage {
        command,
        message: message.into(),
    }
}

/// Ends with an error: JSON on stdout with --json, else a line on stderr
/// (`text`, where it says more than `desc`).
fn fail_with(json: bool, class: &str, desc: &str, text: &str, code: u8) -> ExitCode {
    if json {
        println!("{}", json!({"error": {"class": class, "desc": desc}}));
    } else {
        eprintln!("blkctl: {text}");
    }
    ExitCode::from(code)
}

fn fail(json: bool, class: &str, desc: &str, code: u8) -> ExitCode {
    fail_with(json, class, desc, desc, code)
}

fn main() -> ExitCode {
    let parsed = cli_command()
        .try_get_matches()
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::{DisplayHelp, DisplayVersion};
            let json = std::env::args_os().any(|a| a == "--json");
            if !json || matches!(e.kind(), DisplayHelp | DisplayVersion) {
                e.exit();
            }
            let text = e.to_string();
            let desc = text.lines().next().unwrap_or_default();
            let desc = desc.strip_prefix("error: ").unwrap_or(desc);
            return fail(true, "UsageError", desc, EXIT_USAGE);
        }
    };
    let socket = cli.socket.clone().unwrap_or_else(|| {
        std::env::var_os(SOCKET_ENV)
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
    });
    if let Command::Qmp {
        command: QmpTarget::Object(_),
        arguments: Some(_),
    } = cli.command
    {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "ARGUMENTS can only follow a command name, not a command object",
            )
            .exit();
    }

    if let Command::Map {
        image,
        format,
        force_share,
    } = &cli.command
    {
        return cmd_map(image, format.as_deref(), *force_share, cli.json);
    }
    if let Command::Create {
        format,
        backing,
        backing_format,
        options,
        image,
        size,
    } = &cli.command
    {
        return match offline::create(
            image,
            format,
            size.as_deref(),
            backing.as_deref(),
            backing_format.as_deref(),
            options.as_deref(),
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(
                cli.json,
                "GenericError",
                &format!("{image}: {e}"),
                EXIT_FAILED,
            ),
        };
    }
    let generated = match &cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cli_command(), "blkctl", &mut out);
            Some(Ok(out))
        }
        Command::Man => {
            let mut out = Vec::new();
            Some(
                clap_mangen::Man::new(cli_command())
                    .render(&mut out)
                    .map(|()| out),
            )
        }
        _ => None,
    };
    if let Some(text) = generated {
        return match text.and_then(|t| io::stdout().write_all(&t)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => fail(cli.json, "GenericError", &e.to_string(), EXIT_FAILED),
        };
    }
    if let Command::Check {
        image,
        repair,
        force_share,
    } = &cli.command
    {
        return cmd_check(image, repair.as_deref(), *force_share, cli.json);
    }
    let timeout = match cli.command {
        Command::Events => None,
        _ => Some(REPLY_TIMEOUT),
    };
    let json = cli.json;
    let result = Client::connect(&socket, timeout)
        .map_err(Failure::from)
        .and_then(|mut client| run(&mut client, cli.command, json));
    match result {
        Ok(code) => code,
        Err(Failure::Qmp(QmpError::Command { class, desc })) => {
            let text = format!("{class}: {desc}");
            fail_with(json, &class, &desc, &text, EXIT_FAILED)
        }
        // The command may have run: not a connection failure.
        Err(Failure::Qmp(e @ QmpError::Timeout(_))) => {
            fail(json, "Timeout", &e.to_string(), EXIT_FAILED)
        }
        Err(Failure::Qmp(e @ QmpError::Connect { .. })) => {
            fail(json, "NoConnection", &e.to_string(), EXIT_NO_CONNECTION)
        }
        Err(Failure::Qmp(e)) => fail(json, "ConnectionLost", &e.to_string(), EXIT_NO_CONNECTION),
        // The reader went away (`blkctl events | head`): nothing left to say.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Output(e)) => {
            eprintln!("blkctl: cannot write output: {e}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(Failure::Usage { message, .. }) if json => {
            fail(true, "UsageError", &message, EXIT_USAGE)
        }
        Err(Failure::Usage { command, message }) => {
            let mut cli = Cli::command();
            cli.build();
            // The subcommand's usage line rather than blkctl's.
            match cli.find_subcommand_mut(command) {
                Some(sub) => sub.error(clap::error::ErrorKind::ArgumentConflict, message),
                None => cli.error(clap::error::ErrorKind::ArgumentConflict, message),
            }
            .exit()
        }
        Err(Failure::Other(msg)) => fail(json, "GenericError", &msg, EXIT_FAILED),
        Err(Failure::Exit { message, code }) => {
            let class = match code {
                jobs::EXIT_UNKNOWN => "JobResultUnknown",
                _ => "JobFailed",
            };
            fail(json, class, &message, code)
        }
    }
}

fn run(client: &mut Client, command: Command, json: bool) -> Outcome {
    match command {
        Command::Qmp { command, arguments } => cmd_qmp(client, command, arguments, json),
        Command::Add { spec } => cmd_add(client, spec, json),
        Command::Block => cmd_block(client, json),
        Command::Nodes => cmd_nodes(client, json),
        Command::Stats => cmd_stats(client, json),
        Command::Events => cmd_events(client),
        Command::Version => cmd_version(client, json),
        Command::Quit => cmd_quit(client),
        Command::Throttle {
            device,
            limits,
            off,
        } => cmd_throttle(client, &device, &limits, off, json),
        Command::Resize {
            target,
            size,
            shrink,
        } => cmd_resize(client, target, size, shrink, json),
        Command::Snapshot {
            target,
            file,
            node_name,
            format,
            existing,
        } => cmd_snapshot(client, target, file, node_name, format, existing, json),
        Command::ChangeBacking {
            device,
            image_node,
            backing_file,
        } => {
            let msg = format!("{image_node} now names {backing_file} as its backing file");
            let args = json!({
                "device": device,
                "image-node-name": image_node,
                "backing-file": backing_file,
            });
            simple_command(client, "change-backing-file", args, &msg, json)
        }
        Command::Passwd {
            target,
            password,
            password_file,
        } => cmd_passwd(client, target, password, password_file, json),
        Command::Cont => simple_command(client, "cont", json!({}), "resumed", json),
        Command::Del { target } => {
            let (t, []) = target.resolve([]).map_err(|m| usage("del", m))?;
            let name = args::target_name(&t).to_string();
            // blockdev-del names a device by its `id`.
            let arg = match t.get("device") {
                Some(d) => json!({"id": d}),
                None => Value::Object(t),
            };
            simple_command(
                client,
                "blockdev-del",
                arg,
                &format!("deleted {name}"),
                json,
            )
        }
        Command::Stream(job) => jobs::cmd_start(client, &job, json),
        Command::Commit(job) => jobs::cmd_start(client, &job, json),
        Command::Mirror(job) => jobs::cmd_start(client, &job, json),
        Command::Backup(job) => jobs::cmd_start(client, &job, json),
        Command::Jobs => jobs::cmd_jobs(client, json),
        Command::Job { action } => jobs::cmd_job(client, action, json),
        Command::Map { .. }
        | Command::Check { .. }
        | Command::Create { .. }
        | Command::Completions { .. }
        | Command::Man => Err(Failure::Other(
            "this subcommand runs without a daemon".into(),
        )),
    }
}

fn cmd_check(image: &str, repair: Option<&str>, force_share: bool, json: bool) -> ExitCode {
    use blkfs_engine::drivers::qcow2::check::Repair;
    let mode = match repair {
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        _ => Repair::None,
    };
    let r = match offline::check(image, mode, force_share) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blkctl: {image}: {e}");
            return ExitCode::from(1);
        }
    };
    let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    let out = if json {
        format!("{r}\n")
    } else {
        let mut s = String::new();
        if n("corruptions") == 0 && n("leaks") == 0 && n("check-errors") == 0 {
            s.push_str("No errors were found on the image.\n");
        }
        for (k, what) in [("corruptions", "errors"), ("leaks", "leaked clusters")] {
            if n(k) > 0 {
                s.push_str(&format!("{} {what} were found on the image.\n", n(k)));
            }
        }
        for (k, what) in [
            ("corruptions-fixed", "errors"),
            ("leaks-fixed", "leaked clusters"),
        ] {
            if n(k) > 0 {
                s.push_str(&format!(
                    "The following inconsistencies were found and repaired: {} {what}\n",
                    n(k)
                ));
            }
        }
        let total = n("total-clusters").max(1) as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\nImage end offset: {}\n",
            n("allocated-clusters"),
            n("total-clusters"),
            100.0 * n("allocated-clusters") as f64 / total,
            100.0 * n("fragmented-clusters") as f64 / n("allocated-clusters").max(1) as f64,
            100.0 * n("compressed-clusters") as f64 / n("allocated-clusters").max(1) as f64,
            n("image-end-offset")
        ));
        s
    };
    if emit(&out).is_err() {
        return ExitCode::from(1);
    }
    // qemu-img's exit codes: 2 corruption, 3 leaks only.
    if n("corruptions") > 0 || n("check-errors") > 0 {
        ExitCode::from(2)
    } else if n("leaks") > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn cmd_map(image: &str, format: Option<&str>, force_share: bool, json: bool) -> ExitCode {
    let entries = match offline::map(image, format, force_share) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("blkctl: {image}: {e}");
            return ExitCode::from(1);
        }
    };
    let out = if json {
        serde_json::to_string(&entries)
            .map(|s| s + "\n")
            .unwrap_or_default()
    } else {
        let mut table = Table::new(&[
            ("START", Align::Right),
            ("LENGTH", Align::Right),
            ("DEPTH", Align::Right),
            ("PRESENT", Align::Left),
            ("ZERO", Align::Left),
            ("DATA", Align::Left),
            ("OFFSET", Align::Right),
        ]);
        for e in &entries {
            table.row(vec![
                cell(e.get("start")),
                cell(e.get("length")),
                cell(e.get("depth")),
                bool_cell(e.get("present")),
                bool_cell(e.get("zero")),
                bool_cell(e.get("data")),
                cell(e.get("offset")),
            ]);
        }
        table.render()
    };
    match emit(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkctl: cannot write output: {e}");
            ExitCode::from(1)
        }
    }
}

/// Writes to stdout, reporting failures (a closed pipe) instead of panicking
/// as `print!` would.
fn emit(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

fn emit_json(value: &Value) -> Result<(), Failure> {
    emit(&format!("{value}\n"))?;
    Ok(())
}

fn cmd_qmp(
    client: &mut Client,
    target: QmpTarget,
    arguments: Option<Map<String, Value>>,
    json: bool,
) -> Outcome {
    let cmd = match target {
        QmpTarget::Object(cmd) => cmd,
        QmpTarget::Name(name) => {
            let mut cmd = Map::new();
            cmd.insert("execute".into(), Value::String(name));
            if let Some(args) = arguments {
                cmd.insert("arguments".into(), Value::Object(args));
            }
            cmd
        }
    };
    let reply = client.transact(cmd)?;
    let text = if json {
        reply.to_string()
    } else {
        serde_json::to_string_pretty(&reply).unwrap_or_else(|_| reply.to_string())
    };
    emit(&format!("{text}\n"))?;
    Ok(if reply.get("error").is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_add(client: &mut Client, spec: AddSpec, json: bool) -> Outcome {
    let name = spec
        .options
        .get("id")
        .or_else(|| spec.options.get("node-name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let ret = client.execute("blockdev-add", Some(json!({ "options": spec.options })))?;
    if let (Some(cfg), Some(id)) = (spec.throttle, &name) {
        let mut args = cfg.to_qmp();
        args.insert("device".into(), json!(id));
        if let Err(e) = client.execute("block_set_io_throttle", Some(Value::Object(args))) {
            // All or nothing: a retry must not meet "Duplicate ID".
            let _ = client.execute("blockdev-del", Some(json!({"id": id})));
            return Err(e.into());
        }
    }
    if json {
        emit_json(&ret)?;
    } else {
        match name {
            Some(name) => emit(&format!("added {name}\n"))?,
            None => emit("added\n")?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a query returning a list and either prints it raw or hands each
/// element to `row` to fill `table`.
fn list_query(
    client: &mut Client,
    command: &str,
    json: bool,
    mut table: Table,
    row: impl Fn(&Value) -> Vec<String>,
) -> Outcome {
    let ret = client.execute(command, None)?;
    if json {
        emit_json(&ret)?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(items) = ret.as_array() else {
        return Err(QmpError::Protocol(format!("{command} did not return a list")).into());
    };
    for item in items {
        table.row(row(item));
    }
    emit(&table.render())?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_block(client: &mut Client, json: bool) -> Outcome {
    let table = Table::new(&[
        ("DEVICE", Align::Left),
        ("DRIVER", Align::Left),
        ("RO", Align::Left),
        ("SIZE", Align::Right),
        ("IO-STATUS", Align::Left),
        ("THROTTLE", Align::Left),
        ("FILE", Align::Left),
    ]);
    list_query(client, "query-block", json, table, |dev| {
        let ins = dev.get("inserted");
        let field = |k: &str| ins.and_then(|i| i.get(k));
        vec![
            cell(dev.get("device")),
            cell(field("drv")),
            bool_cell(field("ro")),
            size_cell(field("image").and_then(|img| img.get("virtual-size"))),
            cell(dev.get("io-status")),
            ins.map_or_else(|| "-".to_string(), throttle_summary),
            cell(field("file")),
        ]
    })
}

fn cmd_nodes(client: &mut Client, json: bool) -> Outcome {
    let table = Table::new(&[
        ("NODE-NAME", Align::Left),
        ("DRIVER", Align::Left),
        ("RO", Align::Left),
        ("SIZE", Align::Right),
        ("FILE", Align::Left),
    ]);
    list_query(client, "query-named-block-nodes", json, table, |node| {
        vec![
            cell(node.get("node-name")),
            cell(node.get("drv")),
            bool_cell(node.get("ro")),
            size_cell(node.get("image").and_then(|img| img.get("virtual-size"))),
            cell(node.get("file")),
        ]
    })
}

fn cmd_stats(client: &mut Client, json: bool) -> Outcome {
    const FIELDS: [(&str, &str); 8] = [
        ("RD_BYTES", "rd_bytes"),
        ("WR_BYTES", "wr_bytes"),
        ("RD_OPS", "rd_operations"),
        ("WR_OPS", "wr_operations"),
        ("FLUSH_OPS", "flush_operations"),
        ("RD_NS", "rd_total_time_ns"),
        ("WR_NS", "wr_total_time_ns"),
        ("WR_HIGHEST", "wr_highest_offset"),
    ];
    let mut columns = vec![("DEVICE", Align::Left)];
    columns.extend(FIELDS.iter().map(|(h, _)| (*h, Align::Right)));
    list_query(
        client,
        "query-blockstats",
        json,
        Table::new(&columns),
        |s| {
            // Newer servers name nodes without a device; use that when present.
            let name = s
                .get("device")
                .filter(|d| d.as_str().is_some_and(|d| !d.is_empty()))
                .or_else(|| s.get("node-name"));
            let stats = s.get("stats");
            std::iter::once(cell(name))
                .chain(
                    FIELDS
                        .iter()
                        .map(|(_, k)| cell(stats.and_then(|st| st.get(*k)))),
                )
                .collect()
        },
    )
}

fn cmd_events(client: &mut Client) -> Outcome {
    while let Some(event) = client.next_event()? {
        emit_json(&event)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_version(client: &mut Client, json: bool) -> Outcome {
    let ret = client.execute("query-version", None)?;
    if json {
        emit_json(&ret)?;
        return Ok(ExitCode::SUCCESS);
    }
    let qemu = ret.get("qemu");
    let part = |k: &str| cell(qemu.and_then(|q| q.get(k)));
    let package = match ret.get("package").and_then(Value::as_str).map(str::trim) {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => "unknown".to_string(),
    };
    emit(&format!(
        "blkfs {package} (qemu-compatible {}.{}.{})\n",
        part("major"),
        part("minor"),
        part("micro")
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_quit(client: &mut Client) -> Outcome {
    match client.execute("quit", None) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        // The daemon may close the socket before its reply gets out; it is
        // going away either way, which is what was asked.
        Err(QmpError::Closed) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e.into()),
    }
}

/// Runs a command whose return value is empty: prints `message`, or the
/// raw return with --json.
fn simple_command(
    client: &mut Client,
    command: &str,
    arguments: Value,
    message: &str,
    json: bool,
) -> Outcome {
    let ret = client.execute(command, Some(arguments))?;
    if json {
        emit_json(&ret)?;
    } else {
        emit(&format!("{message}\n"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The non-zero limits of a `BlockDeviceInfo` (or of throttle arguments),
/// e.g. `bps=1.0M,iops=100`; `-` when there are none.
fn throttle_summary(limits: &Value) -> String {
    let set: Vec<String> = args::throttle_names()
        .filter_map(|name| {
            let v = limits
                .get(name)
                .and_then(Value::as_u64)
                .filter(|&v| v != 0)?;
            Some(if args::is_byte_limit(name) {
                format!("{name}={}", human_size(v))
            } else {
                format!("{name}={v}")
            })
        })
        .collect();
    if set.is_empty() {
        "-".to_string()
    } else {
        set.join(",")
    }
}

/// The entry named `name` under `key` in the list a query returns.
fn find_in_query(
    client: &mut Client,
    query: &str,
    key: &str,
    name: &str,
) -> Result<Value, Failure> {
    let ret = client.execute(query, None)?;
    ret.as_array()
        .and_then(|items| {
            items
                .iter()
                .find(|i| i.get(key).and_then(Value::as_str) == Some(name))
        })
        .cloned()
        .ok_or_else(|| Failure::Other(format!("{query} does not list {key} '{name}'")))
}

fn cmd_throttle(
    client: &mut Client,
    device: &str,
    limits: &ThrottleLimits,
    off: bool,
    json: bool,
) -> Outcome {
    if off || !limits.is_empty() {
        // Only the limits named change: the others are read first.
        let current = match off {
            true => Value::Null,
            // An unknown device: block_set_io_throttle says DeviceNotFound.
            false => match find_in_query(client, "query-block", "device", device) {
                Ok(dev) => dev.get("inserted").cloned().unwrap_or(Value::Null),
                Err(Failure::Other(_)) => Value::Null,
                Err(e) => return Err(e),
            },
        };
        let args = limits.arguments(device, off, &current);
        let msg = match throttle_summary(&Value::Object(args.clone())) {
            none if none == "-" => format!("{device}: no I/O limits"),
            set => format!("{device}: I/O limits {set}"),
        };
        return simple_command(
            client,
            "block_set_io_throttle",
            Value::Object(args),
            &msg,
            json,
        );
    }
    let dev = find_in_query(client, "query-block", "device", device)?;
    let inserted = dev.get("inserted").cloned().unwrap_or(Value::Null);
    // query-block omits the optional limits that are unset; show them as 0.
    let current: Map<String, Value> = args::throttle_names()
        .map(|n| (n.to_string(), inserted.get(n).cloned().unwrap_or(json!(0))))
        .collect();
    if json {
        emit_json(&Value::Object(current))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[("LIMIT", Align::Left), ("VALUE", Align::Right)]);
    // In the command's order: the map may sort its keys.
    for name in args::throttle_names() {
        let value = current.get(name);
        let text = match value.and_then(Value::as_u64) {
            Some(0) => "-".to_string(),
            Some(v) if args::is_byte_limit(name) => human_size(v),
            _ => cell(value),
        };
        table.row(vec![name.to_string(), text]);
    }
    emit(&table.render())?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_snapshot(
    client: &mut Client,
    target: Target,
    file: Option<String>,
    node_name: Option<String>,
    format: Option<String>,
    existing: bool,
    json: bool,
) -> Outcome {
    let (mut args, [file]) = target.resolve([file]).map_err(|m| usage("snapshot", m))?;
    let file = file.ok_or_else(|| usage("snapshot", "FILE is missing"))?;
    let file = paths::absolute(&file).map_err(Failure::Other)?;
    args.insert("snapshot-file".into(), json!(file));
    if let Some(n) = node_name {
        args.insert("snapshot-node-name".into(), json!(n));
    }
    if let Some(f) = format {
        args.insert("format".into(), json!(f));
    }
    let mode = if existing {
        "existing"
    } else {
        "absolute-paths"
    };
    args.insert("mode".into(), json!(mode));
    let msg = format!("{} now writes to {file}", args::target_name(&args));
    simple_command(
        client,
        "blockdev-snapshot-sync",
        Value::Object(args),
        &msg,
        json,
    )
}

fn cmd_resize(
    client: &mut Client,
    target: Target,
    size: Option<String>,
    shrink: bool,
    json: bool,
) -> Outcome {
    let (mut args, [size]) = target.resolve([size]).map_err(|m| usage("resize", m))?;
    let size = size.ok_or_else(|| usage("resize", "SIZE is missing"))?;
    let size = SizeChange::parse(&size).map_err(|m| usage("resize", m))?;
    let name = args::target_name(&args).to_string();
    let (query, key, image) = if args.contains_key("device") {
        ("query-block", "device", "/inserted/image/virtual-size")
    } else {
        (
            "query-named-block-nodes",
            "node-name",
            "/image/virtual-size",
        )
    };
    let current = match (find_in_query(client, query, key, &name), &size) {
        (Ok(entry), _) => Some(
            entry
                .pointer(image)
                .and_then(Value::as_u64)
                .ok_or_else(|| Failure::Other(format!("{query} gives no size for '{name}'")))?,
        ),
        // An absolute size needs no current one: block_resize names the error.
        (Err(_), SizeChange::To(_)) => None,
        (Err(e), _) => return Err(e),
    };
    let new_size = size.apply(current.unwrap_or(0)).map_err(Failure::Other)?;
    // As qemu-img resize: losing the end of a disk takes an explicit word.
    if let Some(current) = current.filter(|&c| new_size < c && !shrink) {
        return Err(Failure::Other(format!(
            "'{name}' is {current} bytes: use the --shrink option to shrink it to {new_size} bytes (data past that is lost)"
        )));
    }
    args.insert("size".into(), json!(new_size));
    let msg = format!(
        "resized {name} to {} ({new_size} bytes)",
        human_size(new_size)
    );
    simple_command(client, "block_resize", Value::Object(args), &msg, json)
}

fn cmd_passwd(
    client: &mut Client,
    target: Target,
    password: Option<String>,
    password_file: Option<PathBuf>,
    json: bool,
) -> Outcome {
    let (mut args, [password]) = target.resolve([password]).map_err(|m| usage("passwd", m))?;
    let password = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(usage(
                "passwd",
                "give either PASSWORD or --password-file, not both",
            ))
        }
        (Some(pw), None) => pw,
        (None, Some(path)) => std::fs::File::open(&path)
            .and_then(|f| args::first_line(io::BufReader::new(f)))
            .map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?
            .ok_or_else(|| Failure::Other(format!("{}: empty file", path.display())))?,
        (None, None) => read_password()
            .map_err(|e| Failure::Other(format!("cannot read the password: {e}")))?
            .ok_or_else(|| Failure::Other("no password on standard input".into()))?,
    };
    let msg = format!("password set for {}", args::target_name(&args));
    args.insert("password".into(), json!(password));
    simple_command(client, "block_passwd", Value::Object(args), &msg, json)
}

/// The first line of stdin; typed without echo when stdin is a terminal.
fn read_password() -> io::Result<Option<String>> {
    // SAFETY: isatty only inspects file descriptor 0.
    let tty = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
    if !tty {
        return args::first_line(io::stdin().lock());
    }
    eprint!("Password: ");
    let echo_off = EchoOff::new();
    let line = args::first_line(io::stdin().lock());
    drop(echo_off);
    // The user's newline was not echoed either.
    eprintln!();
    line
}

/// Turns terminal echo off on stdin until dropped.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut term: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios for the calls' duration.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut term) } != 0 {
            return EchoOff(None);
        }
        let saved = term;
        term.c_lflag &= !libc::ECHO;
        // SAFETY: as above.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &term) } != 0 {
            return EchoOff(None);
        }
        EchoOff(Some(saved))
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings tcgetattr returned.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}
