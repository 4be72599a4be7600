//! The helper ("zygote"): a small single-threaded process the [`Launcher`]
//! starts once, by re-executing a binary that calls [`helper_main`]. It
//! receives requests on a unix socket and `clone3`s each sandbox's init
//! straight into its namespaces — cheap, and safe because nothing else runs
//! in this process. It also reaps the inits, enforces timeouts and owns the
//! pools of ready network and IPC namespaces. It keeps the next sandbox's
//! init made ahead (a spare, for uid/gid 0 without network: most requests),
//! so a request usually skips `clone3` and half the set-up.
//!
//! [`Launcher`]: crate::Launcher

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::error::SetupError;
use crate::limits::{Cgroups, Group, Limits, Probes};
use crate::outcome::{ExitStatus, Outcome};
use crate::protocol::{self, KilledBy, Received, Reply, WireRequest};
use crate::request::BackendKind;
use crate::seccomp::{self, SeccompPolicy};
use crate::sys::{self, Forked, Reaped};
use crate::userns::{self, idmap::IdMap, nspool::NsPool};

pub(crate) const CTL_FD_ENV: &str = "KILN_SANDBOX_HELPER_FD";
/// How long the helper waits without a request before refilling its pools.
const REFILL_AFTER_IDLE: Duration = Duration::from_millis(1);
/// How long after starting a sandbox the helper makes the next spare init:
/// past the set-up of the one just started (which the spare's `clone3` would
/// otherwise slow down when both land on one CPU), and in time for a worker
/// that starts sandboxes back to back.
const SPARE_AFTER: Duration = Duration::from_micros(600);
pub(crate) const POOL_ENV: &str = "KILN_SANDBOX_NETNS_POOL";
/// `userns` or `oci`: the backend this helper serves.
pub(crate) const BACKEND_ENV: &str = "KILN_SANDBOX_BACKEND";
/// The seccomp policy ([`SeccompPolicy::to_env`]).
pub(crate) const SECCOMP_ENV: &str = "KILN_SANDBOX_SECCOMP";

/// Runs the helper; never returns. Call it first thing in `main` when the
/// process was started with the hidden argument the [`LauncherConfig`]
/// names (e.g. `kiln __sandbox-helper`), before any thread or async runtime
/// exists. Logging set up before the call (with `tracing`) is used.
///
/// [`LauncherConfig`]: crate::LauncherConfig
pub fn helper_main() -> ! {
    let code = match Helper::from_env().and_then(|h| {
        let privileged = h.privileged;
        let r = h.run();
        crate::oci::remove_state_root(privileged);
        r
    }) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("sandbox helper: {e}");
            1
        }
    };
    std::process::exit(code)
}

pub(crate) struct Action {
    pidfd: OwnedFd,
    pid: libc::pid_t,
    sock: OwnedFd,
    deadline: Option<Instant>,
    timed_out: bool,
    /// An OCI monitor rather than a sandbox's init.
    monitor: bool,
    /// The launcher hung up: the sandbox was killed.
    dropped: bool,
    /// Its cgroup, and the limits it was asked for.
    group: Option<Group>,
    limits: Limits,
}

/// A sandbox init made ahead of its request, waiting on `chan`.
struct Spare {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    chan: OwnedFd,
    /// It said it is prepared.
    ready: bool,
    group: Option<Group>,
}

struct Helper {
    ctl: OwnedFd,
    netns_pool: Option<NsPool>,
    ipc_pool: Option<NsPool>,
    outside_uid: u32,
    outside_gid: u32,
    privileged: bool,
    base: CString,
    /// Where the read-only `/dev` every sandbox binds is, if one was built.
    dev_template: Option<&'static std::ffi::CStr>,
    /// Whether this helper makes spare inits (the userns backend does).
    spares: bool,
    /// The next sandbox's init, made ahead (see [`userns::spare_main`]).
    spare: Option<Spare>,
    /// When the next spare is due.
    spare_at: Option<Instant>,
    last_cap: libc::c_ulong,
    actions: Vec<Action>,
    cgroups: Cgroups,
    /// The limits of the last request: the guess for sandboxes made ahead.
    last_limits: Limits,
    /// A cgroup made ahead for the next sandbox that is not the spare's.
    ready_group: Option<Group>,
    /// The helper's own `RLIMIT_NPROC` (`ulimit -u` of whoever started
    /// Kiln), which no sandbox's process limit may exceed: the kernel does
    /// not apply it to processes of host uid 0.
    nproc_cap: Option<u64>,
}

/// Every sandbox starts from a copy of the helper's mount table, and each
/// mount in it is paid for three times: copied at `clone3`, detached after
/// `pivot_root`, torn down at the end. Mounts no sandbox of the userns
/// backend uses (sysfs with its cgroup tree, devpts, mqueue, hugetlbfs) are
/// dropped once from a namespace of the helper's own: a third of the
/// per-sandbox cost on a host with a cgroup v1 tree. The namespace is a
/// slave of the host's, so roots mounted on the host later still show up
/// here, and nothing done here reaches the host. (The OCI backend keeps the
/// full table: libcontainer needs /sys/fs/cgroup.)
fn trim_mount_namespace() -> Result<(), Errno> {
    // SAFETY: plain syscalls in a single-threaded process.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(Errno::last());
        }
    }
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_SLAVE, None)?;
    for target in [c"/sys", c"/dev/pts", c"/dev/mqueue", c"/dev/hugepages"] {
        // SAFETY: plain syscall; absent mount points are fine.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    unmount_below_proc();
    Ok(())
}

/// Drops every mount stacked below `/proc` in the helper's namespace.
/// Container engines mask `/proc` paths (`/proc/kcore`, a read-only
/// `/proc/sys`, …) by mounting over them; a sandbox's new user namespace
/// would inherit those as locked mounts, and the kernel refuses a fresh
/// `proc` mount while every visible one is partly covered that way. Docker
/// can lift the masks itself (`systempaths=unconfined`), but docker-compose
/// 1.29 cannot ask for that. Sandboxes get their own `/proc` with Kiln's
/// masks, so nothing is exposed by this; on a host it only hides
/// binfmt_misc and the like from the helper.
fn unmount_below_proc() {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with("/proc/"))
        .collect();
    // Deepest first, so a mount is never detached before one below it; a
    // path listed twice (stacked mounts) is unmounted once per entry.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        // mountinfo escapes spaces and such as \ooo; /proc paths have none,
        // and a name that does not convert is just left alone.
        let Ok(path) = CString::new(point) else {
            continue;
        };
        // SAFETY: plain syscall on a NUL-terminated path.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// This process's `RLIMIT_NPROC`, if it is finite.
fn nproc_cap() -> Option<u64> {
    // SAFETY: zeroed rlimit is valid; plain getter.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut r) } != 0 {
        return None;
    }
    (r.rlim_cur != libc::RLIM_INFINITY && r.rlim_cur > 0).then_some(r.rlim_cur)
}

/// Whether this process holds CAP_SETUID and CAP_SETGID in its user namespace.
fn has_setid_caps() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 7) != 0 && caps & (1 << 6) != 0)
}

impl Helper {
    fn from_env() -> Result<Helper, String> {
        let fd: RawFd = std::env::var(CTL_FD_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                format!("{CTL_FD_ENV} is not set: start the helper through a Launcher")
            })?;
        let pool_size: usize = std::env::var(POOL_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        // SAFETY: the launcher passed this fd to us and nobody else owns it.
        let ctl = unsafe { OwnedFd::from_raw_fd(fd) };
        let policy = SeccompPolicy::from_env(&std::env::var(SECCOMP_ENV).unwrap_or_default())?;
        // Compiled once: every init forked from here inherits the programs.
        seccomp::set_programs(seccomp::compile(&policy)?);
        seccomp::set_policy(policy);
        // SAFETY: plain fcntl; the fd must not leak into sandboxes.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };

        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let privileged = has_setid_caps();
        if privileged {
            // Our supplementary groups would otherwise follow into every
            // sandbox (as "nogroup", but still honoured by the host kernel).
            // SAFETY: an empty group list.
            if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
                return Err(format!("setgroups([]): {}", Errno::last()));
            }
        }
        // Sandboxed commands inherit dispositions through fork and execve:
        // start them all from the defaults, but keep ignoring SIGPIPE here
        // (a write to a dead sandbox's pipe must not kill the helper), which
        // the command resets.
        sys::reset_signals();
        // SAFETY: ignoring a signal is always valid.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let userns_backend = std::env::var(BACKEND_ENV).as_deref() == Ok("userns");
        // Before the mount namespace is trimmed: /sys goes.
        let cgroups = if userns_backend {
            Cgroups::detect(privileged)
        } else {
            Cgroups::for_oci(privileged)
        };
        let hello = protocol::Hello {
            limitations: cgroups.limitations.clone(),
            cgroups: cgroups.describe.clone(),
        };
        protocol::send(ctl.as_fd(), &hello, &[]).map_err(|e| format!("greet the launcher: {e}"))?;
        let mut dev_template = None;
        if privileged && userns_backend {
            match trim_mount_namespace() {
                Ok(()) => match userns::mounts::build_dev_template() {
                    Ok(()) => dev_template = Some(userns::mounts::DEV_TEMPLATE_AT),
                    Err(e) => tracing::warn!(
                        "sandbox helper: no /dev template ({e}): each sandbox builds its own"
                    ),
                },
                Err(e) => {
                    tracing::warn!("sandbox helper: could not trim its mount namespace: {e}")
                }
            }
        }
        if std::env::var(BACKEND_ENV).as_deref() == Ok("oci") {
            crate::oci::make_state_root(privileged)
                .map_err(|e| format!("OCI state directory: {e}"))?;
        }
        // Looked up once here; every sandbox forked from us inherits it.
        let _ = userns::mounts::proc_entry_exists("sys");
        let (netns_pool, ipc_pool) = if pool_size > 0 {
            (NsPool::network(pool_size), NsPool::ipc(pool_size))
        } else {
            (None, None)
        };
        let base = ["/tmp", "/mnt", "/"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_dir())
            .expect("/ is a directory");
        tracing::debug!(
            uid,
            gid,
            privileged,
            netns_pool = netns_pool.is_some(),
            ipc_pool = ipc_pool.is_some(),
            "sandbox helper ready"
        );
        Ok(Helper {
            ctl,
            netns_pool,
            ipc_pool,
            outside_uid: uid,
            outside_gid: gid,
            privileged,
            base: CString::new(base).expect("no NUL"),
            dev_template,
            spares: std::env::var(BACKEND_ENV).as_deref() == Ok("userns"),
            spare: None,
            spare_at: Some(Instant::now()),
            last_cap: sys::last_cap(),
            actions: Vec::new(),
            cgroups,
            last_limits: Limits::default(),
            ready_group: None,
            nproc_cap: nproc_cap(),
        })
    }

    /// A cgroup for the next sandbox (`None` without cgroups), with `limits`.
    fn group_for(&mut self, limits: &Limits) -> Result<Option<Group>, SetupError> {
        if !self.cgroups.available() {
            return Ok(None);
        }
        let made = match self.ready_group.take() {
            Some(mut g) => g.set(limits).map(|()| g),
            None => self.cgroups.make(limits),
        };
        made.map(Some)
            .map_err(|e| SetupError::new(format!("sandbox cgroup: {e}"), Errno::EIO))
    }

    /// What the helper does when nothing else is due: remove finished
    /// sandboxes' cgroups, make the next one. Returns whether it did anything.
    fn tidy_cgroups(&mut self) -> bool {
        if self.cgroups.has_dead() {
            self.cgroups.remove_dead();
            return true;
        }
        if self.cgroups.available() && self.ready_group.is_none() {
            match self.cgroups.make(&self.last_limits) {
                Ok(g) => self.ready_group = Some(g),
                Err(e) => tracing::warn!("sandbox helper: {e}"),
            }
            return true;
        }
        false
    }

    fn run(mut self) -> Result<(), String> {
        loop {
            let now = Instant::now();
            let next_deadline = self.actions.iter().filter_map(|a| a.deadline).min();
            // The earliest of what may wake us without a request (`None`: nothing).
            let mut timeout: Option<Duration> = None;
            let mut wake_within = |d: Duration| timeout = Some(timeout.map_or(d, |t| t.min(d)));
            if let Some(d) = next_deadline {
                wake_within(d.saturating_duration_since(now) + Duration::from_millis(1));
            }
            // Refill the namespace pools only once nothing has happened for
            // a moment: a sandbox just started is still setting up, often on
            // this very CPU, and must not wait for spare namespaces.
            let refill = self.pools().any(|p| p.below_target())
                || self.cgroups.has_dead()
                || (self.cgroups.available() && self.ready_group.is_none());
            if refill {
                wake_within(REFILL_AFTER_IDLE);
            }
            let spare_due = self
                .spare_at
                .filter(|_| self.spares && self.spare.is_none());
            if let Some(at) = spare_due {
                wake_within(at.saturating_duration_since(now));
            }
            let n_actions = self.actions.len();
            let mut pfds: Vec<libc::pollfd> = std::iter::once(self.ctl.as_raw_fd())
                .chain(self.actions.iter().map(|a| a.pidfd.as_raw_fd()))
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                // The launcher's end of each sandbox's socket: a hang-up
                // means it dropped the sandbox, which must not outlive that.
                .chain(self.actions.iter().map(|a| libc::pollfd {
                    fd: if a.dropped || a.monitor {
                        -1
                    } else {
                        a.sock.as_raw_fd()
                    },
                    events: 0,
                    revents: 0,
                }))
                .chain(self.spare.iter().flat_map(|s| {
                    [s.chan.as_raw_fd(), s.pidfd.as_raw_fd()].map(|fd| libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    })
                }))
                .collect();
            let n = sys::ppoll_readable(&mut pfds, timeout).map_err(|e| format!("poll: {e}"))?;
            if let [.., chan, pidfd] = pfds[1 + 2 * n_actions..] {
                self.spare_news(chan.revents, pidfd.revents);
            }
            if n == 0 && spare_due.is_some_and(|at| at <= Instant::now()) {
                self.make_spare();
                continue;
            }
            let deadline_due = next_deadline.is_some_and(|d| d <= Instant::now());
            if n == 0 && refill && !deadline_due {
                if self.tidy_cgroups() {
                    continue;
                }
                for p in [self.netns_pool.as_mut(), self.ipc_pool.as_mut()]
                    .into_iter()
                    .flatten()
                    .filter(|p| p.below_target())
                {
                    p.refill_one();
                }
                continue;
            }
            for p in pfds[1 + n_actions..1 + 2 * n_actions]
                .iter()
                .filter(|p| p.revents != 0)
            {
                if let Some(a) = self.actions.iter_mut().find(|a| a.sock.as_raw_fd() == p.fd) {
                    a.dropped = true;
                    let _ = sys::pidfd_send_signal(a.pidfd.as_fd(), libc::SIGKILL);
                }
            }
            // Exits first: an init that ended on time must not be reported as timed out.
            let exited: Vec<RawFd> = pfds[1..1 + n_actions]
                .iter()
                .filter(|p| p.revents != 0)
                .map(|p| p.fd)
                .collect();
            for fd in exited {
                self.reap(fd);
            }
            let now = Instant::now();
            for a in &mut self.actions {
                if a.deadline.is_some_and(|d| d <= now) {
                    a.deadline = None;
                    a.timed_out = true;
                    tracing::debug!(pid = a.pid, "sandbox timed out: killing it");
                    let _ = sys::pidfd_send_signal(a.pidfd.as_fd(), libc::SIGKILL);
                }
            }
            if pfds[0].revents != 0 {
                match protocol::recv::<WireRequest>(self.ctl.as_fd(), 3) {
                    Ok(Received::Msg(req, fds)) => self.launch(req, fds),
                    Ok(Received::Eof) => break,
                    Err(e) => {
                        tracing::error!("sandbox helper: bad request: {e}");
                        if pfds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                            break;
                        }
                    }
                }
            }
        }
        // The launcher is gone. Sandboxes still running are killed
        // (finished ones live on in the fds the launcher held). OCI monitors
        // are not: they see their launcher's end close, kill their
        // container and clean up its state and cgroups, which takes a moment.
        self.drop_spare();
        for a in self.actions.iter().filter(|a| !a.monitor) {
            let _ = sys::pidfd_send_signal(a.pidfd.as_fd(), libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.actions.is_empty() {
            let mut pfds: Vec<libc::pollfd> = self
                .actions
                .iter()
                .map(|a| libc::pollfd {
                    fd: a.pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                for a in &self.actions {
                    let _ = sys::pidfd_send_signal(a.pidfd.as_fd(), libc::SIGKILL);
                }
                break;
            }
            let _ = sys::poll_readable(&mut pfds, left.as_millis() as i32 + 1);
            for p in pfds.iter().filter(|p| p.revents != 0) {
                if let Some(i) = self
                    .actions
                    .iter()
                    .position(|a| a.pidfd.as_raw_fd() == p.fd)
                {
                    let a = self.actions.swap_remove(i);
                    let _ = sys::waitid_pidfd(a.pidfd.as_fd());
                }
            }
        }
        Ok(())
    }

    fn pools(&self) -> impl Iterator<Item = &NsPool> {
        self.netns_pool.iter().chain(self.ipc_pool.iter())
    }

    /// Moves the helper into the pooled namespaces the next sandbox joins.
    fn enter_pooled(
        &self,
        netns: Option<&OwnedFd>,
        ipcns: Option<&OwnedFd>,
    ) -> Result<(), SetupError> {
        if let (Some(ns), Some(pool)) = (netns, &self.netns_pool) {
            pool.enter(ns)
                .map_err(|e| SetupError::new("join pooled network namespace", e))?;
        }
        if let (Some(ns), Some(pool)) = (ipcns, &self.ipc_pool)
            && let Err(e) = pool.enter(ns)
        {
            self.leave_pooled(netns.is_some(), false);
            return Err(SetupError::new("join pooled IPC namespace", e));
        }
        Ok(())
    }

    fn leave_pooled(&self, netns: bool, ipcns: bool) {
        if let (true, Some(pool)) = (netns, &self.netns_pool) {
            pool.leave();
        }
        if let (true, Some(pool)) = (ipcns, &self.ipc_pool) {
            pool.leave();
        }
    }

    fn reap(&mut self, pidfd: RawFd) {
        let Some(i) = self
            .actions
            .iter()
            .position(|a| a.pidfd.as_raw_fd() == pidfd)
        else {
            return;
        };
        let mut a = self.actions.swap_remove(i);
        let reaped = match sys::waitid_pidfd(a.pidfd.as_fd()) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(pid = a.pid, "waitid on sandbox init: {e}");
                Reaped::Signaled(libc::SIGKILL)
            }
        };
        // Every process of the sandbox is gone with its init (the kernel
        // kills and waits for the PID namespace before the init is reaped).
        let limits_hit = a
            .group
            .as_ref()
            .map(|g| g.probes.hits(&a.limits))
            .unwrap_or_default();
        if let Some(g) = a.group.take() {
            self.cgroups.retire(g);
        }
        let (status, killed) = match reaped {
            Reaped::Exited(0) if !a.timed_out => return,
            _ if a.timed_out => (ExitStatus::Signaled(libc::SIGKILL), KilledBy::Timeout),
            Reaped::Exited(c) => (ExitStatus::Exited(c), KilledBy::InitDied),
            Reaped::Signaled(s) => (ExitStatus::Signaled(s), KilledBy::InitDied),
        };
        let outcome = Outcome {
            status,
            timed_out: killed == KilledBy::Timeout,
            cancelled: false,
            wall: Duration::ZERO,
            user: Duration::ZERO,
            sys: Duration::ZERO,
            peak_rss_bytes: 0,
            setup: Duration::ZERO,
            warnings: Vec::new(),
            limits_hit,
        };
        let _ = protocol::send(
            a.sock.as_fd(),
            &Reply::Finished {
                outcome,
                exec_ns: 0,
                killed: Some(killed),
            },
            &[],
        );
    }

    fn launch(&mut self, req: WireRequest, mut fds: Vec<OwnedFd>) {
        if fds.len() != 3 {
            tracing::error!(
                "sandbox request with {} fds instead of 3: dropped",
                fds.len()
            );
            return;
        }
        let stderr = fds.pop().expect("3 fds");
        let stdout = fds.pop().expect("3 fds");
        let sock = fds.pop().expect("3 fds");
        match self.start(req, &sock, stdout, stderr) {
            Ok(a) => self.actions.push(a),
            Err(e) => {
                tracing::debug!("sandbox set-up failed in the helper: {e}");
                let _ = protocol::send(sock.as_fd(), &Reply::Error(e), &[]);
            }
        }
    }

    fn start(
        &mut self,
        mut req: WireRequest,
        sock: &OwnedFd,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> Result<Action, SetupError> {
        if let Some(cap) = self.nproc_cap {
            req.limits.pids = Some(req.limits.pids.map_or(cap, |p| p.min(cap)));
        }
        if req.backend == BackendKind::Oci {
            return crate::oci::start_in_helper(self_ctx(self), req, sock, stdout, stderr);
        }
        self.spare_at = Some(Instant::now() + SPARE_AFTER);
        self.last_limits = req.limits;
        if req.uid == 0
            && req.gid == 0
            && !req.network
            && let Some(a) = self.hand_to_spare(&req, sock, &stdout, &stderr)
        {
            return Ok(a);
        }
        let ids = self.ids(req.uid, req.gid);
        let base = self.base.clone();
        let (dev_template, last_cap) = (self.dev_template, self.last_cap);
        let (timeout, limits) = (req.timeout, req.limits);
        let group = self.group_for(&limits)?;
        let probes = group.as_ref().map(|g| g.probes.raw());
        let (placed_r, placed_w) = match &group {
            Some(_) => {
                let (r, w) = sys::pipe().map_err(|e| SetupError::new("pipe", e))?;
                (Some(r), Some(w))
            }
            None => (None, None),
        };
        let nproc_rlimit = self.cgroups.nproc_fallback;
        let cloned = self.clone_init(req.network, move |fresh_netns| {
            let action = sock.try_clone().unwrap_or_else(|_| sys::exit_now(3));
            userns::init_main(userns::InitArgs {
                req,
                action,
                stdout,
                stderr,
                ids,
                base,
                dev_template,
                fresh_netns,
                last_cap,
                cg: userns::InitCgroup {
                    // SAFETY: our copies of the helper's probe fds (forked).
                    probes: unsafe { Probes::adopt(probes) },
                    placed: placed_r,
                    nproc_rlimit,
                },
            })
        });
        let (pid, pidfd) = match cloned {
            Ok(x) => x,
            Err(e) => {
                if let Some(g) = group {
                    self.cgroups.retire(g);
                }
                return Err(e);
            }
        };
        if let (Some(g), Some(w)) = (&group, placed_w) {
            match g.place(pid) {
                Ok(()) => {
                    let _ = sys::write_all(w.as_fd(), b"P");
                }
                // The init hears the pipe close without a byte and fails
                // its set-up: no sandbox runs outside its limits.
                Err(e) => tracing::error!(pid, "moving a sandbox into its cgroup: {e}"),
            }
        }
        Ok(Action {
            pidfd,
            pid,
            sock: sock
                .try_clone()
                .map_err(|_| SetupError::new("dup action socket", Errno::EMFILE))?,
            deadline: timeout.map(|t| Instant::now() + t),
            timed_out: false,
            monitor: false,
            dropped: false,
            group,
            limits,
        })
    }

    fn ids(&self, inside_uid: u32, inside_gid: u32) -> IdMap {
        IdMap {
            inside_uid,
            inside_gid,
            outside_uid: self.outside_uid,
            outside_gid: self.outside_gid,
        }
    }

    /// `clone3`s an init into fresh namespaces (pooled network and IPC ones
    /// joined) to run `child` (which never returns), told whether its
    /// network namespace is brand-new. Returns its pid and pidfd.
    fn clone_init(
        &mut self,
        network: bool,
        child: impl FnOnce(bool),
    ) -> Result<(libc::pid_t, OwnedFd), SetupError> {
        let mut flags = userns::NS_FLAGS;
        let netns = if network {
            None
        } else {
            take_pooled(&mut self.netns_pool, libc::CLONE_NEWNET, &mut flags)?
        };
        let ipcns = take_pooled(&mut self.ipc_pool, libc::CLONE_NEWIPC, &mut flags)?;
        let fresh_netns = flags & libc::CLONE_NEWNET as u64 != 0;
        self.enter_pooled(netns.as_ref(), ipcns.as_ref())?;
        // SAFETY: the helper is single-threaded.
        let forked = unsafe { sys::clone3_fork(flags) };
        // The child stays in the pooled namespaces; we go back. They are
        // the sandbox's alone from here (`netns` and `ipcns` are dropped):
        // never handed to another sandbox, which could otherwise find what
        // this one left (a TIME_WAIT socket, loopback counters, SysV IPC).
        if matches!(forked, Ok(Forked::Parent { .. }) | Err(_)) {
            self.leave_pooled(netns.is_some(), ipcns.is_some());
        }
        match forked {
            Err(e) => Err(SetupError::new("clone3 into new namespaces", e)),
            Ok(Forked::Child) => {
                child(fresh_netns);
                // The inits never return.
                sys::exit_now(3)
            }
            Ok(Forked::Parent { pid, pidfd }) => Ok((pid, pidfd)),
        }
    }

    /// Makes the next sandbox's init ahead of its request.
    fn make_spare(&mut self) {
        self.spare_at = None;
        let (mine, theirs) = match sys::socketpair_seqpacket() {
            Ok(p) => p,
            Err(e) => return self.no_more_spares(&e.to_string()),
        };
        let ids = self.ids(0, 0);
        let base = self.base.clone();
        let (dev_template, last_cap) = (self.dev_template, self.last_cap);
        let limits = self.last_limits;
        let group = match self.group_for(&limits) {
            Ok(g) => g,
            Err(e) => return self.no_more_spares(&e.to_string()),
        };
        let probes = group.as_ref().map(|g| g.probes.raw());
        let nproc_rlimit = self.cgroups.nproc_fallback;
        let cloned = self.clone_init(false, move |fresh_netns| {
            userns::spare_main(userns::SpareArgs {
                chan: theirs,
                ids,
                base,
                dev_template,
                fresh_netns,
                last_cap,
                cg: userns::InitCgroup {
                    // SAFETY: our copies of the helper's probe fds (forked).
                    probes: unsafe { Probes::adopt(probes) },
                    // It waits for its request, which comes after this.
                    placed: None,
                    nproc_rlimit,
                },
            })
        });
        match cloned {
            Ok((pid, pidfd)) => {
                let placed = group.as_ref().map_or(Ok(()), |g| g.place(pid));
                self.spare = Some(Spare {
                    pid,
                    pidfd,
                    chan: mine,
                    ready: false,
                    group,
                });
                if let Err(e) = placed {
                    self.drop_spare();
                    self.no_more_spares(&format!("moving it into its cgroup: {e}"));
                }
            }
            Err(e) => {
                if let Some(g) = group {
                    self.cgroups.retire(g);
                }
                self.no_more_spares(&e.to_string())
            }
        }
    }

    fn no_more_spares(&mut self, why: &str) {
        tracing::warn!("sandbox helper: no spare inits ({why}): every sandbox starts from clone3");
        self.spares = false;
    }

    /// What the spare's channel and pidfd said in the last poll.
    fn spare_news(&mut self, chan: libc::c_short, pidfd: libc::c_short) {
        let Some(s) = self.spare.as_mut() else {
            return;
        };
        let mut gone = pidfd != 0;
        if !gone && chan & libc::POLLIN != 0 {
            let mut b = [0u8; 1];
            match sys::read(s.chan.as_fd(), &mut b) {
                Ok(1) => s.ready = true,
                _ => gone = true,
            }
        } else if chan & (libc::POLLHUP | libc::POLLERR) != 0 {
            gone = true;
        }
        if gone {
            // It could not prepare (it says nothing and exits): once is
            // enough to stop trying.
            self.drop_spare();
            self.no_more_spares("a spare init exited before its request");
        }
    }

    fn drop_spare(&mut self) {
        if let Some(s) = self.spare.take() {
            let _ = sys::pidfd_send_signal(s.pidfd.as_fd(), libc::SIGKILL);
            let _ = sys::waitid_pidfd(s.pidfd.as_fd());
            if let Some(g) = s.group {
                self.cgroups.retire(g);
            }
        }
    }

    /// Gives `req` to the spare init if it is prepared: the sandbox then
    /// skips its `clone3`, ids and `/proc`.
    fn hand_to_spare(
        &mut self,
        req: &WireRequest,
        sock: &OwnedFd,
        stdout: &OwnedFd,
        stderr: &OwnedFd,
    ) -> Option<Action> {
        let mut s = self.spare.take_if(|s| s.ready)?;
        if let Some(g) = s.group.as_mut()
            && let Err(e) = g.set(&req.limits)
        {
            tracing::warn!("sandbox helper: {e}");
            self.spare = Some(s);
            self.drop_spare();
            return None;
        }
        let sent = protocol::send(
            s.chan.as_fd(),
            req,
            &[sock.as_fd(), stdout.as_fd(), stderr.as_fd()],
        );
        let dup = sock.try_clone();
        match (sent, dup) {
            (Ok(()), Ok(sock)) => {
                tracing::debug!(pid = s.pid, "sandbox starts from the spare init");
                Some(Action {
                    pidfd: s.pidfd,
                    pid: s.pid,
                    sock,
                    deadline: req.timeout.map(|t| Instant::now() + t),
                    timed_out: false,
                    monitor: false,
                    dropped: false,
                    group: s.group,
                    limits: req.limits,
                })
            }
            _ => {
                self.spare = Some(s);
                self.drop_spare();
                None
            }
        }
    }
}

/// A namespace from `pool` for the next sandbox, or, without a pool, the
/// `clone_flag` added to `flags` so the sandbox gets a new one of its own.
fn take_pooled(
    pool: &mut Option<NsPool>,
    clone_flag: libc::c_int,
    flags: &mut u64,
) -> Result<Option<OwnedFd>, SetupError> {
    match pool {
        Some(pool) => pool
            .take()
            .map(Some)
            .map_err(|e| SetupError::new(format!("create {} namespace", pool.name()), e)),
        None => {
            *flags |= clone_flag as u64;
            Ok(None)
        }
    }
}

/// What the OCI backend needs from the helper.
pub(crate) struct HelperCtx {
    pub outside_uid: u32,
    pub outside_gid: u32,
    pub privileged: bool,
    pub last_cap: libc::c_ulong,
}

fn self_ctx(h: &Helper) -> HelperCtx {
    HelperCtx {
        outside_uid: h.outside_uid,
        outside_gid: h.outside_gid,
        privileged: h.privileged,
        last_cap: h.last_cap,
    }
}

/// An action the OCI backend started, for the helper to supervise.
pub(crate) fn oci_action(
    pidfd: OwnedFd,
    pid: libc::pid_t,
    sock: &OwnedFd,
    timeout: Option<Duration>,
) -> Result<Action, SetupError> {
    Ok(Action {
        pidfd,
        pid,
        sock: sock
            .try_clone()
            .map_err(|_| SetupError::new("dup action socket", Errno::EMFILE))?,
        deadline: timeout.map(|t| Instant::now() + t),
        timed_out: false,
        monitor: true,
        dropped: false,
        group: None,
        limits: Limits::default(),
    })
}
