//! The caller's side: [`Launcher`] (owns the helper process), [`Running`],
//! [`Finished`] and [`KillHandle`].

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::{Result, SandboxError};
use crate::helper::{BACKEND_ENV, CTL_FD_ENV, POOL_ENV, SECCOMP_ENV};
use crate::outcome::Outcome;
use crate::protocol::{self, KilledBy, Received, Reply, WireRequest};
use crate::request::{BackendKind, SandboxRequest, Stdio};
use crate::root::RootDir;
use crate::seccomp::SeccompPolicy;
use crate::sys;

/// The hidden argument the `kiln` binary answers by calling [`helper_main`](crate::helper_main).
pub const HELPER_ARG: &str = "__sandbox-helper";

/// How to start the helper and which backend it runs.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// The executable to re-exec as the helper (default `/proc/self/exe`:
    /// the very binary running, even if it was replaced on disk since).
    pub program: PathBuf,
    /// Its arguments (default `[HELPER_ARG]`). A wrapper such as
    /// `setpriv --reuid=65534 … kiln __sandbox-helper` may be expressed by
    /// making `program` the wrapper.
    pub args: Vec<OsString>,
    /// Empty network namespaces, and as many fresh IPC namespaces, a
    /// privileged helper keeps ready (0: none).
    pub netns_pool: usize,
    pub backend: BackendKind,
    /// For [`BackendKind::Oci`]: run this OCI runtime binary (`crun`, `runc`).
    /// `None`: Kiln's built-in OCI runtime, in the helper.
    pub oci_runtime: Option<PathBuf>,
    /// The system-call filter every sandbox runs under (default: Kiln's
    /// whole filter).
    pub seccomp: SeccompPolicy,
}

impl LauncherConfig {
    /// Re-exec the running binary with [`HELPER_ARG`].
    pub fn current_exe() -> Self {
        LauncherConfig::new("/proc/self/exe", [HELPER_ARG])
    }

    pub fn new<I, S>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        LauncherConfig {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            netns_pool: 4,
            backend: BackendKind::Userns,
            oci_runtime: None,
            seccomp: SeccompPolicy::default(),
        }
    }
}

struct HelperProc {
    child: Child,
    /// `None` only while the launcher is being dropped.
    ctl: Option<Arc<OwnedFd>>,
    /// What it said it cannot enforce.
    hello: protocol::Hello,
}

/// Starts sandboxes through one long-lived, single-threaded helper process.
/// `Send + Sync`: share it (e.g. in an `Arc`) and call [`spawn`](Self::spawn)
/// from any number of threads at once. Must outlive the [`Running`]
/// sandboxes it started (dropping it kills them); [`Finished`] ones stay
/// readable.
pub struct Launcher {
    cfg: LauncherConfig,
    helper: Mutex<HelperProc>,
}

fn start_helper(cfg: &LauncherConfig) -> Result<HelperProc> {
    let (ours, theirs) =
        sys::socketpair_seqpacket().map_err(|e| SandboxError::io("socketpair", e.into()))?;
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&cfg.program);
    cmd.args(&cfg.args)
        .env(CTL_FD_ENV, fd.to_string())
        .env(POOL_ENV, cfg.netns_pool.to_string())
        .env(SECCOMP_ENV, cfg.seccomp.to_env())
        .env(
            BACKEND_ENV,
            match cfg.backend {
                BackendKind::Userns => "userns",
                BackendKind::Oci => "oci",
            },
        )
        .stdin(std::process::Stdio::null());
    // SAFETY: only fcntl, which is async-signal-safe, runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        SandboxError::io(format!("start sandbox helper {}", cfg.program.display()), e)
    })?;
    drop(theirs);
    tracing::debug!(pid = child.id(), program = %cfg.program.display(), "sandbox helper started");
    let hello = loop {
        match protocol::recv::<protocol::Hello>(ours.as_fd(), 0) {
            Ok(Received::Msg(h, _)) => break h,
            Err(Errno::EINTR) => continue,
            Ok(Received::Eof) => {
                return Err(SandboxError::Helper(format!(
                    "{} exited at start (its log says why)",
                    cfg.program.display()
                )));
            }
            Err(e) => return Err(SandboxError::Helper(format!("reading its greeting: {e}"))),
        }
    };
    Ok(HelperProc {
        child,
        ctl: Some(Arc::new(ours)),
        hello,
    })
}

fn open_stdio(s: Stdio, what: &str) -> Result<OwnedFd> {
    match s {
        Stdio::Fd(fd) => Ok(fd),
        Stdio::Null => std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .map(Into::into)
            .map_err(|e| SandboxError::io("open /dev/null", e)),
        Stdio::File(p) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .map(Into::into)
            .map_err(|e| SandboxError::io(format!("open {what} file {}", p.display()), e)),
    }
}

impl Launcher {
    /// Starts the helper now, so the first sandbox does not pay for it.
    pub fn new(cfg: LauncherConfig) -> Result<Launcher> {
        let helper = start_helper(&cfg)?;
        Ok(Launcher {
            cfg,
            helper: Mutex::new(helper),
        })
    }

    /// The helper's pid (for logs and diagnostics).
    pub fn helper_pid(&self) -> u32 {
        self.helper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .child
            .id()
    }

    pub fn config(&self) -> &LauncherConfig {
        &self.cfg
    }

    /// Resource limits (and isolation) this helper cannot apply on this
    /// host, each with the reason; empty when everything applies.
    pub fn limitations(&self) -> Vec<String> {
        let h = self.helper.lock().unwrap_or_else(|p| p.into_inner());
        h.hello.limitations.clone()
    }

    /// Where the sandboxes' cgroups go (empty: none), for start-up logs.
    pub fn cgroups(&self) -> String {
        let h = self.helper.lock().unwrap_or_else(|p| p.into_inner());
        h.hello.cgroups.clone()
    }

    /// The helper's control socket, restarting the helper if it died.
    fn ctl(&self, restart: bool) -> Result<Arc<OwnedFd>> {
        let mut h = self.helper.lock().unwrap_or_else(|p| p.into_inner());
        let dead = match h.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) if restart => Some("stopped answering".to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = dead {
            tracing::warn!(pid = h.child.id(), "sandbox helper {why}: restarting it");
            let _ = h.child.kill();
            let _ = h.child.wait();
            *h = start_helper(&self.cfg)?;
        }
        h.ctl
            .clone()
            .ok_or_else(|| SandboxError::Helper("the launcher is shutting down".into()))
    }

    /// Starts one sandbox and returns once its command is about to run
    /// (namespaces, mounts and `pivot_root` done). Set-up failures (a mount
    /// that failed, with errno) are returned here; nothing is left behind.
    pub fn spawn(&self, req: SandboxRequest) -> Result<Running> {
        let mut r = self.start(req)?;
        r.ready()?;
        Ok(r)
    }

    /// Like [`spawn`](Self::spawn) but returns as soon as the helper has the
    /// request, without waiting for the sandbox to be set up: the caller's
    /// thread sleeps once (in [`Running::wait`]) instead of twice. Set-up
    /// failures then come from `wait`. What a busy worker should use.
    pub fn start(&self, mut req: SandboxRequest) -> Result<Running> {
        req.validate()?;
        let t0 = sys::monotonic_ns();
        let stdout = open_stdio(std::mem::replace(&mut req.stdout, Stdio::Null), "stdout")?;
        let stderr = open_stdio(std::mem::replace(&mut req.stderr, Stdio::Null), "stderr")?;
        let wire = WireRequest {
            backend: self.cfg.backend,
            root: req.root,
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            uid: req.uid,
            gid: req.gid,
            network: req.network,
            subtrees: req.subtrees,
            timeout: req.timeout,
            hostname: req.hostname,
            oci_runtime: self.cfg.oci_runtime.clone(),
            limits: req.limits,
        };
        // Every affected sandbox's outcome says which limits did not apply.
        let limitations = if req.limits == crate::limits::Limits::default() {
            Vec::new()
        } else {
            self.limitations()
        };
        let (mine, theirs) =
            sys::socketpair_seqpacket().map_err(|e| SandboxError::io("socketpair", e.into()))?;
        // For the limits a killed sandbox ran into, which its init could not say.
        let stderr_note = stderr.try_clone().ok();
        let fds = [theirs.as_fd(), stdout.as_fd(), stderr.as_fd()];
        let mut restarted = false;
        loop {
            let ctl = self.ctl(false)?;
            match protocol::send(ctl.as_fd(), &wire, &fds) {
                Ok(()) => break,
                Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) if !restarted => {
                    restarted = true;
                    self.ctl(true)?;
                }
                Err(e) => {
                    return Err(SandboxError::Helper(format!("sending the request: {e}")));
                }
            }
        }
        drop((theirs, stdout, stderr));
        Ok(Running {
            sock: mine,
            held: None,
            shared: Arc::new(Shared::default()),
            t0,
            limitations,
            stderr_note,
        })
    }
}

impl Drop for Launcher {
    /// Closes the helper's control socket: it kills the sandboxes still
    /// running, lets OCI monitors clean up (their containers' state and
    /// cgroups), and exits. Waits up to 6 s for that, then kills it.
    fn drop(&mut self) {
        let h = self.helper.get_mut().unwrap_or_else(|p| p.into_inner());
        h.ctl = None;
        if let Ok(pidfd) = sys::pidfd_open(h.child.id() as libc::pid_t) {
            let mut p = [libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if sys::poll_readable(&mut p, 6000) == Ok(1) {
                let _ = h.child.wait();
                return;
            }
        }
        let _ = h.child.kill();
        let _ = h.child.wait();
    }
}

/// What a [`Running`] shares with its [`KillHandle`]s.
#[derive(Debug, Default)]
struct Shared {
    /// The sandbox's PID 1, once it has reported ready; and whether a kill
    /// was asked for before that (it is then delivered on arrival).
    pidfd: Mutex<(Option<Arc<OwnedFd>>, bool)>,
    cancelled: AtomicBool,
}

impl Shared {
    fn kill(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let mut g = self.pidfd.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        if let Some(fd) = &g.0 {
            // ESRCH: already gone, which is what was asked.
            let _ = sys::pidfd_send_signal(fd.as_fd(), libc::SIGKILL);
        }
    }

    fn arrived(&self, pidfd: OwnedFd) {
        let mut g = self.pidfd.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 {
            let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
        }
        g.0 = Some(Arc::new(pidfd));
    }
}

/// Kills a running sandbox from any thread: SIGKILL through a pidfd to the
/// sandbox's PID 1, which takes every process of it down at once (nested
/// PID namespaces included). A pidfd never signals a recycled pid. A kill
/// before the sandbox finished its set-up is delivered when it does.
#[derive(Clone, Debug)]
pub struct KillHandle {
    shared: Arc<Shared>,
}

impl KillHandle {
    pub fn kill(&self) {
        self.shared.kill()
    }
}

/// What the sandbox's init sent when it was set up.
#[derive(Debug)]
struct ReadyFds {
    root: OwnedFd,
    mntns: OwnedFd,
    kiln_mounts: Vec<PathBuf>,
    warnings: Vec<String>,
}

/// A sandbox whose command is running (or, after [`Launcher::start`], about to).
#[derive(Debug)]
pub struct Running {
    sock: OwnedFd,
    held: Option<ReadyFds>,
    shared: Arc<Shared>,
    t0: u64,
    limitations: Vec<String>,
    stderr_note: Option<OwnedFd>,
}

impl Running {
    /// Blocks until the sandbox is set up (a no-op after [`Launcher::spawn`]).
    pub fn ready(&mut self) -> Result<()> {
        if self.held.is_some() {
            return Ok(());
        }
        loop {
            match protocol::recv::<Reply>(self.sock.as_fd(), 3) {
                Ok(Received::Msg(
                    Reply::Ready {
                        kiln_mounts,
                        warnings,
                    },
                    fds,
                )) => {
                    let [pidfd, root, mntns]: [OwnedFd; 3] =
                        fds.try_into().map_err(|v: Vec<_>| {
                            SandboxError::Helper(format!(
                                "ready message with {} fds instead of 3",
                                v.len()
                            ))
                        })?;
                    self.shared.arrived(pidfd);
                    self.held = Some(ReadyFds {
                        root,
                        mntns,
                        kiln_mounts,
                        warnings,
                    });
                    return Ok(());
                }
                Ok(Received::Msg(Reply::Error(e), _)) => return Err(SandboxError::Setup(e)),
                Ok(Received::Msg(Reply::Finished { .. }, _)) => {
                    return Err(SandboxError::Helper(
                        "the sandbox ended (timeout?) before its set-up completed".into(),
                    ));
                }
                Ok(Received::Eof) => {
                    return Err(SandboxError::Helper(
                        "the helper closed the sandbox's channel during set-up (did it die?)"
                            .into(),
                    ));
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(SandboxError::Helper(format!(
                        "reading the set-up reply: {e}"
                    )));
                }
            }
        }
    }

    /// The host pid of the sandbox's init (PID 1 inside), for logs; `None`
    /// before it is [`ready`](Self::ready).
    pub fn pid(&self) -> Option<u32> {
        let g = self.shared.pidfd.lock().unwrap_or_else(|p| p.into_inner());
        let fd = g.0.as_ref()?;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("Pid:"))
            .and_then(|p| p.trim().parse::<i64>().ok())
            .filter(|p| *p > 0)
            .map(|p| p as u32)
    }

    /// Kills the whole sandbox now; [`wait`](Self::wait) then reports it as cancelled.
    pub fn kill(&self) {
        self.shared.kill()
    }

    /// A handle to [`kill`](Self::kill) from another thread while this one waits.
    pub fn kill_handle(&self) -> KillHandle {
        KillHandle {
            shared: self.shared.clone(),
        }
    }

    /// An fd that becomes readable when the sandbox has something to say
    /// (for callers with an event loop, e.g. tokio's `AsyncFd`).
    pub fn wait_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Blocks until the command has exited and every other process of the
    /// sandbox is dead (or it timed out / was killed). The mount namespace
    /// stays alive in the returned [`Finished`] for collection.
    pub fn wait(mut self) -> Result<Finished> {
        self.ready()?;
        let held = self.held.take().expect("ready");
        loop {
            match protocol::recv::<Reply>(self.sock.as_fd(), 0) {
                Ok(Received::Msg(
                    Reply::Finished {
                        mut outcome,
                        exec_ns,
                        killed,
                    },
                    _,
                )) => {
                    if exec_ns > 0 {
                        outcome.setup = Duration::from_nanos(exec_ns.saturating_sub(self.t0));
                    }
                    if let (Some(_), Some(fd)) = (killed, &self.stderr_note) {
                        for h in &outcome.limits_hit {
                            let line = format!("kiln-sandbox: {h}\n");
                            let _ = sys::write_all(fd.as_fd(), line.as_bytes());
                        }
                    }
                    match killed {
                        Some(KilledBy::Timeout) => outcome.timed_out = true,
                        Some(KilledBy::InitDied)
                            if self.shared.cancelled.load(Ordering::SeqCst) =>
                        {
                            outcome.cancelled = true
                        }
                        _ => {}
                    }
                    let mut warnings = std::mem::take(&mut self.limitations);
                    warnings.extend(held.warnings);
                    warnings.append(&mut outcome.warnings);
                    outcome.warnings = warnings;
                    return Ok(Finished {
                        outcome,
                        ns: Some(HeldNamespace {
                            root: RootDir::new(held.root),
                            _mntns: held.mntns,
                        }),
                        kiln_mounts: held.kiln_mounts,
                        _sock: self.sock,
                    });
                }
                Ok(Received::Msg(Reply::Error(e), _)) => return Err(SandboxError::Setup(e)),
                Ok(Received::Msg(Reply::Ready { .. }, _)) => {
                    return Err(SandboxError::Helper("a second ready message".into()));
                }
                Ok(Received::Eof) => {
                    return Err(SandboxError::Helper(
                        "the sandbox's channel closed without an outcome (did the helper die?)"
                            .into(),
                    ));
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SandboxError::Helper(format!("reading the outcome: {e}"))),
            }
        }
    }
}

/// A sandbox whose processes are all gone but whose filesystem (mount
/// namespace) is kept until [`release`](Self::release) or drop.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    ns: Option<HeldNamespace>,
    kiln_mounts: Vec<PathBuf>,
    _sock: OwnedFd,
}

impl Finished {
    /// The sandbox's `/`, for reading outputs.
    pub fn root(&self) -> &RootDir {
        &self.ns.as_ref().expect("held until release").root
    }

    /// Kiln's own mounts (`dev`, `proc`, `tmp`), relative to the root: treat
    /// them as the empty directories they were staged as.
    pub fn kiln_mounts(&self) -> &[PathBuf] {
        &self.kiln_mounts
    }

    /// Lets the mount namespace go and returns once the kernel has unmounted
    /// everything in it (overlay, binds, tmpfs): the staged directories may
    /// be deleted right after. Tearing a mount namespace down waits for an
    /// RCU grace period (about a millisecond here, more under load); dropping
    /// a `Finished` instead does the same on a background thread.
    pub fn release(mut self) {
        if let Some(ns) = self.ns.take() {
            drop(ns);
        }
    }
}

/// The fds that keep a finished sandbox's mount namespace alive.
#[derive(Debug)]
struct HeldNamespace {
    root: RootDir,
    /// Held only to keep the namespace alive (the root fd alone would keep
    /// the root mount, not what is mounted under it).
    _mntns: OwnedFd,
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(ns) = self.ns.take() {
            release_in_background(ns);
        }
    }
}

/// One thread for the whole process drops held namespaces, so callers never
/// wait for the kernel's grace period.
fn release_in_background(ns: HeldNamespace) {
    static DROPPER: OnceLock<Mutex<Option<mpsc::Sender<HeldNamespace>>>> = OnceLock::new();
    let tx = DROPPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<HeldNamespace>();
        let spawned = std::thread::Builder::new()
            .name("kiln-sandbox-release".into())
            .spawn(move || {
                for ns in rx {
                    drop(ns);
                }
            });
        Mutex::new(spawned.ok().map(|_| tx))
    });
    let guard = tx.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(tx) => {
            if let Err(mpsc::SendError(ns)) = tx.send(ns) {
                drop(ns);
            }
        }
        None => drop(ns),
    }
}

/// What every backend offers: start a request, get a [`Running`] sandbox.
pub trait Backend: Send + Sync {
    fn spawn(&self, req: SandboxRequest) -> Result<Running>;

    /// Starts without waiting for the set-up (see [`Launcher::start`]).
    fn start(&self, req: SandboxRequest) -> Result<Running>;

    /// `start` then `wait`.
    fn run(&self, req: SandboxRequest) -> Result<Finished> {
        self.start(req)?.wait()
    }
}

impl Backend for Launcher {
    fn spawn(&self, req: SandboxRequest) -> Result<Running> {
        Launcher::spawn(self, req)
    }

    fn start(&self, req: SandboxRequest) -> Result<Running> {
        Launcher::start(self, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_cross_threads() {
        // The executor shares one Launcher between its tasks and kills or
        // waits on sandboxes from other threads.
        send_sync::<Launcher>();
        send_sync::<Running>();
        send_sync::<Finished>();
        send_sync::<KillHandle>();
    }
}
