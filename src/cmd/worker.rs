//! `kiln worker`: a standalone worker joining a server.

use std::path::PathBuf;

use anyhow::Context;
use kiln_executor::{SandboxBackend, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Flags of `kiln worker`; each overrides the config file's `[worker]`.
#[derive(clap::Args, Debug, Default)]
pub struct WorkerArgs {
    /// TOML configuration file; `kiln worker` reads its `[worker]` and
    /// `[log]` tables (docs/configuration.md).
    #[arg(long, short = 'c', env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format [default: human].
    #[arg(long, value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    /// The server to join [default: http://127.0.0.1:50051].
    #[arg(long)]
    pub server: Option<String>,
    /// Cache and scratch directory [default: $XDG_CACHE_HOME/kiln/worker].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub common: WorkerFlags,
}

/// Worker flags shared by `kiln worker` and the embedded workers of
/// `kiln serve`.
#[derive(clap::Args, Debug, Default)]
pub struct WorkerFlags {
    /// Actions a worker runs at once [default: number of CPUs].
    #[arg(long)]
    pub slots: Option<usize>,
    /// Extra platform property offered, NAME=VALUE (repeatable); OSFamily
    /// and ISA are detected.
    #[arg(long = "platform", value_name = "NAME=VALUE")]
    pub platform: Vec<String>,
    /// A base root filesystem offered as container-image, NAME=PATH: a rootfs
    /// directory, an OCI image layout, or an OCI/docker-save tarball
    /// (repeatable).
    #[arg(long = "image", value_name = "NAME=DIR")]
    pub images: Vec<String>,
    /// Let actions asking for network=on use the host network.
    #[arg(long)]
    pub network: bool,
    /// Sandbox backend: userns or oci [default: userns].
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<SandboxBackend>,
    /// OCI runtime binary for the oci backend (crun, runc) [default: built-in].
    #[arg(long)]
    pub oci_runtime: Option<PathBuf>,
    /// Allow a group of system calls back despite the seccomp filter
    /// (repeatable): keyring, bpf, perf, userfaultfd, kernel, ptrace,
    /// namespaces, mount, io_uring, setid.
    #[arg(long = "seccomp-allow", value_name = "GROUP")]
    pub seccomp_allow: Vec<kiln_sandbox::SyscallGroup>,
    /// Run actions without any seccomp filter.
    #[arg(long)]
    pub no_seccomp: bool,
    #[command(flatten)]
    pub limits: LimitFlags,
    /// Most new data one action may leave: outputs, stdout and stderr
    /// together, e.g. 4G [default: 4G].
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub output_limit: Option<u64>,
}

/// Per-action resource limits, for `kiln serve`, `kiln worker` and
/// `kiln sandbox run` (0 lifts one).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LimitFlags {
    /// Memory of one action, e.g. 4G [default: 3/4 of the host's memory / slots].
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub memory_limit: Option<u64>,
    /// Processes and threads of one action at once [default: 4096].
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// CPUs one action may use, e.g. 1.5 [default: no quota; equal shares].
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    pub cpu_limit: Option<f64>,
    /// Size of /tmp and /dev/shm each, and the largest file [default: 16G].
    #[arg(long, value_name = "SIZE", value_parser = super::parse_size)]
    pub scratch_limit: Option<u64>,
}

fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && c >= 0.0 => Ok(c),
        _ => Err(format!("{s:?} is not a number of CPUs (e.g. 1.5)")),
    }
}

impl LimitFlags {
    pub fn apply(&self, config: &mut WorkerConfig) {
        if let Some(m) = self.memory_limit {
            config.memory_limit_bytes = Some(m);
        }
        if let Some(n) = self.pids_limit {
            config.pids_limit = n;
        }
        if let Some(c) = self.cpu_limit {
            config.cpu_limit = c;
        }
        if let Some(b) = self.scratch_limit {
            config.scratch_limit_bytes = b;
        }
    }
}

fn parse_backend(s: &str) -> Result<SandboxBackend, String> {
    match s {
        "userns" => Ok(SandboxBackend::Userns),
        "oci" => Ok(SandboxBackend::Oci),
        _ => Err(format!("unknown backend {s:?}: expected userns or oci")),
    }
}

impl WorkerArgs {
    /// Applies the flags over `config`.
    pub fn apply(&self, config: &mut WorkerConfig) -> anyhow::Result<()> {
        if let Some(s) = &self.server {
            config.server = s.clone();
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = Some(d.clone());
        }
        self.common.apply(config)
    }
}

impl WorkerFlags {
    /// Applies the flags over `config`.
    pub fn apply(&self, config: &mut WorkerConfig) -> anyhow::Result<()> {
        if let Some(n) = self.slots {
            anyhow::ensure!(n > 0, "--slots must be at least 1");
            config.slots = n;
        }
        config.platform.extend(self.platform.iter().cloned());
        for image in &self.images {
            let (name, dir) = image
                .split_once('=')
                .with_context(|| format!("--image {image:?} is not NAME=PATH"))?;
            config.images.insert(name.to_string(), PathBuf::from(dir));
        }
        if self.network {
            config.network = true;
        }
        if let Some(b) = self.backend {
            config.backend = b;
        }
        if let Some(r) = &self.oci_runtime {
            config.oci_runtime = Some(r.clone());
        }
        if let Some(n) = self.output_limit {
            config.output_limit_bytes = n;
        }
        config
            .seccomp_allow
            .extend(self.seccomp_allow.iter().copied());
        if self.no_seccomp {
            config.seccomp = false;
        }
        self.limits.apply(config);
        Ok(())
    }
}

/// Runs a worker until SIGINT or SIGTERM.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut file = crate::config::Config::load(args.config.as_deref())?;
    if let Some(f) = args.log_format {
        file.log.format = f;
    }
    super::init_logging_from(&file.log);
    let mut config = file.worker;
    args.apply(&mut config)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let handle = kiln_executor::start(
            &config,
            kiln_sandbox::LauncherConfig::current_exe(),
            shutdown.clone(),
        )
        .with_context(|| format!("starting the worker in {}", config.data_dir().display()))?;
        tracing::info!(server = %config.server, slots = config.slots, "worker started");
        super::shutdown_signal().await;
        shutdown.cancel();
        let _ = handle.await;
        Ok(())
    })
}
