//! The wire between a [`Launcher`](crate::Launcher) and its helper, and between
//! a sandbox's init and the launcher: one JSON document per SEQPACKET message,
//! file descriptors attached with SCM_RIGHTS.
//!
//! - launcher → helper (control socket): [`WireRequest`], fds
//!   `[action socket, stdout, stderr]` (+ a memfd holding the JSON when it is
//!   too large for one datagram).
//! - sandbox init → launcher (action socket): [`Reply::Ready`] with fds
//!   `[init pidfd, root dir, mount namespace]`, then [`Reply::Finished`].
//! - helper → launcher (action socket): [`Reply::Error`] when set-up failed,
//!   [`Reply::Finished`] when the helper killed the sandbox (timeout) or its
//!   init died without reporting.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::errno::Errno;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::SetupError;
use crate::limits::Limits;
use crate::outcome::Outcome;
use crate::request::{BackendKind, Root, Subtree};
use crate::sys;

/// Larger messages travel in a memfd: a datagram must fit the socket buffer.
const INLINE_MAX: usize = 48 * 1024;
pub(crate) const RECV_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireRequest {
    pub backend: BackendKind,
    pub root: Root,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub network: bool,
    pub subtrees: Vec<Subtree>,
    pub timeout: Option<Duration>,
    pub hostname: String,
    /// OCI runtime binary when the OCI backend runs an external runtime.
    pub oci_runtime: Option<PathBuf>,
    pub limits: Limits,
}

/// The helper's first message on its control socket: what it can enforce.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// Limits or isolation no sandbox of this helper gets, and why.
    pub limitations: Vec<String>,
    /// Where sandboxes' cgroups go (empty: none).
    pub cgroups: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum KilledBy {
    /// The helper killed the sandbox when its timeout expired.
    Timeout,
    /// The sandbox's init died without reporting (killed by the caller, or crashed).
    InitDied,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Reply {
    Ready {
        kiln_mounts: Vec<PathBuf>,
        warnings: Vec<String>,
    },
    Finished {
        outcome: Outcome,
        /// CLOCK_MONOTONIC just before `execve`; 0 if it never got there.
        exec_ns: u64,
        killed: Option<KilledBy>,
    },
    Error(SetupError),
}

pub(crate) fn send<T: Serialize>(
    sock: BorrowedFd<'_>,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), Errno> {
    let mut json = serde_json::to_vec(msg).map_err(|_| Errno::EINVAL)?;
    let mut raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    if json.len() <= INLINE_MAX {
        json.insert(0, b'J');
        return sys::send_with_fds(sock, &json, &raw);
    }
    let memfd = memfd_with(&json)?;
    raw.push(memfd.as_raw_fd());
    sys::send_with_fds(sock, b"M", &raw)
}

fn memfd_with(data: &[u8]) -> Result<OwnedFd, Errno> {
    // SAFETY: valid name string.
    let fd = unsafe { libc::memfd_create(c"kiln-request".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: new fd we own.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(data).map_err(|_| Errno::EIO)?;
    f.rewind().map_err(|_| Errno::EIO)?;
    Ok(f.into())
}

/// What `recv` got: a message and its fds, or the end of the stream.
pub(crate) enum Received<T> {
    Msg(T, Vec<OwnedFd>),
    Eof,
}

pub(crate) fn recv<T: DeserializeOwned>(
    sock: BorrowedFd<'_>,
    max_fds: usize,
) -> Result<Received<T>, Errno> {
    let mut buf = Vec::with_capacity(RECV_BUF);
    let Some(mut fds) = sys::recv_with_fds(sock, &mut buf, max_fds + 1)? else {
        return Ok(Received::Eof);
    };
    let msg = match buf.first() {
        Some(b'J') => serde_json::from_slice(&buf[1..]).map_err(|_| Errno::EBADMSG)?,
        Some(b'M') => {
            let memfd = fds.pop().ok_or(Errno::EBADMSG)?;
            let mut data = Vec::new();
            std::fs::File::from(memfd)
                .read_to_end(&mut data)
                .map_err(|_| Errno::EIO)?;
            serde_json::from_slice(&data).map_err(|_| Errno::EBADMSG)?
        }
        _ => return Err(Errno::EBADMSG),
    };
    Ok(Received::Msg(msg, fds))
}
