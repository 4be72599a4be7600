//! What the caller asks for: one command, one root, and the environment around it.

use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SandboxError};
use crate::limits::Limits;

/// The directory tree that becomes `/` inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Root {
    /// A plain directory, bind-mounted and modified in place.
    Dir(PathBuf),
    /// Read-only lower layers (top first) under a writable upper directory,
    /// mounted as overlayfs (`userxattr,volatile`) inside the sandbox's own
    /// user and mount namespaces. Writes only ever land in `upper`; `work` is
    /// overlayfs's scratch directory on the same filesystem as `upper`.
    Overlay {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
}

/// Where the command's stdout or stderr goes. stdin is always `/dev/null`.
#[derive(Debug)]
pub enum Stdio {
    /// Discarded (`/dev/null`).
    Null,
    /// A file on the host, created or truncated by the caller's process.
    File(PathBuf),
    /// An already-open file descriptor (passed to the helper with SCM_RIGHTS).
    Fd(OwnedFd),
}

/// A subtree of the root mounted read-only or read-write. Paths are relative to
/// the root (`""` is the root itself); nesting is allowed (`""` read-only,
/// `buildstream-install` writable): they are applied parents first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subtree {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Which backend runs the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BackendKind {
    /// Kiln's own user-namespace chroot (the fast path).
    #[default]
    Userns,
    /// The same request expressed as an OCI runtime spec and run by an OCI runtime.
    Oci,
}

/// One command to run hermetically.
#[derive(Debug)]
pub struct SandboxRequest {
    pub root: Root,
    /// `argv[0]` is looked up in the sandbox's `PATH` (from `env`) when it has no `/`.
    pub argv: Vec<String>,
    /// The whole environment: nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// Working directory relative to the root; created if missing.
    pub cwd: PathBuf,
    /// Ids inside the sandbox; both map to the helper's own uid/gid outside.
    pub uid: u32,
    pub gid: u32,
    /// `false`: a network namespace with only loopback. `true`: the host's network.
    pub network: bool,
    pub subtrees: Vec<Subtree>,
    /// `None`: no limit. Zero is rejected.
    pub timeout: Option<Duration>,
    pub stdout: Stdio,
    pub stderr: Stdio,
    pub hostname: String,
    /// Memory, processes, CPU and scratch space (default: none).
    pub limits: Limits,
}

impl SandboxRequest {
    /// A request with Kiln's defaults: uid/gid 0, no network, no environment,
    /// working directory `/`, output discarded, hostname `kiln`.
    pub fn new(root: Root, argv: Vec<String>) -> Self {
        SandboxRequest {
            root,
            argv,
            env: Vec::new(),
            cwd: PathBuf::new(),
            uid: 0,
            gid: 0,
            network: false,
            subtrees: Vec::new(),
            timeout: None,
            stdout: Stdio::Null,
            stderr: Stdio::Null,
            hostname: DEFAULT_HOSTNAME.to_string(),
            limits: Limits::default(),
        }
    }

    /// Checks everything that can be checked without starting anything, and
    /// normalises paths. Called by every backend before it starts a sandbox.
    pub fn validate(&mut self) -> Result<()> {
        if self.argv.is_empty() {
            return Err(SandboxError::invalid("argv is empty"));
        }
        for a in &self.argv {
            no_nul("argument", a)?;
        }
        if self.argv[0].is_empty() {
            return Err(SandboxError::invalid("argv[0] is empty"));
        }
        for (k, v) in &self.env {
            no_nul("environment variable", k)?;
            no_nul("environment variable", v)?;
            if k.is_empty() || k.contains('=') {
                return Err(SandboxError::invalid(format!(
                    "environment variable name {k:?} is empty or contains '='"
                )));
            }
        }
        let l = &self.limits;
        for (what, v) in [
            ("memory limit", l.memory_bytes),
            ("process limit", l.pids),
            ("CPU limit", l.cpu_millis),
            ("scratch limit", l.scratch_bytes),
        ] {
            if v == Some(0) {
                return Err(SandboxError::invalid(format!(
                    "{what} of zero: give a positive limit or none"
                )));
            }
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(SandboxError::invalid(
                "timeout of zero: give a positive timeout or none",
            ));
        }
        if self.hostname.is_empty()
            || self.hostname.len() > 64
            || self.hostname.contains(['\0', '/'])
        {
            return Err(SandboxError::invalid(format!(
                "hostname {:?} must be 1 to 64 characters without '/'",
                self.hostname
            )));
        }
        self.cwd = normalize_relative("working directory", &self.cwd)?;
        for s in &mut self.subtrees {
            s.path = normalize_relative("subtree", &s.path)?;
        }
        check_root(&self.root)
    }
}

pub(crate) const DEFAULT_HOSTNAME: &str = "kiln";

fn no_nul(what: &str, s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(SandboxError::invalid(format!(
            "{what} {s:?} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Resolves `.` and `..` lexically and refuses anything that would leave the
/// root. Symlinks are resolved later, inside the sandbox, where `/` is the root
/// and so cannot lead out of it.
pub fn normalize_relative(what: &str, p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(SandboxError::invalid(format!(
                        "{what} {} escapes the sandbox root",
                        p.display()
                    )));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(SandboxError::invalid(format!(
                    "{what} {} must be relative to the sandbox root",
                    p.display()
                )));
            }
        }
    }
    let s = out.as_os_str().as_encoded_bytes();
    if s.contains(&0) {
        return Err(SandboxError::invalid(format!("{what} contains a NUL byte")));
    }
    Ok(out)
}

fn check_dir(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(SandboxError::BadRoot {
            path: path.to_path_buf(),
            reason: "not a directory".into(),
        }),
        Err(e) => Err(SandboxError::BadRoot {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn check_root(root: &Root) -> Result<()> {
    match root {
        Root::Dir(p) => {
            if !p.is_absolute() {
                return Err(SandboxError::BadRoot {
                    path: p.clone(),
                    reason: "must be an absolute path".into(),
                });
            }
            check_dir(p)
        }
        Root::Overlay {
            lowers,
            upper,
            work,
        } => {
            if lowers.is_empty() {
                return Err(SandboxError::invalid("overlay root without lower layers"));
            }
            for p in lowers.iter().chain([upper, work]) {
                if !p.is_absolute() {
                    return Err(SandboxError::BadRoot {
                        path: p.clone(),
                        reason: "must be an absolute path".into(),
                    });
                }
                // overlayfs splits its options on ',' and lowerdir on ':'.
                let s = p.as_os_str().as_encoded_bytes();
                if s.iter().any(|b| matches!(b, b',' | b':' | b'\\' | 0)) {
                    return Err(SandboxError::BadRoot {
                        path: p.clone(),
                        reason: "overlay layer paths may not contain ',', ':' or '\\'".into(),
                    });
                }
                check_dir(p)?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_rejects_escapes() {
        let n = |s: &str| normalize_relative("cwd", Path::new(s));
        assert_eq!(n("").unwrap(), PathBuf::new());
        assert_eq!(n(".").unwrap(), PathBuf::new());
        assert_eq!(n("a/./b/../c").unwrap(), PathBuf::from("a/c"));
        assert_eq!(n("a/..").unwrap(), PathBuf::new());
        assert!(n("..").is_err());
        assert!(n("a/../..").is_err());
        assert!(n("a/../../etc").is_err());
        assert!(n("/etc").is_err());
    }

    fn req(root: &Path) -> SandboxRequest {
        SandboxRequest::new(Root::Dir(root.to_path_buf()), vec!["/bin/true".into()])
    }

    #[test]
    fn rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = req(dir.path());
        assert!(r.validate().is_ok());

        let mut r = req(dir.path());
        r.timeout = Some(Duration::ZERO);
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("timeout of zero")
        );

        let mut r = req(dir.path());
        r.argv.clear();
        assert!(r.validate().is_err());

        let mut r = req(dir.path());
        r.cwd = "../x".into();
        assert!(r.validate().unwrap_err().to_string().contains("escapes"));

        let mut r = req(&dir.path().join("missing"));
        let e = r.validate().unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");

        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        let mut r = req(&file);
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );

        let mut r = req(dir.path());
        r.env.push(("A=B".into(), "c".into()));
        assert!(r.validate().is_err());
    }
}
