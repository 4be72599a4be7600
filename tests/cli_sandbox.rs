//! `kiln sandbox run` as a user types it.

use std::path::PathBuf;
use std::process::Command;

fn busybox() -> Option<PathBuf> {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/fixtures"));
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

fn kiln(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sandbox_run_by_hand() {
    let Some(root) = busybox() else { return };
    let root = root.to_str().unwrap();
    let out = kiln(&[
        "sandbox",
        "run",
        "--root",
        root,
        "--env",
        "PATH=/bin",
        "--cwd",
        "/work",
        "--",
        "sh",
        "-c",
        "echo hi; pwd; echo err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n/work\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let out = kiln(&[
        "sandbox",
        "run",
        "--root",
        "/nonexistent",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sandbox root /nonexistent"));

    let out = kiln(&[
        "sandbox",
        "run",
        "--root",
        root,
        "--timeout",
        "0.3",
        "--",
        "/bin/sleep",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(137));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    let out = kiln(&["sandbox", "run", "--root", root, "--", "gcc"]);
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "kiln-sandbox: gcc: not found\n"
    );

    let out = kiln(&[
        "sandbox",
        "run",
        "--root",
        root,
        "--backend",
        "oci",
        "--",
        "/bin/true",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
