//! The hermeticity suite: every test tries to get out of the sandbox and
//! must fail. Each runs against every backend, with a privileged helper and
//! with an unprivileged one (uid 65534).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use kiln_sandbox::*;

fn read_host_file(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let secret = s.path("secret");
    std::fs::write(&secret, "host-secret-1234\n").unwrap();
    std::fs::write(s.root().join("inside"), "inside\n").unwrap();
    // An absolute symlink staged in the root pointing at the host path.
    std::os::unix::fs::symlink(&secret, s.root().join("link-abs")).unwrap();
    std::os::unix::fs::symlink("../secret", s.root().join("link-rel")).unwrap();
    let sp = secret.display().to_string();
    let script = format!(
        "cat {sp}; cat /../secret; cat ../secret; cat /link-abs; cat /link-rel; \
         cat /proc/self/root/../secret; cat /proc/1/root/../secret; cat /proc/1/cwd/../secret; \
         cd /; cd ..; cd ..; cat secret; cat /etc/shadow; ls /work /root /home; \
         cat /inside; echo done"
    );
    let r = run_sh(&l, &s, &script);
    assert!(
        !r.stdout.contains("host-secret"),
        "host file read: {}",
        r.stdout
    );
    assert!(
        r.stdout.contains("inside\ndone"),
        "stdout: {} stderr: {}",
        r.stdout,
        r.stderr
    );
}

fn reach_host_tcp(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let srv = HostServer::start();
    let port = srv.port;
    let r = run_sh(
        &l,
        &s,
        &format!(
            "/probe connect {port}; wget -q -T 2 -O - http://127.0.0.1:{port}/; ip -o link; ip -o addr"
        ),
    );
    assert!(r.stdout.contains("connect: ECONNREFUSED"), "{}", r.stdout);
    assert!(!r.stdout.contains("host-secret"));
    // Only loopback inside, and it is up.
    let links: Vec<&str> = r.stdout.lines().filter(|l| l.contains("mtu")).collect();
    assert_eq!(links.len(), 1, "links: {links:?}");
    assert!(
        links[0].contains(": lo:") && links[0].contains("UP"),
        "{links:?}"
    );
    // A server inside the sandbox on its own loopback works.
    let r2 = run_sh(
        &l,
        &s,
        "nc -l -p 7777 -e echo inside-lo & \
         for i in 1 2 3 4 5 6 7 8 9 10; do /probe connect 7777 | grep ok && break; sleep 0.2; done",
    );
    assert!(
        r2.stdout.contains("connect: ok"),
        "{} {}",
        r2.stdout,
        r2.stderr
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(srv.count(), 0, "the host server was reached");

    // Positive control: with the network on, the same probe does connect.
    let r = run_sh_with(&l, &s, &format!("/probe connect {port}"), |q| {
        q.network = true
    });
    assert!(
        r.stdout.contains("connect: ok"),
        "{} {}",
        r.stdout,
        r.stderr
    );
}

fn see_host_processes(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let marker = format!("kiln-host-marker-{}", std::process::id());
    let mut host = std::process::Command::new("sh")
        .args(["-c", &format!("sleep 20; : {marker}")])
        // Its `sleep` outlives the kill of `sh`: it must not hold the test's output open.
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let r = run_sh(
        &l,
        &s,
        "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    );
    let _ = host.kill();
    let _ = host.wait();
    assert!(!r.stdout.contains(&marker), "{}", r.stdout);
    let count: usize = r.stdout.lines().last().unwrap().trim().parse().unwrap();
    assert!(count <= 4, "{count} processes visible: {}", r.stdout);
}

fn see_host_environment(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let (out, err) = (s.path("out"), s.path("err"));
    let mut req = SandboxRequest::new(Root::Dir(s.root()), vec!["/bin/env".into()]);
    req.env = vec![
        ("PATH".into(), "/bin".into()),
        ("ONLY".into(), "this".into()),
    ];
    req.stdout = Stdio::File(out.clone());
    req.stderr = Stdio::File(err);
    let f = l.spawn(req).unwrap().wait().unwrap();
    assert!(f.outcome.status.success());
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        "PATH=/bin\nONLY=this\n"
    );
}

fn setuid_binary(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "suid", true);
    // The OCI backend runs uid 0 only (see oci.rs); root inside must not
    // gain anything from a setuid file either.
    let id = if backend == BackendKind::Oci { 0 } else { 1000 };
    let r = run_sh_with(
        &l,
        &s,
        "/suid ids; /suid setuid0; grep -E '^(Cap|NoNewPrivs)' /proc/self/status",
        |q| {
            q.uid = id;
            q.gid = id;
        },
    );
    let want = format!("uid={id} euid={id} suid={id} gid={id} egid={id}");
    assert!(r.stdout.contains(&want), "{}\n{}", r.stdout, r.stderr);
    if id != 0 {
        assert!(
            r.stdout.contains("setuid0: EPERM") || r.stdout.contains("setuid0: EINVAL"),
            "{}",
            r.stdout
        );
    }
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            r.stdout.contains(&format!("{set}:\t0000000000000000")),
            "{set}: {}",
            r.stdout
        );
    }
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
}

fn mount_ptrace_mknod(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let r = run_sh(
        &l,
        &s,
        "for v in mount umount-proc mknod chroot unshare-user unshare-mount; do /probe $v; done; \
         /probe ptrace 1; sleep 5 & /probe ptrace $!; \
         mount -t tmpfs none /tmp 2>&1; unshare -r -m true 2>&1; hostname evil 2>&1; hostname",
    );
    for v in ["mount", "umount-proc", "mknod", "chroot", "unshare-mount"] {
        assert!(
            r.stdout.contains(&format!("{v}: EPERM")),
            "{v}: {}",
            r.stdout
        );
    }
    // No nested user namespace: max_user_namespaces is 0 inside.
    assert!(
        r.stdout.contains("unshare-user: ENOSPC") || r.stdout.contains("unshare-user: EPERM"),
        "{}",
        r.stdout
    );
    // The sandbox's init holds capabilities in its namespace: never traceable.
    assert!(r.stdout.contains("ptrace: EPERM"), "{}", r.stdout);
    assert!(
        r.stdout.trim_end().ends_with("kiln"),
        "hostname changed: {}",
        r.stdout
    );
}

fn proc_and_sys_are_read_only(mode: Mode, backend: BackendKind) {
    proc_and_sys_stay_read_only_with_marks(mode, backend, &[]);
}

/// BuildStream marks `dev`, `proc` and `tmp` writable under a read-only
/// root: those marks are about its staged directories and must not undo
/// Kiln's /proc masks or take /dev away.
fn proc_and_sys_are_read_only_with_buildstreams_marks(mode: Mode, backend: BackendKind) {
    let marks = [("", true), ("dev", false), ("proc", false), ("tmp", false)];
    proc_and_sys_stay_read_only_with_marks(mode, backend, &marks);
}

fn proc_and_sys_stay_read_only_with_marks(
    mode: Mode,
    backend: BackendKind,
    marks: &[(&str, bool)],
) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let subtrees: Vec<Subtree> = marks
        .iter()
        .map(|(p, ro)| Subtree {
            path: p.into(),
            read_only: *ro,
        })
        .collect();
    // uid 0 starts from the helper's spare init (given time to get ready),
    // which prepared /proc ahead; other ids from a fresh clone3.
    let ids: &[u32] = match backend {
        BackendKind::Userns => &[0, 1000],
        _ => &[0],
    };
    for &id in ids {
        if id == 0 {
            let_the_spare_get_ready();
        }
        let subtrees = subtrees.clone();
        proc_checks(&l, &s, |q| {
            q.subtrees = subtrees;
            q.uid = id;
            q.gid = id;
        });
    }
}

fn proc_checks(l: &Launcher, s: &Scratch, f: impl FnOnce(&mut SandboxRequest)) {
    // Opening for write is enough to prove it; nothing is written.
    let r = run_sh_with(
        l,
        s,
        "echo x > /dev/null && echo null-ok; touch /tmp/t && echo tmp-ok; \
         head -c 1 /proc/keys 2>/dev/null | wc -c; \
         for f in /proc/sysrq-trigger /proc/sys/vm/drop_caches /proc/sys/kernel/core_pattern \
         /proc/sys/net/ipv4/ip_forward /proc/sys/user/max_user_namespaces; do \
           if (exec 3>>$f) 2>/dev/null; then echo WRITABLE $f; else echo denied $f; fi; done; \
         cat /proc/sys/user/max_user_namespaces; cat /proc/kcore 2>&1 | head -c 10 | wc -c; ls /sys 2>&1 | head -1",
        f,
    );
    assert!(!r.stdout.contains("WRITABLE"), "{}", r.stdout);
    // /proc/keys is masked with /dev/null: nothing to read.
    assert!(r.stdout.starts_with("null-ok\ntmp-ok\n0\n"), "{}", r.stdout);
    assert_eq!(r.stdout.matches("denied").count(), 5, "{}", r.stdout);
    assert!(
        r.stdout.contains("max_user_namespaces\n0\n"),
        "max_user_namespaces: {}",
        r.stdout
    );
}

fn leave_process_after_timeout(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let marker = format!("kiln-daemon-{}-{mode:?}-{backend:?}", std::process::id());
    let (out, err) = (s.path("out"), s.path("err"));
    let script = format!(
        "sh -c 'sleep 1000; : {marker}' & setsid sh -c 'sleep 1000; : {marker}' & \
         (sh -c 'trap \"\" TERM HUP; sleep 1000; : {marker}' &) ; \
         echo partial > /partial; sleep 1000"
    );
    let mut req = sh_request(Root::Dir(s.root()), &script, &out, &err);
    req.timeout = Some(Duration::from_millis(2000));
    let running = l.spawn(req).unwrap();
    let pid = running.pid().expect("init pid");
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    let ns = ns.to_string_lossy().into_owned();
    // Wait (bounded) until the daemons run, however loaded the machine.
    for _ in 0..100 {
        if processes_in_pidns(&ns).len() >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(processes_in_pidns(&ns).len() >= 4, "the daemons did start");
    let f = running.wait().unwrap();
    assert!(f.outcome.timed_out, "{:?}", f.outcome);
    assert_eq!(f.outcome.status, ExitStatus::Signaled(9));
    // Partial outputs stay readable after a timeout.
    let partial = std::io::read_to_string(f.root().open(Path::new("partial")).unwrap()).unwrap();
    assert_eq!(partial, "partial\n");
    assert_eq!(processes_in_pidns(&ns), Vec::<u32>::new());
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
    f.release();

    // The same when the command simply exits, leaving daemons behind.
    // (The short sleep keeps the init alive long enough for us to find its
    // namespace; were it gone already, so would be every process in it.)
    let script = format!(
        "setsid sh -c 'sleep 1000; : {marker}' & sh -c 'sleep 1000; : {marker}' & sleep 0.3; exit 0"
    );
    let req = sh_request(Root::Dir(s.root()), &script, &out, &err);
    let running = l.spawn(req).unwrap();
    let init = running.pid().and_then(|pid| {
        let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
        Some((pid, ns.to_string_lossy().into_owned()))
    });
    let f = running.wait().unwrap();
    assert_eq!(f.outcome.status, ExitStatus::Exited(0));
    assert_eq!(processes_with(&marker), Vec::<u32>::new());
    let Some((pid, ns)) = init else {
        return;
    };
    // Only Kiln's init may still be on its way out once the outcome is in.
    let left: Vec<u32> = processes_in_pidns(&ns)
        .into_iter()
        .filter(|p| *p != pid)
        .collect();
    assert_eq!(left, Vec::<u32>::new());
    for _ in 0..200 {
        if processes_in_pidns(&ns).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the sandbox's init did not exit");
}

fn write_beyond_root(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let outside = s.path("outside");
    std::fs::create_dir(&outside).unwrap();
    if mode == Mode::Unprivileged {
        std::os::unix::fs::chown(&outside, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::symlink(&outside, s.root().join("out-link")).unwrap();
    let o = outside.display().to_string();
    let script = format!(
        "echo a > /proc/self/root/../escaped-a; echo b > /../escaped-b; echo c > ../../escaped-c; \
         echo d > /proc/1/root/../escaped-d; echo e > /out-link/escaped-e; mkdir -p {o}; echo f > {o}/escaped-f; \
         ln -s {o} /l2; echo g > /l2/escaped-g; true"
    );
    let r = run_sh(&l, &s, &script);
    assert!(r.outcome.status.success(), "{}", r.stderr);
    let escaped: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(escaped.is_empty(), "wrote outside the root: {escaped:?}");
    for x in ["a", "b", "c"] {
        assert!(!s.path(&format!("escaped-{x}")).exists());
        assert!(
            s.root().join(format!("escaped-{x}")).exists(),
            "{x} landed inside"
        );
    }
}

fn staged_symlinks_cannot_redirect_mounts(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let outside = s.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), "x").unwrap();
    if mode == Mode::Unprivileged {
        std::os::unix::fs::chown(&outside, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    // /tmp and a read-only subtree are symlinks to a host directory.
    std::fs::remove_dir(s.root().join("tmp")).unwrap();
    std::os::unix::fs::symlink(&outside, s.root().join("tmp")).unwrap();
    std::os::unix::fs::symlink(&outside, s.root().join("ro")).unwrap();
    let before = host_mounts_with(&outside.display().to_string());
    let res = l.spawn({
        let mut q = sh_request(
            Root::Dir(s.root()),
            "ls /tmp; echo x > /tmp/new; true",
            &s.path("o"),
            &s.path("e"),
        );
        q.subtrees = vec![Subtree {
            path: "ro".into(),
            read_only: true,
        }];
        q
    });
    // Either set-up refuses (the link target does not exist inside the root)
    // or it mounts inside: never over the host directory.
    if let Ok(r) = res {
        let f = r.wait().unwrap();
        drop(f);
    }
    assert!(!outside.join("new").exists());
    assert!(outside.join("keep").exists());
    assert_eq!(host_mounts_with(&outside.display().to_string()), before);
}

fn devices_are_minimal(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    let r = run_sh(
        &l,
        &s,
        "ls /dev | tr '\\n' ' '; echo; head -c 4 /dev/zero | wc -c; head -c 4 /dev/urandom | wc -c; \
         echo x > /dev/null && echo null-ok; (echo x > /dev/full) 2>/dev/null || echo full-ok; \
         (exec 3</dev/tty) 2>/dev/null && echo TTY || echo no-tty; touch /dev/shm/x && echo shm-ok; \
         readlink /dev/fd; readlink /dev/stdout",
    );
    assert_eq!(
        r.stdout.lines().next().unwrap().trim(),
        "fd full null random shm stderr stdin stdout tty urandom zero"
    );
    for w in [
        "null-ok",
        "full-ok",
        "no-tty",
        "shm-ok",
        "/proc/self/fd\n/proc/self/fd/1",
    ] {
        assert!(r.stdout.contains(w), "{w}: {}", r.stdout);
    }
}

/// Sandboxes from one launcher share a helper, its pools and its `/dev`
/// template: nothing one action leaves in `/dev`, `/dev/shm`, SysV IPC or
/// `/tmp` may reach the next.
fn nothing_carries_over_between_sandboxes(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let_the_spare_get_ready();
    let first = run_sh(
        &l,
        &s,
        "touch /dev/shm/left /tmp/left; touch /dev/left 2>/dev/null; /probe sysv-create",
    );
    assert!(first.stdout.contains("sysv-create: ok"), "{first:?}");
    let_the_spare_get_ready();
    let second = run_sh(&l, &s, "ls -a /dev/shm /tmp; ls /dev; /probe sysv-find");
    assert!(!second.stdout.contains("left"), "{second:?}");
    // The segment would still be there in a reused IPC namespace. (The
    // namespaces' inode numbers prove nothing: the kernel recycles them.)
    assert!(second.stdout.contains("sysv-find: ENOENT"), "{second:?}");
}

/// Finding 4: keys are not namespaced by serial. A key in the keyring of
/// the user the helper runs as must stay out of reach: the sandbox may not
/// link that user's keyring (whose serial an action can find by scanning)
/// into its own session keyring, nor see `/proc/keys` or `/proc/key-users`.
fn keyring_of_the_kiln_user(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let desc = format!("kiln-test-{}-{mode:?}-{backend:?}", std::process::id());
    let mut plant = std::process::Command::new("setpriv");
    if mode == Mode::Unprivileged {
        plant.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    }
    let planted = plant
        .arg(&p)
        .args(["key-plant", &desc, "host-key-secret"])
        .output()
        .unwrap();
    let planted = String::from_utf8_lossy(&planted.stdout).into_owned();
    let serial = planted
        .trim()
        .strip_prefix("key-plant: ")
        .unwrap_or_else(|| panic!("planting a key on the host: {planted}"));
    let r = run_sh(
        &l,
        &s,
        &format!(
            "/probe key-steal {serial} {desc}; /probe keyctl; \
             cat /proc/key-users /proc/keys 2>&1 | wc -c"
        ),
    );
    assert!(!r.stdout.contains("host-key-secret"), "{r:?}");
    assert!(r.stdout.contains("key-steal: EPERM"), "{r:?}");
    assert!(r.stdout.contains("keyctl: EPERM"), "{r:?}");
    assert_eq!(r.stdout.lines().last(), Some("0"), "{r:?}");
}

/// What Kiln's seccomp filter denies (like Docker's default profile):
/// calls builds never need and kernel exploits love. Ordinary processes and
/// threads still work (clone3 fails with ENOSYS, so libc falls back).
fn kernel_attack_surface_is_filtered(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let r = run_sh(
        &l,
        &s,
        "for v in perf userfaultfd io_uring clone3 bpf keyctl; do /probe $v; done; \
         (echo sub-shell) | cat",
    );
    for want in [
        "perf: EPERM",
        "userfaultfd: EPERM",
        "io_uring: ENOSYS",
        "clone3: ENOSYS",
        "bpf: EPERM",
        "keyctl: EPERM",
        "sub-shell",
    ] {
        assert!(r.stdout.contains(want), "{want}: {r:?}");
    }
}

/// Finding 3: `nosuid` protects only the sandbox's own mount. A set-id
/// bit set inside must never land on the host: not on the root's files
/// (which `kiln sandbox run --root` changes in place), not on stdout when
/// it is a host file.
fn setid_bits_never_land_on_the_host(mode: Mode, backend: BackendKind) {
    use std::os::unix::fs::PermissionsExt;
    let fx = need_fixture!();
    let p = need_probe!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    install_probe(&p, &s.root(), "probe", false);
    let r = run_sh(
        &l,
        &s,
        "/probe setid /made; cp /bin/busybox /bb; chmod 4755 /bb; chmod g+s /bb; \
         chmod 4755 /proc/self/fd/1; chmod 6755 /dev/stdout; echo done",
    );
    assert!(r.stdout.contains("done"), "{r:?}");
    let mut checked = 0;
    for e in std::fs::read_dir(s.root()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("made.") || name == "bb" {
            let mode = e.metadata().unwrap().permissions().mode();
            assert_eq!(mode & 0o6000, 0, "/{name} is {mode:o} on the host: {r:?}");
            checked += 1;
        }
    }
    // made.{chmod,fchmod,fchmodat} and /bb; open and mknod fail before creating.
    assert!(checked >= 4, "{checked} files: {r:?}");
    let out_mode = std::fs::metadata(s.path("stdout"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(out_mode & 0o6000, 0, "stdout is {out_mode:o} on the host");
    for v in ["chmod", "fchmod", "fchmodat", "open", "mknod"] {
        assert!(
            r.stdout.contains(&format!("setid-{v}: EPERM")),
            "{v}: {r:?}"
        );
    }
}

/// Finding 7: network namespaces a privileged helper keeps ready must not
/// carry one action's state to the next: a TIME_WAIT socket in
/// `/proc/net/tcp`, loopback counters in `/proc/net/dev`.
fn network_state_does_not_carry_over(mode: Mode, backend: BackendKind) {
    let fx = need_fixture!();
    let l = launcher(mode, backend);
    let s = Scratch::new(&fx, mode);
    // The server side closes first, so its socket stays in TIME_WAIT.
    let first = run_sh(
        &l,
        &s,
        "nc -l -p 7777 -e echo hi & sleep 0.2; nc 127.0.0.1 7777 </dev/null; sleep 0.1; \
         grep -c ':1E61' /proc/net/tcp",
    );
    assert!(first.stdout.starts_with("hi\n"), "{first:?}");
    // The helper's next spare was made before the first one's namespace
    // came back: look a few sandboxes on.
    for i in 0..5 {
        let_the_spare_get_ready();
        let r = run_sh(
            &l,
            &s,
            "echo tcp $(($(wc -l < /proc/net/tcp) - 1)); grep ' lo:' /proc/net/dev",
        );
        assert!(r.stdout.starts_with("tcp 0\n"), "run {i}: {r:?}");
        let lo: Vec<&str> = r
            .stdout
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        // lo: rx_bytes rx_packets … tx_bytes tx_packets …
        assert_eq!(
            (lo.get(1), lo.get(2)),
            (Some(&"0"), Some(&"0")),
            "run {i}: {r:?}"
        );
    }
}

matrix!(
    network_state_does_not_carry_over,
    keyring_of_the_kiln_user,
    kernel_attack_surface_is_filtered,
    setid_bits_never_land_on_the_host,
    nothing_carries_over_between_sandboxes,
    proc_and_sys_are_read_only_with_buildstreams_marks,
    read_host_file,
    reach_host_tcp,
    see_host_processes,
    see_host_environment,
    setuid_binary,
    mount_ptrace_mknod,
    proc_and_sys_are_read_only,
    leave_process_after_timeout,
    write_beyond_root,
    staged_symlinks_cannot_redirect_mounts,
    devices_are_minimal,
);

/// Finding 6: the unprivileged OCI backend kept its bundles in
/// `/tmp/kiln-oci-<uid>` without checking who made it. Another local user
/// who creates it first must get nothing of the helper's: its state lives
/// in a fresh directory only the helper's user can enter.
#[test]
fn oci_state_directory_cannot_be_planted() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let fx = need_fixture!();
    let planted = std::path::PathBuf::from(format!("/tmp/kiln-oci-{NOBODY}"));
    let _ = std::fs::remove_dir_all(&planted);
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cfg = LauncherConfig::new(
        "env",
        [
            "-u",
            "XDG_RUNTIME_DIR",
            "TMPDIR=/tmp",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            HELPER,
            HELPER_ARG,
        ],
    );
    cfg.backend = BackendKind::Oci;
    let l = Launcher::new(cfg).unwrap();
    let s = Scratch::new(&fx, Mode::Unprivileged);
    let (out, err) = (s.path("out"), s.path("err"));
    let running = l
        .spawn(sh_request(Root::Dir(s.root()), "sleep 0.5", &out, &err))
        .unwrap();
    let ours: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("kiln-oci-{NOBODY}-"))
        })
        .map(|e| e.path())
        .collect();
    let f = running.wait().unwrap();
    assert!(f.outcome.status.success(), "{:?}", f.outcome);
    let in_planted: Vec<_> = std::fs::read_dir(&planted).unwrap().flatten().collect();
    std::fs::remove_dir_all(&planted).unwrap();
    assert!(
        in_planted.is_empty(),
        "the helper used a directory someone else made: {in_planted:?}"
    );
    assert!(!ours.is_empty(), "no private state directory in /tmp");
    let private = ours.iter().any(|d| {
        std::fs::symlink_metadata(d)
            .is_ok_and(|m| m.is_dir() && m.uid() == NOBODY && m.mode() & 0o077 == 0)
    });
    assert!(private, "{ours:?}");
}
