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
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        // The suites start a privileged helper and a setpriv'd unprivileged
        // one, and chown scratch roots: they need root (CI runs as root).
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the sandbox tests must run as root");
        }
        eprintln!("skipped: the sandbox tests need root (they also run an unprivileged helper)");
        return None;
    }
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

type Launchers = Vec<((Mode, BackendKind), Arc<Launcher>)>;

pub fn launcher(mode: Mode, backend: BackendKind) -> Arc<Launcher> {
    static L: OnceLock<std::sync::Mutex<Launchers>> = OnceLock::new();
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
#[derive(Debug)]
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

/// The static probe (tests/probe.c), compiled once per test binary. `None`
/// (after a loud "skipped") without a C compiler; under `CI=true` that fails.
pub fn probe() -> Option<PathBuf> {
    static P: OnceLock<Option<PathBuf>> = OnceLock::new();
    P.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kiln-probe-{}", std::process::id()));
        let ok = Command::new("cc")
            .args(["-static", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Some(out)
        } else if std::env::var("CI").as_deref() == Ok("true") {
            panic!("cannot build the static probe: install gcc and libc6-dev (scripts/install-test-deps)");
        } else {
            eprintln!("skipped: cannot build the static probe (cc -static); install gcc libc6-dev");
            None
        }
    })
    .clone()
}

#[macro_export]
macro_rules! need_probe {
    () => {
        match common::probe() {
            Some(p) => p,
            None => return,
        }
    };
}

/// Copies the probe into the root as `/name`, setuid root if asked.
pub fn install_probe(probe: &Path, root: &Path, name: &str, setuid_root: bool) {
    let dst = root.join(name);
    std::fs::copy(probe, &dst).unwrap();
    use std::os::unix::fs::PermissionsExt;
    if setuid_root {
        std::os::unix::fs::chown(&dst, Some(0), Some(0)).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o4755)).unwrap();
    } else {
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Host pids of every process in the PID namespace `ns` (an `ns/pid` link
/// target such as `pid:[4026532001]`).
pub fn processes_in_pidns(ns: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(l) = std::fs::read_link(e.path().join("ns/pid"))
            && l.to_string_lossy() == ns
        {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let state = status
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_string();
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            eprintln!(
                "pid {pid} in {ns}: {state} {}",
                String::from_utf8_lossy(&cmd)
            );
            out.push(pid);
        }
    }
    out
}

/// Host processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).contains(marker)
        {
            out.push(pid);
        }
    }
    out
}

/// Mount points on the host whose path contains `needle`.
pub fn host_mounts_with(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

/// A TCP listener on the host's 127.0.0.1 (port 0) counting connections it accepts.
pub struct HostServer {
    pub port: u16,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl HostServer {
    pub fn start() -> HostServer {
        use std::sync::atomic::*;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            // Bounded: at most 60 s, stops when dropped.
            for _ in 0..6000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok((mut c, _)) = l.accept() {
                    a.fetch_add(1, Ordering::SeqCst);
                    use std::io::Write;
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-secret\n");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        HostServer {
            port,
            accepted,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Generates one `#[test]` per (identity, backend) for each listed test
/// function `fn name(mode: Mode, backend: BackendKind)`.
#[macro_export]
macro_rules! matrix {
    ($($name:ident),* $(,)?) => {
        mod userns_root {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Root, kiln_sandbox::BackendKind::Userns) } )*
        }
        mod userns_unprivileged {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Unprivileged, kiln_sandbox::BackendKind::Userns) } )*
        }
        mod oci_root {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Root, kiln_sandbox::BackendKind::Oci) } )*
        }
        mod oci_unprivileged {
            $( #[test] fn $name() { super::$name($crate::common::Mode::Unprivileged, kiln_sandbox::BackendKind::Oci) } )*
        }
    };
}

/// Gives the helper time to make its spare init (the next sandbox's, made
/// ahead of its request) so the run that follows starts from it.
pub fn let_the_spare_get_ready() {
    std::thread::sleep(std::time::Duration::from_millis(50));
}
