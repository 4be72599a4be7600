//! recc, the real client (`../shared/clients/recc`, installed by
//! scripts/install-test-deps), against `kiln serve` on loopback.
//!
//! The project in tests/clients/recc is built with `make CC="recc
//! /usr/bin/gcc"` the way docs/clients/recc.md tells users to: the Debian
//! gcc-12 root of scripts/fixtures pushed once with `kiln cas upload-dir` and
//! named by `RECC_REMOTE_PLATFORM_chrootRootDigest`. Its sources sit in
//! subdirectories, one header lies outside the project directory (so recc
//! sends a working directory below the input root), and the objects go to
//! `build/obj/…`, which the input root does not hold.
//!
//! One test still speaks recc's requests from Rust: the machine-readable
//! details of a refused Execute, which the binary only prints as text.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use kiln_proto::digest;
use kiln_proto::reapi::{Directory, FileNode};
use prost::Message;
use tonic::Code;

/// The sources of tests/clients/recc/project, as make compiles them.
const SOURCES: [&str; 5] = [
    "src/main.c",
    "src/calc/add.c",
    "src/calc/mul.c",
    "src/text/format.c",
    "src/text/reverse.c",
];
/// What the linked program prints.
const DEMO_OUTPUT: &str = "ccer+nlik sum=56 product=15\n";
/// recc's verbose lines for a remote compile and an action-cache hit.
const RECC_EXECUTES: &str = "Executing action remotely";
const RECC_HIT: &str = "Action Cache hit for";

/// The real recc: `$KILN_RECC`, else the link scripts/install-test-deps
/// makes to the binary of `../shared/clients/recc` (or `$KILN_RECC_DIR`).
fn recc_binary() -> Option<PathBuf> {
    let path = std::env::var_os("KILN_RECC")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/recc/recc"));
    if path.exists() {
        return Some(path);
    }
    skip(&format!(
        "recc is missing at {} (scripts/install-test-deps installs it from \
         ../shared/clients/recc, or from $KILN_RECC_DIR)",
        path.display()
    ));
    None
}

/// A fresh copy of tests/clients/recc under `dest`; returns its project
/// directory (the header directory `../shared` sits next to it).
fn copy_project(dest: &Path) -> PathBuf {
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo_root().join("tests/clients/recc"))
        .arg(dest)
        .status()
        .expect("run cp");
    assert!(status.success());
    dest.join("project")
}

/// recc's configuration as docs/clients/recc.md gives it, and nothing from
/// the environment of whoever runs the tests (`HOME` points into the
/// temporary directory, so no user `recc.conf` applies either).
fn recc_env(cmd: &mut Command, url: &str, project: &Path, platform: &[(&str, &str)]) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", project.parent().unwrap())
        .env("RECC_SERVER", url)
        .env("RECC_PROJECT_ROOT", project)
        .env("RECC_REMOTE_ENV_PATH", "/usr/bin:/bin")
        .env("RECC_VERBOSE", "1")
        .current_dir(project);
    for (name, value) in platform {
        cmd.env(format!("RECC_REMOTE_PLATFORM_{name}"), value);
    }
}

fn platform(base: &str) -> [(&'static str, &str); 3] {
    [
        ("OSFamily", "linux"),
        ("ISA", "x86-64"),
        ("chrootRootDigest", base),
    ]
}

/// `make` in `project` with this C compiler; returns its output.
fn make(project: &Path, cc: &str, env: impl FnOnce(&mut Command)) -> Output {
    let mut cmd = Command::new("make");
    env(&mut cmd);
    cmd.current_dir(project)
        .args(["-j2", &format!("CC={cc}")])
        .output()
        .expect("run make")
}

/// One recc compile in `project`: `recc /usr/bin/gcc ARGS`.
fn recc(
    recc: &Path,
    url: &str,
    project: &Path,
    platform: &[(&str, &str)],
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(recc);
    recc_env(&mut cmd, url, project, platform);
    cmd.arg("/usr/bin/gcc")
        .args(args)
        .output()
        .expect("run recc")
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn object(project: &Path, source: &str) -> Vec<u8> {
    let path = project.join("build/obj").join(source).with_extension("o");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The server's JSON log lines (`--log-format json`).
fn log_events(server: &Proc) -> Vec<serde_json::Value> {
    server
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn with_message<'a>(
    events: &'a [serde_json::Value],
    message: &str,
) -> Vec<(usize, &'a serde_json::Value)> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["fields"]["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recc_builds_a_project_like_a_local_build_then_all_from_the_action_cache() {
    let (Some(gcc), Some(recc_bin)) = (fixture("gcc", "usr/bin/gcc-12"), recc_binary()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(
        tmp.path(),
        &[
            "--workers",
            "1",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
    );
    let url = server.url();
    let base = kiln_cas_upload_dir(&url, &gcc);
    let cc = format!("{} /usr/bin/gcc", recc_bin.display());

    // The reference: the same project built by the host's gcc (Debian 12's
    // gcc-12, as in the base root).
    let local = copy_project(&tmp.path().join("local"));
    let out = make(&local, "gcc", |_| {});
    assert!(out.status.success(), "local build: {}", text(&out));

    // Remotely: every compile runs on the worker.
    let remote = copy_project(&tmp.path().join("remote"));
    let env = |cmd: &mut Command| recc_env(cmd, &url, &remote, &platform(&base));
    let out = make(&remote, &cc, env);
    let log = text(&out);
    assert!(out.status.success(), "recc build: {log}");
    assert_eq!(log.matches(RECC_EXECUTES).count(), SOURCES.len(), "{log}");
    assert_eq!(log.matches(RECC_HIT).count(), 0, "{log}");
    for source in SOURCES {
        assert!(
            object(&remote, source) == object(&local, source),
            "{source}: the remote object differs from the local one"
        );
    }
    let demo = Command::new(remote.join("build/bin/demo"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&demo.stdout), DEMO_OUTPUT);

    // Kiln's log names recc and its invocation (recc sends its metadata
    // under `requestmetadata-bin`), and says "queued" before "dispatched".
    let events = log_events(&server);
    let queued = with_message(&events, "queued");
    let dispatched = with_message(&events, "dispatched");
    assert_eq!(queued.len(), SOURCES.len(), "{}", server.log_text());
    for (at, q) in &queued {
        let tool = q["fields"]["tool"].as_str().unwrap();
        assert!(tool.starts_with("recc "), "tool {tool:?} in {q}");
        assert_ne!(q["fields"]["invocation"], "", "{q}");
        let op = &q["fields"]["operation"];
        let (d_at, _) = dispatched
            .iter()
            .find(|(_, d)| d["fields"]["operation"] == *op)
            .unwrap_or_else(|| panic!("{op} never dispatched"));
        assert!(at < d_at, "{op}: dispatched before queued");
    }

    // A clean rebuild: every compile is an action-cache hit, nothing runs.
    let hits = "kiln_action_cache_lookups_total{path=\"get_action_result\",result=\"hit\"}";
    let misses = "kiln_action_cache_lookups_total{path=\"get_action_result\",result=\"miss\"}";
    let (_, before) = http_get(&server.metrics, "/metrics");
    std::fs::remove_dir_all(remote.join("build")).unwrap();
    let out = make(&remote, &cc, env);
    let log = text(&out);
    assert!(out.status.success(), "recc rebuild: {log}");
    assert_eq!(log.matches(RECC_HIT).count(), SOURCES.len(), "{log}");
    assert_eq!(log.matches(RECC_EXECUTES).count(), 0, "{log}");
    let (_, after) = http_get(&server.metrics, "/metrics");
    assert_eq!(
        sample(&after, hits) - sample(&before, hits),
        SOURCES.len() as f64
    );
    assert_eq!(sample(&after, misses), sample(&before, misses));
    assert_eq!(
        with_message(&log_events(&server), "queued").len(),
        SOURCES.len(),
        "no new operation"
    );
    for source in SOURCES {
        assert!(
            object(&remote, source) == object(&local, source),
            "{source}"
        );
    }

    // recc speaking REAPI 2.2 (`output_paths`): the same object again.
    let mut cmd = Command::new(&recc_bin);
    recc_env(&mut cmd, &url, &remote, &platform(&base));
    let out = cmd
        .env("RECC_REAPI_VERSION", "2.2")
        .args(["/usr/bin/gcc", "-O2", "-Wall", "-Werror", "-Iinclude"])
        .args([
            "-I../shared/include",
            "-c",
            "src/main.c",
            "-o",
            "build/v22/main.o",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "REAPI 2.2: {}", text(&out));
    assert!(
        std::fs::read(remote.join("build/v22/main.o")).unwrap() == object(&local, "src/main.c")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_error_comes_back_as_the_compilers_error_and_exit_code() {
    let (Some(gcc), Some(recc_bin)) = (fixture("gcc", "usr/bin/gcc-12"), recc_binary()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), &["--workers", "1"]);
    let base = kiln_cas_upload_dir(&server.url(), &gcc);
    let project = copy_project(&tmp.path().join("p"));
    std::fs::write(
        project.join("src/broken.c"),
        "#include \"calc.h\"\nint broken(void) { return undeclared_value; }\n",
    )
    .unwrap();
    let args = [
        "-Iinclude",
        "-c",
        "src/broken.c",
        "-o",
        "build/obj/src/broken.o",
    ];

    let local = Command::new("gcc")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(&project)
        .args(args)
        .output()
        .unwrap();
    assert_eq!(local.status.code(), Some(1));
    let local_err = String::from_utf8_lossy(&local.stderr).into_owned();
    assert!(
        local_err.contains("error: 'undeclared_value' undeclared"),
        "{local_err}"
    );

    let out = recc(&recc_bin, &server.url(), &project, &platform(&base), &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&local_err),
        "the remote gcc's error, word for word: {}",
        text(&out)
    );
    assert!(!project.join("build/obj/src/broken.o").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_without_a_base_root_is_told_to_name_one() {
    let Some(recc_bin) = recc_binary() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), &["--workers", "1"]);
    let project = copy_project(&tmp.path().join("p"));
    let no_base = [("OSFamily", "linux"), ("ISA", "x86-64")];
    let args = ["-Iinclude", "-c", "src/calc/mul.c", "-o", "build/obj/mul.o"];
    let out = recc(&recc_bin, &server.url(), &project, &no_base, &args);
    let log = text(&out);
    // The exit code stays the sandbox's "not found"; stderr says why.
    assert_eq!(out.status.code(), Some(127), "{log}");
    assert!(
        log.contains("kiln-sandbox: /usr/bin/gcc: not found"),
        "{log}"
    );
    assert!(
        log.contains("/usr/bin/gcc is not in this action's input root")
            && log.contains("names no base root")
            && log.contains("RECC_REMOTE_PLATFORM_chrootRootDigest")
            && log.contains("container-image"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_root_missing_from_cas_is_refused_and_logged() {
    let Some(recc_bin) = recc_binary() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), &["--workers", "1", "--log-format", "json"]);
    let project = copy_project(&tmp.path().join("p"));
    let ghost = format!("{}/{}", "ab".repeat(32), 123);
    let args = ["-Iinclude", "-c", "src/calc/mul.c", "-o", "build/obj/mul.o"];
    let out = recc(&recc_bin, &server.url(), &project, &platform(&ghost), &args);
    let log = text(&out);
    assert_ne!(out.status.code(), Some(0), "{log}");
    assert!(log.contains(&ghost), "recc shows the missing blob: {log}");

    // The operator sees it too, at the default level, with the client.
    let events = log_events(&server);
    let refused = with_message(&events, "Execute refused");
    let [(_, e)] = refused.as_slice() else {
        panic!("one refusal logged: {}", server.log_text());
    };
    assert_eq!(e["level"], "WARN", "{e}");
    assert_eq!(e["fields"]["code"], "FailedPrecondition", "{e}");
    assert!(
        e["fields"]["reason"].as_str().unwrap().contains(&ghost),
        "{e}"
    );
    let action = log
        .split_once("actionDigest=")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(digest, _)| digest)
        .unwrap_or_else(|| panic!("recc names its action: {log}"));
    assert_eq!(e["fields"]["action"], action, "{e}");
    let tool = e["span"]["tool"].as_str().unwrap_or_default();
    assert!(tool.starts_with("recc "), "{e}");
}

/// What the binary cannot show: the refusal of a missing base root carries a
/// `google.rpc.PreconditionFailure` naming the blob (`blobs/HASH/SIZE`),
/// which clients that re-upload read (this recc only prints the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_base_root_is_a_precondition_failure_naming_the_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;

    // recc's shape: sources only, argv[0] a host path, a working directory
    // below the input root, an output whose directory does not exist.
    let source = b"int f(void) { return 1; }\n".to_vec();
    let source_digest = digest::of_bytes(&source);
    let src = Directory {
        files: vec![FileNode {
            name: "f.c".into(),
            digest: Some(source_digest.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (src_digest, src_bytes) = directory(&src);
    let root = Directory {
        directories: vec![kiln_proto::reapi::DirectoryNode {
            name: "src".into(),
            digest: Some(src_digest.clone()),
        }],
        ..Default::default()
    };
    let (root_digest, root_bytes) = directory(&root);
    upload(
        &ch,
        vec![
            (source_digest, source),
            (src_digest, src_bytes),
            (root_digest.clone(), root_bytes),
        ],
    )
    .await;
    let ghost = digest::of_bytes(b"a base root never pushed");
    let spec = ActionSpec {
        argv: ["/usr/bin/gcc", "-c", "f.c", "-o", "build/obj/f.o"]
            .map(String::from)
            .to_vec(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        input_root: root_digest,
        working_directory: "src".into(),
        output_paths: Vec::new(),
        output_files: vec!["build/obj/f.o".into()],
        output_directories: Vec::new(),
        platform: vec![
            ("OSFamily".into(), "linux".into()),
            ("ISA".into(), "x86-64".into()),
            (
                "chrootRootDigest".into(),
                format!("{}/{}", ghost.hash, ghost.size_bytes),
            ),
        ],
        timeout: None,
        do_not_cache: false,
        directory_only: false,
        salt: Vec::new(),
    };
    let action = spec.upload(&ch).await;
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let status = kiln_proto::rpc::Status::decode(err.details()).unwrap();
    let failure =
        kiln_proto::error_details::PreconditionFailure::decode(&status.details[0].value[..])
            .unwrap();
    assert_eq!(failure.violations.len(), 1, "{failure:?}");
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", ghost.hash, ghost.size_bytes)
    );
}
