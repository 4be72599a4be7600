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

/// Finding 3: `nosuid` protects only the sandbox's mount. With `--root DIR`
/// (changed in place), `--upper DIR`, and stdout redirected to a host file,
/// a command's `chmod 4755` must not leave a set-id file on the host.
#[test]
fn no_setid_file_lands_on_the_host() {
    use std::os::unix::fs::PermissionsExt;
    let Some(fixture) = busybox() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(&fixture)
            .arg(&root)
            .status()
            .unwrap()
            .success()
    );
    let (upper, work) = (tmp.path().join("upper"), tmp.path().join("work"));
    std::fs::create_dir(&upper).unwrap();
    std::fs::create_dir(&work).unwrap();
    let script = "cp /bin/busybox /s; chmod 4755 /s; chmod g+s /s; \
                  install -m 6755 /bin/busybox /i; chmod 4755 /proc/self/fd/1; echo ran";
    let setid = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o6000)
            .unwrap_or(0)
    };
    for (i, how) in [
        vec!["--root", root.to_str().unwrap()],
        vec![
            "--lower",
            fixture.to_str().unwrap(),
            "--upper",
            upper.to_str().unwrap(),
            "--work",
            work.to_str().unwrap(),
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let stdout = tmp.path().join(format!("stdout-{i}"));
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["sandbox", "run"])
            .args(&how)
            .args(["--env", "PATH=/bin", "--", "sh", "-c", script])
            .stdout(std::fs::File::create(&stdout).unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(std::fs::read_to_string(&stdout).unwrap(), "ran\n", "{err}");
        assert_eq!(setid(&stdout), 0, "stdout file: {err}");
        for f in ["s", "i"] {
            for dir in [&root, &upper] {
                assert_eq!(setid(&dir.join(f)), 0, "{}: {err}", dir.join(f).display());
            }
        }
    }
}
