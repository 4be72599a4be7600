//! The system-call filter every sandboxed command runs under.
//!
//! Like Docker's default profile, it allows everything a build does and
//! denies what builds never need but attacks use: the kernel keyring, `bpf`,
//! `perf_event_open`, `userfaultfd`, kernel modules and kexec, tracing other
//! processes, namespaces and mounts, `io_uring` (whose operations bypass
//! seccomp). It also refuses to set the set-user-ID and set-group-ID bits
//! (`chmod 4755`, `open(…, O_CREAT, 04755)`, `mknod`, `mkdir`): the root of
//! `kiln sandbox run --root DIR` and the command's stdout may be host files,
//! and `nosuid` protects only the sandbox's own mount of them.
//!
//! The rules are data ([`RULES`]), grouped ([`SyscallGroup`]) so that a
//! worker can allow one group back (`worker.seccomp_allow`), and compiled
//! twice: to BPF with `seccompiler` for Kiln's own init, which installs it
//! in the command's process just before `execve`, and to the OCI runtime
//! spec's `linux.seccomp` for an external runtime.
//!
//! Only the native system-call ABI is allowed: a 32-bit (`int 0x80`) call
//! on x86-64 kills the process, and x32 calls fail with `ENOSYS`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A set of system calls the filter denies, allowed back as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyscallGroup {
    /// `add_key`, `request_key`, `keyctl`: keys are not namespaced by serial.
    Keyring,
    /// `bpf`.
    Bpf,
    /// `perf_event_open`.
    Perf,
    /// `userfaultfd` (a staple of kernel exploits).
    Userfaultfd,
    /// Kernel modules, kexec, reboot, swap, clocks, quotas, the kernel log,
    /// `acct`, `open_by_handle_at`, port I/O and other administration calls.
    Kernel,
    /// `ptrace`, `process_vm_readv`/`writev`, `kcmp`, `pidfd_getfd`.
    /// Debuggers, `strace` and LeakSanitizer need this group.
    Ptrace,
    /// `unshare`, `setns`, `clone` with a namespace flag, and `clone3`
    /// (its flags cannot be inspected: it fails with `ENOSYS`, and libc
    /// falls back to `clone`).
    Namespaces,
    /// `mount`, `umount2`, `pivot_root`, `chroot` and the new mount API.
    Mount,
    /// `io_uring_*` (fails with `ENOSYS`): its operations are not filtered.
    IoUring,
    /// Setting the set-user-ID or set-group-ID bit with `chmod`, `fchmod`,
    /// `fchmodat`, `fchmodat2`, `open`/`openat`/`creat` (when creating),
    /// `mknod`, `mkdir` (EPERM), and `openat2` (`ENOSYS`: its mode cannot be
    /// inspected). Allowing it back lets a command leave set-id files on the
    /// host under `kiln sandbox run --root`.
    #[serde(rename = "setid")]
    SetId,
}

impl SyscallGroup {
    pub const ALL: [SyscallGroup; 10] = [
        SyscallGroup::Keyring,
        SyscallGroup::Bpf,
        SyscallGroup::Perf,
        SyscallGroup::Userfaultfd,
        SyscallGroup::Kernel,
        SyscallGroup::Ptrace,
        SyscallGroup::Namespaces,
        SyscallGroup::Mount,
        SyscallGroup::IoUring,
        SyscallGroup::SetId,
    ];

    /// The name used in configuration files and flags.
    pub fn name(self) -> &'static str {
        match self {
            SyscallGroup::Keyring => "keyring",
            SyscallGroup::Bpf => "bpf",
            SyscallGroup::Perf => "perf",
            SyscallGroup::Userfaultfd => "userfaultfd",
            SyscallGroup::Kernel => "kernel",
            SyscallGroup::Ptrace => "ptrace",
            SyscallGroup::Namespaces => "namespaces",
            SyscallGroup::Mount => "mount",
            SyscallGroup::IoUring => "io_uring",
            SyscallGroup::SetId => "setid",
        }
    }
}

impl fmt::Display for SyscallGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SyscallGroup {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SyscallGroup::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown system-call group {s:?}: expected one of {}",
                    SyscallGroup::ALL.map(|g| g.name()).join(", ")
                )
            })
    }
}

/// Which filter sandboxes run under: Kiln's, less the groups allowed back,
/// or none at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPolicy {
    pub enabled: bool,
    pub allow: Vec<SyscallGroup>,
}

impl Default for SeccompPolicy {
    fn default() -> Self {
        SeccompPolicy {
            enabled: true,
            allow: Vec::new(),
        }
    }
}

impl SeccompPolicy {
    pub fn off() -> Self {
        SeccompPolicy {
            enabled: false,
            allow: Vec::new(),
        }
    }

    fn denies(&self, g: SyscallGroup) -> bool {
        self.enabled && !self.allow.contains(&g)
    }

    /// The policy as one environment value for the helper: `off`, or the
    /// allowed groups separated by commas (empty: Kiln's whole filter).
    pub(crate) fn to_env(&self) -> String {
        if !self.enabled {
            return "off".into();
        }
        self.allow
            .iter()
            .map(|g| g.name())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub(crate) fn from_env(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(SeccompPolicy::off());
        }
        let allow = s
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        Ok(SeccompPolicy {
            enabled: true,
            allow,
        })
    }
}

/// When a rule's system call is denied.
#[derive(Debug, Clone, Copy)]
enum When {
    Always,
    /// Argument `mode` has a set-id bit.
    SetIdMode {
        mode: u8,
    },
    /// Argument `flags` creates a file (`O_CREAT` or `O_TMPFILE`) and
    /// argument `mode` has a set-id bit.
    CreatesSetId {
        flags: u8,
        mode: u8,
    },
    /// Argument 0 (`clone`'s flags) asks for a new namespace.
    NamespaceFlag,
}

struct Rule {
    group: SyscallGroup,
    name: &'static str,
    nr: libc::c_long,
    when: When,
    /// `EPERM`, or `ENOSYS` where libc falls back to another call.
    errno: i32,
}

const fn rule(group: SyscallGroup, name: &'static str, nr: libc::c_long) -> Rule {
    Rule {
        group,
        name,
        nr,
        when: When::Always,
        errno: libc::EPERM,
    }
}

const fn enosys(group: SyscallGroup, name: &'static str, nr: libc::c_long) -> Rule {
    Rule {
        group,
        name,
        nr,
        when: When::Always,
        errno: libc::ENOSYS,
    }
}

const fn setid(name: &'static str, nr: libc::c_long, mode: u8) -> Rule {
    Rule {
        group: SyscallGroup::SetId,
        name,
        nr,
        when: When::SetIdMode { mode },
        errno: libc::EPERM,
    }
}

const fn creates_setid(name: &'static str, nr: libc::c_long, flags: u8, mode: u8) -> Rule {
    Rule {
        group: SyscallGroup::SetId,
        name,
        nr,
        when: When::CreatesSetId { flags, mode },
        errno: libc::EPERM,
    }
}

use SyscallGroup as G;

/// Every rule of Kiln's filter.
#[rustfmt::skip]
const RULES: &[Rule] = &[
    rule(G::Keyring, "add_key", libc::SYS_add_key),
    rule(G::Keyring, "request_key", libc::SYS_request_key),
    rule(G::Keyring, "keyctl", libc::SYS_keyctl),
    rule(G::Bpf, "bpf", libc::SYS_bpf),
    rule(G::Perf, "perf_event_open", libc::SYS_perf_event_open),
    rule(G::Userfaultfd, "userfaultfd", libc::SYS_userfaultfd),
    rule(G::Kernel, "init_module", libc::SYS_init_module),
    rule(G::Kernel, "finit_module", libc::SYS_finit_module),
    rule(G::Kernel, "delete_module", libc::SYS_delete_module),
    rule(G::Kernel, "kexec_load", libc::SYS_kexec_load),
    rule(G::Kernel, "kexec_file_load", libc::SYS_kexec_file_load),
    rule(G::Kernel, "reboot", libc::SYS_reboot),
    rule(G::Kernel, "swapon", libc::SYS_swapon),
    rule(G::Kernel, "swapoff", libc::SYS_swapoff),
    rule(G::Kernel, "acct", libc::SYS_acct),
    rule(G::Kernel, "syslog", libc::SYS_syslog),
    rule(G::Kernel, "quotactl", libc::SYS_quotactl),
    rule(G::Kernel, "settimeofday", libc::SYS_settimeofday),
    rule(G::Kernel, "clock_settime", libc::SYS_clock_settime),
    rule(G::Kernel, "clock_adjtime", libc::SYS_clock_adjtime),
    rule(G::Kernel, "open_by_handle_at", libc::SYS_open_by_handle_at),
    rule(G::Kernel, "lookup_dcookie", libc::SYS_lookup_dcookie),
    rule(G::Kernel, "fanotify_init", libc::SYS_fanotify_init),
    rule(G::Kernel, "vhangup", libc::SYS_vhangup),
    #[cfg(target_arch = "x86_64")]
    rule(G::Kernel, "iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    rule(G::Kernel, "ioperm", libc::SYS_ioperm),
    #[cfg(target_arch = "x86_64")]
    rule(G::Kernel, "uselib", libc::SYS_uselib),
    #[cfg(target_arch = "x86_64")]
    rule(G::Kernel, "ustat", libc::SYS_ustat),
    #[cfg(target_arch = "x86_64")]
    rule(G::Kernel, "sysfs", libc::SYS_sysfs),
    rule(G::Ptrace, "ptrace", libc::SYS_ptrace),
    rule(G::Ptrace, "process_vm_readv", libc::SYS_process_vm_readv),
    rule(G::Ptrace, "process_vm_writev", libc::SYS_process_vm_writev),
    rule(G::Ptrace, "kcmp", libc::SYS_kcmp),
    rule(G::Ptrace, "pidfd_getfd", libc::SYS_pidfd_getfd),
    rule(G::Namespaces, "unshare", libc::SYS_unshare),
    rule(G::Namespaces, "setns", libc::SYS_setns),
    Rule { group: G::Namespaces, name: "clone", nr: libc::SYS_clone, when: When::NamespaceFlag, errno: libc::EPERM },
    enosys(G::Namespaces, "clone3", libc::SYS_clone3),
    rule(G::Mount, "mount", libc::SYS_mount),
    rule(G::Mount, "umount2", libc::SYS_umount2),
    rule(G::Mount, "pivot_root", libc::SYS_pivot_root),
    rule(G::Mount, "chroot", libc::SYS_chroot),
    rule(G::Mount, "open_tree", libc::SYS_open_tree),
    rule(G::Mount, "move_mount", libc::SYS_move_mount),
    rule(G::Mount, "fsopen", libc::SYS_fsopen),
    rule(G::Mount, "fsconfig", libc::SYS_fsconfig),
    rule(G::Mount, "fsmount", libc::SYS_fsmount),
    rule(G::Mount, "fspick", libc::SYS_fspick),
    rule(G::Mount, "mount_setattr", libc::SYS_mount_setattr),
    enosys(G::IoUring, "io_uring_setup", libc::SYS_io_uring_setup),
    enosys(G::IoUring, "io_uring_enter", libc::SYS_io_uring_enter),
    enosys(G::IoUring, "io_uring_register", libc::SYS_io_uring_register),
    #[cfg(target_arch = "x86_64")]
    setid("chmod", libc::SYS_chmod, 1),
    setid("fchmod", libc::SYS_fchmod, 1),
    setid("fchmodat", libc::SYS_fchmodat, 2),
    setid("fchmodat2", SYS_FCHMODAT2, 2),
    #[cfg(target_arch = "x86_64")]
    setid("creat", libc::SYS_creat, 1),
    #[cfg(target_arch = "x86_64")]
    setid("mknod", libc::SYS_mknod, 1),
    setid("mknodat", libc::SYS_mknodat, 2),
    #[cfg(target_arch = "x86_64")]
    setid("mkdir", libc::SYS_mkdir, 1),
    setid("mkdirat", libc::SYS_mkdirat, 2),
    #[cfg(target_arch = "x86_64")]
    creates_setid("open", libc::SYS_open, 1, 2),
    creates_setid("openat", libc::SYS_openat, 2, 3),
    enosys(G::SetId, "openat2", libc::SYS_openat2),
];

/// `fchmodat2` (Linux 6.6) has the same number on every architecture.
const SYS_FCHMODAT2: libc::c_long = 452;
/// `O_TMPFILE` without `O_DIRECTORY`: the bit that makes `open` create.
const O_TMPFILE_BIT: u64 = 0o20_000_000;
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];
const SETID_BITS: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];

/// One compiled BPF program, ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub(crate) type Program = Vec<seccompiler::sock_filter>;

fn bit_set(arg: u8, bit: u64) -> seccompiler::SeccompCondition {
    seccompiler::SeccompCondition::new(
        arg,
        seccompiler::SeccompCmpArgLen::Dword,
        seccompiler::SeccompCmpOp::MaskedEq(bit),
        bit,
    )
    .expect("argument index below 6")
}

/// The conditions (ORed) under which `r` denies its call; empty: always.
fn conditions(r: &Rule) -> Vec<seccompiler::SeccompRule> {
    let one = |c: Vec<seccompiler::SeccompCondition>| {
        seccompiler::SeccompRule::new(c).expect("non-empty condition list")
    };
    match r.when {
        When::Always => Vec::new(),
        When::SetIdMode { mode } => SETID_BITS
            .iter()
            .map(|&b| one(vec![bit_set(mode, b)]))
            .collect(),
        When::CreatesSetId { flags, mode } => [libc::O_CREAT as u64, O_TMPFILE_BIT]
            .iter()
            .flat_map(|&f| {
                SETID_BITS
                    .iter()
                    .map(move |&b| one(vec![bit_set(flags, f), bit_set(mode, b)]))
            })
            .collect(),
        When::NamespaceFlag => NAMESPACE_FLAGS
            .iter()
            .map(|&f| one(vec![bit_set(0, f as u64)]))
            .collect(),
    }
}

/// The BPF programs for `policy` (one per errno; the kernel applies the
/// strictest verdict of all), or none when it is off.
pub(crate) fn compile(policy: &SeccompPolicy) -> Result<Vec<Program>, String> {
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| format!("no seccomp filter for {}: {e:?}", std::env::consts::ARCH))?;
    let mut by_errno: BTreeMap<i32, BTreeMap<i64, Vec<seccompiler::SeccompRule>>> = BTreeMap::new();
    for r in RULES.iter().filter(|r| policy.denies(r.group)) {
        by_errno
            .entry(r.errno)
            .or_default()
            .insert(r.nr, conditions(r));
    }
    let mut out = Vec::new();
    for (i, (errno, rules)) in by_errno.into_iter().enumerate() {
        let filter = seccompiler::SeccompFilter::new(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(errno as u32),
            arch,
        )
        .map_err(|e| format!("seccomp filter: {e}"))?;
        let mut prog: Program = filter
            .try_into()
            .map_err(|e| format!("seccomp filter: {e:?}"))?;
        if i == 0 && cfg!(target_arch = "x86_64") {
            prog.splice(0..0, x32_guard());
        }
        out.push(prog);
    }
    Ok(out)
}

/// x32 system calls carry the x86-64 audit arch with bit 30 set in their
/// number: no rule above would match them, so they are refused first.
fn x32_guard() -> [seccompiler::sock_filter; 3] {
    // BPF_LD | BPF_W | BPF_ABS
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    let insn = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    [
        // seccomp_data.nr is at offset 0.
        insn(BPF_LD_W_ABS, 0, 0, 0),
        insn(BPF_JGE_K, 0, 1, 0x4000_0000),
        insn(
            BPF_RET_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
    ]
}

/// Installs `programs` in the calling process. `no_new_privs` must be set.
/// Fork-safe: no allocation.
pub(crate) fn install(programs: &[Program]) -> Result<(), nix::errno::Errno> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    for p in programs {
        let prog = SockFprog {
            len: p.len() as libc::c_ushort,
            filter: p.as_ptr(),
        };
        // SAFETY: a valid sock_fprog pointing at a live program.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const SockFprog,
            )
        };
        if r != 0 {
            return Err(nix::errno::Errno::last());
        }
    }
    Ok(())
}

/// The filter as an OCI runtime spec's `linux.seccomp` (for crun or runc,
/// which compile it with libseccomp for every ABI of the host).
pub(crate) fn oci_spec(policy: &SeccompPolicy) -> Option<serde_json::Value> {
    if !policy.enabled {
        return None;
    }
    let arg = |index: u8, bit: u64| serde_json::json!({"index": index, "value": bit, "valueTwo": bit, "op": "SCMP_CMP_MASKED_EQ"});
    let mut syscalls = Vec::new();
    for r in RULES.iter().filter(|r| policy.denies(r.group)) {
        let action =
            serde_json::json!({"names": [r.name], "action": "SCMP_ACT_ERRNO", "errnoRet": r.errno});
        let with = |args: Vec<serde_json::Value>| {
            let mut a = action.clone();
            a["args"] = serde_json::Value::Array(args);
            a
        };
        match r.when {
            When::Always => syscalls.push(action),
            When::SetIdMode { mode } => {
                syscalls.extend(SETID_BITS.iter().map(|&b| with(vec![arg(mode, b)])))
            }
            When::CreatesSetId { flags, mode } => {
                for f in [libc::O_CREAT as u64, O_TMPFILE_BIT] {
                    syscalls.extend(
                        SETID_BITS
                            .iter()
                            .map(|&b| with(vec![arg(flags, f), arg(mode, b)])),
                    );
                }
            }
            When::NamespaceFlag => syscalls.extend(
                NAMESPACE_FLAGS
                    .iter()
                    .map(|&f| with(vec![arg(0, f as u64)])),
            ),
        }
    }
    let arches: &[&str] = if cfg!(target_arch = "x86_64") {
        &["SCMP_ARCH_X86_64"]
    } else {
        &["SCMP_ARCH_AARCH64"]
    };
    Some(serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arches,
        "syscalls": syscalls,
    }))
}

/// The filter every sandbox of this helper installs (set once at start;
/// inits forked from the helper inherit it).
pub(crate) fn programs() -> &'static [Program] {
    PROGRAMS.get().map_or(&[], Vec::as_slice)
}

static PROGRAMS: std::sync::OnceLock<Vec<Program>> = std::sync::OnceLock::new();
static POLICY: std::sync::OnceLock<SeccompPolicy> = std::sync::OnceLock::new();

pub(crate) fn set_programs(p: Vec<Program>) {
    let _ = PROGRAMS.set(p);
}

pub(crate) fn set_policy(p: SeccompPolicy) {
    let _ = POLICY.set(p);
}

/// The helper's policy (for the OCI spec of an external runtime).
pub(crate) fn policy() -> SeccompPolicy {
    POLICY.get().cloned().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_round_trips_through_the_environment() {
        for p in [
            SeccompPolicy::default(),
            SeccompPolicy::off(),
            SeccompPolicy {
                enabled: true,
                allow: vec![SyscallGroup::Ptrace, SyscallGroup::IoUring],
            },
        ] {
            assert_eq!(SeccompPolicy::from_env(&p.to_env()).unwrap(), p);
        }
        assert!(
            SeccompPolicy::from_env("ptrace,nope")
                .unwrap_err()
                .contains("\"nope\"")
        );
    }

    #[test]
    fn config_names_are_the_display_names() {
        for g in SyscallGroup::ALL {
            let v: SyscallGroup = serde_json::from_value(serde_json::json!(g.name())).unwrap();
            assert_eq!(v, g);
            assert_eq!(g.name().parse::<SyscallGroup>().unwrap(), g);
        }
    }

    #[test]
    fn compiles_for_this_host() {
        let progs = compile(&SeccompPolicy::default()).unwrap();
        // EPERM and ENOSYS.
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty() && p.len() < 4096));
        assert!(compile(&SeccompPolicy::off()).unwrap().is_empty());
        let all = SeccompPolicy {
            enabled: true,
            allow: SyscallGroup::ALL.to_vec(),
        };
        assert!(compile(&all).unwrap().is_empty());
    }

    #[test]
    fn the_oci_form_names_every_denied_call() {
        let spec = oci_spec(&SeccompPolicy {
            enabled: true,
            allow: vec![SyscallGroup::Ptrace],
        })
        .unwrap();
        let names: Vec<&str> = spec["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["names"][0].as_str().unwrap())
            .collect();
        assert!(names.contains(&"keyctl") && names.contains(&"fchmodat"));
        assert!(!names.contains(&"ptrace"));
        assert!(oci_spec(&SeccompPolicy::off()).is_none());
    }
}
