//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything that can go wrong while asking for, setting up or talking to a
/// sandbox. A command that *runs* and fails is not an error: it is an
/// [`Outcome`](crate::Outcome) with a non-zero status.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The request itself is wrong (empty argv, a working directory escaping
    /// the root, a zero timeout, …). Nothing was started.
    #[error("invalid sandbox request: {0}")]
    InvalidRequest(String),

    /// The root (or one of its overlay layers) is missing or unusable.
    #[error("sandbox root {path}: {reason}")]
    BadRoot { path: PathBuf, reason: String },

    /// An I/O operation in the calling process failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// Setting the sandbox up failed inside the helper or the sandbox's init,
    /// before the command was executed. `step` says which operation (e.g.
    /// `mount tmpfs on /dev`), `errno` why. Nothing is left mounted or running.
    #[error("sandbox set-up failed: {0}")]
    Setup(SetupError),

    /// The helper process misbehaved or died.
    #[error("sandbox helper: {0}")]
    Helper(String),

    /// The OCI backend could not express or run the request.
    #[error("oci backend: {0}")]
    Oci(String),
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        SandboxError::InvalidRequest(msg.into())
    }
}

/// A failure inside the helper or the sandbox before `execve`, reported back
/// precisely over the launcher socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupError {
    /// What was being done, with the path involved.
    pub step: String,
    /// The raw errno (0 when the failure is not a syscall's).
    pub errno: i32,
}

impl SetupError {
    pub(crate) fn new(step: impl Into<String>, errno: nix::errno::Errno) -> Self {
        SetupError {
            step: step.into(),
            errno: errno as i32,
        }
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.errno == 0 {
            write!(f, "{}", self.step)
        } else {
            let e = nix::errno::Errno::from_raw(self.errno);
            write!(f, "{}: {} ({:?})", self.step, e.desc(), e)
        }
    }
}

pub type Result<T, E = SandboxError> = std::result::Result<T, E>;
