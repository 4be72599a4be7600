//! Bazel 4.2.3 (Debian's bazel-bootstrap, installed by
//! scripts/install-test-deps) building tests/clients/bazel remotely through
//! `kiln serve`: genrules, a `cc_binary` and a `cc_test`, then everything
//! again from Kiln's cache.
//!
//! Bazel uploads only sources and runs `/usr/bin/gcc` and `/bin/bash` by
//! their host paths, so every action names a base root filesystem: the gcc
//! fixture (Debian's gcc-12, binutils, libc6-dev and bash, unpacked with
//! `dpkg -x`) pushed with `kiln cas upload-dir` and given to Bazel as
//! `chrootRootDigest` in `--remote_default_exec_properties`. The workspace
//! builds offline: rules_cc, rules_java and remote_coverage_tools point at
//! local stubs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

struct Bazel {
    workspace: PathBuf,
    output_user_root: PathBuf,
    output_base: PathBuf,
    flags: Vec<String>,
}

impl Bazel {
    fn run(&self, args: &[&str], build_flags: bool) -> (Output, Duration) {
        let started = Instant::now();
        let mut cmd = Command::new("bazel");
        cmd.current_dir(&self.workspace)
            // Batch mode: no Bazel server outlives the test, even when an
            // assertion fails half-way.
            .arg("--batch")
            .arg(format!(
                "--output_user_root={}",
                self.output_user_root.display()
            ))
            .arg(format!("--output_base={}", self.output_base.display()))
            // Not --nosystem_rc: Debian's /etc/bazel/bazelrc sets the
            // install base its bazel needs.
            .arg("--nohome_rc")
            .args(&args[..1]);
        if build_flags {
            cmd.args(&self.flags);
        }
        let out = cmd
            .args(&args[1..])
            .env("HOME", self.output_user_root.join("home"))
            .output()
            .expect("run bazel");
        (out, started.elapsed())
    }

    fn ok(&self, args: &[&str]) -> (String, Duration) {
        let (out, took) = self.run(args, true);
        let log = text(&out);
        assert!(out.status.success(), "bazel {args:?} failed:\n{log}");
        (log, took)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The "INFO: N processes: …" summary line of a Bazel run.
fn processes_line(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains(" processes: ") || l.contains(" process: "))
        .unwrap_or("")
        .to_string()
}

fn bazel_available() -> bool {
    Command::new("bazel")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn copy_tree(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn bazel_builds_and_tests_remotely_then_everything_comes_from_the_cache() {
    if !bazel_available() {
        skip("bazel is not installed (scripts/install-test-deps installs bazel-bootstrap)");
        return;
    }
    let Some(gcc) = fixture("gcc", "usr/bin/gcc-12") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let workspace = tmp.path().join("ws");
    copy_tree(&repo_root().join("tests/clients/bazel"), &workspace);
    let stubs = workspace.join("stubs");

    let server = serve(tmp.path(), &["--workers", "1"]);
    let started = Instant::now();
    let base = kiln_cas_upload_dir(&server.url(), &gcc);
    eprintln!(
        "pushed the gcc base root ({base}) in {:?}",
        started.elapsed()
    );

    let mut flags: Vec<String> = [
        "--color=no",
        "--curses=no",
        "--noshow_progress",
        "--jobs=4",
        "--remote_timeout=120",
        "--test_output=errors",
    ]
    .map(String::from)
    .to_vec();
    flags.push(format!("--remote_executor=grpc://{}", server.addr));
    // One property per flag: Bazel 4 takes everything after the first `=`
    // as the value.
    for prop in [
        "OSFamily=linux".to_string(),
        "ISA=x86-64".to_string(),
        format!("chrootRootDigest={base}"),
    ] {
        flags.push(format!("--remote_default_exec_properties={prop}"));
    }
    for repo in ["rules_cc", "rules_java", "remote_coverage_tools"] {
        flags.push(format!(
            "--override_repository={repo}={}",
            stubs.join(repo).display()
        ));
    }
    let bazel = Bazel {
        workspace: workspace.clone(),
        output_user_root: tmp.path().join("bazel-root"),
        output_base: tmp.path().join("bazel-root/output-base"),
        flags,
    };

    // Cold: every action runs on Kiln's worker.
    let (log, cold) = bazel.ok(&["test", "//..."]);
    let summary = processes_line(&log);
    eprintln!("bazel test //... remote, cold: {cold:?} ({summary})");
    assert!(summary.contains("remote"), "{log}");
    assert!(
        !summary.contains("linux-sandbox") && !summary.contains("local"),
        "{log}"
    );
    assert!(
        log.contains("//:answer_test") && log.contains("PASSED"),
        "{log}"
    );

    // The outputs came back from Kiln and are what the actions made.
    let bin = workspace.join("bazel-bin");
    assert_eq!(
        std::fs::read_to_string(bin.join("shout.txt")).unwrap(),
        "HELLO FROM A GENRULE\n21\n"
    );
    let run = Command::new(bin.join("hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "the answer is 42\n");

    // Warm: an empty output tree, the same actions: all from the cache.
    let (out, _) = bazel.run(&["clean"], false);
    assert!(out.status.success(), "{}", text(&out));
    let (log, warm) = bazel.ok(&["test", "//..."]);
    let summary = processes_line(&log);
    eprintln!("bazel test //... remote, all cached: {warm:?} ({summary})");
    assert!(summary.contains("remote cache hit"), "{log}");
    // "N remote cache hit, M internal": nothing executed remotely again.
    assert!(
        !summary.replace("remote cache hit", "").contains("remote"),
        "{log}"
    );
    let run = Command::new(bin.join("hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "the answer is 42\n");
}
