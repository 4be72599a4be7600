//! Kiln's worker: lease → fetch → stage → sandbox → collect → upload → report.
//!
//! [`start`] builds a worker from a [`WorkerConfig`] and runs it against a
//! server until shut down; `kiln worker` and the workers embedded in
//! `kiln serve` both use it, so there is one code path.

pub mod base;
pub mod cache;
pub mod cas;
pub mod collect;
pub mod config;
pub mod error;
mod hint;
pub mod image;
pub mod run;
pub mod stage;
pub mod transfer;
pub mod trash;
pub mod tree;
pub mod worker;

use std::sync::Arc;

pub use config::{SandboxBackend, WorkerConfig};
pub use error::{Error, Result};
use kiln_sandbox::{BackendKind, Launcher, LauncherConfig};
use tokio_util::sync::CancellationToken;

/// Creates the worker's data directory readable by its owner only. With a
/// privileged worker, an action runs as the host's uid 0 (without
/// capabilities) and may leave a setuid-root file in its scratch space until
/// that is deleted: no other user of the host may reach it.
fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create data directory", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io("make the data directory private", dir, e))
}

/// Builds a worker and runs it in the background until `shutdown` fires.
/// `launcher` says how to start the sandbox helper (the `kiln` binary
/// re-executed with its hidden helper argument).
pub fn start(
    config: &WorkerConfig,
    mut launcher: LauncherConfig,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    // Absolute, because the sandbox is handed paths under it as its root
    // and lower layers (`--data-dir data` is what a user types).
    let data = std::path::absolute(config.data_dir())
        .map_err(|e| Error::io("resolve the data directory", config.data_dir(), e))?;
    private_dir(&data)?;
    let trash = Arc::new(trash::Trash::start(&data.join("trash"))?);
    let cache = Arc::new(cache::BlobCache::open(
        &data.join("cache"),
        config.cache_bytes,
    )?);
    let stager = stage::Stager::open(
        Arc::clone(&cache),
        &data.join("staged"),
        Arc::clone(&trash),
        config.staged_trees,
    )?;
    launcher.backend = match config.backend {
        SandboxBackend::Userns => BackendKind::Userns,
        SandboxBackend::Oci => BackendKind::Oci,
    };
    launcher.oci_runtime = config.oci_runtime.clone();
    launcher.netns_pool = config.netns_pool;
    launcher.seccomp = config.seccomp_policy();
    let launcher = Arc::new(Launcher::new(launcher)?);
    let limits = config.limits();
    tracing::info!(
        memory = %limits.memory_bytes.map_or("none".into(), kiln_sandbox::human_bytes),
        pids = %limits.pids.map_or("none".into(), |n| n.to_string()),
        cpus = %limits.cpu_millis.map_or("no quota".into(), |m| format!("{:.2}", m as f64 / 1000.0)),
        scratch = %limits.scratch_bytes.map_or("none".into(), kiln_sandbox::human_bytes),
        cgroups = %launcher.cgroups(),
        seccomp = config.seccomp,
        "sandbox limits per action"
    );
    for l in launcher.limitations() {
        tracing::warn!("sandbox limitation on this host: {l}");
    }
    let (channel, cas) = worker::cas_client(&config.server)?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let worker_id = format!(
        "{hostname}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut platform = vec![
        ("OSFamily".to_string(), std::env::consts::OS.to_string()),
        ("ISA".to_string(), std::env::consts::ARCH.to_string()),
    ];
    for p in &config.platform {
        let (k, v) = p.split_once('=').ok_or_else(|| {
            Error::Internal(format!("worker platform property {p:?} is not NAME=VALUE"))
        })?;
        platform.push((k.to_string(), v.to_string()));
    }
    let bases = base::BaseRoots::new(config.images.clone(), data.join("images"));
    let identity = worker::WorkerIdentity {
        worker_id: worker_id.clone(),
        hostname,
        platform,
        slots: config.slots.max(1) as u32,
        images: bases.image_names().map(str::to_string).collect(),
        network_allowed: config.network,
    };
    let exec = Arc::new(run::Executor::new(run::ExecutorParts {
        name: worker_id,
        cas,
        cache,
        stager,
        trash,
        launcher,
        bases,
        scratch: data.join("scratch"),
        network_allowed: config.network,
        output_limit: config.output_limit_bytes,
        limits,
    })?);
    Ok(tokio::spawn(worker::run(exec, identity, channel, shutdown)))
}
