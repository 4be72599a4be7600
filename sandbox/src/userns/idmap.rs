//! uid/gid maps of the sandbox's user namespace.
//!
//! Exactly one id is mapped each way: the requested inside uid/gid to the
//! helper's own uid/gid outside. Files staged by the worker therefore appear
//! owned by the sandbox user, and the sandbox holds no other host identity.
//! The helper (the sandbox's parent, still in the host user namespace) writes
//! the maps: a privileged helper may then leave `setgroups` allowed (it has
//! cleared its own supplementary groups), an unprivileged one must deny it
//! first, as the kernel requires for an unprivileged gid map.

use nix::errno::Errno;

use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdMap {
    pub inside_uid: u32,
    pub inside_gid: u32,
    pub outside_uid: u32,
    pub outside_gid: u32,
    /// `false` for an unprivileged helper: `/proc/<pid>/setgroups` gets `deny`.
    pub allow_setgroups: bool,
}

impl IdMap {
    pub fn uid_map(&self) -> String {
        format!("{} {} 1\n", self.inside_uid, self.outside_uid)
    }

    pub fn gid_map(&self) -> String {
        format!("{} {} 1\n", self.inside_gid, self.outside_gid)
    }

    /// Writes the maps of process `pid`, which must be in a fresh user
    /// namespace whose parent is ours. Returns which file failed.
    pub fn write_for(&self, pid: libc::pid_t) -> Result<(), (&'static str, Errno)> {
        let path = |f: &str| std::ffi::CString::new(format!("/proc/{pid}/{f}")).expect("no NUL");
        if !self.allow_setgroups {
            sys::write_file(&path("setgroups"), b"deny").map_err(|e| ("setgroups", e))?;
        }
        sys::write_file(&path("uid_map"), self.uid_map().as_bytes()).map_err(|e| ("uid_map", e))?;
        sys::write_file(&path("gid_map"), self.gid_map().as_bytes()).map_err(|e| ("gid_map", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_requested_ids_to_the_helper() {
        let m = IdMap {
            inside_uid: 1000,
            inside_gid: 100,
            outside_uid: 65534,
            outside_gid: 65533,
            allow_setgroups: false,
        };
        assert_eq!(m.uid_map(), "1000 65534 1\n");
        assert_eq!(m.gid_map(), "100 65533 1\n");
    }
}
