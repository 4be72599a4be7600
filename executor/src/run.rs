//! One action on this worker: fetch its inputs, stage them, run the command
//! in the sandbox, collect and upload its outputs, and describe it all in an
//! ActionResult.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kiln_proto::digest;
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{Action, ActionResult, Command, Digest, ExecutedActionMetadata};
use kiln_proto::rpc;
use kiln_proto::worker::{Lease, Stage};
use kiln_sandbox::{Finished, Launcher, Root, SandboxRequest, Stdio, Subtree};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::base::BaseRoots;
use crate::cache::BlobCache;
use crate::cas::CasClient;
use crate::collect::{self, OutputSpec, Upload};
use crate::error::{Error, Result};
use crate::stage::{Staged, StagedTree, Stager};
use crate::transfer::{blocking, fetch_missing, upload_missing};
use crate::trash::Trash;
use crate::tree::InputTree;

/// Input trees kept in memory, so an action whose root was seen before
/// needs no GetTree.
const TREE_MEMO: usize = 256;
/// Staging retries when blobs are evicted from the cache mid-stage.
const STAGE_ATTEMPTS: usize = 3;
/// stdout/stderr up to this size are uploaded from memory.
const SMALL_LOG: u64 = 1 << 20;

/// What became of a lease, for the `Done` message.
#[derive(Debug)]
pub struct LeaseOutcome {
    pub status: rpc::Status,
    pub result: Option<ActionResult>,
    pub message: String,
}

/// Timings of one action, for logs and metrics.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub fetch: Duration,
    pub stage: Duration,
    pub sandbox_setup: Duration,
    pub run: Duration,
    pub upload: Duration,
}

/// Everything a worker process shares between its actions.
pub struct Executor {
    pub name: String,
    cas: CasClient,
    cache: Arc<BlobCache>,
    stager: Arc<Stager>,
    trash: Arc<Trash>,
    launcher: Arc<Launcher>,
    bases: BaseRoots,
    scratch: PathBuf,
    network_allowed: bool,
    trees: Mutex<HashMap<String, Arc<InputTree>>>,
}

pub struct ExecutorParts {
    pub name: String,
    pub cas: CasClient,
    pub cache: Arc<BlobCache>,
    pub stager: Arc<Stager>,
    pub trash: Arc<Trash>,
    pub launcher: Arc<Launcher>,
    pub bases: BaseRoots,
    pub scratch: PathBuf,
    pub network_allowed: bool,
}

impl Executor {
    pub fn new(parts: ExecutorParts) -> Result<Self> {
        std::fs::create_dir_all(&parts.scratch)
            .map_err(|e| Error::io("create scratch directory", &parts.scratch, e))?;
        Ok(Self {
            name: parts.name,
            cas: parts.cas,
            cache: parts.cache,
            stager: parts.stager,
            trash: parts.trash,
            launcher: parts.launcher,
            bases: parts.bases,
            scratch: parts.scratch,
            network_allowed: parts.network_allowed,
            trees: Mutex::new(HashMap::new()),
        })
    }

    pub fn cache(&self) -> &Arc<BlobCache> {
        &self.cache
    }

    /// Runs one lease to completion. Never fails: every error becomes the
    /// status of the outcome.
    pub async fn execute(
        &self,
        lease: &Lease,
        progress: impl Fn(Stage) + Send + Sync,
        cancel: CancellationToken,
    ) -> (LeaseOutcome, Timings) {
        let mut timings = Timings::default();
        let mut meta = ExecutedActionMetadata {
            worker: self.name.clone(),
            worker_start_timestamp: now(),
            ..Default::default()
        };
        if lease.queued_at_unix_ns > 0 {
            meta.queued_timestamp = Some(Timestamp {
                seconds: lease.queued_at_unix_ns / 1_000_000_000,
                nanos: (lease.queued_at_unix_ns % 1_000_000_000) as i32,
            });
        }
        let outcome = match self
            .execute_inner(lease, &progress, &cancel, &mut meta, &mut timings)
            .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let status = e.to_status();
                tracing::warn!(lease = %lease.lease_id, error = %e, "action failed before completing");
                LeaseOutcome {
                    message: status.message.clone(),
                    status,
                    result: None,
                }
            }
        };
        (outcome, timings)
    }

    async fn execute_inner(
        &self,
        lease: &Lease,
        progress: &(impl Fn(Stage) + Send + Sync),
        cancel: &CancellationToken,
        meta: &mut ExecutedActionMetadata,
        timings: &mut Timings,
    ) -> Result<LeaseOutcome> {
        let action = Action::decode(lease.action.as_slice())
            .map_err(|e| Error::Internal(format!("lease carries an undecodable Action: {e}")))?;
        let command = Command::decode(lease.command.as_slice())
            .map_err(|e| Error::Internal(format!("lease carries an undecodable Command: {e}")))?;
        let cas = self.cas.with_instance(&lease.instance_name);
        let props: HashMap<&str, &str> = lease
            .platform
            .iter()
            .map(|p| (p.name.as_str(), p.value.as_str()))
            .collect();

        // Fetch.
        progress(Stage::Fetching);
        meta.input_fetch_start_timestamp = now();
        let started = std::time::Instant::now();
        let input_root = action
            .input_root_digest
            .clone()
            .unwrap_or_else(digest::empty);
        let tree = self.input_tree(&cas, &input_root).await?;
        let base = self.bases.resolve(&props, &cas, self).await?;
        fetch_missing(&cas, &self.cache, tree.file_blobs()).await?;
        meta.input_fetch_completed_timestamp = now();
        timings.fetch = started.elapsed();
        check_cancel(cancel)?;

        // Stage.
        progress(Stage::Staging);
        let started = std::time::Instant::now();
        let staged = self.stage(&cas, &tree).await?;
        let spec = OutputSpec::from_command(&command);
        let scratch = Scratch::create(&self.scratch, &self.trash)?;
        prepare_upper(&scratch.upper, &command.working_directory, &spec)?;
        let mut lowers = vec![staged.path().to_path_buf()];
        lowers.extend(base.iter().map(|b| b.path().to_path_buf()));
        let trust_inodes = lowers
            .iter()
            .all(|l| std::fs::metadata(l).is_ok_and(|m| m.dev() == self.cache.device()));
        timings.stage = started.elapsed();

        // Run.
        let network = props.get("network") == Some(&"on");
        if network && !self.network_allowed {
            return Err(Error::Internal(
                "network=on reached a worker that does not allow it".into(),
            ));
        }
        let mut req = SandboxRequest::new(
            Root::Overlay {
                lowers,
                upper: scratch.upper.clone(),
                work: scratch.work.clone(),
            },
            command.arguments.clone(),
        );
        req.env = command
            .environment_variables
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect();
        req.cwd = PathBuf::from(&command.working_directory);
        req.uid = parse_id(props.get("unixUID"));
        req.gid = parse_id(props.get("unixGID"));
        req.network = network;
        req.subtrees = tree
            .read_only_marks()
            .into_iter()
            .map(|(path, read_only)| Subtree {
                path: PathBuf::from(path),
                read_only,
            })
            .collect();
        req.timeout = (lease.timeout_ms > 0).then(|| Duration::from_millis(lease.timeout_ms));
        req.stdout = Stdio::File(scratch.stdout.clone());
        req.stderr = Stdio::File(scratch.stderr.clone());

        progress(Stage::Running);
        meta.execution_start_timestamp = now();
        let finished = self.run_sandbox(req, cancel).await?;
        meta.execution_completed_timestamp = now();
        let outcome = finished.outcome.clone();
        if base.is_empty()
            && outcome.status == kiln_sandbox::ExitStatus::Exited(127)
            && let Some(hint) = crate::hint::no_base_root(&command, &tree)
        {
            crate::hint::append(&scratch.stderr, &hint)?;
        }
        timings.sandbox_setup = outcome.setup;
        timings.run = outcome.wall;
        for w in &outcome.warnings {
            tracing::warn!(lease = %lease.lease_id, warning = %w, "sandbox limitation");
        }

        // Collect and upload, also for failures and timeouts: BuildStream
        // keeps the outputs of failed builds.
        progress(Stage::Uploading);
        meta.output_upload_start_timestamp = now();
        let started = std::time::Instant::now();
        let cache = Arc::clone(&self.cache);
        let spec2 = spec.clone();
        let stdout_path = scratch.stdout.clone();
        let stderr_path = scratch.stderr.clone();
        let (collected, stdout, stderr) = blocking(move || {
            let mounts: Vec<String> = finished
                .kiln_mounts()
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let collected = collect::collect(
                &spec2,
                &collect::Source {
                    root: finished.root().fd(),
                    mounts: &mounts,
                    cache: &cache,
                    trust_inodes,
                },
            );
            // Dropped, not released: the sandbox's mount namespace is torn
            // down on a background thread, so the result goes out without
            // waiting for the kernel to unmount it all.
            drop(finished);
            let stdout = log_blob(&cache, &stdout_path)?;
            let stderr = log_blob(&cache, &stderr_path)?;
            Ok((collected?, stdout, stderr))
        })
        .await?;
        drop(staged);
        drop(base);
        let mut uploads = collected.uploads;
        uploads.push(stdout.clone());
        uploads.push(stderr.clone());
        upload_missing(&cas, &self.cache, uploads).await?;
        drop(scratch);
        meta.output_upload_completed_timestamp = now();
        timings.upload = started.elapsed();
        meta.worker_completed_timestamp = now();

        // Legacy symlink fields: Bazel 4 and older recc read only them.
        #[allow(deprecated)]
        let result = ActionResult {
            output_files: collected.files,
            output_file_symlinks: collected.file_symlinks,
            output_symlinks: collected.symlinks,
            output_directories: collected.directories,
            output_directory_symlinks: collected.directory_symlinks,
            exit_code: outcome.status.code(),
            stdout_raw: Vec::new(),
            stdout_digest: Some(stdout.digest().clone()),
            stderr_raw: Vec::new(),
            stderr_digest: Some(stderr.digest().clone()),
            execution_metadata: Some(meta.clone()),
        };
        let (code, message) = if outcome.timed_out {
            (
                tonic::Code::DeadlineExceeded,
                format!(
                    "the action exceeded its timeout of {} ms and was killed; partial outputs are kept",
                    lease.timeout_ms
                ),
            )
        } else if outcome.cancelled {
            (
                tonic::Code::Cancelled,
                "the action was cancelled".to_string(),
            )
        } else {
            (tonic::Code::Ok, String::new())
        };
        Ok(LeaseOutcome {
            status: rpc::Status {
                code: code as i32,
                message: message.clone(),
                details: Vec::new(),
            },
            result: Some(result),
            message,
        })
    }

    async fn input_tree(&self, cas: &CasClient, root: &Digest) -> Result<Arc<InputTree>> {
        if let Some(tree) = self.trees.lock().expect("tree memo").get(&root.hash) {
            return Ok(Arc::clone(tree));
        }
        let dirs = cas.get_tree(root).await?;
        let tree = Arc::new(
            blocking({
                let root = root.clone();
                move || InputTree::new(root, dirs)
            })
            .await?,
        );
        let mut memo = self.trees.lock().expect("tree memo");
        if memo.len() >= TREE_MEMO {
            memo.clear();
        }
        memo.insert(root.hash.clone(), Arc::clone(&tree));
        Ok(tree)
    }

    /// Stages a tree, fetching again whatever the cache evicted meanwhile.
    pub(crate) async fn stage(&self, cas: &CasClient, tree: &Arc<InputTree>) -> Result<StagedTree> {
        for _ in 0..STAGE_ATTEMPTS {
            let stager = Arc::clone(&self.stager);
            let t = Arc::clone(tree);
            match blocking(move || stager.stage(&t)).await? {
                Staged::Ready(staged) => return Ok(staged),
                Staged::Evicted(blobs) => {
                    tracing::info!(
                        blobs = blobs.len(),
                        "blobs evicted while staging; fetching again"
                    );
                    fetch_missing(cas, &self.cache, blobs).await?;
                }
            }
        }
        Err(Error::Internal(format!(
            "could not stage input root {}: the blob cache keeps evicting its blobs (cache too small?)",
            digest::key(&tree.root)
        )))
    }

    pub(crate) async fn input_tree_for(
        &self,
        cas: &CasClient,
        root: &Digest,
    ) -> Result<Arc<InputTree>> {
        let tree = self.input_tree(cas, root).await?;
        fetch_missing(cas, &self.cache, tree.file_blobs()).await?;
        Ok(tree)
    }

    async fn run_sandbox(
        &self,
        req: SandboxRequest,
        cancel: &CancellationToken,
    ) -> Result<Finished> {
        let launcher = Arc::clone(&self.launcher);
        let running = blocking(move || launcher.spawn(req).map_err(Error::from)).await?;
        let killer = running.kill_handle();
        let wait = blocking(move || running.wait().map_err(Error::from));
        tokio::pin!(wait);
        tokio::select! {
            r = &mut wait => r,
            _ = cancel.cancelled() => {
                killer.kill();
                wait.await
            }
        }
    }
}

fn check_cancel(cancel: &CancellationToken) -> Result<()> {
    if cancel.is_cancelled() {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

fn parse_id(value: Option<&&str>) -> u32 {
    value.and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Creates the working directory and the parent directories of declared
/// outputs in the overlay's upper layer before the action starts (recc
/// relies on them); overlayfs merges them with the input tree.
fn prepare_upper(upper: &Path, working_directory: &str, spec: &OutputSpec) -> Result<()> {
    let wd = collect::resolve_output_path("", working_directory).map_err(|_| {
        Error::InvalidTree(format!(
            "working directory {working_directory:?} escapes the input root"
        ))
    })?;
    let mut dirs = vec![wd];
    for p in spec.root_relative_paths()? {
        if let Some((parent, _)) = p.rsplit_once('/') {
            dirs.push(parent.to_string());
        }
    }
    for d in dirs.into_iter().filter(|d| !d.is_empty()) {
        let path = upper.join(&d);
        std::fs::create_dir_all(&path).map_err(|e| Error::io("create directory", &path, e))?;
    }
    Ok(())
}

/// stdout or stderr as a blob to upload.
fn log_blob(cache: &BlobCache, path: &Path) -> Result<Upload> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        return Ok(Upload::Bytes(digest::empty(), Bytes::new()));
    }
    if size <= SMALL_LOG {
        let data = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        return Ok(Upload::Bytes(digest::of_bytes(&data), Bytes::from(data)));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut hasher = digest::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let d = hasher.finish();
    // Hardlink the log into the cache (it is ours and done) rather than copy.
    let tmp = cache.tmp_path();
    std::fs::hard_link(path, &tmp).map_err(|e| Error::io("link", path, e))?;
    cache.insert_file(&d, &tmp)?;
    Ok(Upload::Cached(d))
}

/// One action's scratch space: the overlay's upper and work directories and
/// the stdout/stderr files. Deleted in the background when dropped.
struct Scratch {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    trash: Arc<Trash>,
}

impl Scratch {
    fn create(base: &Path, trash: &Arc<Trash>) -> Result<Self> {
        let dir = base.join(uuid::Uuid::new_v4().to_string());
        let upper = dir.join("upper");
        let work = dir.join("work");
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| Error::io("create scratch", d, e))?;
        }
        Ok(Self {
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
            dir,
            upper,
            work,
            trash: Arc::clone(trash),
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.trash.discard(&self.dir);
    }
}

fn now() -> Option<Timestamp> {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}
