//! Exact semantics: what a command sees and what the caller gets back.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_sandbox::*;

fn exit_codes_and_signals(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    for (script, want) in [
        ("true", ExitStatus::Exited(0)),
        ("exit 1", ExitStatus::Exited(1)),
        ("exit 42", ExitStatus::Exited(42)),
        ("exit 255", ExitStatus::Exited(255)),
        ("kill -9 $$", ExitStatus::Signaled(9)),
        ("kill -TERM $$", ExitStatus::Signaled(15)),
        ("kill -SEGV $$", ExitStatus::Signaled(11)),
    ] {
        let r = run_sh(&l, &s, script);
        assert_eq!(r.outcome.status, want, "{script}: {}", r.stderr);
        assert!(!r.outcome.timed_out && !r.outcome.cancelled);
    }
    // SIGPIPE is at its default inside, whatever the helper (a Rust
    // program, which ignores it) had: a writer to a closed pipe dies of it.
    let r = run_sh(
        &l,
        &s,
        "(yes; echo \"yes-exit=$?\" >&2) | head -c 1 >/dev/null",
    );
    assert_eq!(r.stderr, "yes-exit=141\n");
}

fn stdout_stderr_separate(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh(
        &l,
        &s,
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2; cat /proc/self/fd/0 | wc -c",
    );
    assert_eq!(r.stdout, "out1\nout2\n0\n");
    assert_eq!(r.stderr, "err1\nerr2\n");
}

fn large_output_streams(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh(
        &l,
        &s,
        "head -c 104857600 /dev/zero; head -c 1048576 /dev/zero >&2",
    );
    assert!(r.outcome.status.success());
    assert_eq!(
        std::fs::metadata(s.path("stdout")).unwrap().len(),
        104_857_600
    );
    assert_eq!(
        std::fs::metadata(s.path("stderr")).unwrap().len(),
        1_048_576
    );
    std::fs::remove_file(s.path("stdout")).unwrap();
}

fn uid_gid_mapping(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh(
        &l,
        &s,
        "id -u; id -g; stat -c %u:%g /bin/busybox; touch /made-by-root",
    );
    assert_eq!(r.stdout, "0\n0\n0:0\n", "{}", r.stderr);
    if backend == BackendKind::Oci {
        let mut q = sh_request(Root::Dir(s.root()), "true", &s.path("o"), &s.path("e"));
        q.uid = 1000;
        let e = l.spawn(q).unwrap_err().to_string();
        assert!(e.contains("uid/gid 0 inside only"), "{e}");
        return;
    }
    let r = run_sh_with(
        &l,
        &s,
        "id -u; id -g; stat -c %u:%g /bin/busybox; touch /made; id -G",
        |q| {
            q.uid = 1000;
            q.gid = 100;
        },
    );
    assert_eq!(r.stdout, "1000\n100\n1000:100\n100\n", "{}", r.stderr);
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(s.root().join("made")).unwrap();
    let want = if mode == Mode::Root { 0 } else { NOBODY };
    assert_eq!(
        (m.uid(), m.gid()),
        (want, want),
        "files land owned by the helper's ids"
    );
}

fn symlinks_inside_root(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    std::fs::create_dir_all(s.root().join("usr/lib/x")).unwrap();
    std::fs::write(s.root().join("usr/lib/x/data"), "via-link\n").unwrap();
    // Like a sysroot's lib64/ld-linux.so -> /lib/...: absolute, resolved inside.
    std::os::unix::fs::symlink("/usr/lib/x", s.root().join("abs")).unwrap();
    std::os::unix::fs::symlink("usr/lib/x", s.root().join("rel")).unwrap();
    std::fs::create_dir(s.root().join("links")).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", s.root().join("links/echo")).unwrap();
    let r = run_sh(
        &l,
        &s,
        "cat /abs/data /rel/data; /links/echo exec-via-link; ln -s ../abs/data /tmp/l; cat /tmp/l",
    );
    assert_eq!(
        r.stdout, "via-link\nvia-link\nexec-via-link\nvia-link\n",
        "{}",
        r.stderr
    );
    let f = l
        .spawn(sh_request(
            Root::Dir(s.root()),
            "ln -s /usr/lib/x/data /out-link",
            &s.path("o"),
            &s.path("e"),
        ))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        f.root().read_link(Path::new("out-link")).unwrap(),
        Path::new("/usr/lib/x/data")
    );
    // The collector follows it inside the root, never on the host.
    let got = std::io::read_to_string(f.root().open(Path::new("out-link")).unwrap()).unwrap();
    assert_eq!(got, "via-link\n");
}

fn working_directory_and_environment(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh_with(&l, &s, "pwd; echo $FOO; touch here", |q| {
        q.cwd = "buildstream/proj/el.bst".into();
        q.env.push(("FOO".into(), "bar baz".into()));
    });
    assert_eq!(
        r.stdout, "/buildstream/proj/el.bst\nbar baz\n",
        "{}",
        r.stderr
    );
    assert!(s.root().join("buildstream/proj/el.bst/here").exists());
    let r = run_sh(
        &l,
        &s,
        "hostname; cat /proc/1/cmdline >/dev/null && echo init-visible; echo $$",
    );
    assert_eq!(r.stdout, "kiln\ninit-visible\n2\n");
}

fn missing_executable(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    for argv0 in ["no-such-tool", "/usr/bin/gcc"] {
        let mut req = SandboxRequest::new(Root::Dir(s.root()), vec![argv0.into(), "-v".into()]);
        req.env = vec![("PATH".into(), "/bin".into())];
        req.stderr = Stdio::File(s.path("err"));
        let f = l.spawn(req).unwrap().wait().unwrap();
        assert_eq!(f.outcome.status, ExitStatus::Exited(127));
        let err = std::fs::read_to_string(s.path("err")).unwrap();
        assert_eq!(err, format!("kiln-sandbox: {argv0}: not found\n"));
    }
    // Not executable: 126.
    std::fs::write(s.root().join("noexec"), "#!/bin/sh\n").unwrap();
    let mut req = SandboxRequest::new(Root::Dir(s.root()), vec!["/noexec".into()]);
    req.stderr = Stdio::File(s.path("err"));
    let f = l.spawn(req).unwrap().wait().unwrap();
    assert_eq!(f.outcome.status, ExitStatus::Exited(126));
    assert!(
        std::fs::read_to_string(s.path("err"))
            .unwrap()
            .contains("Permission denied")
    );
}

fn timeout_and_cancel(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let mut req = sh_request(
        Root::Dir(s.root()),
        "echo started; sleep 100",
        &s.path("o"),
        &s.path("e"),
    );
    req.timeout = Some(Duration::from_millis(300));
    let t = std::time::Instant::now();
    let f = l.spawn(req).unwrap().wait().unwrap();
    assert!(
        f.outcome.timed_out && !f.outcome.cancelled,
        "{:?}",
        f.outcome
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(std::fs::read_to_string(s.path("o")).unwrap(), "started\n");

    let req = sh_request(
        Root::Dir(s.root()),
        "echo partial > /p; sleep 100",
        &s.path("o"),
        &s.path("e"),
    );
    let running = l.spawn(req).unwrap();
    let k = running.kill_handle();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        k.kill();
    });
    let f = running.wait().unwrap();
    killer.join().unwrap();
    assert!(
        f.outcome.cancelled && !f.outcome.timed_out,
        "{:?}",
        f.outcome
    );
    assert_eq!(f.outcome.status, ExitStatus::Signaled(9));
    let p = std::io::read_to_string(f.root().open(Path::new("p")).unwrap()).unwrap();
    assert_eq!(p, "partial\n");
}

fn outcome_metrics(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    // ~50 MB resident, some CPU, some sleep.
    let r = run_sh(
        &l,
        &s,
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; dd if=/dev/zero of=/dev/null bs=50M count=1 2>/dev/null; sleep 0.2",
    );
    let o = &r.outcome;
    assert!(o.status.success(), "{}", r.stderr);
    assert!(
        o.wall >= Duration::from_millis(200) && o.wall < Duration::from_secs(20),
        "{o:?}"
    );
    assert!(o.user + o.sys > Duration::from_millis(5), "{o:?}");
    assert!(o.peak_rss_bytes > 40_000_000, "{o:?}");
    assert!(
        o.setup > Duration::ZERO && o.setup < Duration::from_secs(5),
        "{o:?}"
    );
}

fn bad_input(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let tag = s.dir.path().display().to_string();
    let mk = |root: Root| SandboxRequest::new(root, vec!["/bin/true".into()]);
    let e = l.spawn(mk(Root::Dir(s.path("missing")))).unwrap_err();
    assert!(matches!(e, SandboxError::BadRoot { .. }), "{e}");
    std::fs::write(s.path("file"), "").unwrap();
    let e = l.spawn(mk(Root::Dir(s.path("file")))).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    let mut q = mk(Root::Dir(s.root()));
    q.cwd = "a/../../etc".into();
    assert!(
        l.spawn(q)
            .unwrap_err()
            .to_string()
            .contains("escapes the sandbox root")
    );
    let mut q = mk(Root::Dir(s.root()));
    q.timeout = Some(Duration::ZERO);
    assert!(matches!(
        l.spawn(q).unwrap_err(),
        SandboxError::InvalidRequest(_)
    ));
    // A read-only subtree that does not exist: set-up fails precisely.
    let mut q = mk(Root::Dir(s.root()));
    q.subtrees = vec![Subtree {
        path: "nope/deeper".into(),
        read_only: true,
    }];
    let e = l.spawn(q).unwrap_err();
    assert_eq!(
        e.to_string(),
        "sandbox set-up failed: open /nope/deeper: No such file or directory (ENOENT)"
    );
    // A working directory under a file.
    let mut q = mk(Root::Dir(s.root()));
    q.cwd = "bin/busybox/x".into();
    let e = l.spawn(q).unwrap_err();
    assert_eq!(
        e.to_string(),
        "sandbox set-up failed: create directory /bin/busybox/x: open /bin/busybox: Not a directory (ENOTDIR)"
    );
    // Nothing left mounted on the host, and the helper still works.
    assert_eq!(host_mounts_with(&tag), Vec::<String>::new());
    assert!(run_sh(&l, &s, "true").outcome.status.success());
}

fn read_only_subtrees(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    std::fs::create_dir_all(s.root().join("buildstream-install/sub")).unwrap();
    std::fs::create_dir_all(s.root().join("usr/share")).unwrap();
    if mode == Mode::Unprivileged {
        std::process::Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(s.root())
            .status()
            .unwrap();
    }
    let r = run_sh_with(
        &l,
        &s,
        "touch /x 2>/dev/null && echo ROOT-WRITABLE; touch /buildstream-install/ok && echo install-ok; \
         touch /usr/share/y 2>/dev/null && echo USR-WRITABLE; touch /tmp/t && echo tmp-ok; \
         mkdir -p /buildstream/p/el/out && echo cwd-ok",
        |q| {
            q.subtrees = vec![
                Subtree {
                    path: "".into(),
                    read_only: true,
                },
                Subtree {
                    path: "buildstream-install".into(),
                    read_only: false,
                },
                Subtree {
                    path: "buildstream".into(),
                    read_only: false,
                },
            ];
            q.cwd = "buildstream/p/el".into();
        },
    );
    assert_eq!(r.stdout, "install-ok\ntmp-ok\ncwd-ok\n", "{}", r.stderr);
    assert!(s.root().join("buildstream-install/ok").exists());
}

fn overlay_root(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let (lower, upper, work) = (s.root(), s.path("upper"), s.path("work"));
    let lower2 = s.path("lower2");
    for d in [&upper, &work, &lower2] {
        std::fs::create_dir(d).unwrap();
        if mode == Mode::Unprivileged {
            std::os::unix::fs::chown(d, Some(NOBODY), Some(NOBODY)).unwrap();
        }
    }
    std::fs::write(lower2.join("top-file"), "from-lower2\n").unwrap();
    let passwd_before = std::fs::read(lower.join("etc/passwd")).unwrap();
    let root = Root::Overlay {
        lowers: vec![lower2.clone(), lower.clone()],
        upper: upper.clone(),
        work,
    };
    if backend == BackendKind::Oci {
        let q = sh_request(root, "true", &s.path("o"), &s.path("e"));
        let e = l.spawn(q).unwrap_err().to_string();
        assert!(e.contains("overlay roots need the userns backend"), "{e}");
        return;
    }
    let mut req = sh_request(
        root,
        "cat /top-file; echo new > /new; echo more >> /etc/passwd; rm /bin/true; mkdir -p /out/d; echo o > /out/d/f; ls /dev | wc -l",
        &s.path("o"),
        &s.path("e"),
    );
    req.subtrees = vec![Subtree {
        path: "bin".into(),
        read_only: false,
    }];
    let f = l.spawn(req).unwrap().wait().unwrap();
    assert!(
        f.outcome.status.success(),
        "{}",
        std::fs::read_to_string(s.path("e")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(s.path("o")).unwrap(),
        "from-lower2\n11\n"
    );
    // Reading the merged tree before release.
    let names = f.root().read_dir(Path::new("out/d")).unwrap();
    assert_eq!(names, ["f"]);
    assert_eq!(
        f.kiln_mounts(),
        [Path::new("dev"), Path::new("proc"), Path::new("tmp")]
    );
    assert!(f.root().symlink_metadata(Path::new("bin/true")).is_err());
    f.release();
    // Writes landed only in the upper layer; the lowers are untouched.
    assert_eq!(
        std::fs::read(lower.join("etc/passwd")).unwrap(),
        passwd_before
    );
    assert!(lower.join("bin/true").exists());
    assert!(!lower.join("new").exists());
    assert_eq!(std::fs::read_to_string(upper.join("new")).unwrap(), "new\n");
    assert!(
        std::fs::read_to_string(upper.join("etc/passwd"))
            .unwrap()
            .ends_with("more\n")
    );
    assert_eq!(
        host_mounts_with(&s.dir.path().display().to_string()),
        Vec::<String>::new()
    );
}

fn concurrent_sandboxes(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let scratch: Vec<Arc<Scratch>> = (0..8).map(|_| Arc::new(Scratch::new(&fx, mode))).collect();
    let threads: Vec<_> = scratch
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (l, s) = (l.clone(), s.clone());
            std::thread::spawn(move || {
                for j in 0..5 {
                    let r = run_sh(&l, &s, &format!("echo {i}-{j}; exit {j}"));
                    assert_eq!(r.outcome.status, ExitStatus::Exited(j));
                    assert_eq!(r.stdout, format!("{i}-{j}\n"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A request larger than one datagram (here 240 KB of environment) travels
/// to the helper in a memfd.
fn large_request(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh_with(&l, &s, "echo ${#V0} ${#V11}; env | wc -l", |q| {
        for i in 0..12 {
            q.env.push((format!("V{i}"), "x".repeat(20_000)));
        }
    });
    assert!(r.outcome.status.success(), "{}", r.stderr);
    assert_eq!(r.stdout, "20000 20000\n15\n", "{}", r.stderr);
}

/// Dropping a running sandbox (without waiting) kills all of it.
fn dropping_kills(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let marker = format!("kiln-dropped-{}-{mode:?}-{backend:?}", std::process::id());
    let script = format!("setsid sh -c 'sleep 1000; : {marker}' & sleep 1000; : {marker}");
    let q = sh_request(Root::Dir(s.root()), &script, &s.path("o"), &s.path("e"));
    let running = l.spawn(q).unwrap();
    for _ in 0..250 {
        if processes_with(&marker).len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!processes_with(&marker).is_empty());
    drop(running);
    for _ in 0..300 {
        if processes_with(&marker).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "processes survived their dropped sandbox: {:?}",
        processes_with(&marker)
    );
}

matrix!(
    dropping_kills,
    large_request,
    exit_codes_and_signals,
    stdout_stderr_separate,
    large_output_streams,
    uid_gid_mapping,
    symlinks_inside_root,
    working_directory_and_environment,
    missing_executable,
    timeout_and_cancel,
    outcome_metrics,
    bad_input,
    read_only_subtrees,
    overlay_root,
    concurrent_sandboxes,
);

/// The helper is restarted (and says so) when it dies.
#[test]
fn helper_restarts_after_dying() {
    let fx = need_fixture!();
    let l = Launcher::new(LauncherConfig::new(HELPER, [HELPER_ARG])).unwrap();
    let s = Scratch::new(&fx, Mode::Root);
    assert!(run_sh(&l, &s, "true").outcome.status.success());
    let pid = l.helper_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(run_sh(&l, &s, "true").outcome.status.success());
    assert_ne!(l.helper_pid(), pid);
}

/// A worker may allow a group of system calls back (here the keyring and
/// ptrace), or turn the filter off; the rest of the filter stays.
#[test]
fn seccomp_groups_can_be_allowed_back() {
    let fx = need_fixture!();
    let p = need_probe!();
    let s = Scratch::new(&fx, Mode::Root);
    install_probe(&p, &s.root(), "probe", false);
    let mut cfg = LauncherConfig::new(HELPER, [HELPER_ARG]);
    cfg.seccomp = SeccompPolicy {
        enabled: true,
        allow: vec![SyscallGroup::Keyring, SyscallGroup::Ptrace],
    };
    let l = Launcher::new(cfg).unwrap();
    let r = run_sh(
        &l,
        &s,
        "/probe keyctl; /probe perf; sleep 5 & /probe ptrace $!",
    );
    assert!(r.stdout.contains("keyctl: ok"), "{r:?}");
    assert!(r.stdout.contains("perf: EPERM"), "{r:?}");
    assert!(r.stdout.contains("ptrace: ok"), "{r:?}");
    let mut cfg = LauncherConfig::new(HELPER, [HELPER_ARG]);
    cfg.seccomp = SeccompPolicy::off();
    let l = Launcher::new(cfg).unwrap();
    let r = run_sh(&l, &s, "/probe perf");
    assert!(r.stdout.contains("perf: ok"), "{r:?}");
}
