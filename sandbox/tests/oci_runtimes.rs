//! The OCI backend with an external runtime (crun, runc): a representative
//! subset of the hermeticity and semantics suites, with a privileged helper.
//! The command is the container's PID 1 there (no Kiln init), which the
//! outcome's warnings say; everything else behaves as with the built-in runtime.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kiln_sandbox::*;

fn runtime_launcher(rt: &str) -> Option<Arc<Launcher>> {
    let path = ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(rt))
        .find(|p| p.exists());
    let Some(path) = path else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{rt} missing: run scripts/install-test-deps");
        }
        eprintln!("skipped: {rt} is not installed");
        return None;
    };
    let mut cfg = LauncherConfig::new(HELPER, [HELPER_ARG]);
    cfg.backend = BackendKind::Oci;
    cfg.oci_runtime = Some(path);
    Some(Arc::new(Launcher::new(cfg).unwrap()))
}

fn suite(rt: &str) {
    let fx = need_fixture!();
    let p = need_probe!();
    let Some(l) = runtime_launcher(rt) else {
        return;
    };
    let s = Scratch::new(&fx, Mode::Root);
    install_probe(&p, &s.root(), "probe", false);

    // Exit codes, stdio separation, the warnings.
    let r = run_sh(&l, &s, "echo out; echo err >&2; exit 3");
    assert_eq!(r.outcome.status, ExitStatus::Exited(3), "{}", r.stderr);
    assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));
    assert!(
        r.outcome.warnings.iter().any(|w| w.contains("PID 1")),
        "{:?}",
        r.outcome.warnings
    );

    // A host file, the host's loopback, host processes.
    let secret = s.path("secret");
    std::fs::write(&secret, "host-secret\n").unwrap();
    let srv = HostServer::start();
    let r = run_sh(
        &l,
        &s,
        &format!(
            "cat {} /../secret ../secret; /probe connect {}; ls /proc | grep -c '^[0-9]'; \
             /probe mount; /probe mknod; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status",
            secret.display(),
            srv.port
        ),
    );
    assert!(!r.stdout.contains("host-secret"), "{}", r.stdout);
    assert!(r.stdout.contains("connect: ECONNREFUSED"), "{}", r.stdout);
    assert!(
        r.stdout.contains("mount: EPERM") && r.stdout.contains("mknod: EPERM"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("CapEff:\t0000000000000000"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("CapBnd:\t0000000000000000"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
    assert_eq!(srv.count(), 0);

    // Kiln's seccomp filter, through the spec: keyring, perf, set-id bits.
    let r = run_sh(
        &l,
        &s,
        "/probe keyctl; /probe perf; /probe setid /made; touch /f; chmod 4755 /f",
    );
    for want in [
        "keyctl: EPERM",
        "perf: EPERM",
        "setid-chmod: EPERM",
        "setid-open: EPERM",
    ] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.root().join("f"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o6000, 0, "{mode:o}");

    // Limits go in linux.resources; the cgroup's counters say what was hit.
    let r = run_sh_with(&l, &s, "/probe balloon 512", |q| {
        q.limits = Limits {
            memory_bytes: Some(64 << 20),
            pids: Some(64),
            ..Limits::default()
        }
    });
    assert!(!r.stdout.contains("balloon: 512"), "{r:?}");
    assert!(
        r.outcome
            .limits_hit
            .iter()
            .any(|h| matches!(h, LimitHit::Memory { .. })),
        "{r:?}"
    );

    // The timeout kills everything, partial output stays readable.
    let marker = format!("kiln-{rt}-daemon-{}", std::process::id());
    let mut q = sh_request(
        Root::Dir(s.root()),
        &format!("setsid sh -c 'sleep 1000; : {marker}' & echo partial > /p; sleep 1000"),
        &s.path("o"),
        &s.path("e"),
    );
    q.timeout = Some(Duration::from_millis(700));
    let f = l.spawn(q).unwrap().wait().unwrap();
    assert!(f.outcome.timed_out, "{:?}", f.outcome);
    let p = std::io::read_to_string(f.root().open(Path::new("p")).unwrap()).unwrap();
    assert_eq!(p, "partial\n");
    f.release();
    assert_eq!(processes_with(&marker), Vec::<u32>::new());

    // Cancel.
    let q = sh_request(Root::Dir(s.root()), "sleep 100", &s.path("o"), &s.path("e"));
    let running = l.spawn(q).unwrap();
    running.kill();
    let f = running.wait().unwrap();
    assert!(f.outcome.cancelled, "{:?}", f.outcome);

    // A missing executable.
    let mut q = SandboxRequest::new(Root::Dir(s.root()), vec!["/nope".into()]);
    q.stderr = Stdio::File(s.path("e"));
    let res = l.spawn(q).and_then(|r| r.wait());
    match res {
        Ok(f) => assert_ne!(f.outcome.status, ExitStatus::Exited(0)),
        Err(e) => assert!(e.to_string().contains("create"), "{e}"),
    }
}

#[test]
fn crun() {
    suite("crun");
}

#[test]
fn runc() {
    suite("runc");
}
