//! Kiln's one configuration file, for `kiln serve` and `kiln worker`:
//! top-level server keys, then one table per part. Every field has a
//! default; unknown keys and bad values are start-up errors that name the
//! key by its full path. `docs/configuration.md` documents every field and
//! [`DEFAULT_TOML`] is the commented default file (`kiln config
//! print-default`); tests keep the three in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use kiln_executor::WorkerConfig;
use kiln_server::ServerConfig;
use kiln_server::config::{CasConfig, GrpcConfig, StorageConfig};
use kiln_server::execution::ExecutionConfig;
use kiln_server::http::MetricsConfig;
use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC address (`kiln serve`).
    pub listen: SocketAddr,
    /// The server's data directory.
    pub data_dir: Option<PathBuf>,
    /// Instance names served besides `""`.
    pub instance_names: Vec<String>,
    /// Workers `kiln serve` runs in its own process.
    pub workers: usize,
    pub storage: StorageConfig,
    pub cas: CasConfig,
    pub grpc: GrpcConfig,
    pub execution: ExecutionConfig,
    pub worker: WorkerConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        let server = ServerConfig::default();
        Config {
            listen: server.listen,
            data_dir: server.data_dir,
            instance_names: server.instance_names,
            workers: 1,
            storage: server.storage,
            cas: server.cas,
            grpc: server.grpc,
            execution: server.execution,
            worker: WorkerConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, spans as `name{field=value}:` prefixes.
    #[default]
    Human,
    /// One JSON object per line, with the current span's fields and the
    /// list of enclosing spans (for log shippers).
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `"human"` or `"json"`. Default `"human"`.
    pub format: LogFormat,
    /// A `tracing` filter: a level (`info`) or per-module directives
    /// (`info,kiln_server::execution=debug`). `RUST_LOG`, when set, wins.
    /// Default `"info"`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads and checks a file; errors name the file and the key.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in the config file {}", path.display()))
    }

    /// Parses and checks TOML text.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // toml's message already shows the offending line; the path
            // says which table it belongs to.
            let message = inner.message().to_string();
            let location = inner
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            if path == "." || path.is_empty() {
                anyhow::anyhow!("{message}{location}")
            } else {
                anyhow::anyhow!("`{path}`: {message}{location}")
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.server().validate()?;
        anyhow::ensure!(self.worker.slots > 0, "`worker.slots` must be at least 1");
        anyhow::ensure!(
            self.metrics.recent_operations <= 10_000,
            "`metrics.recent_operations` = {} is too many (at most 10000)",
            self.metrics.recent_operations
        );
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| anyhow::anyhow!("`log.level` = {:?}: {e}", self.log.level))?;
        anyhow::ensure!(
            self.worker.cpu_limit.is_finite() && self.worker.cpu_limit >= 0.0,
            "`worker.cpu_limit` = {} is not a number of CPUs",
            self.worker.cpu_limit
        );
        for p in &self.worker.platform {
            anyhow::ensure!(
                p.contains('='),
                "`worker.platform` entry {p:?} is not NAME=VALUE"
            );
        }
        Ok(())
    }

    /// The server's part.
    pub fn server(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            data_dir: self.data_dir.clone(),
            instance_names: self.instance_names.clone(),
            storage: self.storage.clone(),
            cas: self.cas.clone(),
            grpc: self.grpc.clone(),
            execution: self.execution.clone(),
        }
    }

    /// The file named by `--config` (or `KILN_CONFIG`), else the defaults.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            Some(p) => Self::from_file(p),
            None => Ok(Self::default()),
        }
    }
}

/// The default file, every key with a comment, as `kiln config
/// print-default` prints it. Keys whose default depends on the machine are
/// commented out.
pub const DEFAULT_TOML: &str = r#"# Kiln configuration (kiln serve --config FILE, kiln worker --config FILE).
# Every key below shows its default; delete what you do not change.
# docs/configuration.md describes each one. Command-line flags override
# the file.

# gRPC address of the REAPI endpoint. Port 0 picks a free port.
listen = "127.0.0.1:50051"
# Where the server keeps its data. Default: $XDG_CACHE_HOME/kiln, else
# ~/.cache/kiln.
# data_dir = "/var/cache/kiln"
# Instance names served besides "" (the CAS is shared; the action cache is
# per instance).
instance_names = []
# Workers `kiln serve` runs in its own process (0: a pure server that
# waits for `kiln worker`s).
workers = 1

[storage]
# "disk" (under data_dir, durable) or "memory" (lost on exit).
backend = "disk"
# CAS size limit in bytes; least recently used blobs are evicted beyond it.
# 0 means unlimited. 17179869184 = 16 GiB.
max_size_bytes = 17179869184
# Eviction brings the CAS down to this percentage of max_size_bytes.
evict_to_percent = 90
# fsync every blob before acknowledging it (slower; see docs/storage.md).
fsync = false
# Seconds between checkpoints (syncfs of the data directory).
checkpoint_interval_secs = 30

[cas]
# Largest BatchUpdateBlobs/BatchReadBlobs payload advertised (4 MiB).
max_batch_total_size_bytes = 4194304
# Chunk size of ByteStream.Read (256 KiB).
read_chunk_bytes = 262144
# Seconds an interrupted ByteStream upload stays resumable, and a silent
# write stream stays open.
upload_idle_timeout_secs = 600
# Support and advertise zstd-compressed blobs.
zstd = true

[grpc]
# Largest gRPC message in bytes (16 MiB); must exceed a full batch.
max_message_bytes = 16777216
# HTTP/2 flow-control windows (4 MiB per stream, 16 MiB per connection).
stream_window_bytes = 4194304
connection_window_bytes = 16777216
# Largest HTTP/2 frame accepted (1 MiB).
max_frame_bytes = 1048576
# Seconds open calls get to finish after SIGTERM.
shutdown_grace_secs = 10

[execution]
# Longest Action.timeout accepted (one day).
max_action_timeout_secs = 86400
# Timeout of actions that set none; 0 means max_action_timeout_secs.
default_action_timeout_secs = 0
# Ignore unknown platform properties instead of rejecting the action.
ignore_unknown_properties = false
# After start, actions are queued (not refused) while no worker has joined.
startup_grace_secs = 15
# A platform stays possible this long after its last worker left.
worker_loss_grace_secs = 60
# After a restart, how long a running action waits for its worker.
reattach_grace_secs = 30
# Worker keepalive interval; three silent intervals drop the worker.
keepalive_ms = 5000
# Attempts an action gets when its workers vanish or the server restarts
# while it runs.
max_attempts = 3
# How long finished operations stay answerable, and at most how many.
completed_retention_secs = 3600
completed_max = 100000
# fsync the operations journal after each batch of writes.
journal_fsync = false

[worker]
# The server a `kiln worker` joins (kiln serve's own workers ignore it).
server = "http://127.0.0.1:50051"
# Actions a worker runs at once. Default: the number of CPUs.
# slots = 2
# Blob cache, staged trees and scratch space. Default:
# $XDG_CACHE_HOME/kiln/worker (kiln serve: DATA_DIR/worker-N).
# data_dir = "/var/cache/kiln/worker"
# Size limit of the worker's blob cache (10 GiB).
cache_bytes = 10737418240
# Staged input trees kept for reuse.
staged_trees = 64
# Extra platform properties offered, NAME=VALUE (OSFamily and ISA of the
# host are detected), e.g. ["ISA=x86-32"].
platform = []
# Let actions that ask for network=on use the host's network.
network = false
# Sandbox backend: "userns" (Kiln's own) or "oci".
backend = "userns"
# For backend = "oci": an OCI runtime binary instead of the built-in one.
# oci_runtime = "/usr/bin/crun"
# Empty network namespaces, and as many fresh IPC namespaces, kept ready.
netns_pool = 8
# Run every action under Kiln's seccomp filter (docs/security.md).
seccomp = true
# System-call groups the filter allows back: keyring, bpf, perf,
# userfaultfd, kernel, ptrace, namespaces, mount, io_uring, setid.
seccomp_allow = []
# Per-action limits (0 lifts one); docs/security.md says what each holds.
# Memory of one action, with its /tmp and /dev/shm. Default: 3/4 of the
# host's memory divided by slots.
# memory_limit_bytes = 4294967296
# Processes and threads of one action at once.
pids_limit = 4096
# CPUs one action may use (a quota); 0: none (every action still gets an
# equal CPU share).
cpu_limit = 0.0
# Size of /tmp and /dev/shm each, and the largest file an action may write
# (16 GiB).
scratch_limit_bytes = 17179869184
# Most new data one action may leave (outputs, stdout and stderr together);
# beyond it the action ends RESOURCE_EXHAUSTED. 4294967296 = 4 GiB.
output_limit_bytes = 4294967296

# Base root filesystems offered as the container-image property:
# NAME = "PATH" (a root filesystem directory, an OCI image layout or an
# OCI/docker-save tarball).
[worker.images]

[metrics]
# HTTP address serving /metrics (Prometheus) and the status page (/).
# Default: off. No authentication: keep it on loopback or a private network.
# listen = "127.0.0.1:9090"
# Finished operations the status page lists.
recent_operations = 50

[log]
# "human" or "json" (one object per line).
format = "human"
# A tracing filter: a level or per-module directives. RUST_LOG wins.
level = "info"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_the_default_config() {
        let parsed = Config::from_toml(DEFAULT_TOML).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[storage]\nmax_size_bytes = \"big\"\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("storage.max_size_bytes"), "{msg}");
        let e = Config::from_toml("[worker]\nslotz = 3\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("`worker.slotz`"), "{msg}");
        assert!(msg.contains("(line 2)"), "{msg}");
        let e = Config::from_toml("[log]\nformat = \"xml\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("log.format"), "{e:#}");
        let e = Config::from_toml("[worker]\nslots = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("worker.slots"), "{e:#}");
    }

    #[test]
    fn every_key_is_documented() {
        let docs = include_str!("../docs/configuration.md");
        let mut table = String::new();
        for line in DEFAULT_TOML.lines() {
            let line = line.trim_start_matches("# ").trim();
            if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = t.to_string();
                continue;
            }
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                continue;
            }
            let full = if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            };
            assert!(
                docs.contains(&format!("`{full}`")),
                "docs/configuration.md does not document `{full}`"
            );
        }
    }
}
