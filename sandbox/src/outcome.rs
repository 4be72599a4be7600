//! What came of running a command.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::LimitHit;

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell's convention: the code, or 128 + signal.
    pub fn code(&self) -> i32 {
        match *self {
            ExitStatus::Exited(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    pub fn success(&self) -> bool {
        *self == ExitStatus::Exited(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => {
                let name = nix::sys::signal::Signal::try_from(s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by signal {s} ({name})")
            }
        }
    }
}

/// The result of one sandboxed run, for REAPI's `ExecutedActionMetadata` and metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: ExitStatus,
    /// The timeout expired and the sandbox was killed. `status` is then `Signaled(9)`.
    pub timed_out: bool,
    /// The caller killed the sandbox ([`Running::kill`](crate::Running::kill)).
    pub cancelled: bool,
    /// From the command's `execve` to its exit.
    pub wall: Duration,
    /// CPU time of the command and the descendants it waited for.
    pub user: Duration,
    pub sys: Duration,
    /// Peak resident set size of the command (or its largest waited-for
    /// descendant), from `wait4`'s rusage.
    pub peak_rss_bytes: u64,
    /// From the launcher's request to the command's `execve`. Zero when the
    /// command never got that far.
    pub setup: Duration,
    /// Limits or isolation the backend could not apply on this host.
    pub warnings: Vec<String>,
    /// Resource limits the sandbox ran into (the likely reason it failed).
    #[serde(default)]
    pub limits_hit: Vec<LimitHit>,
}
