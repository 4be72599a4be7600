//! Giving up every privilege before `execve`.
//!
//! Order matters: securebits and the bounding set need CAP_SETPCAP, so they go
//! before the final `capset`; `no_new_privs` last, so nothing exec'd (setuid
//! files, file capabilities) can ever gain anything back.

use crate::error::SetupError;
use crate::sys;

const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;

/// Drops every capability set (bounding, ambient, inheritable, permitted,
/// effective) and sets `no_new_privs`. Fork-safe: no allocation unless it
/// fails.
pub(crate) fn drop_all(last_cap: libc::c_ulong) -> Result<(), SetupError> {
    // uid 0 inside must not regain capabilities on execve.
    sys::prctl(
        libc::PR_SET_SECUREBITS,
        SECBIT_NOROOT
            | SECBIT_NOROOT_LOCKED
            | SECBIT_KEEP_CAPS_LOCKED
            | SECBIT_NO_CAP_AMBIENT_RAISE
            | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
    )
    .map_err(|e| SetupError::new("prctl(PR_SET_SECUREBITS)", e))?;
    sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )
    .map_err(|e| SetupError::new("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", e))?;
    for cap in 0..=last_cap {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            // A kernel older than cap_last_cap said: nothing left to drop.
            Ok(_) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(SetupError::new("prctl(PR_CAPBSET_DROP)", e)),
        }
    }
    sys::capset_clear().map_err(|e| SetupError::new("capset(none)", e))?;
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
        .map_err(|e| SetupError::new("prctl(PR_SET_NO_NEW_PRIVS)", e))?;
    Ok(())
}
