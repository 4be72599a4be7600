//! Run one command hermetically with a directory as its filesystem root.
//! Knows nothing of gRPC; blocking API, no async runtime needed.
//!
//! # Shape
//!
//! - A [`Launcher`] starts one single-threaded **helper** process (the
//!   "zygote") by re-executing a binary that calls [`helper_main`] when it
//!   sees [`HELPER_ARG`] — `kiln __sandbox-helper`, or the
//!   `kiln-sandbox-helper` binary of this crate in tests. The caller (a
//!   multi-threaded tokio worker) never forks itself into a sandbox.
//! - [`Launcher::spawn`] sends a [`SandboxRequest`] to the helper, which
//!   `clone3`s the sandbox's init straight into new user, mount, PID, IPC,
//!   UTS, cgroup and network namespaces. The init mounts the root (a
//!   directory, or an overlay of read-only lowers and a writable upper), a
//!   minimal `/dev`, a fresh `/proc` and a tmpfs `/tmp`, applies read-only
//!   subtrees, `pivot_root`s, and answers `Ready`: `spawn` returns a
//!   [`Running`] ([`Launcher::start`] returns at once instead, and set-up
//!   errors then come from `wait`: one wake-up fewer for a busy worker).
//!   The command runs as PID 2 with no capabilities,
//!   `no_new_privs`, exactly the given environment, stdin `/dev/null` and
//!   stdout/stderr into the caller's files.
//! - [`Running::wait`] blocks until the command exited and the init killed
//!   and reaped every other process; it returns a [`Finished`] holding the
//!   [`Outcome`] (status, timed out / cancelled, wall/user/sys time, peak RSS,
//!   set-up time) and the sandbox's mount namespace, still alive, so outputs
//!   are read through [`Finished::root`] (`openat2` confined to the root).
//!   [`Finished::release`] (or drop) lets it go: the kernel unmounts it all.
//! - [`Running::kill`] / [`KillHandle`] kill the whole sandbox from any
//!   thread (SIGKILL to its PID 1 via a pidfd). Timeouts are enforced by the
//!   helper the same way. Both outcomes still allow collection.
//! - Dropping a [`Finished`] releases the namespace on a background thread;
//!   [`Finished::release`] waits until everything is unmounted.
//!
//! # Backends
//!
//! [`LauncherConfig::backend`] picks one; [`Launcher`] implements
//! [`Backend`] either way.
//! - [`BackendKind::Userns`] (default): Kiln's own user-namespace chroot,
//!   the fast path. Directory and overlay roots, any uid/gid, pooled network
//!   namespaces with a privileged helper.
//! - [`BackendKind::Oci`]: the request as an OCI runtime spec (oci-spec),
//!   run in-process by youki's `libcontainer` in a child of the helper, with
//!   Kiln's init as the container's PID 1 so outcomes and semantics are the
//!   same. Directory roots and uid/gid 0 only; what the host could not apply
//!   (no cgroup for an unprivileged helper on cgroup v1)
//!   is listed in [`Outcome::warnings`].
//!
//! # Isolation
//!
//! New user, mount, PID, IPC, UTS, cgroup and network namespaces; the root
//! bind-mounted (or overlay-mounted) `nosuid,nodev` and made `/` with
//! `pivot_root`; `/dev` with null, zero, full, random, urandom, tty, shm and
//! the fd links; fresh `/proc` with runc's masked and read-only paths;
//! tmpfs `/tmp`; hostname `kiln`; exactly one uid and gid mapped (the
//! requested ones inside, the helper's outside); `max_user_namespaces` 0
//! inside, every capability set cleared, `no_new_privs`; the command runs as
//! PID 2 under Kiln's init, which kills and reaps everything else when it
//! ends. Paths from the staged root are always resolved inside it
//! (`openat2(RESOLVE_IN_ROOT)`), before and after `pivot_root`.
//!
//! ```no_run
//! use kiln_sandbox::*;
//! let launcher = Launcher::new(LauncherConfig::current_exe())?;
//! let mut req = SandboxRequest::new(Root::Dir("/srv/root".into()), vec!["/bin/sh".into(), "-c".into(), "echo hi > out".into()]);
//! req.env = vec![("PATH".into(), "/bin".into())];
//! req.stdout = Stdio::File("/tmp/stdout".into());
//! let finished = launcher.start(req)?.wait()?;
//! assert!(finished.outcome.status.success());
//! let out = std::io::read_to_string(finished.root().open("out".as_ref())?)?;
//! finished.release();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod helper;
mod init;
mod launcher;
mod limits;
mod oci;
mod outcome;
mod protocol;
mod request;
mod root;
mod seccomp;
mod sys;
mod userns;

pub use error::{Result, SandboxError, SetupError};
pub use helper::helper_main;
pub use launcher::{Backend, Finished, HELPER_ARG, KillHandle, Launcher, LauncherConfig, Running};
pub use limits::{LimitHit, Limits, human_bytes};
pub use outcome::{ExitStatus, Outcome};
pub use request::{BackendKind, Root, SandboxRequest, Stdio, Subtree, normalize_relative};
pub use root::RootDir;
pub use seccomp::{SeccompPolicy, SyscallGroup};
