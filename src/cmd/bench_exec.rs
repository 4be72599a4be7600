//! `kiln bench exec`: remote-execution throughput and latency, and staging
//! cost, each printed next to baselines measured in the same run:
//!
//! * **trivial actions**: N distinct `/bin/true` actions in a busybox root,
//!   C at a time, through the server to one worker, every action in the
//!   full sandbox. Baselines: the same N actions again, now answered from
//!   the action cache (the RPC floor: everything but execution), and the
//!   bare sandbox (the launcher running `/bin/true` C at a time in this
//!   process, no RPC, no staging, no upload).
//! * **staging**: a 10,000-file input tree staged from a warm blob cache,
//!   against `cp -al` of the same tree.
//!
//! Without `--server` it starts `kiln serve --workers 1 --slots C` as a
//! child process on a temporary data directory and port 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_executor::cache::BlobCache;
use kiln_executor::stage::{Staged, Stager};
use kiln_executor::trash::Trash;
use kiln_executor::tree::InputTree;
use kiln_proto::digest;
use kiln_proto::prost::Message;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    Action, Command, Digest, Directory, DirectoryNode, ExecuteRequest, ExecuteResponse, FileNode,
    Platform, command::EnvironmentVariable, platform::Property,
};
use kiln_sandbox::{Launcher, LauncherConfig, Root, SandboxRequest};
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Arguments of `kiln bench exec`.
#[derive(clap::Args, Debug)]
pub struct BenchExecArgs {
    /// Benchmark this server instead of starting one.
    #[arg(long)]
    pub server: Option<String>,
    /// Distinct trivial actions to run.
    #[arg(long, default_value_t = 1000)]
    pub actions: usize,
    /// Actions in flight at once (and worker slots of the started server).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The busybox root the actions run in [default: .cache/fixtures/busybox].
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Files of the staging benchmark's input tree.
    #[arg(long, default_value_t = 10_000)]
    pub stage_files: usize,
    /// Runs of each staging measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub stage_runs: usize,
    /// Directory for temporary data [default: the system temp dir].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

const TARGET_ACTIONS_PER_SEC: f64 = 300.0;
const TARGET_P99_MS: f64 = 50.0;
const TARGET_STAGE_RATIO: f64 = 1.2;

pub fn run(args: BenchExecArgs) -> anyhow::Result<()> {
    let root = match &args.root {
        Some(r) => r.clone(),
        None => default_root()?,
    };
    let root = std::fs::canonicalize(&root).with_context(|| format!("{}", root.display()))?;
    let work = match &args.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("kiln-bench-")
            .tempdir_in(d)?,
        None => tempfile::Builder::new().prefix("kiln-bench-").tempdir()?,
    };
    let mut child = None;
    let url = match &args.server {
        Some(u) => u.clone(),
        None => {
            let slots = args.concurrency.to_string();
            let (c, addr) = super::bench_cas::spawn_server(
                &work.path().join("server"),
                &["--workers", "1", "--slots", &slots],
            )?;
            child = Some(c);
            format!("http://{addr}")
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench_actions(&args, &url, &root));
    if let Some(mut c) = child {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
    let (remote, cached) = result?;
    let sandbox = bare_sandbox(&root, args.actions, args.concurrency, work.path())?;
    let staging = bench_staging(work.path(), args.stage_files, args.stage_runs)?;

    println!();
    println!(
        "Trivial actions: {} distinct `/bin/true` in a busybox root, {} in flight",
        args.actions, args.concurrency
    );
    println!(
        "{:<44} {:>12} {:>10} {:>10}",
        "", "actions/s", "p50 ms", "p99 ms"
    );
    println!(
        "{:<44} {:>12.0} {:>10.2} {:>10.2}",
        "Kiln: Execute, full sandbox (1 worker)", remote.rate, remote.p50, remote.p99
    );
    println!(
        "{:<44} {:>12.0} {:>10.2} {:>10.2}",
        "baseline: same actions, action-cache hits", cached.rate, cached.p50, cached.p99
    );
    println!(
        "{:<44} {:>12.0} {:>10.2} {:>10.2}",
        "baseline: bare sandbox, no RPC", sandbox.rate, sandbox.p50, sandbox.p99
    );
    println!();
    println!(
        "  Kiln / target ({TARGET_ACTIONS_PER_SEC:.0}/s):        {:.2}×  {}",
        remote.rate / TARGET_ACTIONS_PER_SEC,
        verdict(remote.rate >= TARGET_ACTIONS_PER_SEC)
    );
    println!(
        "  p99 / target ({TARGET_P99_MS:.0} ms):           {:.2}×  {}",
        remote.p99 / TARGET_P99_MS,
        verdict(remote.p99 <= TARGET_P99_MS)
    );
    println!(
        "  Kiln / cache-hit floor:          {:.2}×",
        remote.rate / cached.rate
    );
    println!(
        "  Kiln / bare sandbox:             {:.2}×",
        remote.rate / sandbox.rate
    );
    println!();
    println!(
        "Staging a {}-file input tree from a warm cache (median of {})",
        args.stage_files, args.stage_runs
    );
    println!("  Kiln stage:  {:>8.1} ms", staging.kiln_ms);
    println!("  cp -al:      {:>8.1} ms", staging.cp_ms);
    println!(
        "  Kiln / cp -al: {:.2}×  (target ≤ {TARGET_STAGE_RATIO}×) {}",
        staging.kiln_ms / staging.cp_ms,
        verdict(staging.kiln_ms / staging.cp_ms <= TARGET_STAGE_RATIO)
    );
    println!(
        "  re-staging the same root (reused): {:.3} ms",
        staging.reuse_ms
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets target" } else { "MISSES target" }
}

fn default_root() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/fixtures"));
    let root = base.join("busybox");
    if !root.join("bin/busybox").exists() {
        bail!(
            "no busybox root at {} (run scripts/fixtures, or pass --root)",
            root.display()
        );
    }
    Ok(root)
}

struct Stats {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn stats(mut latencies: Vec<f64>, wall: Duration) -> Stats {
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    Stats {
        rate: latencies.len() as f64 / wall.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

async fn bench_actions(
    args: &BenchExecArgs,
    url: &str,
    root: &Path,
) -> anyhow::Result<(Stats, Stats)> {
    let ch = Channel::from_shared(url.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let cas = kiln_server::client::CasClient::with_channel(ch.clone(), "").await?;
    let input = cas.upload_directory(root).await?.to_proto();
    let mut actions = Vec::with_capacity(args.actions);
    let mut blobs = Vec::new();
    let run_id = uuid::Uuid::new_v4().to_string();
    for i in 0..args.actions + 16 {
        let (d, cmd, action) = trivial_action(&input, &format!("{run_id}-{i}"));
        blobs.push(cmd);
        blobs.push(action);
        actions.push(d);
    }
    let upload: Vec<(kiln_server::Digest, bytes::Bytes)> = blobs
        .into_iter()
        .map(|b| (kiln_server::Digest::of(&b), bytes::Bytes::from(b)))
        .collect();
    cas.batch_update(upload).await?;
    let (warmup, measured) = actions.split_at(16);
    drive(&ch, warmup.to_vec(), args.concurrency).await?;
    let remote = drive(&ch, measured.to_vec(), args.concurrency).await?;
    let cached = drive(&ch, measured.to_vec(), args.concurrency).await?;
    Ok((remote, cached))
}

/// (Action digest, Command bytes, Action bytes)
fn trivial_action(input: &Digest, id: &str) -> (Digest, Vec<u8>, Vec<u8>) {
    let platform = Platform {
        properties: vec![
            Property {
                name: "ISA".into(),
                value: "x86-64".into(),
            },
            Property {
                name: "OSFamily".into(),
                value: "linux".into(),
            },
        ],
    };
    #[allow(deprecated)]
    let cmd = Command {
        arguments: vec!["/bin/true".into()],
        environment_variables: vec![EnvironmentVariable {
            name: "BENCH_ID".into(),
            value: id.into(),
        }],
        platform: Some(platform.clone()),
        ..Default::default()
    };
    let (cd, cb) = digest::of_message(&cmd);
    let action = Action {
        command_digest: Some(cd),
        input_root_digest: Some(input.clone()),
        platform: Some(platform),
        ..Default::default()
    };
    let (ad, ab) = digest::of_message(&action);
    (ad, cb, ab)
}

async fn drive(ch: &Channel, actions: Vec<Digest>, concurrency: usize) -> anyhow::Result<Stats> {
    let queue = Arc::new(std::sync::Mutex::new(actions));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let queue = Arc::clone(&queue);
        let ch = ch.clone();
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(d) = queue.lock().expect("queue").pop() else {
                    return Ok::<_, anyhow::Error>(latencies);
                };
                let t = Instant::now();
                let resp = execute(&ch, d).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
                let code = resp.status.map_or(0, |s| s.code);
                let exit = resp.result.map_or(-1, |r| r.exit_code);
                if code != 0 || exit != 0 {
                    bail!("an action failed: status {code}, exit code {exit}");
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok(stats(all, started.elapsed()))
}

async fn execute(ch: &Channel, action: Digest) -> anyhow::Result<ExecuteResponse> {
    let mut stream = ExecutionClient::new(ch.clone())
        .execute(ExecuteRequest {
            action_digest: Some(action),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(op) = stream.message().await? {
        if op.done {
            if let Some(kiln_proto::longrunning::operation::Result::Response(any)) = op.result {
                return Ok(ExecuteResponse::decode(any.value.as_slice())?);
            }
            bail!("operation {} ended without a response", op.name);
        }
    }
    bail!("operation stream ended early")
}

/// `/bin/true` straight through the launcher, `concurrency` at a time.
fn bare_sandbox(
    root: &Path,
    runs: usize,
    concurrency: usize,
    work: &Path,
) -> anyhow::Result<Stats> {
    let launcher = Arc::new(Launcher::new(LauncherConfig::current_exe())?);
    // The same shape as the executor's: the root as an overlay lower layer.
    let scratch = work.join("bare");
    std::fs::create_dir_all(&scratch)?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let launcher = Arc::clone(&launcher);
            let next = Arc::clone(&next);
            let root = root.to_path_buf();
            let scratch = scratch.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= runs {
                        return Ok(lat);
                    }
                    let upper = scratch.join(format!("u{i}"));
                    let wk = scratch.join(format!("w{i}"));
                    std::fs::create_dir_all(&upper)?;
                    std::fs::create_dir_all(&wk)?;
                    let t = Instant::now();
                    let req = SandboxRequest::new(
                        Root::Overlay {
                            lowers: vec![root.clone()],
                            upper,
                            work: wk,
                        },
                        vec!["/bin/true".into()],
                    );
                    let finished = launcher.spawn(req)?.wait()?;
                    anyhow::ensure!(
                        finished.outcome.status.success(),
                        "/bin/true failed: {}",
                        finished.outcome.status
                    );
                    finished.release();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("bench thread panicked"))??,
        );
    }
    Ok(stats(all, started.elapsed()))
}

struct StagingResult {
    kiln_ms: f64,
    cp_ms: f64,
    reuse_ms: f64,
}

/// Stages a tree of `files` files (100 per directory) from a warm cache,
/// against `cp -al` of the same tree.
fn bench_staging(work: &Path, files: usize, runs: usize) -> anyhow::Result<StagingResult> {
    let dir = work.join("staging");
    let cache = Arc::new(BlobCache::open(&dir.join("cache"), u64::MAX)?);
    let trash = Arc::new(Trash::start(&dir.join("trash"))?);
    let stager = Stager::open(
        Arc::clone(&cache),
        &dir.join("staged"),
        Arc::clone(&trash),
        runs + 2,
    )?;
    let per_dir = 100;
    let mut kiln = Vec::new();
    let mut cp = Vec::new();
    let mut reuse = Vec::new();
    for run in 0..runs {
        // A new root each run (one file differs), so nothing is reused.
        let mut dirs: BTreeMap<String, Directory> = BTreeMap::new();
        let mut root = Directory::default();
        for d in 0..files.div_ceil(per_dir) {
            let mut sub = Directory::default();
            for f in 0..per_dir.min(files - d * per_dir) {
                let content = if d == 0 && f == 0 {
                    format!("run {run}")
                } else {
                    format!("file {d}/{f}")
                };
                let blob = digest::of_bytes(content.as_bytes());
                cache.insert_bytes(&blob, content.as_bytes())?;
                sub.files.push(FileNode {
                    name: format!("f{f:04}"),
                    digest: Some(blob),
                    is_executable: f % 10 == 0,
                    node_properties: None,
                });
            }
            sub.files.sort_by(|a, b| a.name.cmp(&b.name));
            let (sd, _) = digest::of_message(&sub);
            dirs.insert(sd.hash.clone(), sub);
            root.directories.push(DirectoryNode {
                name: format!("d{d:04}"),
                digest: Some(sd),
            });
        }
        let (rd, _) = digest::of_message(&root);
        dirs.insert(rd.hash.clone(), root);
        let tree = InputTree::new(rd, dirs.into_iter().collect())?;
        let t = Instant::now();
        let staged = match stager.stage(&tree)? {
            Staged::Ready(s) => s,
            Staged::Evicted(_) => bail!("the cache evicted blobs during the staging benchmark"),
        };
        kiln.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let again = stager.stage(&tree)?;
        reuse.push(t.elapsed().as_secs_f64() * 1e3);
        drop(again);
        let copy = dir.join(format!("cp-{run}"));
        let t = Instant::now();
        let status = std::process::Command::new("cp")
            .arg("-al")
            .arg(staged.path())
            .arg(&copy)
            .status()
            .context("running cp -al")?;
        cp.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(status.success(), "cp -al failed");
        trash.discard(&copy);
        // Let the background deletion finish so it does not skew the next run.
        std::thread::sleep(Duration::from_millis(300));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(StagingResult {
        kiln_ms: median(kiln),
        cp_ms: median(cp),
        reuse_ms: median(reuse),
    })
}
