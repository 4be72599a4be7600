//! The sandbox's filesystem: what is mounted where, in which order.
//!
//! [`plan`] turns a request into a list of [`Op`]s (pure, unit-tested);
//! [`apply`] runs them against a [`MountSys`], whose live implementation
//! ([`Live`]) works inside the sandbox's fresh user and mount namespaces.
//!
//! Every path that comes from the staged root is resolved with
//! `openat2(RESOLVE_IN_ROOT)` relative to the new root and then acted on
//! through `/proc/self/fd/N`, so a symlink planted in the root (`tmp ->
//! /etc`) is followed *inside* the root and can never make Kiln mount over,
//! or expose, a host path — the mounts happen before `pivot_root`, while the
//! host tree is still reachable.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::SetupError;
use crate::request::{Root, Subtree};
use crate::sys::{self, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS};

/// Kiln's own mounts inside the root: the collector treats them as the empty
/// directories they were staged as.
pub(crate) const KILN_MOUNTS: [&str; 3] = ["dev", "proc", "tmp"];

/// Device nodes bound from the host into the sandbox's `/dev`.
pub(crate) const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
pub(crate) const DEV_LINKS: [(&str, &str); 4] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// `/proc` files hidden behind `/dev/null` and directories behind an empty
/// read-only tmpfs, and parts made read-only — the set runc uses. With a
/// privileged helper the sandbox's uid *is* the host's uid 0 (without
/// capabilities), and DAC alone would let it write `/proc/sysrq-trigger` or
/// host sysctls; this closes that.
pub(crate) const PROC_MASKED_FILES: [&str; 6] = [
    "kcore",
    "keys",
    "key-users",
    "timer_list",
    "sched_debug",
    "latency_stats",
];
pub(crate) const PROC_MASKED_DIRS: [&str; 3] = ["acpi", "scsi", "asound"];
pub(crate) const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// Which of the `/proc` entries above this kernel has. A fresh `/proc` shows
/// the same global entries as the host's, so the helper looks once at start
/// (the sandboxes it forks inherit the answer) and no sandbox spends mount
/// calls on entries that cannot exist.
pub(crate) fn proc_entry_exists(name: &str) -> bool {
    static PRESENT: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    PRESENT
        .get_or_init(|| {
            PROC_MASKED_FILES
                .iter()
                .chain(&PROC_MASKED_DIRS)
                .chain(&PROC_READ_ONLY)
                .copied()
                .filter(|n| Path::new("/proc").join(n).symlink_metadata().is_ok())
                .collect()
        })
        .contains(&name)
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

const DEV_TMPFS_OPTIONS: &str = "mode=0755,size=64k,nr_inodes=64";

/// Where a privileged helper keeps the template of every sandbox's `/dev`,
/// in its own mount namespace: the mount point of the `/sys` it dropped
/// (no sandbox of this backend uses the host's sysfs).
pub(crate) const DEV_TEMPLATE_AT: &CStr = c"/sys";

/// Builds `/dev` once, read-only, at [`DEV_TEMPLATE_AT`]: each sandbox then
/// binds it with one recursive mount instead of a tmpfs, six device binds
/// and a dozen more calls of its own. Must run in the helper's private mount
/// namespace. The device nodes are real ones when this process may `mknod`
/// (root on the host): one mount for every sandbox to copy instead of seven.
pub(crate) fn build_dev_template() -> Result<(), SetupError> {
    let at = DEV_TEMPLATE_AT;
    let data = CString::new(DEV_TMPFS_OPTIONS).expect("no NUL");
    // Not nodev: the nodes made here must work. Nothing else can ever be
    // made here: it turns read-only below, and sandboxes hold no capability.
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
    sys::mount(Some(c"tmpfs"), at, Some(c"tmpfs"), flags, Some(&data))
        .map_err(err("mount tmpfs for the /dev template".into()))?;
    let dev = sys::open(at, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(err("open the /dev template".into()))?;
    // SAFETY: plain syscall; the helper is single-threaded, and its umask is
    // put back below.
    let umask = unsafe { libc::umask(0) };
    let made = populate_dev(dev.as_fd(), DevNodes::Mknod).or_else(|e| {
        tracing::debug!("device nodes in the /dev template are binds: {e}");
        populate_dev(dev.as_fd(), DevNodes::Bind)
    });
    // SAFETY: as above.
    unsafe { libc::umask(umask) };
    made?;
    // The superblock, not just this mount: no copy of it is ever writable.
    sys::mount(
        None,
        at,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | flags,
        Some(&data),
    )
    .map_err(err("make the /dev template read-only".into()))
}

/// Mounts the sandbox's `/proc`, with its masks, over `/proc` of the
/// calling spare init's own mount and PID namespaces, ahead of any request;
/// [`Op::MoveProc`] later moves it into the root. Until then the spare's own
/// `/proc/self` paths resolve through it.
pub(crate) fn prepare_proc() -> Result<(), SetupError> {
    sys::mount(
        Some(c"proc"),
        c"/proc",
        Some(c"proc"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(err("mount proc on /proc".into()))?;
    let fd = sys::open(c"/proc", libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(err("open /proc".into()))?;
    let mut live = Live {
        base: CString::default(),
        root: None,
        dev: None,
        proc_: Some(fd),
    };
    apply(&proc_ops(), &mut live)
}

/// How [`populate_dev`] makes the device nodes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DevNodes {
    /// The host's nodes bound on empty files (a user namespace cannot `mknod`).
    Bind,
    /// `mknod` with the host nodes' numbers: all or nothing (what was made
    /// is removed again if one fails).
    Mknod,
}

/// Kiln's `/dev` in the (empty, writable) directory `dev`: the host's
/// harmless device nodes, the `/proc/self/fd` links, and a world-writable
/// `shm`.
fn populate_dev(dev: BorrowedFd<'_>, nodes: DevNodes) -> Result<(), SetupError> {
    if nodes == DevNodes::Mknod {
        return mknod_all(dev).and_then(|()| dev_links_and_shm(dev));
    }
    for name in DEV_NODES {
        let name_c = CString::new(name).expect("no NUL");
        sys::openat(
            dev,
            &name_c,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o666,
        )
        .map_err(err(format!("create /dev/{name}")))?;
        let src = CString::new(format!("/dev/{name}")).expect("no NUL");
        sys::mount(
            Some(&src),
            &sys::fd_path(dev, Some(name)),
            None,
            libc::MS_BIND,
            None,
        )
        .map_err(err(format!("bind host /dev/{name} on /dev/{name}")))?;
    }
    dev_links_and_shm(dev)
}

fn mknod_all(dev: BorrowedFd<'_>) -> Result<(), SetupError> {
    for (i, name) in DEV_NODES.iter().enumerate() {
        let host = format!("/dev/{name}");
        let made = std::fs::metadata(&host)
            .map_err(|e| {
                SetupError::new(
                    format!("stat {host}"),
                    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                )
            })
            .and_then(|m| {
                use std::os::unix::fs::{FileTypeExt, MetadataExt};
                if !m.file_type().is_char_device() {
                    return Err(SetupError::new(
                        format!("{host} is not a character device"),
                        Errno::ENODEV,
                    ));
                }
                let name_c = CString::new(*name).expect("no NUL");
                sys::mknodat(dev, &name_c, libc::S_IFCHR | 0o666, m.rdev())
                    .map_err(err(format!("mknod /dev/{name}")))
            });
        if let Err(e) = made {
            for done in &DEV_NODES[..i] {
                let _ = sys::unlinkat(dev, &CString::new(*done).expect("no NUL"));
            }
            return Err(e);
        }
    }
    Ok(())
}

fn dev_links_and_shm(dev: BorrowedFd<'_>) -> Result<(), SetupError> {
    for (name, target) in DEV_LINKS {
        let (n, t) = (CString::new(name).unwrap(), CString::new(target).unwrap());
        sys::symlinkat(&t, dev, &n).map_err(err(format!("symlink /dev/{name}")))?;
    }
    sys::mkdirat(dev, c"shm", 0o1777).map_err(err("mkdir /dev/shm".into()))?;
    // mkdir applies the umask; shm must be world-writable and sticky.
    let shm = sys::openat(dev, c"shm", libc::O_DIRECTORY | libc::O_RDONLY, 0)
        .map_err(err("open /dev/shm".into()))?;
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::fchmod(std::os::fd::AsRawFd::as_raw_fd(&shm), 0o1777) } != 0 {
        return Err(SetupError::new("chmod /dev/shm", Errno::last()));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Mount the root (bind or overlay) at the staging point and open it.
    Root(Root),
    /// `mkdir -p` inside the root.
    EnsureDir(PathBuf),
    /// Make the root mount `nosuid,nodev`, and read-only if asked.
    RemountRoot {
        read_only: bool,
    },
    Tmpfs {
        target: PathBuf,
        flags: libc::c_ulong,
        data: String,
    },
    Proc(PathBuf),
    /// Move the `/proc` a spare init prepared (see [`prepare_proc`]), masks
    /// and all, to `proc` in the root.
    MoveProc,
    /// Fill the fresh tmpfs on `/dev` (device nodes, links, `shm`) and make
    /// it read-only, like the helper's template.
    DevPopulate,
    /// Bind the helper's read-only template of `/dev` (see
    /// [`build_dev_template`]) on `/dev`, with everything under it.
    DevFromTemplate(&'static CStr),
    /// Bind a subtree of the root onto itself, read-only or read-write.
    BindSelf {
        path: PathBuf,
        read_only: bool,
    },
    /// Write a file under the sandbox's `/proc` (e.g. `sys/user/max_user_namespaces`).
    WriteProc(&'static str, &'static str),
    MaskProcFile(&'static str),
    MaskProcDir(&'static str),
    ProcReadOnly(&'static str),
}

/// Subtrees in pre-order (parents before children), so a writable directory
/// inside a read-only one is mounted on top of it. The root itself (`""`) is
/// handled by [`Op::RemountRoot`].
fn ordered_subtrees(subtrees: &[Subtree]) -> Vec<Subtree> {
    let mut v: Vec<Subtree> = subtrees.to_vec();
    v.sort_by_key(|s| s.path.components().count());
    // Later entries for the same path win; keep only the last.
    let mut out: Vec<Subtree> = Vec::new();
    for s in v {
        out.retain(|o| o.path != s.path);
        out.push(s);
    }
    out.sort_by(|a, b| {
        (a.path.components().count(), &a.path).cmp(&(b.path.components().count(), &b.path))
    });
    out
}

/// How the sandbox's `/proc` comes about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcSetup {
    /// Mounted and masked now.
    Fresh,
    /// Made ahead by a spare init at `/proc` of its own mount namespace.
    Prepared,
}

/// The size of `/tmp` and `/dev/shm` each: the scratch limit, and never
/// more than the memory limit (their pages are memory).
pub(crate) fn tmpfs_size(l: &crate::limits::Limits) -> Option<u64> {
    match (l.scratch_bytes, l.memory_bytes) {
        (Some(s), Some(m)) => Some(s.min(m)),
        (a, b) => a.or(b),
    }
}

/// `dev_template`: where the helper keeps a ready `/dev` to bind, if it could
/// make one; otherwise each sandbox builds its own. `tmpfs_size`: bytes of
/// `/tmp` and `/dev/shm` each (`None`: the kernel's default, half the RAM).
pub(crate) fn plan(
    root: &Root,
    cwd: &Path,
    subtrees: &[Subtree],
    dev_template: Option<&'static CStr>,
    proc: ProcSetup,
    tmpfs_size: Option<u64>,
) -> Vec<Op> {
    let sized = |mode: &str| match tmpfs_size {
        Some(b) => format!("mode={mode},size={}k", b.div_ceil(1024).max(4)),
        None => format!("mode={mode}"),
    };
    let subtrees = ordered_subtrees(subtrees);
    let root_ro = subtrees
        .iter()
        .any(|s| s.path.as_os_str().is_empty() && s.read_only);
    let mut ops = vec![Op::Root(root.clone())];
    // Directories are created before anything turns read-only.
    for m in KILN_MOUNTS {
        ops.push(Op::EnsureDir(PathBuf::from(m)));
    }
    if !cwd.as_os_str().is_empty() {
        ops.push(Op::EnsureDir(cwd.to_path_buf()));
    }
    ops.push(Op::RemountRoot { read_only: root_ro });
    // The marks are about the input root, so they go on before Kiln's own
    // mounts, which then cover them: a mark on `proc` or `dev` (BuildStream
    // marks both writable under a read-only root), or a staged path whose
    // symlinks lead there, must never rebind Kiln's /proc on itself without
    // its masks, nor touch the shared /dev.
    for s in subtrees.iter().filter(|s| !s.path.as_os_str().is_empty()) {
        ops.push(Op::BindSelf {
            path: s.path.clone(),
            read_only: s.read_only,
        });
    }
    match dev_template {
        Some(template) => ops.push(Op::DevFromTemplate(template)),
        None => {
            ops.push(Op::Tmpfs {
                target: "dev".into(),
                flags: NOSUID_NODEV | libc::MS_NOEXEC,
                data: DEV_TMPFS_OPTIONS.into(),
            });
            ops.push(Op::DevPopulate);
        }
    }
    // /dev is read-only either way; shm is each sandbox's own.
    ops.push(Op::Tmpfs {
        target: "dev/shm".into(),
        flags: NOSUID_NODEV | libc::MS_NOEXEC,
        data: sized("1777"),
    });
    ops.push(Op::Tmpfs {
        target: "tmp".into(),
        flags: NOSUID_NODEV,
        data: sized("1777"),
    });
    match proc {
        ProcSetup::Fresh => {
            ops.push(Op::Proc("proc".into()));
            ops.extend(proc_ops());
        }
        ProcSetup::Prepared => ops.push(Op::MoveProc),
    }
    ops
}

/// What makes a fresh `/proc` Kiln's: no nested user namespaces, runc's
/// masked and read-only paths.
fn proc_ops() -> Vec<Op> {
    let mut ops = Vec::new();
    // No nested user namespaces: without them an action can never hold
    // CAP_SYS_ADMIN again, so it cannot mount, unmount Kiln's masks or ptrace
    // across a namespace boundary. Must precede making /proc/sys read-only.
    ops.push(Op::WriteProc("sys/user/max_user_namespaces", "0"));
    for f in PROC_MASKED_FILES
        .into_iter()
        .filter(|f| proc_entry_exists(f))
    {
        ops.push(Op::MaskProcFile(f));
    }
    for d in PROC_MASKED_DIRS
        .into_iter()
        .filter(|d| proc_entry_exists(d))
    {
        ops.push(Op::MaskProcDir(d));
    }
    for p in PROC_READ_ONLY.into_iter().filter(|p| proc_entry_exists(p)) {
        ops.push(Op::ProcReadOnly(p));
    }
    ops
}

/// What [`apply`] needs from the system; [`Live`] is the real thing.
pub(crate) trait MountSys {
    fn op(&mut self, op: &Op) -> Result<(), SetupError>;
}

pub(crate) fn apply(ops: &[Op], sys: &mut impl MountSys) -> Result<(), SetupError> {
    for op in ops {
        sys.op(op)?;
    }
    Ok(())
}

/// Mounts for real, in the calling process's (fresh, private) mount namespace.
pub(crate) struct Live {
    /// Where the new root is mounted before `pivot_root` (e.g. `/tmp`: in a
    /// private mount namespace, covering it does not affect the host).
    base: CString,
    root: Option<OwnedFd>,
    dev: Option<OwnedFd>,
    proc_: Option<OwnedFd>,
}

fn err(step: String) -> impl FnOnce(Errno) -> SetupError {
    move |e| SetupError::new(step, e)
}

fn rel_c(p: &Path) -> CString {
    if p.as_os_str().is_empty() {
        c".".into()
    } else {
        sys::cpath(p)
    }
}

impl Live {
    pub fn new(base: CString) -> Self {
        Live {
            base,
            root: None,
            dev: None,
            proc_: None,
        }
    }

    /// The new root, once mounted.
    pub fn root_fd(&self) -> Option<&OwnedFd> {
        self.root.as_ref()
    }

    fn root(&self) -> &OwnedFd {
        self.root.as_ref().expect("Op::Root comes first")
    }

    /// Resolves `rel` inside the new root (symlinks followed, but never out of it).
    fn resolve(&self, rel: &Path, flags: libc::c_int) -> Result<OwnedFd, Errno> {
        sys::openat2(
            self.root().as_fd(),
            &rel_c(rel),
            flags | libc::O_PATH,
            0,
            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
        )
    }

    fn mount_root(&mut self, root: &Root) -> Result<(), SetupError> {
        let base_s = self.base.to_string_lossy().into_owned();
        match root {
            Root::Dir(dir) => {
                let src = sys::cpath(dir);
                sys::mount(Some(&src), &self.base, None, libc::MS_BIND, None)
                    .map_err(err(format!("bind {} on {base_s}", dir.display())))?;
            }
            Root::Overlay {
                lowers,
                upper,
                work,
            } => {
                let lower = lowers
                    .iter()
                    .map(|p| p.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(":");
                let data = format!(
                    "lowerdir={lower},upperdir={},workdir={},userxattr,volatile",
                    upper.display(),
                    work.display()
                );
                if data.len() >= 4096 {
                    return Err(SetupError {
                        step: format!(
                            "overlay options are {} bytes, over the kernel's 4095",
                            data.len()
                        ),
                        errno: Errno::E2BIG as i32,
                    });
                }
                let data_c = CString::new(data).expect("checked for NUL");
                sys::mount(
                    Some(c"overlay"),
                    &self.base,
                    Some(c"overlay"),
                    NOSUID_NODEV,
                    Some(&data_c),
                )
                .map_err(err(format!(
                    "mount overlay (upper {}, {} lower layers) on {base_s}",
                    upper.display(),
                    lowers.len()
                )))?;
            }
        }
        let fd = sys::open(&self.base, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(err(format!("open new root at {base_s}")))?;
        self.root = Some(fd);
        Ok(())
    }

    fn ensure_dir(&self, rel: &Path) -> Result<(), SetupError> {
        let mut cur = PathBuf::new();
        for comp in rel.components() {
            let parent = cur.clone();
            cur.push(comp);
            match self.resolve(&cur, libc::O_DIRECTORY) {
                Ok(_) => continue,
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(SetupError::new(format!("open /{}", cur.display()), e)),
            }
            let pfd = self
                .resolve(&parent, libc::O_DIRECTORY)
                .map_err(err(format!("open /{}", parent.display())))?;
            let name = sys::cpath(Path::new(comp.as_os_str()));
            match sys::mkdirat(pfd.as_fd(), &name, 0o755) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(SetupError::new(format!("mkdir /{}", cur.display()), e)),
            }
            // A dangling symlink in the root makes mkdir say EEXIST; insist
            // on a directory.
            self.resolve(&cur, libc::O_DIRECTORY)
                .map_err(err(format!("create directory /{}", cur.display())))?;
        }
        Ok(())
    }

    fn remount_root(&self, read_only: bool) -> Result<(), SetupError> {
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | NOSUID_NODEV;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(None, &self.base, None, flags, None).map_err(err(format!(
            "remount root nosuid,nodev{}",
            if read_only { ",ro" } else { "" }
        )))
    }

    fn tmpfs(&mut self, target: &Path, flags: libc::c_ulong, data: &str) -> Result<(), SetupError> {
        let fd = self
            .resolve(target, libc::O_DIRECTORY)
            .map_err(err(format!("open /{}", target.display())))?;
        let data_c = CString::new(data).expect("no NUL");
        sys::mount(
            Some(c"tmpfs"),
            &sys::fd_path(fd.as_fd(), None),
            Some(c"tmpfs"),
            flags,
            Some(&data_c),
        )
        .map_err(err(format!("mount tmpfs on /{}", target.display())))?;
        if target == Path::new("dev") {
            self.dev = Some(
                self.resolve(target, libc::O_DIRECTORY)
                    .map_err(err("open /dev".into()))?,
            );
        }
        Ok(())
    }

    fn proc(&mut self, target: &Path) -> Result<(), SetupError> {
        let fd = self
            .resolve(target, libc::O_DIRECTORY)
            .map_err(err(format!("open /{}", target.display())))?;
        sys::mount(
            Some(c"proc"),
            &sys::fd_path(fd.as_fd(), None),
            Some(c"proc"),
            NOSUID_NODEV | libc::MS_NOEXEC,
            None,
        )
        .map_err(err(format!("mount proc on /{}", target.display())))?;
        self.proc_ = Some(
            self.resolve(target, libc::O_DIRECTORY)
                .map_err(err("open /proc".into()))?,
        );
        Ok(())
    }

    fn dev(&self) -> &OwnedFd {
        self.dev.as_ref().expect("dev tmpfs mounted first")
    }

    fn proc_fd(&self) -> &OwnedFd {
        self.proc_.as_ref().expect("proc mounted first")
    }

    fn bind_self(&self, path: &Path, read_only: bool) -> Result<(), SetupError> {
        let shown = format!("/{}", path.display());
        let fd = self
            .resolve(path, 0)
            .map_err(err(format!("open {shown}")))?;
        let p = sys::fd_path(fd.as_fd(), None);
        sys::mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None)
            .map_err(err(format!("bind {shown} on itself")))?;
        // The fd still names the covered inode: resolve again to reach the new mount.
        let top = self
            .resolve(path, 0)
            .map_err(err(format!("open {shown}")))?;
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | NOSUID_NODEV;
        if read_only {
            flags |= libc::MS_RDONLY;
        }
        sys::mount(None, &sys::fd_path(top.as_fd(), None), None, flags, None).map_err(err(format!(
            "remount {shown} {}",
            if read_only { "read-only" } else { "read-write" }
        )))
    }

    /// Mounts `src`, a path outside the root (Kiln's own), on the directory
    /// `target` of the root.
    fn mount_from_outside(
        &self,
        src: &CStr,
        target: &str,
        flags: libc::c_ulong,
        what: &str,
    ) -> Result<(), SetupError> {
        let fd = self
            .resolve(Path::new(target), libc::O_DIRECTORY)
            .map_err(err(format!("open /{target}")))?;
        sys::mount(
            Some(src),
            &sys::fd_path(fd.as_fd(), None),
            None,
            flags,
            None,
        )
        .map_err(err(format!("{what} ({})", src.to_string_lossy())))
    }

    fn proc_path(&self, rel: &str) -> CString {
        sys::fd_path(self.proc_fd().as_fd(), Some(rel))
    }
}

impl MountSys for Live {
    fn op(&mut self, op: &Op) -> Result<(), SetupError> {
        match op {
            Op::Root(root) => self.mount_root(root),
            Op::EnsureDir(p) => self.ensure_dir(p).map_err(|e| SetupError {
                step: format!("create directory /{}: {}", p.display(), e.step),
                errno: e.errno,
            }),
            Op::RemountRoot { read_only } => self.remount_root(*read_only),
            Op::Tmpfs {
                target,
                flags,
                data,
            } => self.tmpfs(target, *flags, data),
            Op::Proc(p) => self.proc(p),
            Op::MoveProc => self.mount_from_outside(
                c"/proc",
                "proc",
                libc::MS_MOVE,
                "move the prepared /proc into the root",
            ),
            Op::DevPopulate => {
                populate_dev(self.dev().as_fd(), DevNodes::Bind)?;
                remount_read_only(&sys::fd_path(self.dev().as_fd(), None), "/dev")
            }
            Op::DevFromTemplate(template) => self.mount_from_outside(
                template,
                "dev",
                libc::MS_BIND | libc::MS_REC,
                "bind the /dev template on /dev",
            ),
            Op::BindSelf { path, read_only } => self.bind_self(path, *read_only),
            Op::WriteProc(rel, contents) => {
                match sys::write_file(&self.proc_path(rel), contents.as_bytes()) {
                    // Kernels without the knob: nothing to harden.
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(SetupError::new(format!("write /proc/{rel}"), e)),
                }
            }
            Op::MaskProcFile(rel) => {
                match sys::mount(
                    Some(c"/dev/null"),
                    &self.proc_path(rel),
                    None,
                    libc::MS_BIND,
                    None,
                ) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(SetupError::new(format!("mask /proc/{rel}"), e)),
                }
            }
            Op::MaskProcDir(rel) => {
                match sys::mount(
                    Some(c"tmpfs"),
                    &self.proc_path(rel),
                    Some(c"tmpfs"),
                    libc::MS_RDONLY | NOSUID_NODEV | libc::MS_NOEXEC,
                    Some(c"mode=0555"),
                ) {
                    Ok(()) | Err(Errno::ENOENT) => Ok(()),
                    Err(e) => Err(SetupError::new(format!("mask /proc/{rel}"), e)),
                }
            }
            Op::ProcReadOnly(rel) => {
                let p = self.proc_path(rel);
                match sys::mount(Some(&p), &p, None, libc::MS_BIND | libc::MS_REC, None) {
                    Ok(()) => {}
                    Err(Errno::ENOENT) => return Ok(()),
                    Err(e) => {
                        return Err(SetupError::new(format!("bind /proc/{rel} on itself"), e));
                    }
                }
                remount_read_only(&p, &format!("/proc/{rel}"))
            }
        }
    }
}

/// Makes the mount at `path` (shown as `shown`) read-only, `nosuid`,
/// `nodev` and `noexec`.
fn remount_read_only(path: &CStr, shown: &str) -> Result<(), SetupError> {
    sys::mount(
        None,
        path,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | NOSUID_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(err(format!("remount {shown} read-only")))
}

/// Makes the new root `/` and lets go of the host's tree.
///
/// The old root stays stacked on `/` (reachable through `..` from a
/// subdirectory) until [`detach_old_root`]: nothing may run that is not
/// Kiln's own code before then.
pub(crate) fn pivot(root: &OwnedFd) -> Result<(), SetupError> {
    sys::fchdir(root.as_fd()).map_err(err("chdir to the new root".into()))?;
    sys::pivot_root(c".", c".").map_err(err("pivot_root".into()))
}

/// Detaches the host's tree, stacked on `/` by [`pivot`]. The caller's
/// working directory must still be the new root. This waits for an RCU
/// grace period (the kernel frees the mounts after it), so the init does it
/// while the command's process gets ready, and lets it `execve` only after.
pub(crate) fn detach_old_root() -> Result<(), SetupError> {
    sys::umount2(c".", libc::MNT_DETACH).map_err(err("detach the host root".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: &str, ro: bool) -> Subtree {
        Subtree {
            path: p.into(),
            read_only: ro,
        }
    }

    #[test]
    fn subtrees_are_applied_parents_first() {
        let root = Root::Dir("/r".into());
        let ops = plan(
            &root,
            Path::new("buildstream/p/el"),
            &[
                sub("buildstream-install", false),
                sub("", true),
                sub("usr/lib", false),
                sub("usr", true),
            ],
            None,
            ProcSetup::Fresh,
            None,
        );
        let binds: Vec<_> = ops
            .iter()
            .filter_map(|o| match o {
                Op::BindSelf { path, read_only } => Some((path.to_str().unwrap(), *read_only)),
                _ => None,
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("buildstream-install", false),
                ("usr", true),
                ("usr/lib", false)
            ]
        );
        assert!(ops.contains(&Op::RemountRoot { read_only: true }));
    }

    #[test]
    fn directories_are_created_before_anything_is_read_only() {
        let ops = plan(
            &Root::Dir("/r".into()),
            Path::new("src/x"),
            &[sub("", true)],
            None,
            ProcSetup::Fresh,
            None,
        );
        let pos = |want: &Op| ops.iter().position(|o| o == want).unwrap();
        let remount = pos(&Op::RemountRoot { read_only: true });
        assert!(pos(&Op::EnsureDir("src/x".into())) < remount);
        for m in KILN_MOUNTS {
            assert!(pos(&Op::EnsureDir(m.into())) < remount);
        }
        assert_eq!(ops[0], Op::Root(Root::Dir("/r".into())));
    }

    #[test]
    fn userns_limit_is_written_before_proc_sys_turns_read_only() {
        let ops = plan(
            &Root::Dir("/r".into()),
            Path::new(""),
            &[],
            None,
            ProcSetup::Fresh,
            None,
        );
        let w = ops
            .iter()
            .position(|o| matches!(o, Op::WriteProc("sys/user/max_user_namespaces", "0")))
            .unwrap();
        let ro = ops
            .iter()
            .position(|o| *o == Op::ProcReadOnly("sys"))
            .unwrap();
        let proc_ = ops.iter().position(|o| matches!(o, Op::Proc(_))).unwrap();
        assert!(proc_ < w && w < ro);
    }

    #[test]
    fn marks_go_on_before_kilns_own_mounts() {
        let marks = [
            sub("", true),
            sub("dev", false),
            sub("proc", false),
            sub("tmp", false),
            sub("buildstream-install", false),
        ];
        for template in [None, Some(c"/t")] {
            let ops = plan(
                &Root::Dir("/r".into()),
                Path::new(""),
                &marks,
                template,
                ProcSetup::Fresh,
                None,
            );
            let last_bind = ops
                .iter()
                .rposition(|o| matches!(o, Op::BindSelf { .. }))
                .unwrap();
            let first_kiln = ops
                .iter()
                .position(|o| {
                    matches!(
                        o,
                        Op::Tmpfs { .. } | Op::Proc(_) | Op::DevFromTemplate(_) | Op::DevPopulate
                    )
                })
                .unwrap();
            assert!(last_bind < first_kiln, "{ops:?}");
        }
    }

    #[test]
    fn a_template_dev_gets_a_private_shm_and_no_tmpfs_of_its_own() {
        let ops = plan(
            &Root::Dir("/r".into()),
            Path::new(""),
            &[],
            Some(c"/t"),
            ProcSetup::Fresh,
            None,
        );
        let pos = |want: &Op| ops.iter().position(|o| o == want);
        let bind = pos(&Op::DevFromTemplate(c"/t")).unwrap();
        let shm = ops
            .iter()
            .position(|o| matches!(o, Op::Tmpfs { target, .. } if target == Path::new("dev/shm")))
            .unwrap();
        assert!(bind < shm);
        assert!(pos(&Op::DevPopulate).is_none());
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::Tmpfs { target, .. } if target == Path::new("dev")))
        );
    }

    #[test]
    fn last_setting_for_a_path_wins() {
        let s = ordered_subtrees(&[sub("a", true), sub("a", false)]);
        assert_eq!(s, [sub("a", false)]);
    }

    /// Records what would be done: the order of operations is the contract.
    struct Recorder(Vec<String>);
    impl MountSys for Recorder {
        fn op(&mut self, op: &Op) -> Result<(), SetupError> {
            if let Op::BindSelf { path, .. } = op
                && path == Path::new("fail")
            {
                return Err(SetupError::new("bind /fail", Errno::ENOENT));
            }
            self.0.push(format!("{op:?}"));
            Ok(())
        }
    }

    #[test]
    fn apply_stops_at_the_first_failure_and_says_where() {
        let ops = plan(
            &Root::Dir("/r".into()),
            Path::new(""),
            &[sub("fail", true)],
            None,
            ProcSetup::Fresh,
            None,
        );
        let mut r = Recorder(Vec::new());
        let e = apply(&ops, &mut r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bind /fail: No such file or directory (ENOENT)"
        );
        assert!(!r.0.iter().any(|s| s.contains("WriteProc")));
    }
}
