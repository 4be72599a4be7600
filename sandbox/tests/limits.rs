//! Resource limits: each one holds, says so in the outcome (and on the
//! command's stderr), and leaves the next sandbox alone. With a privileged
//! helper on this cgroup v1 host they come from cgroups; an unprivileged
//! helper says which it could not apply, and still bounds processes
//! (RLIMIT_NPROC per user namespace), files and its tmpfs.

mod common;

use common::*;
use kiln_sandbox::*;

const MIB: u64 = 1 << 20;

fn with_limits(l: Limits) -> impl FnOnce(&mut SandboxRequest) {
    move |q| q.limits = l
}

/// Whether the helper gets cgroups on this v1 host: only as root, either backend.
fn cgroups(mode: Mode, _backend: BackendKind) -> bool {
    mode == Mode::Root
}

fn memory_balloon(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let limits = Limits {
        memory_bytes: Some(64 * MIB),
        ..Limits::default()
    };
    let r = run_sh_with(
        &l,
        &s,
        "/probe balloon 512; echo survived",
        with_limits(limits),
    );
    if !cgroups(mode, backend) {
        assert!(
            r.outcome
                .warnings
                .iter()
                .any(|w| w.contains("memory limit not applied")),
            "{r:?}"
        );
        return;
    }
    assert!(!r.stdout.contains("balloon: 512"), "{r:?}");
    assert!(
        r.outcome
            .limits_hit
            .iter()
            .any(|h| matches!(h, LimitHit::Memory { limit_bytes, kills } if *limit_bytes == 64 * MIB && *kills >= 1)),
        "{r:?}"
    );
    assert!(
        r.stderr
            .contains("kiln-sandbox: memory limit of 64 MiB reached"),
        "{r:?}"
    );
    // The next sandbox, with no limit, is unaffected.
    let r = run_sh_with(&l, &s, "/probe balloon 128", with_limits(Limits::default()));
    assert!(r.stdout.contains("balloon: 128 MiB"), "{r:?}");
    assert!(r.outcome.limits_hit.is_empty(), "{r:?}");
}

fn process_limit(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let limits = Limits {
        pids: Some(40),
        ..Limits::default()
    };
    let r = run_sh_with(&l, &s, "/probe forks 200", with_limits(limits));
    let ok: u64 = r
        .stdout
        .strip_prefix("forks: ")
        .and_then(|x| x.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(ok < 40, "{ok} processes at a limit of 40: {r:?}");
    if cgroups(mode, backend) {
        assert!(
            r.outcome
                .limits_hit
                .iter()
                .any(|h| matches!(h, LimitHit::Pids { limit: 40, refused } if *refused > 0)),
            "{r:?}"
        );
        assert!(r.stderr.contains("process limit of 40 reached"), "{r:?}");
    }
    let r = run_sh_with(&l, &s, "/probe forks 60", with_limits(Limits::default()));
    assert!(r.stdout.starts_with("forks: 60 ok"), "{r:?}");
}

fn tmp_and_files(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let limits = Limits {
        scratch_bytes: Some(8 * MIB),
        ..Limits::default()
    };
    let r = run_sh_with(
        &l,
        &s,
        "for i in $(seq 20); do dd if=/dev/zero of=/tmp/f$i bs=1M count=1 2>/dev/null || break; done; \
         echo tmp $i; \
         for i in $(seq 20); do dd if=/dev/zero of=/dev/shm/f$i bs=1M count=1 2>/dev/null || break; done; \
         echo shm $i; rm /dev/shm/f*",
        with_limits(limits),
    );
    // 8 MiB hold 8 files of 1 MiB: the 9th fails (ENOSPC).
    assert!(r.stdout.contains("tmp 9\nshm 9\n"), "{r:?}");
    assert!(
        r.outcome
            .limits_hit
            .iter()
            .any(|h| matches!(h, LimitHit::TmpfsFull { path, .. } if path == "/tmp")),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("kiln-sandbox: /tmp is full (8 MiB)"),
        "{r:?}"
    );
    // A file anywhere (here in the root) stops at the limit: SIGXFSZ.
    let (out, err) = (s.path("o"), s.path("e"));
    let mut q = SandboxRequest::new(
        Root::Dir(s.root()),
        vec![
            "/bin/dd".into(),
            "if=/dev/zero".into(),
            "of=/big".into(),
            "bs=1M".into(),
            "count=20".into(),
        ],
    );
    q.stdout = Stdio::File(out);
    q.stderr = Stdio::File(err.clone());
    q.limits = limits;
    let f = l.spawn(q).unwrap().wait().unwrap();
    assert_eq!(
        f.outcome.status,
        ExitStatus::Signaled(libc::SIGXFSZ),
        "{:?}",
        f.outcome
    );
    assert!(
        f.outcome.limits_hit.contains(&LimitHit::FileSize {
            limit_bytes: 8 * MIB
        }),
        "{:?}",
        f.outcome
    );
    f.release();
    assert!(std::fs::metadata(s.root().join("big")).unwrap().len() <= 8 * MIB);
    assert!(
        std::fs::read_to_string(err)
            .unwrap()
            .contains("file size limit of 8 MiB reached")
    );
}

/// The sandbox sees its own cgroup as `/`: no host cgroup path leaks.
fn cgroup_namespace_is_its_own(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let limits = Limits {
        pids: Some(100),
        ..Limits::default()
    };
    for _ in 0..2 {
        let_the_spare_get_ready();
        let r = run_sh_with(&l, &s, "cat /proc/self/cgroup", with_limits(limits));
        for line in r.stdout.lines() {
            assert!(line.ends_with(":/"), "{r:?}");
        }
    }
}

matrix!(
    memory_balloon,
    process_limit,
    tmp_and_files,
    cgroup_namespace_is_its_own
);

/// Finding 10: processes of host uid 0 are exempt from RLIMIT_NPROC, so a
/// root-run Kiln started under `ulimit -u 50` let an action fork as many
/// processes as it liked. The helper's own limit now caps every sandbox's
/// process limit, enforced by the pids cgroup.
#[test]
fn root_helper_honours_its_rlimit_nproc() {
    let fx = need_fixture!();
    let p = need_probe!();
    let s = Scratch::new(&fx, Mode::Root);
    install_probe(&p, &s.root(), "probe", false);
    let l = Launcher::new(LauncherConfig::new(
        "prlimit",
        ["--nproc=50", HELPER, HELPER_ARG],
    ))
    .unwrap();
    let r = run_sh(&l, &s, "/probe forks 200");
    let ok: u64 = r
        .stdout
        .strip_prefix("forks: ")
        .and_then(|x| x.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{r:?}"));
    assert!(ok < 50, "{ok} processes under ulimit -u 50: {r:?}");
}
