//! The sandbox's PID 1: runs the command as its child, and when that ends
//! kills and reaps every other process of the action before reporting.
//!
//! The command is PID 2, not PID 1, so it keeps ordinary signal semantics (a
//! PID 1 ignores signals it has no handler for, even `kill -9 $$` from
//! inside). Shared by the backends: whatever set the namespaces up, this is
//! what runs last.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;

use crate::error::SetupError;
use crate::limits::{LimitHit, Limits};
use crate::outcome::{ExitStatus, Outcome};
use crate::sys;
use crate::userns::caps;

/// Everything the command's process needs, prepared before `fork` so the
/// child only makes syscalls.
pub(crate) struct Exec {
    /// Where to try `execve`, in order (`argv[0]`, or its `PATH` candidates).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    not_found_msg: Vec<u8>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    last_cap: libc::c_ulong,
    /// Working directory to enter just before `execve` (None: inherited).
    cwd: Option<CString>,
    limits: Limits,
    /// `RLIMIT_NPROC` stands in for a pids cgroup.
    nproc_rlimit: bool,
}

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl Exec {
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        stdout: OwnedFd,
        stderr: OwnedFd,
        last_cap: libc::c_ulong,
    ) -> Exec {
        let c = |s: &str| CString::new(s).expect("request was checked for NUL bytes");
        let argv0 = &argv[0];
        let candidates = if argv0.contains('/') {
            vec![c(argv0)]
        } else {
            let path = env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
            path.split(':')
                .map(|d| if d.is_empty() { "." } else { d })
                .map(|d| c(&format!("{}/{argv0}", d.trim_end_matches('/'))))
                .collect()
        };
        let argv: Vec<CString> = argv.iter().map(|a| c(a)).collect();
        let envp: Vec<CString> = env.iter().map(|(k, v)| c(&format!("{k}={v}"))).collect();
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        Exec {
            candidates,
            not_found_msg: format!("kiln-sandbox: {argv0}: not found\n").into_bytes(),
            argv,
            envp,
            argv_ptrs,
            envp_ptrs,
            stdout,
            stderr,
            last_cap,
            cwd: None,
            limits: Limits::default(),
            nproc_rlimit: false,
        }
    }

    /// The limits the command's process sets on itself (`RLIMIT_FSIZE`,
    /// and `RLIMIT_NPROC` when no cgroup counts processes).
    pub fn with_limits(mut self, limits: Limits, nproc_rlimit: bool) -> Exec {
        self.limits = limits;
        self.nproc_rlimit = nproc_rlimit;
        self
    }

    /// Adds what the command ran into to `outcome` (`found`: the cgroup's
    /// and the tmpfs' findings), and says so on its stderr, where the
    /// user looks first.
    pub fn report_limits(&self, outcome: &mut Outcome, mut found: Vec<LimitHit>) {
        if let Some(limit_bytes) = self.limits.scratch_bytes
            && matches!(
                outcome.status,
                ExitStatus::Signaled(libc::SIGXFSZ) | ExitStatus::Exited(153)
            )
        {
            found.push(LimitHit::FileSize { limit_bytes });
        }
        for h in &found {
            let _ = sys::write_all(
                self.stderr.as_fd(),
                format!("kiln-sandbox: {h}\n").as_bytes(),
            );
        }
        outcome.limits_hit.extend(found);
    }

    pub fn with_cwd(mut self, cwd: &std::path::Path) -> Exec {
        self.cwd = Some(sys::cpath(cwd));
        self
    }
}

/// What the command's process tells its init through the status pipe.
const TAG_EXEC: u8 = b'T';
const TAG_ERROR: u8 = b'E';

/// Runs `exec` as PID 2 and supervises it; returns the outcome, the
/// CLOCK_MONOTONIC of its `execve` (0 if it never got there), or the set-up
/// error that kept it from running.
///
/// `before_exec` is the last set-up step (detaching the host's tree): the
/// command's process runs it first, while it still holds the namespace's
/// capabilities, so nothing of the command's runs before it is done.
pub(crate) fn run_as_init(
    exec: &Exec,
    before_exec: Option<fn() -> Result<(), SetupError>>,
) -> Result<(Outcome, u64), SetupError> {
    let (r, w) = sys::pipe().map_err(|e| SetupError::new("pipe", e))?;
    // Spawned, not forked: this init is a copy of a large binary, and a
    // fork would copy its page tables only for execve to throw them away.
    // SAFETY: the sandbox's init is single-threaded, and the command's
    // process leaves only by execve or _exit.
    let pid = unsafe { sys::vfork_spawn(&mut || command_child(exec, &w, before_exec)) }
        .map_err(|e| SetupError::new("spawn the command", e))?;
    drop(w);
    let (status, ru) = sys::wait4(pid).map_err(|e| SetupError::new("wait4", e))?;
    let end = sys::monotonic_ns();
    kill_the_rest();

    let mut buf = [0u8; 512];
    let n = sys::read(r.as_fd(), &mut buf).unwrap_or(0);
    let mut exec_ns = 0;
    if n >= 9 && buf[0] == TAG_EXEC {
        exec_ns = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
    } else if n >= 5 && buf[0] == TAG_ERROR {
        let errno = i32::from_le_bytes(buf[1..5].try_into().expect("4 bytes"));
        return Err(SetupError {
            step: String::from_utf8_lossy(&buf[5..n]).into_owned(),
            errno,
        });
    }
    let st = if libc::WIFEXITED(status) {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    } else {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    };
    let outcome = Outcome {
        status: st,
        timed_out: false,
        cancelled: false,
        wall: if exec_ns > 0 {
            Duration::from_nanos(end.saturating_sub(exec_ns))
        } else {
            Duration::ZERO
        },
        user: sys::timeval(ru.ru_utime),
        sys: sys::timeval(ru.ru_stime),
        peak_rss_bytes: ru.ru_maxrss as u64 * 1024,
        setup: Duration::ZERO,
        warnings: Vec::new(),
        limits_hit: Vec::new(),
    };
    Ok((outcome, exec_ns))
}

/// Kills every process left in the PID namespace (daemons, orphans,
/// grandchildren in nested namespaces) and reaps them all.
pub(crate) fn kill_the_rest() {
    // SAFETY: plain syscalls. As PID 1, kill(-1) reaches every other process
    // in the namespace and never this one.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        while libc::waitpid(-1, std::ptr::null_mut(), 0) > 0 || Errno::last() == Errno::EINTR {}
    }
}

fn report_error(w: &OwnedFd, e: &SetupError) -> ! {
    let mut msg = vec![TAG_ERROR];
    msg.extend_from_slice(&e.errno.to_le_bytes());
    msg.extend_from_slice(e.step.as_bytes());
    msg.truncate(500);
    let _ = sys::write_all(w.as_fd(), &msg);
    sys::exit_now(125)
}

/// Moves `fd` to exactly `target` without close-on-exec.
fn place_fd(fd: RawFd, target: RawFd) -> Result<(), Errno> {
    // SAFETY: plain fd syscalls.
    unsafe {
        if libc::dup2(fd, target) < 0 {
            return Err(Errno::last());
        }
    }
    Ok(())
}

fn command_child(
    exec: &Exec,
    w: &OwnedFd,
    before_exec: Option<fn() -> Result<(), SetupError>>,
) -> ! {
    if let Some(step) = before_exec
        && let Err(e) = step()
    {
        report_error(w, &e);
    }
    // Lift stdout/stderr (and the status pipe) clear of 0..2 before dup2,
    // whatever numbers they arrived with.
    let high = |fd: RawFd| {
        // SAFETY: plain fd syscall.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if n < 0 {
            report_error(w, &SetupError::new("dup stdout/stderr", Errno::last()));
        }
        n
    };
    let out = high(exec.stdout.as_raw_fd());
    let err = high(exec.stderr.as_raw_fd());
    let null = match sys::open(c"/dev/null", libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(e) => report_error(w, &SetupError::new("open /dev/null for stdin", e)),
    };
    for (fd, target, what) in [
        (null.as_raw_fd(), 0, "stdin"),
        (out, 1, "stdout"),
        (err, 2, "stderr"),
    ] {
        if let Err(e) = place_fd(fd, target) {
            report_error(w, &SetupError::new(format!("dup2 {what}"), e));
        }
    }
    // Nothing but 0, 1, 2 survives execve.
    if let Err(e) = sys::cloexec_from(3) {
        report_error(w, &SetupError::new("close_range", e));
    }
    // The helper reset every disposition at its start but SIGPIPE, which
    // the Rust runtime ignores; the command gets the default back.
    sys::reset_signal_mask_and(libc::SIGPIPE);
    // SAFETY: plain syscalls.
    unsafe {
        libc::umask(0o022);
        libc::setpgid(0, 0);
    }
    if let Some(b) = exec.limits.scratch_bytes
        && let Err(e) = sys::setrlimit(libc::RLIMIT_FSIZE, b)
    {
        report_error(w, &SetupError::new("setrlimit(RLIMIT_FSIZE)", e));
    }
    // Counted per user namespace (Linux 5.14): this sandbox's processes,
    // Kiln's init among them.
    if let (true, Some(n)) = (exec.nproc_rlimit, exec.limits.pids)
        && let Err(e) = sys::setrlimit(libc::RLIMIT_NPROC, n + 1)
    {
        report_error(w, &SetupError::new("setrlimit(RLIMIT_NPROC)", e));
    }
    if let Err(e) = caps::drop_all(exec.last_cap) {
        report_error(w, &e);
    }
    if let Some(cwd) = &exec.cwd
        && let Err(e) = sys::chdir(cwd)
    {
        report_error(
            w,
            &SetupError::new(
                format!("chdir to working directory {}", cwd.to_string_lossy()),
                e,
            ),
        );
    }
    // Last: from here on the command's own rules apply (the stamp and
    // execve below are allowed).
    if let Err(e) = crate::seccomp::install(crate::seccomp::programs()) {
        report_error(w, &SetupError::new("install the seccomp filter", e));
    }
    let mut stamp = [0u8; 9];
    stamp[0] = TAG_EXEC;
    stamp[1..].copy_from_slice(&sys::monotonic_ns().to_le_bytes());
    let _ = sys::write_all(w.as_fd(), &stamp);

    let mut denied = false;
    let mut last = Errno::ENOENT;
    for path in &exec.candidates {
        // SAFETY: NUL-terminated arrays of valid C strings kept alive by `exec`.
        unsafe {
            libc::execve(
                path.as_ptr(),
                exec.argv_ptrs.as_ptr(),
                exec.envp_ptrs.as_ptr(),
            )
        };
        last = Errno::last();
        match last {
            Errno::ENOENT | Errno::ENOTDIR => {}
            Errno::EACCES => denied = true,
            _ => break,
        }
    }
    let _ = (&exec.argv, &exec.envp);
    if !denied && matches!(last, Errno::ENOENT | Errno::ENOTDIR) {
        let _ = sys::write_all(unsafe_fd(2), &exec.not_found_msg);
        sys::exit_now(127);
    }
    let code = if denied { Errno::EACCES } else { last };
    let msg = format!(
        "kiln-sandbox: {}: cannot execute: {}\n",
        exec.argv[0].to_string_lossy(),
        code.desc()
    );
    let _ = sys::write_all(unsafe_fd(2), msg.as_bytes());
    sys::exit_now(126)
}

fn unsafe_fd(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: fds 0..2 stay open for the life of this process.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
