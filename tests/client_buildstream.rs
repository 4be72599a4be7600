//! BuildStream 2.8 (from .venv, installed by scripts/install-test-deps)
//! building tests/clients/buildstream through `kiln serve`: remote
//! execution, a second build from Kiln's action cache, and Kiln as
//! BuildStream's artifact and source cache (Remote Asset API).
//!
//! The project's sysroot is the tcc fixture (busybox, tcc, libc), imported
//! from local files; every build command runs in Kiln's sandbox, with that
//! sysroot staged by BuildStream as the input root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

/// One BuildStream "user": its own caches, logs and config in `home`.
struct Bst {
    bin: PathBuf,
    project: PathBuf,
    home: PathBuf,
    config: PathBuf,
}

impl Bst {
    /// `remote` is Kiln's URL; `exec` makes it the remote executor,
    /// `caches` the artifact and source cache server.
    fn new(tmp: &Path, name: &str, project: &Path, remote: &str, exec: bool, caches: bool) -> Bst {
        let bin = repo_root().join(".venv/bin/bst");
        let home = tmp.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let mut config = format!(
            "cachedir: {home}/cache\nsourcedir: {home}/sources\nlogdir: {home}/logs\n\
             scheduler:\n  network-retries: 0\n  builders: 2\n  on-error: continue\n\
             logging:\n  error-lines: 60\n",
            home = home.display()
        );
        if exec {
            config += &format!(
                "remote-execution:\n  execution-service:\n    url: {remote}\n  \
                 storage-service:\n    url: {remote}\n  action-cache-service:\n    url: {remote}\n"
            );
        }
        if caches {
            config += &format!(
                "artifacts:\n  servers:\n  - url: {remote}\n    push: true\n\
                 source-caches:\n  servers:\n  - url: {remote}\n    push: true\n"
            );
        }
        let path = home.join("buildstream.conf");
        std::fs::write(&path, config).unwrap();
        Bst {
            bin,
            project: project.to_path_buf(),
            home,
            config: path,
        }
    }

    fn run(&self, args: &[&str]) -> (Output, Duration) {
        let started = Instant::now();
        let out = Command::new(&self.bin)
            .arg("--no-interactive")
            .arg("--config")
            .arg(&self.config)
            .arg("--directory")
            .arg(&self.project)
            .args(args)
            .env("HOME", &self.home)
            .env("XDG_CACHE_HOME", self.home.join("xdg-cache"))
            .env("XDG_CONFIG_HOME", self.home.join("xdg-config"))
            .env("XDG_DATA_HOME", self.home.join("xdg-data"))
            .output()
            .expect("run bst");
        (out, started.elapsed())
    }

    /// Runs bst and insists it succeeds; returns its stderr (its log).
    fn ok(&self, args: &[&str]) -> (String, Duration) {
        let (out, took) = self.run(args);
        let log = text(&out);
        assert!(out.status.success(), "bst {args:?} failed:\n{log}");
        (log, took)
    }

    fn checkout(&self, element: &str) -> PathBuf {
        let dest = self.home.join(format!("checkout-{element}"));
        let dest_s = dest.to_str().unwrap().to_string();
        self.ok(&["artifact", "checkout", "--directory", &dest_s, element]);
        dest
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The project copied into `tmp` with the tcc sysroot next to it
/// (BuildStream's `local` sources must live inside the project).
fn project(tmp: &Path) -> Option<PathBuf> {
    if !repo_root().join(".venv/bin/bst").exists() {
        skip("BuildStream is not installed in .venv (run scripts/install-test-deps)");
        return None;
    }
    let tcc = fixture("tcc", "usr/bin/tcc")?;
    let project = tmp.join("project");
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo_root().join("tests/clients/buildstream"))
        .arg(&project)
        .status()
        .unwrap();
    assert!(status.success());
    // Hard links: the sysroot is only read, and copying 36 MB per test
    // would be most of its time.
    let status = Command::new("cp")
        .arg("-al")
        .arg(&tcc)
        .arg(project.join("sysroot"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_file(project.join("sysroot/.done")).unwrap();
    Some(project)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// How many actions Kiln's scheduler handed to a worker (its log says
/// "dispatched" once per dispatch; action-cache hits are never dispatched).
fn executions(server: &Proc) -> usize {
    server
        .log_text()
        .lines()
        .filter(|l| l.contains(" dispatched"))
        .count()
}

#[test]
fn bst_builds_through_kiln_then_from_its_action_and_artifact_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(project) = project(tmp.path()) else {
        return;
    };
    let server = serve(tmp.path(), &["--workers", "1"]);
    let url = server.url();

    // Cold: every element built by Kiln's worker; artifacts and sources
    // pushed to Kiln.
    let cold = Bst::new(tmp.path(), "cold", &project, &url, true, true);
    let (log, took) = cold.ok(&["build", "all.bst"]);
    eprintln!("bst build through Kiln, cold: {took:?}");
    let ran = executions(&server);

    let hello = cold.checkout("hello.bst");
    assert_eq!(
        read(&hello.join("usr/share/hello/output")),
        "hello from kiln, 42\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(hello.join("usr/bin/hello"))
        .unwrap()
        .permissions()
        .mode();
    assert!(mode & 0o111 != 0, "the program stays executable");

    // The script element's output is the whole root: its own file and the
    // sysroot it ran in.
    let script = cold.checkout("script.bst");
    assert_eq!(read(&script.join("made-by-script/file")), "from-script\n");
    assert!(script.join("usr/bin/tcc").exists());

    let ids = cold.checkout("uid.bst");
    assert_eq!(read(&ids.join("ids/uid")).trim(), "1234");
    assert_eq!(read(&ids.join("ids/gid")).trim(), "4321");

    // Warm: a new user with an empty local cache, same remote execution
    // service: every action is answered from Kiln's action cache.
    let warm = Bst::new(tmp.path(), "warm", &project, &url, true, false);
    let (_, took_warm) = warm.ok(&["build", "all.bst"]);
    eprintln!("bst build through Kiln, warm (action cache): {took_warm:?}");
    assert_eq!(
        executions(&server),
        ran,
        "no action ran again; Kiln log:\n{}",
        server.log_text()
    );
    let hello = warm.checkout("hello.bst");
    assert_eq!(
        read(&hello.join("usr/share/hello/output")),
        "hello from kiln, 42\n"
    );

    // Artifact cache: a third user without remote execution pulls every
    // artifact from Kiln and builds nothing.
    let pull = Bst::new(tmp.path(), "pull", &project, &url, false, true);
    let (log3, took_pull) = pull.ok(&["build", "all.bst"]);
    eprintln!("bst build with Kiln as artifact cache: {took_pull:?}");
    assert!(log3.contains("Pulled artifact"), "{log3}");
    assert!(!log3.contains("SUCCESS Running commands"), "{log3}");
    let hello = pull.checkout("hello.bst");
    assert_eq!(
        read(&hello.join("usr/share/hello/output")),
        "hello from kiln, 42\n"
    );

    // Source cache: the first build pushed hello.bst's sources.
    assert!(log.contains("Pushed source"), "{log}");
    let fetch = Bst::new(tmp.path(), "sources", &project, &url, false, true);
    let (log4, _) = fetch.ok(&["source", "fetch", "hello.bst"]);
    assert!(log4.contains("Pulled source"), "{log4}");
}

#[test]
fn bst_failed_builds_keep_outputs_and_an_impossible_arch_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(project) = project(tmp.path()) else {
        return;
    };
    let server = serve(tmp.path(), &["--workers", "1"]);
    let bst = Bst::new(tmp.path(), "user", &project, &server.url(), true, false);

    // A build that fails: bst reports it, and the failed artifact holds
    // what the element installed before failing.
    let (out, _) = bst.run(&["build", "fails.bst"]);
    let log = text(&out);
    assert!(!out.status.success(), "fails.bst must fail:\n{log}");
    assert!(
        log.contains("about to fail"),
        "the build log reaches bst:\n{log}"
    );
    let partial = bst.checkout("fails.bst");
    assert_eq!(
        read(&partial.join("partial/file")),
        "written-before-failing\n"
    );

    // No worker here is aarch64: the Execute call is refused at once,
    // naming the platform, instead of waiting for a worker forever.
    let (out, took) = bst.run(&["build", "arm.bst"]);
    let log = text(&out);
    assert!(!out.status.success(), "arm.bst must fail:\n{log}");
    assert!(
        took < Duration::from_secs(60),
        "failed fast, not after a timeout: {took:?}"
    );
    assert!(log.contains("aarch64"), "the message names the ISA:\n{log}");
}
