//! Namespaces made ahead of time, in the helper's idle moments.
//!
//! Creating a network namespace is the costliest step of a sandbox (~0.8 ms
//! here), and an IPC namespace brings a mqueue mount of its own. A
//! privileged helper keeps a few of each ready and a sandbox joins one
//! (`setns` before its user namespace exists, so the helper — owner of the
//! pool — still may). Such a namespace stays owned by the host user
//! namespace, so the action cannot reconfigure it.
//!
//! Neither kind is ever handed out twice: a network namespace keeps what an
//! action left in it (TIME_WAIT sockets, loopback counters, neighbour
//! entries) past its last process, and SysV IPC objects outlive theirs. The
//! helper drops the pool's fd after the `clone3`, which leaves the
//! namespace to the sandbox alone; the pool is refilled in idle moments.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

use crate::sys;

pub(crate) struct NsPool {
    kind: libc::c_int,
    /// `/proc/thread-self/ns/…` of this kind.
    proc_path: &'static CStr,
    host: OwnedFd,
    free: Vec<OwnedFd>,
    target: usize,
    broken: bool,
}

impl NsPool {
    /// A pool of network namespaces with `lo` up, or `None` when this
    /// process may not create them (unprivileged helper: each sandbox then
    /// makes a fresh one inside its own user namespace).
    pub fn network(target: usize) -> Option<NsPool> {
        NsPool::new(libc::CLONE_NEWNET, c"/proc/thread-self/ns/net", target)
    }

    /// A pool of fresh IPC namespaces, or `None` as for [`network`](Self::network).
    pub fn ipc(target: usize) -> Option<NsPool> {
        NsPool::new(libc::CLONE_NEWIPC, c"/proc/thread-self/ns/ipc", target)
    }

    fn new(kind: libc::c_int, proc_path: &'static CStr, target: usize) -> Option<NsPool> {
        let host = sys::open(proc_path, libc::O_RDONLY, 0).ok()?;
        let mut pool = NsPool {
            kind,
            proc_path,
            host,
            free: Vec::new(),
            target,
            broken: false,
        };
        match pool.create() {
            Ok(fd) => {
                pool.free.push(fd);
                Some(pool)
            }
            Err(e) => {
                tracing::debug!(
                    "no namespace pool ({e}): {} namespace made per sandbox",
                    pool.name()
                );
                None
            }
        }
    }

    /// What this pool holds, for messages.
    pub fn name(&self) -> &'static str {
        if self.kind == libc::CLONE_NEWNET {
            "a network"
        } else {
            "an IPC"
        }
    }

    fn create(&self) -> Result<OwnedFd, Errno> {
        sys::unshare(self.kind)?;
        let made = sys::open(self.proc_path, libc::O_RDONLY, 0).and_then(|fd| {
            if self.kind == libc::CLONE_NEWNET {
                sys::loopback_up()?;
            }
            Ok(fd)
        });
        // Back to the host namespace whatever happened: the helper must not
        // stay in a half-made one.
        self.leave();
        made
    }

    /// A namespace for one sandbox: from the pool, or made now if it is empty.
    pub fn take(&mut self) -> Result<OwnedFd, Errno> {
        match self.free.pop() {
            Some(fd) => Ok(fd),
            None => self.create(),
        }
    }

    pub fn below_target(&self) -> bool {
        !self.broken && self.free.len() < self.target
    }

    /// Makes one more namespace. A failure stops refilling for good (it is
    /// logged once); sandboxes then create theirs when they start.
    pub fn refill_one(&mut self) {
        match self.create() {
            Ok(fd) => self.free.push(fd),
            Err(e) => {
                tracing::warn!("could not make {} namespace for the pool: {e}", self.name());
                self.broken = true;
            }
        }
    }

    /// Moves the calling process into `ns` (for the next clone). Pair with [`leave`](Self::leave).
    pub fn enter(&self, ns: &OwnedFd) -> Result<(), Errno> {
        sys::setns(ns.as_fd(), self.kind)
    }

    /// Back to the host namespace of this kind.
    pub fn leave(&self) {
        sys::setns(self.host.as_fd(), self.kind).expect("return to the host namespace");
    }
}
