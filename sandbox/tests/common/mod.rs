//! Shared by the integration tests: fixtures, launchers (privileged and
//! unprivileged) and a small way to run a shell snippet in a sandbox.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_sandbox::*;

pub const HELPER: &str = env!("CARGO_BIN_EXE_kiln-sandbox-helper");

/// The busybox root built by `scripts/fixtures`, or `None` (after saying
/// "skipped" loudly) when it is missing. Under `CI=true` a missing fixture
/// fails the test instead.
pub fn busybox() -> Option<PathBuf> {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/fixtures"));
    let dir = base.join("busybox");
    if dir.join(".done").exists() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("fixture {} missing: run scripts/fixtures", dir.display());
    }
    eprintln!(
        "skipped: fixture {} missing (run scripts/fixtures)",
        dir.display()
    );
    None
}

/// Runs a test body only when the fixture exists.
#[macro_export]
macro_rules! need_fixture {
    () => {
        match common::busybox() {
            Some(d) => d,
            None => return,
        }
    };
}

/// Which identity the helper runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Root,
    /// `setpriv --reuid=65534 --regid=65534 --clear-groups`: the rootless path.
    Unprivileged,
}

pub const NOBODY: u32 = 65534;

pub fn launcher(mode: Mode, backend: BackendKind) -> Arc<Launcher> {
    static L: OnceLock<std::sync::Mutex<Vec<((Mode, BackendKind), Arc<Launcher>)>>> =
        OnceLock::new();
    let l = L.get_or_init(Default::default);
    let mut v = l.lock().unwrap();
    if let Some((_, x)) = v.iter().find(|(k, _)| *k == (mode, backend)) {
        return x.clone();
    }
    let mut cfg = match mode {
        Mode::Root => LauncherConfig::new(HELPER, [HELPER_ARG]),
        Mode::Unprivileged => LauncherConfig::new(
            "setpriv",
            [
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                HELPER,
                HELPER_ARG,
            ],
        ),
    };
    cfg.backend = backend;
    let x = Arc::new(Launcher::new(cfg).expect("start helper"));
    v.push(((mode, backend), x.clone()));
    x
}

/// A private, writable copy of the busybox root (owned by the helper's uid).
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(fixture: &Path, mode: Mode) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("kiln-sbx-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("root");
        let st = Command::new("cp")
            .arg("-a")
            .arg(fixture)
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success());
        if mode == Mode::Unprivileged {
            let st = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success());
        }
        Scratch { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// What a shell snippet did.
pub struct Ran {
    pub outcome: Outcome,
    pub stdout: String,
    pub stderr: String,
}

pub fn sh_request(root: Root, script: &str, out: &Path, err: &Path) -> SandboxRequest {
    let mut req = SandboxRequest::new(root, vec!["/bin/sh".into(), "-c".into(), script.into()]);
    req.env = vec![("PATH".into(), "/bin:/usr/bin".into())];
    req.stdout = Stdio::File(out.to_path_buf());
    req.stderr = Stdio::File(err.to_path_buf());
    req.timeout = Some(Duration::from_secs(60));
    req
}

/// Runs `script` with `/bin/sh -c` in `s`'s root, adjusting the request with `f`.
pub fn run_sh_with(
    l: &Launcher,
    s: &Scratch,
    script: &str,
    f: impl FnOnce(&mut SandboxRequest),
) -> Ran {
    let (out, err) = (s.path("stdout"), s.path("stderr"));
    let mut req = sh_request(Root::Dir(s.root()), script, &out, &err);
    f(&mut req);
    let fin = l.spawn(req).expect("spawn").wait().expect("wait");
    let outcome = fin.outcome.clone();
    fin.release();
    Ran {
        outcome,
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

pub fn run_sh(l: &Launcher, s: &Scratch, script: &str) -> Ran {
    run_sh_with(l, s, script, |_| {})
}
