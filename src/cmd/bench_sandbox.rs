//! `kiln bench sandbox`: the per-run cost of `/bin/true` in a busybox root,
//! for Kiln's backends and the usual tools, measured in the same run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as PStdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use kiln_sandbox::{BackendKind, Launcher, LauncherConfig, Root, SandboxRequest};

/// Arguments of `kiln bench sandbox`.
#[derive(Args)]
pub struct SandboxBench {
    /// A root containing /bin/true (default: the busybox test fixture).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Measured runs per variant (interleaved round by round, so load changes
    /// on a shared machine hit every variant alike).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Unmeasured runs per variant first.
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    /// Only the variants whose name contains this (repeat).
    #[arg(long)]
    only: Vec<String>,
}

type RunOnce = Box<dyn FnMut() -> anyhow::Result<()>>;

struct Variant {
    name: String,
    run: RunOnce,
    samples: Vec<Duration>,
}

fn fixture_root() -> PathBuf {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/fixtures"));
    base.join("busybox")
}

fn status_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(PStdio::null())
        .stdout(PStdio::null())
        .stderr(PStdio::piped())
        .output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Set-up times (request → execve) the Kiln variants report.
type SetupLog = std::rc::Rc<std::cell::RefCell<Vec<Duration>>>;

fn kiln_worker(
    root: &Path,
    backend: BackendKind,
    runtime: Option<&str>,
    pool: usize,
    setups: SetupLog,
) -> anyhow::Result<RunOnce> {
    let mut cfg = LauncherConfig::current_exe();
    cfg.backend = backend;
    cfg.netns_pool = pool;
    cfg.oci_runtime = runtime.map(PathBuf::from);
    let launcher = Launcher::new(cfg)?;
    let root = root.to_path_buf();
    Ok(Box::new(move || {
        let req = SandboxRequest::new(Root::Dir(root.clone()), vec!["/bin/true".into()]);
        let f = launcher.start(req)?.wait()?;
        if !f.outcome.status.success() {
            bail!("{}", f.outcome.status);
        }
        setups.borrow_mut().push(f.outcome.setup);
        // Dropped, not released: the mount namespace is torn down on a
        // background thread, as the executor does.
        drop(f);
        Ok(())
    }))
}

/// A bundle for a baseline OCI runtime: its own `spec` defaults, our root and argv.
fn oci_bundle(runtime: &str, root: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-bench-{runtime}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    status_ok(Command::new(runtime).arg("spec").current_dir(&dir)).context("spec")?;
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["root"]["path"] = root.display().to_string().into();
    spec["root"]["readonly"] = true.into();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/true"]);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir)
}

/// crun 1.8 refuses a cgroup v1 host that also has a cgroup2 mount at
/// /sys/fs/cgroup/unified; hidden in a private mount namespace it runs.
fn hide_unified_cgroup(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    if !Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        return;
    }
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                || libc::umount2(c"/sys/fs/cgroup/unified".as_ptr(), libc::MNT_DETACH) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn oci_runtime(runtime: &'static str, root: &Path) -> anyhow::Result<RunOnce> {
    let bundle = oci_bundle(runtime, root)?;
    let mut n = 0u64;
    Ok(Box::new(move || {
        n += 1;
        let id = format!("kiln-bench-{}-{n}", std::process::id());
        let mut cmd = Command::new(runtime);
        cmd.args(["run", "--bundle"]).arg(&bundle).arg(&id);
        if runtime == "crun" {
            hide_unified_cgroup(&mut cmd);
        }
        status_ok(&mut cmd)
    }))
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(a: SandboxBench) -> anyhow::Result<()> {
    let root = std::path::absolute(a.root.unwrap_or_else(fixture_root))?;
    if !root.join("bin/true").exists() {
        bail!(
            "{} has no bin/true: run scripts/fixtures or give --root",
            root.display()
        );
    }
    let r = root.display().to_string();
    let mut setups: Vec<(String, SetupLog)> = Vec::new();
    let mut log = |name: &str| {
        let l = SetupLog::default();
        setups.push((name.to_string(), l.clone()));
        l
    };
    let mut candidates: Vec<(String, anyhow::Result<RunOnce>)> = vec![
        (
            "kiln userns (worker)".into(),
            kiln_worker(
                &root,
                BackendKind::Userns,
                None,
                4,
                log("kiln userns (worker)"),
            ),
        ),
        (
            "kiln userns (worker, fresh netns)".into(),
            kiln_worker(
                &root,
                BackendKind::Userns,
                None,
                0,
                log("kiln userns (worker, fresh netns)"),
            ),
        ),
        ("kiln CLI".into(), {
            let r = r.clone();
            Ok(Box::new(move || {
                status_ok(Command::new("/proc/self/exe").args([
                    "sandbox",
                    "run",
                    "--root",
                    &r,
                    "--",
                    "/bin/true",
                ]))
            }) as RunOnce)
        }),
        (
            "kiln oci (worker, libcontainer)".into(),
            kiln_worker(
                &root,
                BackendKind::Oci,
                None,
                4,
                log("kiln oci (worker, libcontainer)"),
            ),
        ),
    ];
    if which("crun") {
        candidates.push((
            "kiln oci (worker, crun)".into(),
            kiln_worker(
                &root,
                BackendKind::Oci,
                Some("crun"),
                4,
                log("kiln oci (worker, crun)"),
            ),
        ));
    }
    candidates.push(("unshare + chroot".into(), {
        let r = r.clone();
        Ok(Box::new(move || {
            status_ok(Command::new("unshare").args([
                "--user",
                "--map-root-user",
                "--mount",
                "--pid",
                "--net",
                "--ipc",
                "--uts",
                "--fork",
                "chroot",
                &r,
                "/bin/true",
            ]))
        }) as RunOnce)
    }));
    if which("bwrap") {
        let r = r.clone();
        candidates.push((
            "bwrap --unshare-all".into(),
            Ok(Box::new(move || {
                status_ok(Command::new("bwrap").args([
                    "--unshare-all",
                    "--bind",
                    &r,
                    "/",
                    "--proc",
                    "/proc",
                    "--dev",
                    "/dev",
                    "--tmpfs",
                    "/tmp",
                    "/bin/true",
                ]))
            }) as RunOnce),
        ));
    } else {
        println!("skipped: bwrap not installed");
    }
    for rt in ["crun", "runc"] {
        if which(rt) {
            candidates.push((rt.into(), oci_runtime(rt, &root)));
        } else {
            println!("skipped: {rt} not installed");
        }
    }

    let mut variants = Vec::new();
    for (name, made) in candidates {
        if !a.only.is_empty() && !a.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        match made {
            Ok(mut run) => match run() {
                Ok(()) => variants.push(Variant {
                    name,
                    run,
                    samples: Vec::new(),
                }),
                Err(e) => println!("skipped: {name}: {e:#}"),
            },
            Err(e) => println!("skipped: {name}: {e:#}"),
        }
    }
    println!(
        "kiln bench sandbox: /bin/true in {r}; {} runs per variant after {} warm-up, interleaved",
        a.runs, a.warmup
    );
    let n = variants.len();
    for round in 0..a.warmup + a.runs {
        // Rotate who goes first: a variant right after crun/runc (whose
        // clean-up is still running) must not always be the same one.
        for i in 0..n {
            let v = &mut variants[(i + round) % n];
            let t = Instant::now();
            (v.run)().with_context(|| format!("{} (round {round})", v.name))?;
            if round >= a.warmup {
                v.samples.push(t.elapsed());
            }
        }
    }
    let mut medians = Vec::new();
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "variant", "median ms", "p10 ms", "p90 ms"
    );
    for v in &mut variants {
        let m = median(&mut v.samples);
        println!(
            "{:<36} {:>10.3} {:>10.3} {:>10.3}",
            v.name,
            ms(m),
            ms(pct(&v.samples, 0.1)),
            ms(pct(&v.samples, 0.9))
        );
        medians.push((v.name.clone(), m));
    }
    println!("set-up (request to execve) as the Kiln variants report it:");
    for (name, l) in &setups {
        let mut v = l.borrow().clone();
        if !v.is_empty() {
            println!("  {name:<34} median {:.3} ms", ms(median(&mut v)));
        }
    }
    let get = |n: &str| medians.iter().find(|(k, _)| k == n).map(|(_, m)| *m);
    println!("ratios (same run):");
    for (a, b, target) in [
        ("kiln userns (worker)", "unshare + chroot", Some(0.75)),
        ("kiln userns (worker)", "bwrap --unshare-all", Some(0.4)),
        (
            "kiln userns (worker, fresh netns)",
            "unshare + chroot",
            None,
        ),
        ("kiln CLI", "unshare + chroot", None),
        ("kiln oci (worker, libcontainer)", "crun", Some(1.0)),
        ("kiln oci (worker, crun)", "crun", None),
        ("crun", "unshare + chroot", None),
        ("runc", "unshare + chroot", None),
    ] {
        if let (Some(x), Some(y)) = (get(a), get(b)) {
            let ratio = x.as_secs_f64() / y.as_secs_f64();
            match target {
                Some(t) => println!(
                    "  {a} / {b} = {ratio:.2}  (target <= {t:.2}: {})",
                    if ratio <= t { "met" } else { "MISSED" }
                ),
                None => println!("  {a} / {b} = {ratio:.2}"),
            }
        }
    }
    Ok(())
}
