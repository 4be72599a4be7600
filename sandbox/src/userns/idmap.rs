//! uid/gid maps of the sandbox's user namespace.
//!
//! Exactly one id is mapped each way: the requested inside uid/gid to the
//! helper's own uid/gid outside. Files staged by the worker therefore appear
//! owned by the sandbox user, and the sandbox holds no other host identity.
//!
//! The sandbox's init writes its own maps, right after `clone3`: a single
//! line mapping the creator's own id is what the kernel lets any process
//! write for itself, so the helper need not wait for the child to exist and
//! the child need not wait for the helper. `setgroups` is denied first (the
//! kernel's condition for a self-written gid map); a privileged helper has
//! already cleared its supplementary groups, so there are none to keep, and
//! without capabilities the command could not change them anyway.

use nix::errno::Errno;

use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdMap {
    pub inside_uid: u32,
    pub inside_gid: u32,
    pub outside_uid: u32,
    pub outside_gid: u32,
}

impl IdMap {
    pub fn uid_map(&self) -> String {
        format!("{} {} 1\n", self.inside_uid, self.outside_uid)
    }

    pub fn gid_map(&self) -> String {
        format!("{} {} 1\n", self.inside_gid, self.outside_gid)
    }

    /// Writes the calling process's own maps; it must be fresh in a user
    /// namespace its (unchanged) euid/egid created.
    pub fn write_self(&self) -> Result<(), (&'static str, Errno)> {
        sys::write_file(c"/proc/self/setgroups", b"deny").map_err(|e| ("setgroups", e))?;
        sys::write_file(c"/proc/self/uid_map", self.uid_map().as_bytes())
            .map_err(|e| ("uid_map", e))?;
        sys::write_file(c"/proc/self/gid_map", self.gid_map().as_bytes())
            .map_err(|e| ("gid_map", e))?;
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
        };
        assert_eq!(m.uid_map(), "1000 65534 1\n");
        assert_eq!(m.gid_map(), "100 65533 1\n");
    }
}
