//! Empty network namespaces made ahead of time.
//!
//! Creating a network namespace is the costliest step of a sandbox (~0.8 ms
//! here). A privileged helper keeps a few ready, each with only `lo` up, and
//! a sandbox joins one (`setns` before its user namespace exists, so the
//! helper — owner of the pool — still may). The namespace stays owned by the
//! host user namespace, so the action cannot reconfigure it (no address,
//! route or sysctl of it survives into the next action); it is handed out
//! again only after every process of its previous sandbox has been reaped.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

use crate::sys;

pub(crate) struct NetnsPool {
    host: OwnedFd,
    free: Vec<OwnedFd>,
    target: usize,
    broken: bool,
}

impl NetnsPool {
    /// A pool, or `None` when this process may not create network
    /// namespaces of its own (unprivileged helper: each sandbox then makes a
    /// fresh one inside its own user namespace).
    pub fn new(target: usize) -> Option<NetnsPool> {
        let host = sys::open(c"/proc/thread-self/ns/net", libc::O_RDONLY, 0).ok()?;
        let mut pool = NetnsPool {
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
                tracing::debug!("no network namespace pool ({e}): fresh namespace per sandbox");
                None
            }
        }
    }

    fn create(&self) -> Result<OwnedFd, Errno> {
        sys::unshare(libc::CLONE_NEWNET)?;
        let made = sys::open(c"/proc/thread-self/ns/net", libc::O_RDONLY, 0)
            .and_then(|fd| sys::loopback_up().map(|()| fd));
        // Back to the host namespace whatever happened: the helper must not
        // stay in a half-made one.
        sys::setns(self.host.as_fd(), libc::CLONE_NEWNET).expect("return to the host netns");
        made
    }

    /// A namespace for one sandbox: from the pool, or made now if it is empty.
    pub fn take(&mut self) -> Result<OwnedFd, Errno> {
        match self.free.pop() {
            Some(fd) => Ok(fd),
            None => self.create(),
        }
    }

    /// Returns a namespace whose sandbox has no process left.
    pub fn give_back(&mut self, fd: OwnedFd) {
        if self.free.len() < self.target * 2 {
            self.free.push(fd);
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
                tracing::warn!("could not refill the network namespace pool: {e}");
                self.broken = true;
            }
        }
    }

    /// Moves the calling process into `ns` (for the next clone). Pair with [`leave`](Self::leave).
    pub fn enter(&self, ns: &OwnedFd) -> Result<(), Errno> {
        sys::setns(ns.as_fd(), libc::CLONE_NEWNET)
    }

    /// Back to the host network namespace.
    pub fn leave(&self) {
        sys::setns(self.host.as_fd(), libc::CLONE_NEWNET).expect("return to the host netns");
    }
}
