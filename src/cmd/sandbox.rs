//! `kiln sandbox run`: one command in a hermetic sandbox, the way a user
//! tries it by hand. The command's stdout/stderr are this process's.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use kiln_sandbox::{BackendKind, Launcher, LauncherConfig, Root, SandboxRequest, Stdio, Subtree};

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Run CMD with DIR as its filesystem root.
    Run(Box<RunArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BackendArg {
    Userns,
    Oci,
}

#[derive(Args)]
pub struct RunArgs {
    /// The directory that becomes `/` (bind-mounted, modified in place).
    #[arg(long, value_name = "DIR", required_unless_present = "lower")]
    root: Option<PathBuf>,
    /// Overlay root instead: a read-only lower layer (repeat; top first)…
    #[arg(long, value_name = "DIR", requires_all = ["upper", "work"], conflicts_with = "root")]
    lower: Vec<PathBuf>,
    /// …its writable upper directory…
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// …and overlayfs's (empty) work directory, on the same filesystem as --upper.
    #[arg(long, value_name = "DIR")]
    work: Option<PathBuf>,
    /// Working directory inside the root (created if missing).
    #[arg(long, default_value = "/")]
    cwd: PathBuf,
    /// Environment variable for the command (repeat). Nothing else is passed.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Share the host's network (default: only a private loopback).
    #[arg(long)]
    network: bool,
    /// Kill everything after this many seconds (fractions allowed).
    #[arg(long, value_name = "S")]
    timeout: Option<f64>,
    #[arg(long, default_value_t = 0)]
    uid: u32,
    #[arg(long, default_value_t = 0)]
    gid: u32,
    /// Mount this path (relative to the root; "" or / for the root) read-only (repeat).
    #[arg(long = "ro", value_name = "PATH")]
    read_only: Vec<PathBuf>,
    /// Mount this path read-write, e.g. inside a read-only one (repeat).
    #[arg(long = "rw", value_name = "PATH")]
    read_write: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "userns")]
    backend: BackendArg,
    /// OCI backend: run this runtime binary (crun, runc) instead of Kiln's own.
    #[arg(long, value_name = "PATH")]
    oci_runtime: Option<PathBuf>,
    /// Allow a group of system calls back despite the seccomp filter
    /// (repeatable): keyring, bpf, perf, userfaultfd, kernel, ptrace,
    /// namespaces, mount, io_uring, setid.
    #[arg(long = "seccomp-allow", value_name = "GROUP")]
    seccomp_allow: Vec<kiln_sandbox::SyscallGroup>,
    /// Run the command without any seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    #[command(flatten)]
    limits: super::worker::LimitFlags,
    /// Print the outcome (status, times, peak memory) to stderr.
    #[arg(long, short)]
    verbose: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

fn relative(p: &std::path::Path) -> PathBuf {
    p.strip_prefix("/").unwrap_or(p).to_path_buf()
}

/// Runs the command; returns the exit code `kiln` should exit with (the
/// command's, or 128 + signal).
pub fn run(cmd: SandboxCommand) -> anyhow::Result<i32> {
    let SandboxCommand::Run(a) = cmd;
    let root = match (&a.root, &a.upper, &a.work) {
        (Some(r), _, _) => Root::Dir(std::path::absolute(r)?),
        (None, Some(u), Some(w)) => Root::Overlay {
            lowers: a
                .lower
                .iter()
                .map(std::path::absolute)
                .collect::<Result<_, _>>()?,
            upper: std::path::absolute(u)?,
            work: std::path::absolute(w)?,
        },
        _ => bail!("give --root DIR, or --lower/--upper/--work"),
    };
    let mut req = SandboxRequest::new(root, a.command.clone());
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env {kv:?}: expected K=V"))?;
        req.env.push((k.to_string(), v.to_string()));
    }
    req.cwd = relative(&a.cwd);
    req.network = a.network;
    req.uid = a.uid;
    req.gid = a.gid;
    req.timeout = match a.timeout {
        None => None,
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => bail!("--timeout {s}: expected a number of seconds"),
    };
    req.subtrees = a
        .read_only
        .iter()
        .map(|p| (p, true))
        .chain(a.read_write.iter().map(|p| (p, false)))
        .map(|(p, ro)| Subtree {
            path: relative(p),
            read_only: ro,
        })
        .collect();
    // The worker's defaults, as for one slot.
    let mut defaults = kiln_executor::WorkerConfig {
        slots: 1,
        ..Default::default()
    };
    a.limits.apply(&mut defaults);
    req.limits = defaults.limits();
    req.stdout = Stdio::Fd(std::io::stdout().as_fd().try_clone_to_owned()?);
    req.stderr = Stdio::Fd(std::io::stderr().as_fd().try_clone_to_owned()?);

    let mut cfg = LauncherConfig::current_exe();
    cfg.backend = match a.backend {
        BackendArg::Userns => BackendKind::Userns,
        BackendArg::Oci => BackendKind::Oci,
    };
    cfg.oci_runtime = a.oci_runtime.clone();
    cfg.seccomp = kiln_sandbox::SeccompPolicy {
        enabled: !a.no_seccomp,
        allow: a.seccomp_allow.clone(),
    };
    // One sandbox: a pool of ready network namespaces would only cost time.
    cfg.netns_pool = 0;
    let launcher = Launcher::new(cfg)?;
    let finished = launcher.spawn(req)?.wait()?;
    let o = &finished.outcome;
    for w in &o.warnings {
        eprintln!("kiln: warning: {w}");
    }
    if o.timed_out {
        eprintln!(
            "kiln: timed out after {:?}: killed every process of the sandbox",
            req_timeout(&a)
        );
    }
    if a.verbose {
        eprintln!(
            "kiln: {}; wall {:.3}s, user {:.3}s, sys {:.3}s, peak RSS {} KiB, set-up {:.2} ms",
            o.status,
            o.wall.as_secs_f64(),
            o.user.as_secs_f64(),
            o.sys.as_secs_f64(),
            o.peak_rss_bytes / 1024,
            o.setup.as_secs_f64() * 1e3
        );
    }
    Ok(o.status.code())
}

fn req_timeout(a: &RunArgs) -> Duration {
    Duration::from_secs_f64(a.timeout.unwrap_or(0.0))
}
