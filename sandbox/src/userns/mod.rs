//! The user-namespace chroot backend: the sandbox's init process.
//!
//! The helper `clone3`s this process straight into new user, mount, PID,
//! IPC, UTS, cgroup and (unless the network is on) network namespaces and
//! lets it go. From then on this process — PID 1 of the sandbox — does
//! everything itself: writes its uid/gid maps, mounts the root and Kiln's `/dev`,
//! `/proc`, `/tmp`, `pivot_root`s, reports `Ready` (with fds to its root, its
//! mount namespace and itself) to the launcher, runs the command as PID 2,
//! and reports `Finished` after killing everything else.
//!
//! Usually the helper has made it ahead, as a spare ([`spare_main`]): the
//! uid/gid maps and `/proc` with its masks (the half of the set-up that does
//! not depend on the request) are then done before the request arrives.
//!
//! It exits 0 once it has reported (set-up error or outcome); any other end
//! tells the helper the launcher still needs to hear something.

pub(crate) mod caps;
pub(crate) mod idmap;
pub(crate) mod mounts;
pub(crate) mod nspool;

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::error::SetupError;
use crate::init::{self, Exec};
use crate::limits::{LimitHit, Probes};
use crate::protocol::{self, Received, Reply, WireRequest};
use crate::sys;
use mounts::ProcSetup;

/// Namespaces every sandbox gets new; it also gets a new IPC namespace and,
/// when the network is off, a new network namespace: joined from the
/// helper's pools, or `CLONE_NEWIPC`/`CLONE_NEWNET` added here without one.
///
/// The cgroup namespace is the init's own doing ([`enter_cgroup_namespace`]),
/// once the helper has moved it into its cgroup: its root is then that
/// cgroup, and the sandbox sees `/` in `/proc/self/cgroup`.
pub(crate) const NS_FLAGS: u64 =
    (libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS) as u64;

pub(crate) struct InitArgs {
    pub req: WireRequest,
    pub action: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Our uid/gid maps, which we write ourselves.
    pub ids: idmap::IdMap,
    /// Mount point for the new root before `pivot_root`.
    pub base: CString,
    /// The helper's ready-made `/dev`, if it has one.
    pub dev_template: Option<&'static std::ffi::CStr>,
    /// We own a brand-new network namespace and must bring `lo` up ourselves.
    pub fresh_netns: bool,
    pub last_cap: libc::c_ulong,
    pub cg: InitCgroup,
}

/// What an init knows of its cgroup.
#[derive(Default)]
pub(crate) struct InitCgroup {
    /// The cgroup's counters (empty without one).
    pub probes: Probes,
    /// Becomes readable once the helper has moved us into the cgroup
    /// (`None`: already done, or no cgroup).
    pub placed: Option<OwnedFd>,
    /// No pids cgroup: `RLIMIT_NPROC` counts the sandbox's processes.
    pub nproc_rlimit: bool,
}

impl InitCgroup {
    fn fds(&self) -> Vec<RawFd> {
        let mut v = self.probes.raw_fds();
        v.extend(self.placed.as_ref().map(|f| f.as_raw_fd()));
        v
    }
}

/// Waits until the helper has put us in our cgroup, then makes it the root
/// of a cgroup namespace of our own.
fn enter_cgroup_namespace(placed: Option<OwnedFd>) -> Result<(), SetupError> {
    if let Some(p) = placed {
        let mut b = [0u8; 1];
        match sys::read(p.as_fd(), &mut b) {
            Ok(1) => {}
            _ => {
                return Err(SetupError::new(
                    "join the sandbox's cgroup (the helper could not move it)",
                    nix::errno::Errno::EIO,
                ));
            }
        }
    }
    sys::unshare(libc::CLONE_NEWCGROUP)
        .map_err(|e| SetupError::new("unshare the cgroup namespace", e))
}

/// Entry of the sandbox's init, in the child of the helper's `clone3`.
pub(crate) fn init_main(a: InitArgs) -> ! {
    // Only what this sandbox needs stays open: the helper's other sockets,
    // pidfds and pooled namespaces must not leak into (or be kept alive by) it.
    let mut keep = vec![
        a.action.as_raw_fd(),
        a.stdout.as_raw_fd(),
        a.stderr.as_raw_fd(),
    ];
    keep.extend(a.cg.fds());
    keep_only(&keep);
    let prologue = a
        .ids
        .write_self()
        .map_err(|(file, e)| SetupError::new(format!("write /proc/self/{file}"), e));
    run_init(a, prologue, ProcSetup::Fresh)
}

/// What a spare init needs until its request comes.
pub(crate) struct SpareArgs {
    /// Where the request comes from; one byte goes back when prepared.
    pub chan: OwnedFd,
    pub ids: idmap::IdMap,
    pub base: CString,
    pub dev_template: Option<&'static std::ffi::CStr>,
    pub fresh_netns: bool,
    pub last_cap: libc::c_ulong,
    pub cg: InitCgroup,
}

/// Entry of a spare init: a sandbox's init made ahead of its request. It
/// does everything that does not depend on the request (ids, `/proc` with
/// its masks, `lo`), says so with one byte, then waits for the request and
/// its fds and goes on as [`init_main`]. The helper hands it only requests
/// for uid/gid 0 without network; it exits if the helper hangs up first.
pub(crate) fn spare_main(s: SpareArgs) -> ! {
    let mut keep = vec![s.chan.as_raw_fd()];
    keep.extend(s.cg.fds());
    keep_only(&keep);
    let prepared = s
        .ids
        .write_self()
        .map_err(|(file, e)| SetupError::new(format!("write /proc/self/{file}"), e))
        .and_then(|()| private_root())
        .and_then(|()| mounts::prepare_proc())
        .and_then(|()| {
            if s.fresh_netns {
                sys::loopback_up().map_err(|e| SetupError::new("bring up lo", e))
            } else {
                Ok(())
            }
        });
    if prepared.is_err() {
        // Not usable: the helper sees the hang-up and makes sandboxes fresh.
        sys::exit_now(0);
    }
    if sys::write_all(s.chan.as_fd(), b"R").is_err() {
        sys::exit_now(0);
    }
    let (req, fds) = match protocol::recv::<WireRequest>(s.chan.as_fd(), 3) {
        Ok(Received::Msg(req, fds)) if fds.len() == 3 => (req, fds),
        _ => sys::exit_now(0),
    };
    drop(s.chan);
    let [action, stdout, stderr]: [OwnedFd; 3] = match fds.try_into() {
        Ok(f) => f,
        Err(_) => sys::exit_now(0),
    };
    run_init(
        InitArgs {
            req,
            action,
            stdout,
            stderr,
            ids: s.ids,
            base: s.base,
            dev_template: s.dev_template,
            fresh_netns: false,
            last_cap: s.last_cap,
            cg: s.cg,
        },
        Ok(()),
        ProcSetup::Prepared,
    )
}

/// Closes every fd but `fds` and 0..2, and ties us to the helper: if it
/// goes, its timeouts go with it, so must we.
fn keep_only(fds: &[RawFd]) {
    let mut keep: Vec<RawFd> = fds.iter().copied().chain([0, 1, 2]).collect();
    keep.dedup();
    keep.sort_unstable();
    let _ = sys::close_all_except(&keep);
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
}

/// Nothing we mount may propagate back to the host.
fn private_root() -> Result<(), SetupError> {
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(|e| SetupError::new("make / private", e))
}

/// The rest of an init's life once its request is known: set up, report
/// `Ready`, run the command, report `Finished`.
fn run_init(a: InitArgs, prologue: Result<(), SetupError>, proc: ProcSetup) -> ! {
    let action = a.action;
    let report = |r: &Reply, fds: &[std::os::fd::BorrowedFd<'_>]| {
        if protocol::send(action.as_fd(), r, fds).is_err() {
            // The launcher is gone: nobody to run for.
            sys::exit_now(2);
        }
    };
    let InitCgroup {
        probes,
        placed,
        nproc_rlimit,
    } = a.cg;
    let ready = match prologue
        .and_then(|()| set_up(&a.req, a.base, a.dev_template, a.fresh_netns, proc))
        .and_then(|r| enter_cgroup_namespace(placed).map(|()| r))
    {
        Ok(r) => r,
        Err(e) => {
            report(&Reply::Error(e), &[]);
            sys::exit_now(0);
        }
    };
    report(
        &Reply::Ready {
            kiln_mounts: mounts::KILN_MOUNTS.iter().map(PathBuf::from).collect(),
            warnings: Vec::new(),
        },
        &[ready.pidfd.as_fd(), ready.root.as_fd(), ready.mntns.as_fd()],
    );
    drop(ready);

    let exec = Exec::new(&a.req.argv, &a.req.env, a.stdout, a.stderr, a.last_cap)
        .with_cwd(&PathBuf::from("/").join(&a.req.cwd))
        .with_limits(a.req.limits, nproc_rlimit);
    let tmpfs: Vec<(&str, Option<OwnedFd>)> = ["/tmp", "/dev/shm"]
        .into_iter()
        .map(|p| {
            (
                p,
                sys::open(&sys::cpath(p.as_ref()), libc::O_PATH | libc::O_DIRECTORY, 0).ok(),
            )
        })
        .collect();
    match init::run_as_init(&exec, Some(mounts::detach_old_root)) {
        Ok((mut outcome, exec_ns)) => {
            let mut found = probes.hits(&a.req.limits);
            found.extend(full_tmpfs(&tmpfs));
            exec.report_limits(&mut outcome, found);
            report(
                &Reply::Finished {
                    outcome,
                    exec_ns,
                    killed: None,
                },
                &[],
            )
        }
        Err(e) => report(&Reply::Error(e), &[]),
    }
    sys::exit_now(0)
}

/// Kiln's tmpfs mounts that are full.
pub(crate) fn full_tmpfs(mounts: &[(&str, Option<OwnedFd>)]) -> Vec<LimitHit> {
    mounts
        .iter()
        .filter_map(|(path, fd)| {
            let (free, total) = sys::fstatfs_free(fd.as_ref()?.as_fd()).ok()?;
            (total > 0 && free < 4096).then(|| LimitHit::TmpfsFull {
                path: path.to_string(),
                size_bytes: total,
            })
        })
        .collect()
}

struct Ready {
    pidfd: OwnedFd,
    root: OwnedFd,
    mntns: OwnedFd,
}

fn set_up(
    req: &WireRequest,
    base: CString,
    dev_template: Option<&'static std::ffi::CStr>,
    fresh_netns: bool,
    proc: ProcSetup,
) -> Result<Ready, SetupError> {
    if proc == ProcSetup::Fresh {
        private_root()?;
    }
    let ops = mounts::plan(
        &req.root,
        &req.cwd,
        &req.subtrees,
        dev_template,
        proc,
        mounts::tmpfs_size(&req.limits),
    );
    let mut live = mounts::Live::new(base);
    mounts::apply(&ops, &mut live)?;
    let root = live.root_fd().expect("root mounted");
    mounts::pivot(root)?;
    drop(live);

    sys::sethostname(&req.hostname).map_err(|e| SetupError::new("sethostname", e))?;
    if fresh_netns {
        sys::loopback_up().map_err(|e| SetupError::new("bring up lo", e))?;
    }
    // A session of our own: no controlling terminal, so /dev/tty leads nowhere.
    // SAFETY: plain syscall.
    unsafe { libc::setsid() };
    let root = sys::open(c"/", libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| SetupError::new("open /", e))?;
    let mntns = sys::open(c"/proc/self/ns/mnt", libc::O_RDONLY, 0)
        .map_err(|e| SetupError::new("open /proc/self/ns/mnt", e))?;
    // SAFETY: plain syscall.
    let pidfd = sys::pidfd_open(unsafe { libc::getpid() })
        .map_err(|e| SetupError::new("pidfd_open(self)", e))?;
    Ok(Ready { pidfd, root, mntns })
}
