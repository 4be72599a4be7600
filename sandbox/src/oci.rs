//! The OCI backend: the same request expressed as an OCI runtime spec
//! ([`spec_for`]) with the staged root as `root.path`, run by youki's
//! `libcontainer` in a child of the single-threaded helper.
//!
//! libcontainer does the namespaces, id maps, mounts, masked and read-only
//! paths, `pivot_root`, capabilities and `no_new_privs` from the spec; its
//! workload hook then runs Kiln's own init ([`crate::init`]) as the
//! container's PID 1, which reports to the launcher exactly as the userns
//! backend's does — so the two backends behave the same to the caller and
//! to the command, and the same tests run against both.
//!
//! Per sandbox the helper forks a monitor process: it writes the bundle,
//! drives libcontainer (create, start, delete), enforces the timeout and
//! reports if the container's init died without a word.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use nix::errno::Errno;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxIdMappingBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, MountBuilder, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

use crate::error::SetupError;
use crate::helper::{Action, HelperCtx};
use crate::init::{self, Exec};
use crate::outcome::{ExitStatus, Outcome};
use crate::protocol::{self, KilledBy, Reply, WireRequest};
use crate::request::Root;
use crate::sys::{self, Forked, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS};
use crate::userns::mounts::{KILN_MOUNTS, PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READ_ONLY};

const WARNINGS_ANNOTATION: &str = "dev.kiln.warnings";

/// The host's ids the sandbox's ids map to, and what this host cannot do.
pub struct SpecContext {
    pub outside_uid: u32,
    pub outside_gid: u32,
    /// Read-write or read-only bind mounts of subtrees, sources already
    /// resolved inside the root (see [`resolve_subtrees`]).
    pub subtree_sources: Vec<(PathBuf, PathBuf, bool)>,
    pub warnings: Vec<String>,
    /// Where the runtime puts the sandbox's cgroup (e.g. `/kiln/<id>`).
    pub cgroups_path: PathBuf,
    /// Kiln's init is the container's PID 1 (libcontainer). `false` for an
    /// external runtime, where the command itself is PID 1.
    pub kiln_init: bool,
    /// The runtime puts the sandbox in a real cgroup: the limits go in
    /// `linux.resources`.
    pub cgroup_limits: bool,
}

/// Memory, pids and CPU limits as `linux.resources`; no swap past the
/// memory limit.
fn resources(l: &crate::limits::Limits) -> Result<oci_spec::runtime::LinuxResources, String> {
    let mut r = oci_spec::runtime::LinuxResources::default();
    if let Some(m) = l.memory_bytes {
        r.set_memory(Some(
            oci_spec::runtime::LinuxMemoryBuilder::default()
                .limit(m as i64)
                .swap(m as i64)
                .build()
                .map_err(e)?,
        ));
    }
    if let Some(p) = l.pids {
        r.set_pids(Some(
            oci_spec::runtime::LinuxPidsBuilder::default()
                .limit(p as i64)
                .build()
                .map_err(e)?,
        ));
    }
    if let Some(c) = l.cpu_millis {
        const PERIOD: u64 = 100_000;
        r.set_cpu(Some(
            oci_spec::runtime::LinuxCpuBuilder::default()
                .period(PERIOD)
                .quota((c * PERIOD / 1000).max(1000) as i64)
                .build()
                .map_err(e)?,
        ));
    }
    Ok(r)
}

/// Makes the sandbox's cgroup directories ahead of the runtime (which uses
/// them as they are) and opens its counters, for Kiln's init to read.
fn cgroup_probes(cgroups_path: &Path) -> crate::limits::Probes {
    let rel = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
    let base = Path::new("/sys/fs/cgroup");
    let open = |dir: PathBuf, file: &str| {
        std::fs::create_dir_all(&dir).ok()?;
        sys::open(&sys::cpath(&dir.join(file)), libc::O_RDONLY, 0).ok()
    };
    if base.join("cgroup.controllers").exists() {
        crate::limits::Probes {
            memory_events: open(base.join(rel), "memory.events"),
            pids_events: open(base.join(rel), "pids.events"),
        }
    } else {
        crate::limits::Probes {
            memory_events: open(base.join("memory").join(rel), "memory.oom_control"),
            pids_events: open(base.join("pids").join(rel), "pids.events"),
        }
    }
}

fn e(s: impl std::fmt::Display) -> String {
    s.to_string()
}

/// The request as an OCI runtime spec (version 1.0.2-compatible).
pub(crate) fn spec_for(req: &WireRequest, ctx: &SpecContext) -> Result<Spec, String> {
    let Root::Dir(root) = &req.root else {
        return Err(
            "overlay roots need the userns backend: the OCI backend takes a directory".into(),
        );
    };
    let root_ro = req
        .subtrees
        .iter()
        .any(|s| s.path.as_os_str().is_empty() && s.read_only);
    // The container's init (Kiln's) keeps CAP_NET_ADMIN to bring `lo` up
    // and CAP_SETPCAP so the command can clear every set before its execve,
    // exactly as in the userns backend; the command keeps nothing.
    let init_caps = || {
        let mut c = oci_spec::runtime::Capabilities::new();
        c.insert(oci_spec::runtime::Capability::NetAdmin);
        c.insert(oci_spec::runtime::Capability::Setpcap);
        c
    };
    let init_caps = || {
        if ctx.kiln_init {
            init_caps()
        } else {
            oci_spec::runtime::Capabilities::new()
        }
    };
    let none = || {
        LinuxCapabilitiesBuilder::default()
            .bounding(init_caps())
            .effective(init_caps())
            .inheritable(oci_spec::runtime::Capabilities::new())
            .permitted(init_caps())
            .ambient(oci_spec::runtime::Capabilities::new())
            .build()
    };
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(req.uid)
                .gid(req.gid)
                .build()
                .map_err(e)?,
        )
        .args(req.argv.clone())
        .env(
            req.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(PathBuf::from("/").join(&req.cwd))
        .capabilities(none().map_err(e)?)
        .no_new_privileges(true)
        .build()
        .map_err(e)?;
    let mount = |dest: &str, typ: &str, src: &str, opts: &[&str]| {
        MountBuilder::default()
            .destination(dest)
            .typ(typ)
            .source(src)
            .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .map_err(e)
    };
    // The marks' binds first, Kiln's own mounts over them: a mark on `proc`
    // or `dev` (BuildStream marks both writable) is about the staged
    // directory, and binding it last would hide the container's /proc and
    // /dev behind an empty one.
    let mut mounts = Vec::new();
    for (dest, src, ro) in &ctx.subtree_sources {
        let mut opts = vec!["rbind", "nosuid", "nodev"];
        opts.push(if *ro { "ro" } else { "rw" });
        mounts.push(
            MountBuilder::default()
                .destination(PathBuf::from("/").join(dest))
                .typ("bind")
                .source(src)
                .options(opts.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .build()
                .map_err(e)?,
        );
    }
    let size = crate::userns::mounts::tmpfs_size(&req.limits)
        .map(|b| format!("size={}k", b.div_ceil(1024).max(4)));
    let sized = |opts: &[&'static str]| -> Vec<String> {
        opts.iter()
            .map(|s| s.to_string())
            .chain(size.clone())
            .collect()
    };
    let shm_opts = sized(&["nosuid", "noexec", "nodev", "mode=1777"]);
    let tmp_opts = sized(&["nosuid", "nodev", "mode=1777"]);
    fn as_strs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    mounts.extend([
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "noexec", "strictatime", "mode=755", "size=64k"],
        )?,
        mount("/dev/shm", "tmpfs", "shm", &as_strs(&shm_opts))?,
        mount("/tmp", "tmpfs", "tmpfs", &as_strs(&tmp_opts))?,
    ]);
    let mut ns: Vec<LinuxNamespaceType> = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::User,
    ];
    if !req.network {
        ns.push(LinuxNamespaceType::Network);
    }
    let map = |inside: u32, outside: u32| {
        LinuxIdMappingBuilder::default()
            .container_id(inside)
            .host_id(outside)
            .size(1u32)
            .build()
            .map_err(e)
    };
    // libcontainer sets the container up as uid/gid 0 inside before it
    // switches to the requested ids, so 0 would have to be mapped too, and
    // it writes more than one mapping only through newuidmap/newgidmap and
    // subordinate ids, which Kiln does not configure.
    if req.uid != 0 || req.gid != 0 {
        return Err(format!(
            "the OCI backend runs as uid/gid 0 inside only (asked for {}/{}): use the userns backend",
            req.uid, req.gid
        ));
    }
    // Kiln's init installs the filter itself; an external runtime gets it
    // in the spec.
    let seccomp = if ctx.kiln_init {
        None
    } else {
        crate::seccomp::oci_spec(&crate::seccomp::policy())
            .map(serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>)
            .transpose()
            .map_err(e)?
    };
    let mut linux = LinuxBuilder::default()
        .namespaces(
            ns.into_iter()
                .map(|t| LinuxNamespaceBuilder::default().typ(t).build().map_err(e))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .uid_mappings(vec![map(req.uid, ctx.outside_uid)?])
        .gid_mappings(vec![map(req.gid, ctx.outside_gid)?])
        .cgroups_path(ctx.cgroups_path.clone())
        .masked_paths(
            PROC_MASKED_FILES
                .iter()
                .chain(PROC_MASKED_DIRS.iter())
                .map(|p| format!("/proc/{p}"))
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            PROC_READ_ONLY
                .iter()
                .map(|p| format!("/proc/{p}"))
                .collect::<Vec<_>>(),
        )
        // runc refuses `user.*` sysctls; libcontainer applies them.
        .sysctl(if ctx.kiln_init {
            HashMap::from([("user.max_user_namespaces".to_string(), "0".to_string())])
        } else {
            HashMap::new()
        })
        .build()
        .map_err(e)?;
    linux.set_seccomp(seccomp);
    if ctx.cgroup_limits {
        linux.set_resources(Some(resources(&req.limits)?));
    }
    let mut annotations = HashMap::new();
    if !ctx.warnings.is_empty() {
        annotations.insert(WARNINGS_ANNOTATION.to_string(), ctx.warnings.join("\n"));
    }
    SpecBuilder::default()
        .version("1.0.2")
        .root(
            RootBuilder::default()
                .path(root)
                .readonly(root_ro)
                .build()
                .map_err(e)?,
        )
        .hostname(req.hostname.clone())
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .annotations(annotations)
        .build()
        .map_err(e)
}

/// Subtree bind sources, resolved inside the root with `RESOLVE_IN_ROOT`
/// (a staged symlink cannot point a bind at a host path), as host paths.
fn resolve_subtrees(
    root: &Path,
    req: &WireRequest,
) -> Result<Vec<(PathBuf, PathBuf, bool)>, SetupError> {
    let rootfd = sys::open(&sys::cpath(root), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| SetupError::new(format!("open root {}", root.display()), e))?;
    let mut out = Vec::new();
    for s in req
        .subtrees
        .iter()
        .filter(|s| !s.path.as_os_str().is_empty())
    {
        let fd = sys::openat2(
            rootfd.as_fd(),
            &sys::cpath(&s.path),
            libc::O_PATH,
            0,
            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| SetupError::new(format!("open /{}", s.path.display()), e))?;
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| SetupError::new(format!("resolve /{}", s.path.display()), Errno::EIO))?;
        out.push((s.path.clone(), real, s.read_only));
    }
    Ok(out)
}

/// `mkdir -p` of the working directory inside the root, from the host,
/// confined to the root (the OCI runtime only chdirs).
fn ensure_cwd(root: &Path, cwd: &Path) -> Result<(), SetupError> {
    let rootfd = sys::open(&sys::cpath(root), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| SetupError::new(format!("open root {}", root.display()), e))?;
    let mut cur = PathBuf::new();
    for comp in cwd.components() {
        let parent = cur.clone();
        cur.push(comp);
        let how = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
        if sys::openat2(
            rootfd.as_fd(),
            &sys::cpath(&cur),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            how,
        )
        .is_ok()
        {
            continue;
        }
        let p = if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.clone()
        };
        let pfd = sys::openat2(
            rootfd.as_fd(),
            &sys::cpath(&p),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            how,
        )
        .map_err(|e| {
            SetupError::new(
                format!(
                    "create directory /{}: open /{}",
                    cwd.display(),
                    parent.display()
                ),
                e,
            )
        })?;
        match sys::mkdirat(pfd.as_fd(), &sys::cpath(Path::new(comp.as_os_str())), 0o755) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(SetupError::new(
                    format!("create directory /{}", cwd.display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

fn host_warnings(external: bool) -> Vec<String> {
    if !external {
        return Vec::new();
    }
    vec![
        "external OCI runtime: the command is the container's PID 1 \
         (signals it does not handle are ignored; no Kiln init reaps orphans)"
            .to_string(),
        "external OCI runtime: nested user namespaces are not disabled \
         (runc refuses the user.max_user_namespaces sysctl)"
            .to_string(),
        "external OCI runtime: the runtime may add HOME (runc: and PATH) to the environment"
            .to_string(),
    ]
}

/// The helper's OCI state directory (bundles, libcontainer's and the
/// external runtimes' state), made once by [`make_state_root`].
static STATE_ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn state_root() -> Result<&'static Path, SetupError> {
    STATE_ROOT
        .get()
        .map(PathBuf::as_path)
        .ok_or_else(|| SetupError {
            step: "the helper has no OCI state directory".into(),
            errno: Errno::ENOENT as i32,
        })
}

/// Makes the OCI backend's state directory, private to this helper's user:
/// `/run/kiln-oci` as root, else a fresh `kiln-oci-<uid>-<random>` under
/// `$XDG_RUNTIME_DIR` (when it is ours and private) or the temporary
/// directory. A directory someone else made first (a predictable name in
/// `/tmp`) would let them swap a bundle's spec: every directory is created
/// with `mkdir` (which fails if the name exists) or checked on an open
/// handle to be ours, mode 0700, not a symlink.
pub(crate) fn make_state_root(privileged: bool) -> Result<(), String> {
    // SAFETY: plain getter.
    let uid = unsafe { libc::geteuid() };
    let dir = if privileged {
        let d = PathBuf::from("/run/kiln-oci");
        match std::fs::create_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("create {}: {e}", d.display())),
        }
        d
    } else {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| check_private(d, uid).is_ok())
            .unwrap_or_else(std::env::temp_dir);
        let mut made = None;
        for _ in 0..16 {
            let d = base.join(format!("kiln-oci-{uid}-{:08x}", random_u32()));
            match std::fs::create_dir(&d) {
                Ok(()) => {
                    made = Some(d);
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("create {}: {e}", d.display())),
            }
        }
        made.ok_or_else(|| format!("no fresh OCI state directory in {}", base.display()))?
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod 0700 {}: {e}", dir.display()))?;
    check_private(&dir, uid)?;
    let _ = STATE_ROOT.set(dir);
    Ok(())
}

/// Removes an unprivileged helper's own state directory when it exits.
pub(crate) fn remove_state_root(privileged: bool) {
    if let (false, Some(d)) = (privileged, STATE_ROOT.get()) {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `dir` is a real directory (not a symlink), owned by `uid`, closed to
/// group and others: checked on an open handle, not by path.
fn check_private(dir: &Path, uid: u32) -> Result<(), String> {
    let fd = sys::open(
        &sys::cpath(dir),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
    .map_err(|e| format!("open {}: {e}", dir.display()))?;
    let m = std::fs::File::from(fd)
        .metadata()
        .map_err(|e| format!("stat {}: {e}", dir.display()))?;
    use std::os::unix::fs::MetadataExt;
    if m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is owned by uid {} with mode {:o}: not private to uid {uid}",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: valid buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(b)
    } else {
        // SAFETY: plain getter.
        (sys::monotonic_ns() as u32) ^ unsafe { libc::getpid() } as u32
    }
}

/// For an unprivileged helper on a cgroup v1 host, where libcontainer 0.7
/// insists on creating a cgroup it has no right to: the monitor moves into a
/// user namespace of its own (its uid as 0, so libcontainer runs as it would
/// as root) and a private mount namespace whose `/sys/fs/cgroup` is an empty
/// tmpfs with the controller directories, so that step succeeds without
/// touching the host. The sandbox's outcome carries a warning that no cgroup
/// limit applies.
fn enter_rootless_namespaces(uid: u32, gid: u32, cgroup: &Path) -> Result<(), SetupError> {
    sys::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS)
        .map_err(|e| SetupError::new("unshare user+mount namespaces for libcontainer", e))?;
    let w = |f: &std::ffi::CStr, s: String| {
        sys::write_file(f, s.as_bytes())
            .map_err(|e| SetupError::new(format!("write {}", f.to_string_lossy()), e))
    };
    w(c"/proc/self/setgroups", "deny".into())?;
    w(c"/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    w(c"/proc/self/gid_map", format!("0 {gid} 1\n"))?;
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(|e| SetupError::new("make / private", e))?;
    let cg = Path::new("/sys/fs/cgroup");
    let controllers: Vec<std::ffi::OsString> = std::fs::read_dir(cg)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    sys::mount(
        Some(c"tmpfs"),
        c"/sys/fs/cgroup",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(|e| SetupError::new("mount tmpfs on /sys/fs/cgroup", e))?;
    // What libcgroups' v1 manager reads and writes when it adds a task and
    // no resources are asked for: each controller's `cgroup.procs`, and
    // cpuset's cpus and mems (copied from the host so they are not empty),
    // the device rules it writes.
    let cpus =
        std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.cpus").unwrap_or_else(|_| "0".into());
    let mems =
        std::fs::read_to_string("/sys/fs/cgroup/cpuset/cpuset.mems").unwrap_or_else(|_| "0".into());
    let rel = cgroup.strip_prefix("/").unwrap_or(cgroup);
    for c in controllers.iter().filter(|c| *c != "unified") {
        let dir = cg.join(c).join(rel);
        let made = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("cgroup.procs"), ""))
            .and_then(|()| {
                if c == "devices" {
                    std::fs::write(dir.join("devices.allow"), "")?;
                    std::fs::write(dir.join("devices.deny"), "")?;
                }
                if c == "cpuset" {
                    // Every level from the mount point down is read.
                    for level in dir.ancestors().take_while(|p| p.starts_with(cg.join(c))) {
                        std::fs::write(level.join("cpuset.cpus"), &cpus)?;
                        std::fs::write(level.join("cpuset.mems"), &mems)?;
                    }
                }
                Ok(())
            });
        if let Err(e) = made {
            return Err(SetupError {
                step: format!("prepare a stand-in cgroup {}: {e}", dir.display()),
                errno: e.raw_os_error().unwrap_or(0),
            });
        }
    }
    Ok(())
}

/// Called by the helper: forks the monitor for one OCI sandbox.
pub(crate) fn start_in_helper(
    ctx: HelperCtx,
    req: WireRequest,
    sock: &OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Action, SetupError> {
    // SAFETY: the helper is single-threaded.
    match unsafe { sys::clone3_fork(0) } {
        Err(e) => Err(SetupError::new("fork the OCI monitor", e)),
        Ok(Forked::Child) => monitor(ctx, req, sock, stdout, stderr),
        Ok(Forked::Parent { pid, pidfd }) => {
            // The monitor enforces the timeout itself: it knows the container's init.
            crate::helper::oci_action(pidfd, pid, sock, None)
        }
    }
}

fn monitor(
    ctx: HelperCtx,
    req: WireRequest,
    sock: &OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> ! {
    let mut keep = [
        sock.as_raw_fd(),
        stdout.as_raw_fd(),
        stderr.as_raw_fd(),
        0,
        1,
        2,
    ];
    keep.sort_unstable();
    let _ = sys::close_all_except(&keep);
    let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    let sock = sock.as_fd();
    let fail = |e: SetupError| -> ! {
        let _ = protocol::send(sock, &Reply::Error(e), &[]);
        sys::exit_now(0)
    };
    let Root::Dir(root) = &req.root else {
        fail(SetupError {
            step: "overlay roots need the userns backend: the OCI backend takes a directory".into(),
            errno: Errno::EINVAL as i32,
        });
    };
    if let Err(e) = ensure_cwd(root, &req.cwd) {
        fail(e);
    }
    let subtree_sources = resolve_subtrees(root, &req).unwrap_or_else(|e| fail(e));
    let states = state_root().unwrap_or_else(|e| fail(e)).to_path_buf();
    // SAFETY: plain getters.
    let id = format!("kiln-{}-{}", unsafe { libc::getppid() }, unsafe {
        libc::getpid()
    });
    let cgroups_path = PathBuf::from("/kiln").join(&id);
    let external = req.oci_runtime.clone();
    let (outside_uid, outside_gid) = if ctx.privileged || external.is_some() {
        (ctx.outside_uid, ctx.outside_gid)
    } else {
        if let Err(e) = enter_rootless_namespaces(ctx.outside_uid, ctx.outside_gid, &cgroups_path) {
            fail(e);
        }
        (0, 0)
    };
    let sctx = SpecContext {
        outside_uid,
        outside_gid,
        subtree_sources,
        warnings: host_warnings(external.is_some()),
        cgroups_path,
        kiln_init: external.is_none(),
        cgroup_limits: ctx.privileged,
    };
    let probes = if ctx.privileged {
        cgroup_probes(&sctx.cgroups_path)
    } else {
        crate::limits::Probes::default()
    };
    let spec = spec_for(&req, &sctx).unwrap_or_else(|m| fail(SetupError { step: m, errno: 0 }));
    let bundle = states.join("bundles").join(&id);
    // Whatever libcontainer managed to delete, nothing of this sandbox may
    // stay behind: its bundle, its state directory, its (empty) cgroups.
    let cleanup_bundle = || {
        let _ = std::fs::remove_dir_all(&bundle);
        let _ = std::fs::remove_dir_all(states.join(&id));
        if ctx.privileged {
            remove_cgroups(&sctx.cgroups_path);
        }
    };
    if let Err(err) = std::fs::create_dir_all(&bundle)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            spec.save(bundle.join("config.json"))
                .map_err(|e| e.to_string())
        })
    {
        fail(SetupError {
            step: format!("write OCI bundle {}: {err}", bundle.display()),
            errno: 0,
        });
    }
    if let Some(runtime) = external {
        run_external(
            &runtime,
            ctx.privileged,
            &states,
            &id,
            &bundle,
            &req,
            sock,
            stdout,
            stderr,
            &sctx.warnings,
            &probes,
        );
    }
    let devnull = sys::open(c"/dev/null", libc::O_RDONLY, 0)
        .unwrap_or_else(|e| fail(SetupError::new("open /dev/null", e)));
    let executor = KilnInit {
        sock: sock.as_raw_fd(),
        last_cap: ctx.last_cap,
        limits: req.limits,
        probes: probes.raw(),
        nproc_rlimit: !ctx.privileged,
    };
    let built = ContainerBuilder::new(id.clone(), SyscallType::Linux)
        .with_root_path(&states)
        .map(|b| {
            b.with_executor(executor)
                .with_stdin(devnull)
                .with_stdout(stdout)
                .with_stderr(stderr)
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
    let mut container = match built {
        Ok(Ok(c)) => c,
        Ok(Err(err)) | Err(err) => {
            cleanup_bundle();
            fail(SetupError {
                step: format!("libcontainer: create container: {err}"),
                errno: 0,
            });
        }
    };
    let started = Instant::now();
    if let Err(err) = container.start() {
        let _ = container.delete(true);
        cleanup_bundle();
        fail(SetupError {
            step: format!("libcontainer: start container: {err}"),
            errno: 0,
        });
    }
    let Some(pid) = container.pid() else {
        let _ = container.delete(true);
        cleanup_bundle();
        fail(SetupError {
            step: "libcontainer: container has no pid".into(),
            errno: 0,
        });
    };
    let pidfd = sys::pidfd_open(pid.as_raw())
        .unwrap_or_else(|e| fail(SetupError::new("pidfd_open(container init)", e)));
    let timed_out = wait_with_deadline(pidfd.as_fd(), sock, req.timeout.map(|t| started + t));
    let reaped = sys::waitid_pidfd(pidfd.as_fd());
    // Before the runtime removes the cgroup (its files then read ENODEV).
    let limits_hit = probes.hits(&req.limits);
    let _ = container.delete(true);
    cleanup_bundle();
    let killed = match (timed_out, reaped) {
        (true, _) => Some((KilledBy::Timeout, ExitStatus::Signaled(libc::SIGKILL))),
        (false, Ok(sys::Reaped::Exited(0))) => None,
        (false, Ok(sys::Reaped::Exited(c))) => Some((KilledBy::InitDied, ExitStatus::Exited(c))),
        (false, Ok(sys::Reaped::Signaled(s))) => {
            Some((KilledBy::InitDied, ExitStatus::Signaled(s)))
        }
        (false, Err(_)) => Some((KilledBy::InitDied, ExitStatus::Signaled(libc::SIGKILL))),
    };
    if let Some((killed, status)) = killed {
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
            sock,
            &Reply::Finished {
                outcome,
                exec_ns: 0,
                killed: Some(killed),
            },
            &[],
        );
    }
    sys::exit_now(0)
}

/// An external OCI runtime (crun, runc) runs the bundle; the command is the
/// container's PID 1. `create` daemonises the container's init, which we
/// adopt as a child subreaper so `wait4` gives its status and rusage; the
/// launcher gets the same Ready/Finished messages as from Kiln's own init.
#[allow(clippy::too_many_arguments)]
fn run_external(
    runtime: &Path,
    privileged: bool,
    states: &Path,
    id: &str,
    bundle: &Path,
    req: &WireRequest,
    sock: BorrowedFd<'_>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    warnings: &[String],
    probes: &crate::limits::Probes,
) -> ! {
    let fail = |e: SetupError| -> ! {
        let _ = std::fs::remove_dir_all(bundle);
        let _ = protocol::send(sock, &Reply::Error(e), &[]);
        sys::exit_now(0)
    };
    let rt_name = runtime
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rt_root = states.join(format!("runtime-{rt_name}"));
    if privileged && Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        // crun 1.8 refuses a cgroup v1 host with a cgroup2 mount beside it;
        // hidden in a private mount namespace, it runs.
        let hidden = sys::unshare(libc::CLONE_NEWNS)
            .and_then(|()| sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None))
            .and_then(|()| sys::umount2(c"/sys/fs/cgroup/unified", libc::MNT_DETACH));
        if let Err(e) = hidden {
            fail(SetupError::new(
                "hide /sys/fs/cgroup/unified from the OCI runtime",
                e,
            ));
        }
    }
    let _ = sys::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
    let run = |args: &[&std::ffi::OsStr], out: Option<&OwnedFd>, err: Option<&OwnedFd>| {
        let mut cmd = std::process::Command::new(runtime);
        cmd.arg("--root")
            .arg(&rt_root)
            .args(args)
            .stdin(std::process::Stdio::null());
        let dup = |f: Option<&OwnedFd>| -> std::process::Stdio {
            match f.and_then(|f| f.try_clone().ok()) {
                Some(f) => f.into(),
                None => std::process::Stdio::null(),
            }
        };
        cmd.stdout(dup(out)).stderr(dup(err));
        cmd.status()
    };
    let pid_file = bundle.join("pid");
    let created = run(
        &[
            "create".as_ref(),
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--pid-file".as_ref(),
            pid_file.as_os_str(),
            id.as_ref(),
        ],
        Some(&stdout),
        Some(&stderr),
    );
    drop((stdout, stderr));
    match created {
        Ok(st) if st.success() => {}
        Ok(st) => fail(SetupError {
            step: format!(
                "{} create: {st} (its messages are on the action's stderr)",
                runtime.display()
            ),
            errno: 0,
        }),
        Err(e) => fail(SetupError {
            step: format!("run {}: {e}", runtime.display()),
            errno: e.raw_os_error().unwrap_or(0),
        }),
    }
    let delete = || {
        let _ = run(
            &["delete".as_ref(), "--force".as_ref(), id.as_ref()],
            None,
            None,
        );
        let _ = std::fs::remove_dir_all(bundle);
    };
    let pid: Option<libc::pid_t> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let Some(pid) = pid else {
        delete();
        fail(SetupError {
            step: format!("{} wrote no pid file", runtime.display()),
            errno: 0,
        });
    };
    let opened = (|| {
        let pidfd =
            sys::pidfd_open(pid).map_err(|e| SetupError::new("pidfd_open(container)", e))?;
        let root = sys::open(
            &sys::cpath(Path::new(&format!("/proc/{pid}/root"))),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| SetupError::new("open the container's root", e))?;
        let mntns = sys::open(
            &sys::cpath(Path::new(&format!("/proc/{pid}/ns/mnt"))),
            libc::O_RDONLY,
            0,
        )
        .map_err(|e| SetupError::new("open the container's mount namespace", e))?;
        Ok::<_, SetupError>((pidfd, root, mntns))
    })();
    let (pidfd, root, mntns) = match opened {
        Ok(x) => x,
        Err(e) => {
            delete();
            fail(e);
        }
    };
    let ready = Reply::Ready {
        kiln_mounts: KILN_MOUNTS.iter().map(PathBuf::from).collect(),
        warnings: warnings.to_vec(),
    };
    if protocol::send(sock, &ready, &[pidfd.as_fd(), root.as_fd(), mntns.as_fd()]).is_err() {
        delete();
        sys::exit_now(2);
    }
    drop((root, mntns));
    let exec_ns = sys::monotonic_ns();
    let started = Instant::now();
    if !matches!(run(&["start".as_ref(), id.as_ref()], None, None), Ok(st) if st.success()) {
        let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    }
    let timed_out = wait_with_deadline(pidfd.as_fd(), sock, req.timeout.map(|t| started + t));
    let reaped = sys::wait4(pid);
    // Before the runtime removes the cgroup (its files then read ENODEV).
    let limits_hit = probes.hits(&req.limits);
    let wall = started.elapsed();
    delete();
    let (status, ru) = match reaped {
        Ok(x) => x,
        // SAFETY: a zeroed rusage is valid.
        Err(_) => (libc::SIGKILL, unsafe { std::mem::zeroed() }),
    };
    let st = if libc::WIFEXITED(status) {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    } else {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    };
    let killed = if timed_out {
        Some(KilledBy::Timeout)
    } else if st == ExitStatus::Signaled(libc::SIGKILL) {
        Some(KilledBy::InitDied)
    } else {
        None
    };
    let outcome = Outcome {
        status: st,
        timed_out,
        cancelled: false,
        wall,
        user: sys::timeval(ru.ru_utime),
        sys: sys::timeval(ru.ru_stime),
        peak_rss_bytes: ru.ru_maxrss as u64 * 1024,
        setup: Duration::ZERO,
        warnings: Vec::new(),
        limits_hit,
    };
    let _ = protocol::send(
        sock,
        &Reply::Finished {
            outcome,
            exec_ns,
            killed,
        },
        &[],
    );
    sys::exit_now(0)
}

/// Removes the sandbox's leaf cgroup in every v1 hierarchy (and a v2 one),
/// retrying briefly while the kernel finishes releasing its last tasks.
fn remove_cgroups(path: &Path) {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let Ok(dirs) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut leaves: Vec<PathBuf> = dirs
        .flatten()
        .map(|d| d.path().join(rel))
        .chain(std::iter::once(Path::new("/sys/fs/cgroup").join(rel)))
        .filter(|p| p.is_dir())
        .collect();
    for _ in 0..20 {
        leaves.retain(|p| std::fs::remove_dir(p).is_err() && p.is_dir());
        if leaves.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    tracing::warn!("could not remove cgroups {leaves:?}");
}

/// Waits for the process behind `pidfd` to exit; kills it at `deadline`.
/// Returns whether it had to.
///
/// The launcher closing its end of `sock` (it dropped the sandbox, or went
/// away) kills the container too, so this monitor can still clean up.
fn wait_with_deadline(
    pidfd: BorrowedFd<'_>,
    sock: BorrowedFd<'_>,
    deadline: Option<Instant>,
) -> bool {
    let mut watch_sock = true;
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => (d.saturating_duration_since(Instant::now()).as_millis() + 1)
                .min(i32::MAX as u128) as i32,
        };
        let mut p = [
            libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // Only hang-ups matter: poll reports them whatever the events.
                fd: if watch_sock { sock.as_raw_fd() } else { -1 },
                events: 0,
                revents: 0,
            },
        ];
        match sys::poll_readable(&mut p, ms) {
            Ok(_) if p[0].revents != 0 => return false,
            Ok(_) if p[1].revents != 0 => {
                watch_sock = false;
                let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
            }
            Ok(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
                let mut p = [libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                let _ = sys::poll_readable(&mut p, -1);
                return true;
            }
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// libcontainer's workload hook: instead of exec'ing the command as PID 1,
/// run Kiln's init, which runs it as PID 2 and reports to the launcher.
#[derive(Clone)]
struct KilnInit {
    sock: RawFd,
    last_cap: libc::c_ulong,
    limits: crate::limits::Limits,
    /// The cgroup's counters, inherited from the monitor.
    probes: (Option<RawFd>, Option<RawFd>),
    nproc_rlimit: bool,
}

impl Executor for KilnInit {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        // SAFETY: the action socket was inherited from the monitor and stays open.
        let sock = unsafe { BorrowedFd::borrow_raw(self.sock) };
        let _ = sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        let report = |r: &Reply, fds: &[BorrowedFd<'_>]| {
            if protocol::send(sock, r, fds).is_err() {
                sys::exit_now(2);
            }
        };
        // libcontainer adds /dev/ptmx (to a devpts Kiln does not mount):
        // the same /dev as the userns backend, please.
        // SAFETY: plain syscall.
        unsafe { libc::unlink(c"/dev/ptmx".as_ptr()) };
        let has_netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Network));
        let opened = (|| {
            if has_netns {
                sys::loopback_up().map_err(|e| SetupError::new("bring up lo", e))?;
            }
            let root = sys::open(c"/", libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(|e| SetupError::new("open /", e))?;
            let mntns = sys::open(c"/proc/self/ns/mnt", libc::O_RDONLY, 0)
                .map_err(|e| SetupError::new("open /proc/self/ns/mnt", e))?;
            // SAFETY: plain getter.
            let pidfd = sys::pidfd_open(unsafe { libc::getpid() })
                .map_err(|e| SetupError::new("pidfd_open(self)", e))?;
            let dup = |fd: RawFd, what: &str| {
                // SAFETY: plain fcntl on an fd we hold.
                let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
                if n < 0 {
                    Err(SetupError::new(format!("dup {what}"), Errno::last()))
                } else {
                    // SAFETY: new fd we own.
                    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(n) })
                }
            };
            Ok::<_, SetupError>((root, mntns, pidfd, dup(1, "stdout")?, dup(2, "stderr")?))
        })();
        let (root, mntns, pidfd, out, err) = match opened {
            Ok(x) => x,
            Err(e) => {
                report(&Reply::Error(e), &[]);
                sys::exit_now(0);
            }
        };
        let warnings = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(WARNINGS_ANNOTATION))
            .map(|w| w.lines().map(String::from).collect())
            .unwrap_or_default();
        report(
            &Reply::Ready {
                kiln_mounts: KILN_MOUNTS.iter().map(PathBuf::from).collect(),
                warnings,
            },
            &[pidfd.as_fd(), root.as_fd(), mntns.as_fd()],
        );
        drop((root, mntns, pidfd));
        let process = spec.process().as_ref();
        let argv = process.and_then(|p| p.args().clone()).unwrap_or_default();
        let env: Vec<(String, String)> = process
            .and_then(|p| p.env().clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        // libcontainer set no_new_privs and left us only NET_ADMIN and
        // SETPCAP; the command gives those up too before its execve.
        let exec = Exec::new(&argv, &env, out, err, self.last_cap)
            .with_limits(self.limits, self.nproc_rlimit);
        // SAFETY: our copies of the monitor's probe fds (forked).
        let probes = unsafe { crate::limits::Probes::adopt(Some(self.probes)) };
        let tmpfs: Vec<(&str, Option<OwnedFd>)> = ["/tmp", "/dev/shm"]
            .into_iter()
            .map(|p| {
                let fd = sys::open(&sys::cpath(p.as_ref()), libc::O_PATH | libc::O_DIRECTORY, 0);
                (p, fd.ok())
            })
            .collect();
        match init::run_as_init(&exec, None) {
            Ok((mut outcome, exec_ns)) => {
                let mut found = probes.hits(&self.limits);
                found.extend(crate::userns::full_tmpfs(&tmpfs));
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

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        Ok(())
    }

    // The environment is taken from the spec as is: libcontainer's default
    // would add HOME.
    fn setup_envs(&self, _envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{BackendKind, Subtree};

    fn req() -> WireRequest {
        WireRequest {
            backend: BackendKind::Oci,
            root: Root::Dir("/srv/root".into()),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "src".into(),
            uid: 0,
            gid: 0,
            network: false,
            subtrees: vec![Subtree {
                path: "".into(),
                read_only: true,
            }],
            timeout: None,
            hostname: "kiln".into(),
            oci_runtime: None,
            limits: crate::limits::Limits::default(),
        }
    }

    #[test]
    fn request_becomes_a_spec() {
        let ctx = SpecContext {
            outside_uid: 65534,
            outside_gid: 65534,
            subtree_sources: vec![("out".into(), "/srv/root/out".into(), false)],
            warnings: vec!["w".into()],
            cgroups_path: "/kiln/x".into(),
            kiln_init: true,
            cgroup_limits: true,
        };
        let spec = spec_for(&req(), &ctx).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["root"]["path"], "/srv/root");
        assert_eq!(json["root"]["readonly"], true);
        assert_eq!(json["process"]["cwd"], "/src");
        assert_eq!(json["process"]["env"], serde_json::json!(["PATH=/bin"]));
        assert_eq!(json["process"]["user"]["uid"], 0);
        assert_eq!(json["process"]["noNewPrivileges"], true);
        assert_eq!(
            json["process"]["capabilities"]["ambient"],
            serde_json::json!([])
        );
        assert_eq!(
            json["linux"]["uidMappings"][0],
            serde_json::json!({"containerID": 0, "hostID": 65534, "size": 1})
        );
        assert_eq!(json["linux"]["cgroupsPath"], "/kiln/x");
        let ns: Vec<_> = json["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(ns.contains(&"network") && ns.contains(&"user") && ns.contains(&"pid"));
        assert_eq!(json["linux"]["sysctl"]["user.max_user_namespaces"], "0");
        let mounts = json["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/out"
            && m["options"].as_array().unwrap().contains(&"rw".into())));
        // Kiln's own mounts go over the marks' binds, never under them.
        let pos = |d: &str| mounts.iter().position(|m| m["destination"] == d).unwrap();
        assert!(pos("/out") < pos("/proc") && pos("/out") < pos("/dev"));
        assert_eq!(json["annotations"][WARNINGS_ANNOTATION], "w");

        let mut r = req();
        r.network = true;
        let json = serde_json::to_value(spec_for(&r, &ctx).unwrap()).unwrap();
        assert!(
            !json["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "network")
        );
        r.uid = 1000;
        assert!(spec_for(&r, &ctx).unwrap_err().contains("uid/gid 0"));
        r.uid = 0;
        r.root = Root::Overlay {
            lowers: vec!["/a".into()],
            upper: "/u".into(),
            work: "/w".into(),
        };
        assert!(spec_for(&r, &ctx).unwrap_err().contains("overlay"));
    }
}
