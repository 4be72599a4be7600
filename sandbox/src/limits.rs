//! Resource limits: what a request asks for ([`Limits`]), what the sandbox
//! ran into ([`LimitHit`]), and the cgroups that enforce memory, process
//! and CPU limits ([`Cgroups`], in the helper).
//!
//! - **cgroup v1** (a root helper on a v1 host): one directory per sandbox
//!   in the memory, pids and cpu hierarchies, under `kiln-<helper pid>` in
//!   the helper's own cgroup of each.
//! - **cgroup v2** where a subtree is delegated to the helper's user (its
//!   own cgroup is writable and offers memory, pids and cpu): the processes
//!   of that cgroup move to a `kiln-worker` leaf, and sandboxes go under
//!   `kiln-sandboxes` beside it.
//! - Otherwise no cgroup: an unprivileged helper falls back to
//!   `RLIMIT_NPROC` (counted per user namespace since Linux 5.14) for the
//!   process limit, and says which limits it could not apply.
//!
//! Everything is done through directory handles opened at start: the helper
//! of the userns backend drops `/sys` from its mount namespace afterwards.
//! A sandbox's cgroup is made ahead (with its spare init, or in idle
//! moments), and removed in idle moments after it ends: the request itself
//! pays only for limits that differ from the last request's.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::sys;

/// Resource limits of one sandbox; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (resident and swap) of all its processes together, including
    /// what they keep in its `/tmp` and `/dev/shm`. Past it, the kernel's
    /// OOM killer ends the largest process.
    pub memory_bytes: Option<u64>,
    /// Processes and threads at once; a `fork` past it fails with EAGAIN.
    pub pids: Option<u64>,
    /// CPU time per second of wall time, in thousandths of a CPU (1500: one
    /// and a half CPUs). Every sandbox has an equal CPU weight regardless.
    pub cpu_millis: Option<u64>,
    /// Size of the `/tmp` and `/dev/shm` tmpfs each, and the largest file a
    /// process may write anywhere (`RLIMIT_FSIZE`; SIGXFSZ past it).
    pub scratch_bytes: Option<u64>,
}

/// A limit the sandbox ran into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitHit {
    /// The kernel's OOM killer ended `kills` processes at the memory limit.
    Memory { limit_bytes: u64, kills: u64 },
    /// `refused` process creations failed at the process limit.
    Pids { limit: u64, refused: u64 },
    /// A process was killed by SIGXFSZ: a file reached the scratch limit.
    FileSize { limit_bytes: u64 },
    /// `/tmp` or `/dev/shm` was full.
    TmpfsFull { path: String, size_bytes: u64 },
}

/// `512 MiB`, `1.5 GiB`, `4096 bytes`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (u, n) in UNITS {
        if b >= n {
            let v = b as f64 / n as f64;
            return if b.is_multiple_of(n) {
                format!("{} {u}", b / n)
            } else {
                format!("{v:.1} {u}")
            };
        }
    }
    format!("{b} bytes")
}

impl std::fmt::Display for LimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitHit::Memory { limit_bytes, kills } => write!(
                f,
                "memory limit of {} reached: the kernel's OOM killer ended {kills} process{}",
                human_bytes(*limit_bytes),
                if *kills == 1 { "" } else { "es" }
            ),
            LimitHit::Pids { limit, refused } => write!(
                f,
                "process limit of {limit} reached: {refused} fork{} failed with EAGAIN",
                if *refused == 1 { "" } else { "s" }
            ),
            LimitHit::FileSize { limit_bytes } => write!(
                f,
                "file size limit of {} reached: a process was killed by SIGXFSZ",
                human_bytes(*limit_bytes)
            ),
            LimitHit::TmpfsFull { path, size_bytes } => {
                write!(f, "{path} is full ({})", human_bytes(*size_bytes))
            }
        }
    }
}

/// Which kernel interface enforces a sandbox's limits.
#[derive(Debug)]
enum Hierarchy {
    /// One parent directory (ours) per controller, each in its own
    /// hierarchy (cpu may share one with cpuacct).
    V1 {
        memory: OwnedFd,
        pids: OwnedFd,
        cpu: OwnedFd,
    },
    /// The parent of the sandboxes' cgroups.
    V2 { parent: OwnedFd },
}

/// The helper's cgroups: how to make one per sandbox, or why it cannot.
#[derive(Debug)]
pub(crate) struct Cgroups {
    hierarchy: Option<Hierarchy>,
    /// Why limits cannot be applied (empty when they all can).
    pub limitations: Vec<String>,
    /// Whether `RLIMIT_NPROC` stands in for the pids controller.
    pub nproc_fallback: bool,
    next: u64,
    /// Cgroups of finished sandboxes, removed in idle moments.
    dead: Vec<Group>,
    /// Where they are, for messages.
    pub describe: String,
}

/// One sandbox's cgroup (a directory per controller on v1).
#[derive(Debug)]
pub(crate) struct Group {
    name: CString,
    /// `(parent, dir)` per controller.
    dirs: Vec<(BorrowedFd<'static>, OwnedFd)>,
    v2: bool,
    /// The limits written so far.
    pub limits: Limits,
    /// Read by the sandbox's init when its command is done.
    pub probes: Probes,
}

/// Open counters of a sandbox's cgroup: the OOM kills and refused forks.
#[derive(Debug, Default)]
pub(crate) struct Probes {
    pub memory_events: Option<OwnedFd>,
    pub pids_events: Option<OwnedFd>,
}

fn open_dir(p: &Path) -> Result<OwnedFd, Errno> {
    sys::open(&sys::cpath(p), libc::O_PATH | libc::O_DIRECTORY, 0)
}

fn write_at(dir: BorrowedFd<'_>, file: &str, value: &str) -> Result<(), Errno> {
    let f = CString::new(file).expect("no NUL");
    let fd = sys::openat(dir, &f, libc::O_WRONLY, 0)?;
    sys::write_all(fd.as_fd(), value.as_bytes())
}

fn mkdir_open(parent: BorrowedFd<'_>, name: &CString) -> Result<OwnedFd, Errno> {
    match sys::mkdirat(parent, name, 0o755) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    sys::openat(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// `/proc/self/cgroup`: `(controllers, path)` per hierarchy.
fn own_cgroups() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

/// cgroup mounts from mountinfo: `(mount point, root, fstype, super options)`.
fn cgroup_mounts() -> Vec<(PathBuf, String, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let fstype = *r.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some((
                PathBuf::from(*f.get(4)?),
                f.get(3)?.to_string(),
                fstype.to_string(),
                r.get(2).copied().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

fn under(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(root).unwrap_or(path);
    mount.join(rel.trim_start_matches('/'))
}

/// The helper's own directory in the v1 hierarchy holding `controller`.
fn v1_dir(controller: &str) -> Option<PathBuf> {
    let own = own_cgroups();
    let (_, path) = own
        .iter()
        .find(|(c, _)| c.split(',').any(|c| c == controller))?;
    let (mount, root, _, _) = cgroup_mounts()
        .into_iter()
        .find(|(_, _, t, o)| t == "cgroup" && o.split(',').any(|c| c == controller))?;
    Some(under(&mount, &root, path))
}

impl Cgroups {
    /// Finds what this helper may use; call before its mount namespace is
    /// trimmed. `privileged`: it holds CAP_SETUID/SETGID (root, usually).
    pub fn detect(privileged: bool) -> Cgroups {
        // SAFETY: plain getter.
        let pid = unsafe { libc::getpid() };
        let mut c = Cgroups {
            hierarchy: None,
            limitations: Vec::new(),
            nproc_fallback: false,
            next: 0,
            dead: Vec::new(),
            describe: String::new(),
        };
        match Self::try_v2(pid).or_else(|e2| Self::try_v1(pid, privileged).map_err(|e1| (e2, e1))) {
            Ok((h, describe)) => {
                c.hierarchy = Some(h);
                c.describe = describe;
            }
            Err((why_v2, why_v1)) => {
                let why = format!("no cgroup for sandboxes ({why_v1}; {why_v2})");
                c.limitations
                    .push(format!("memory limit not applied: {why}"));
                c.limitations
                    .push(format!("CPU limit and share not applied: {why}"));
                if privileged {
                    c.limitations.push(format!(
                        "process limit not applied: {why}, and RLIMIT_NPROC does not bind host uid 0"
                    ));
                } else {
                    c.nproc_fallback = true;
                }
            }
        }
        c
    }

    fn try_v1(pid: libc::pid_t, privileged: bool) -> Result<(Hierarchy, String), String> {
        let dirs: Vec<PathBuf> = ["memory", "pids", "cpu"]
            .iter()
            .map(|c| v1_dir(c).ok_or_else(|| format!("no cgroup v1 {c} controller")))
            .collect::<Result<_, _>>()?;
        if !privileged {
            return Err(format!(
                "cgroup v1 needs a root helper (this one runs as uid {})",
                // SAFETY: plain getter.
                unsafe { libc::geteuid() }
            ));
        }
        let name = CString::new(format!("kiln-{pid}")).expect("no NUL");
        let mut fds = Vec::new();
        for d in &dirs {
            remove_stale(d);
            let parent = open_dir(d).map_err(|e| format!("open {}: {e}", d.display()))?;
            let ours = mkdir_open(parent.as_fd(), &name)
                .map_err(|e| format!("create {}/{}: {e}", d.display(), name.to_string_lossy()))?;
            fds.push(ours);
        }
        let [memory, pids, cpu]: [OwnedFd; 3] = fds.try_into().expect("three controllers");
        let describe = format!(
            "cgroup v1: {}/kiln-{pid}/…",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok((Hierarchy::V1 { memory, pids, cpu }, describe))
    }

    fn try_v2(pid: libc::pid_t) -> Result<(Hierarchy, String), String> {
        let own = own_cgroups();
        let (_, path) = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .ok_or("no cgroup v2 hierarchy")?;
        let (mount, root, _, _) = cgroup_mounts()
            .into_iter()
            .find(|(_, _, t, _)| t == "cgroup2")
            .ok_or("no cgroup v2 mount")?;
        let dir = under(&mount, &root, path);
        let controllers =
            std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for want in ["memory", "pids", "cpu"] {
            if !controllers.split_whitespace().any(|c| c == want) {
                return Err(format!(
                    "cgroup v2 {} does not offer the {want} controller (not delegated)",
                    dir.display()
                ));
            }
        }
        let c = sys::cpath(&dir);
        // SAFETY: valid string.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(format!(
                "cgroup v2 {} is not writable by this user",
                dir.display()
            ));
        }
        let own_fd = open_dir(&dir).map_err(|e| format!("open {}: {e}", dir.display()))?;
        // No process may stay in a cgroup whose children get controllers:
        // ours (the worker's, the helper's) move to a leaf beside the
        // sandboxes'.
        let leaf = mkdir_open(
            own_fd.as_fd(),
            &CString::new("kiln-worker").expect("no NUL"),
        )
        .map_err(|e| format!("create {}/kiln-worker: {e}", dir.display()))?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines() {
            // A process that exited meanwhile: ESRCH, fine.
            let _ = write_at(leaf.as_fd(), "cgroup.procs", p);
        }
        write_at(
            own_fd.as_fd(),
            "cgroup.subtree_control",
            "+memory +pids +cpu",
        )
        .map_err(|e| format!("enable controllers in {}: {e}", dir.display()))?;
        let name = CString::new(format!("kiln-sandboxes-{pid}")).expect("no NUL");
        let parent = mkdir_open(own_fd.as_fd(), &name)
            .map_err(|e| format!("create {}/{}: {e}", dir.display(), name.to_string_lossy()))?;
        write_at(
            parent.as_fd(),
            "cgroup.subtree_control",
            "+memory +pids +cpu",
        )
        .map_err(|e| format!("enable controllers below {}: {e}", dir.display()))?;
        Ok((
            Hierarchy::V2 { parent },
            format!("cgroup v2: {}/{}/…", dir.display(), name.to_string_lossy()),
        ))
    }

    /// The OCI backend's: its runtime makes the cgroups (as root), or
    /// there are none (the unprivileged monitor stands in an empty tmpfs
    /// for `/sys/fs/cgroup`, and `RLIMIT_NPROC` bounds processes).
    pub fn for_oci(privileged: bool) -> Cgroups {
        let mut c = Cgroups {
            hierarchy: None,
            limitations: Vec::new(),
            nproc_fallback: !privileged,
            next: 0,
            dead: Vec::new(),
            describe: if privileged {
                "made by the OCI runtime under /kiln/…".into()
            } else {
                String::new()
            },
        };
        if !privileged {
            let why = "the OCI backend gets cgroups only from a root helper";
            c.limitations
                .push(format!("memory limit not applied: {why}"));
            c.limitations
                .push(format!("CPU limit and share not applied: {why}"));
        }
        c
    }

    pub fn available(&self) -> bool {
        self.hierarchy.is_some()
    }

    /// A new cgroup with `limits` (made now: ahead of its sandbox).
    pub fn make(&mut self, limits: &Limits) -> Result<Group, String> {
        let Some(h) = &self.hierarchy else {
            return Err("no cgroups".into());
        };
        self.next += 1;
        let name = CString::new(format!("s{}", self.next)).expect("no NUL");
        let parents: Vec<BorrowedFd<'static>> = match h {
            // SAFETY: the hierarchy lives as long as the helper (it is
            // never dropped before exit), so the borrow outlives any group.
            Hierarchy::V1 { memory, pids, cpu } => [memory, pids, cpu]
                .iter()
                .map(|f| unsafe { BorrowedFd::borrow_raw(f.as_raw_fd()) })
                .collect(),
            // SAFETY: as above.
            Hierarchy::V2 { parent } => vec![unsafe { BorrowedFd::borrow_raw(parent.as_raw_fd()) }],
        };
        let v2 = matches!(h, Hierarchy::V2 { .. });
        let mut dirs = Vec::new();
        for p in parents {
            let d = mkdir_open(p, &name)
                .map_err(|e| format!("create cgroup {}: {e}", name.to_string_lossy()))?;
            dirs.push((p, d));
        }
        let mut g = Group {
            name,
            dirs,
            v2,
            limits: Limits::default(),
            probes: Probes::default(),
        };
        let (mem, pids) = if v2 { (0, 0) } else { (0, 1) };
        let open = |i: usize, f: &str| {
            sys::openat(
                g.dirs[i].1.as_fd(),
                &CString::new(f).expect("no NUL"),
                libc::O_RDONLY,
                0,
            )
            .ok()
        };
        g.probes = Probes {
            memory_events: open(
                mem,
                if v2 {
                    "memory.events"
                } else {
                    "memory.oom_control"
                },
            ),
            pids_events: open(pids, "pids.events"),
        };
        if let Err(e) = g.set(limits) {
            self.retire(g);
            return Err(e);
        }
        Ok(g)
    }

    /// Queues a finished sandbox's cgroup for removal.
    pub fn retire(&mut self, g: Group) {
        self.dead.push(g);
    }

    pub fn has_dead(&self) -> bool {
        !self.dead.is_empty()
    }

    /// Removes the cgroups of finished sandboxes (no process is left in
    /// them once their init was reaped).
    pub fn remove_dead(&mut self) {
        self.dead.retain(|g| !g.remove());
    }
}

/// Removes `kiln-<pid>` directories of helpers that no longer run (a
/// helper killed with SIGKILL leaves its empty cgroups behind).
fn remove_stale(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("kiln-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(sub) = std::fs::read_dir(e.path()) {
            for s in sub.flatten().filter(|s| s.path().is_dir()) {
                let _ = std::fs::remove_dir(s.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

impl Group {
    /// Writes the limits that differ from those already set.
    pub fn set(&mut self, l: &Limits) -> Result<(), String> {
        let w = |i: usize, file: &str, v: String| {
            write_at(self.dirs[i].1.as_fd(), file, &v).map_err(|e| {
                format!(
                    "write {v} to cgroup {}/{file}: {e}",
                    self.name.to_string_lossy()
                )
            })
        };
        let unlimited = if self.v2 {
            "max".to_string()
        } else {
            "-1".to_string()
        };
        if l.memory_bytes != self.limits.memory_bytes {
            let v = l.memory_bytes.map_or(unlimited.clone(), |b| b.to_string());
            if self.v2 {
                w(0, "memory.max", v)?;
                // No swapping around the limit (absent without swap accounting).
                let _ = w(0, "memory.swap.max", "0".into());
            } else {
                // memsw may never be below the memory limit: lift it first.
                let _ = w(0, "memory.memsw.limit_in_bytes", "-1".into());
                w(0, "memory.limit_in_bytes", v.clone())?;
                let _ = w(0, "memory.memsw.limit_in_bytes", v);
            }
        }
        if l.pids != self.limits.pids {
            let i = if self.v2 { 0 } else { 1 };
            w(
                i,
                "pids.max",
                l.pids.map_or("max".into(), |n| n.to_string()),
            )?;
        }
        if l.cpu_millis != self.limits.cpu_millis {
            const PERIOD: u64 = 100_000;
            let quota = l.cpu_millis.map(|m| (m * PERIOD / 1000).max(1000));
            if self.v2 {
                let q = quota.map_or("max".into(), |q| q.to_string());
                w(0, "cpu.max", format!("{q} {PERIOD}"))?;
            } else {
                w(2, "cpu.cfs_period_us", PERIOD.to_string())?;
                w(
                    2,
                    "cpu.cfs_quota_us",
                    quota.map_or("-1".into(), |q| q.to_string()),
                )?;
            }
        }
        self.limits = *l;
        Ok(())
    }

    /// Moves process `pid` (and its threads) into this cgroup.
    pub fn place(&self, pid: libc::pid_t) -> Result<(), Errno> {
        for (_, d) in &self.dirs {
            write_at(d.as_fd(), "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    fn remove(&self) -> bool {
        let mut all = true;
        for (p, _) in &self.dirs {
            match sys::rmdirat(*p, &self.name) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(_) => all = false,
            }
        }
        all
    }
}

/// Reads `key N` from a cgroup counter file (from its start).
fn counter(fd: &OwnedFd, key: &str) -> u64 {
    let mut buf = [0u8; 512];
    // SAFETY: valid buffer; pread from offset 0.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n <= 0 {
        return 0;
    }
    std::str::from_utf8(&buf[..n as usize])
        .unwrap_or("")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

impl Probes {
    /// The limits the sandbox ran into, by its cgroup's counters.
    pub fn hits(&self, limits: &Limits) -> Vec<LimitHit> {
        let mut out = Vec::new();
        if let (Some(fd), Some(limit_bytes)) = (&self.memory_events, limits.memory_bytes) {
            let kills = counter(fd, "oom_kill");
            if kills > 0 {
                out.push(LimitHit::Memory { limit_bytes, kills });
            }
        }
        if let (Some(fd), Some(limit)) = (&self.pids_events, limits.pids) {
            let refused = counter(fd, "max");
            if refused > 0 {
                out.push(LimitHit::Pids { limit, refused });
            }
        }
        out
    }

    /// The fd numbers, for a child of `clone3` to [`adopt`](Self::adopt).
    pub fn raw(&self) -> (Option<RawFd>, Option<RawFd>) {
        (
            self.memory_events.as_ref().map(|f| f.as_raw_fd()),
            self.pids_events.as_ref().map(|f| f.as_raw_fd()),
        )
    }

    /// Takes ownership of the probe fds inherited at `clone3`.
    ///
    /// # Safety
    /// Only in the child, whose copies of these fds nothing else owns.
    pub unsafe fn adopt(raw: Option<(Option<RawFd>, Option<RawFd>)>) -> Probes {
        let (m, p) = raw.unwrap_or((None, None));
        // SAFETY: the caller vouches for ownership.
        let own = |fd: Option<RawFd>| fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        Probes {
            memory_events: own(m),
            pids_events: own(p),
        }
    }

    pub fn raw_fds(&self) -> Vec<libc::c_int> {
        [&self.memory_events, &self.pids_events]
            .into_iter()
            .flatten()
            .map(|f| f.as_raw_fd())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_read_as_sentences() {
        assert_eq!(
            LimitHit::Memory {
                limit_bytes: 512 << 20,
                kills: 1
            }
            .to_string(),
            "memory limit of 512 MiB reached: the kernel's OOM killer ended 1 process"
        );
        assert_eq!(
            LimitHit::Pids {
                limit: 64,
                refused: 3
            }
            .to_string(),
            "process limit of 64 reached: 3 forks failed with EAGAIN"
        );
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 bytes");
    }

    #[test]
    fn paths_below_a_mount_root() {
        assert_eq!(
            under(Path::new("/sys/fs/cgroup/memory"), "/", "/a/b"),
            PathBuf::from("/sys/fs/cgroup/memory/a/b")
        );
        assert_eq!(
            under(
                Path::new("/sys/fs/cgroup/memory"),
                "/docker/x",
                "/docker/x/y"
            ),
            PathBuf::from("/sys/fs/cgroup/memory/y")
        );
    }
}
