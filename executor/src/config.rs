//! `[worker]` in Kiln's config file: how a worker connects, what it offers
//! and where it keeps its cache.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kiln_sandbox::{Limits, SeccompPolicy, SyscallGroup};
use serde::Deserialize;

/// Which sandbox backend runs actions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxBackend {
    /// Kiln's own user-namespace chroot (fastest).
    #[default]
    Userns,
    /// An OCI runtime spec run by the built-in runtime or `oci_runtime`.
    Oci,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The server to join (`kiln worker`). Default: `http://127.0.0.1:50051`.
    pub server: String,
    /// Actions run at once. Default: the number of CPUs.
    pub slots: usize,
    /// Where the blob cache, staged trees and scratch space live. Default:
    /// `$XDG_CACHE_HOME/kiln/worker` (`~/.cache/kiln/worker`).
    pub data_dir: Option<PathBuf>,
    /// Size limit of the blob cache in bytes. Default: 10 GiB.
    pub cache_bytes: u64,
    /// Staged input trees kept for reuse. Default: 64.
    pub staged_trees: usize,
    /// Extra platform properties offered, as `NAME=VALUE` (e.g. `ISA=x86-32`
    /// on a host that runs 32-bit code). `OSFamily` and `ISA` of the host are
    /// detected. Default: none.
    pub platform: Vec<String>,
    /// Base root filesystems offered as `container-image`, by name: a
    /// directory holding a root filesystem, an OCI image layout directory,
    /// or an OCI / `docker save` tarball (unpacked on first use into the
    /// data directory's `images/`, once). Default: none.
    pub images: BTreeMap<String, PathBuf>,
    /// Let actions that ask for `network=on` use the host's network.
    /// Default: false (they are refused by the scheduler).
    pub network: bool,
    /// The sandbox backend. Default: `userns`.
    pub backend: SandboxBackend,
    /// For the `oci` backend: an OCI runtime binary (`crun`, `runc`) instead
    /// of the built-in one. Default: none.
    pub oci_runtime: Option<PathBuf>,
    /// Empty network namespaces, and as many fresh IPC namespaces, kept
    /// ready (a privileged worker's fast path; 0: none). Default: 8.
    pub netns_pool: usize,
    /// Run every action under Kiln's seccomp filter (docs/security.md).
    /// Default: true.
    pub seccomp: bool,
    /// Groups of system calls the filter allows back, e.g. `["ptrace"]`
    /// for builds that run debuggers or LeakSanitizer. Default: none.
    pub seccomp_allow: Vec<SyscallGroup>,
    /// Memory of one action's processes together, with what they keep in
    /// `/tmp` and `/dev/shm`; 0: no limit. Default: three quarters of the
    /// host's memory divided by `slots`.
    pub memory_limit_bytes: Option<u64>,
    /// Processes and threads of one action at once; 0: no limit.
    /// Default: 4096.
    pub pids_limit: u64,
    /// CPUs one action may use (a quota, e.g. 1.5); 0: no quota. Every
    /// action has an equal CPU share regardless. Default: 0.
    pub cpu_limit: f64,
    /// Size of an action's `/tmp` and `/dev/shm` each (never more than the
    /// memory limit), and the largest file it may write; 0: no limit.
    /// Default: 16 GiB.
    pub scratch_limit_bytes: u64,
    /// Bytes of new data one action may leave: its outputs (files still
    /// the inputs they were do not count), stdout and stderr together.
    /// Beyond it the action ends RESOURCE_EXHAUSTED, naming the path.
    /// Default: 4 GiB.
    pub output_limit_bytes: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:50051".into(),
            slots: std::thread::available_parallelism().map_or(1, |n| n.get()),
            data_dir: None,
            cache_bytes: 10 << 30,
            staged_trees: 64,
            platform: Vec::new(),
            images: BTreeMap::new(),
            network: false,
            backend: SandboxBackend::Userns,
            oci_runtime: None,
            netns_pool: 8,
            seccomp: true,
            seccomp_allow: Vec::new(),
            memory_limit_bytes: None,
            pids_limit: 4096,
            cpu_limit: 0.0,
            scratch_limit_bytes: 16 << 30,
            output_limit_bytes: 4 << 30,
        }
    }
}

impl WorkerConfig {
    /// Each action's resource limits.
    pub fn limits(&self) -> Limits {
        let some = |v: u64| (v > 0).then_some(v);
        let memory = self
            .memory_limit_bytes
            .unwrap_or_else(|| host_memory() / 4 * 3 / self.slots.max(1) as u64);
        Limits {
            memory_bytes: some(memory),
            pids: some(self.pids_limit),
            cpu_millis: some((self.cpu_limit * 1000.0).round().max(0.0) as u64),
            scratch_bytes: some(self.scratch_limit_bytes),
        }
    }

    /// The seccomp policy of `seccomp` and `seccomp_allow`.
    pub fn seccomp_policy(&self) -> SeccompPolicy {
        SeccompPolicy {
            enabled: self.seccomp,
            allow: self.seccomp_allow.clone(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| default_cache_dir().join("worker"))
    }
}

/// The host's memory (`MemTotal`), in bytes; 0 if unknown.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`, else `/var/cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("kiln");
    }
    PathBuf::from("/var/cache/kiln")
}
