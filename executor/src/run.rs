//! One action on this worker: fetch its inputs, stage them, run the command
//! in the sandbox, collect and upload its outputs, and describe it all in an
//! ActionResult.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kiln_proto::digest;
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::{Action, ActionResult, Command, Digest, ExecutedActionMetadata};
use kiln_proto::rpc;
use kiln_proto::worker::{Lease, Stage};
use kiln_sandbox::{Finished, Launcher, Limits, Root, SandboxRequest, Stdio, Subtree};
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::base::BaseRoots;
use crate::cache::BlobCache;
use crate::cas::CasClient;
use crate::collect::{self, Budget, Collected, OutputSpec, Upload};
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
/// Collecting outputs may take as long as the action's timeout, and at
/// least this long (a short timeout is about the command, not its outputs).
const MIN_COLLECT_TIME: Duration = Duration::from_secs(10);

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
    output_limit: u64,
    limits: Limits,
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
    /// Bytes of new outputs, stdout and stderr one action may leave.
    pub output_limit: u64,
    /// Every action's resource limits.
    pub limits: Limits,
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
            output_limit: parts.output_limit,
            limits: parts.limits,
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
        req.stdout = Stdio::Fd(scratch.stdout.for_sandbox()?);
        req.stderr = Stdio::Fd(scratch.stderr.for_sandbox()?);
        req.limits = self.limits;

        progress(Stage::Running);
        meta.execution_start_timestamp = now();
        let finished = self.run_sandbox(req, cancel).await?;
        meta.execution_completed_timestamp = now();
        let outcome = finished.outcome.clone();
        if base.is_empty()
            && outcome.status == kiln_sandbox::ExitStatus::Exited(127)
            && let Some(hint) = crate::hint::no_base_root(&command, &tree)
        {
            crate::hint::append(&scratch.stderr.read, &scratch.stderr.path, &hint)?;
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
        let logs = [scratch.stdout.clone(), scratch.stderr.clone()];
        let timeout = Duration::from_millis(lease.timeout_ms);
        let mut budget = Budget::new(
            self.output_limit,
            timeout.max(MIN_COLLECT_TIME),
            cancel.clone(),
        );
        let (stdout, stderr, outputs) = blocking(move || {
            // stdout and stderr first: within the limit, they tell what
            // went wrong even when the outputs do not fit.
            let [out, err] = logs;
            let stdout = log_blob(&cache, &out, "stdout", &mut budget);
            let stderr = log_blob(&cache, &err, "stderr", &mut budget);
            let outputs = if stdout.is_ok() && stderr.is_ok() {
                let mounts: Vec<String> = finished
                    .kiln_mounts()
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                collect::collect(
                    &spec2,
                    &collect::Source {
                        root: finished.root().fd(),
                        mounts: &mounts,
                        cache: &cache,
                        trust_inodes,
                    },
                    &mut budget,
                )
            } else {
                Ok(Collected::default())
            };
            // Dropped, not released: the sandbox's mount namespace is torn
            // down on a background thread, so the result goes out without
            // waiting for the kernel to unmount it all.
            drop(finished);
            Ok((stdout, stderr, outputs))
        })
        .await?;
        drop(staged);
        drop(base);
        // What went over a limit (or past the deadline) still leaves the
        // command's own result; anything else fails the lease.
        let mut refused = None;
        let stdout = soft(stdout.map(Some), &mut refused)?;
        let stderr = soft(stderr.map(Some), &mut refused)?;
        let collected = soft(outputs, &mut refused)?;
        let mut uploads = collected.uploads;
        uploads.extend(stdout.clone());
        uploads.extend(stderr.clone());
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
            stdout_digest: stdout.as_ref().map(|u| u.digest().clone()),
            stderr_raw: Vec::new(),
            stderr_digest: stderr.as_ref().map(|u| u.digest().clone()),
            execution_metadata: Some(meta.clone()),
        };
        let (code, mut message) = if let Some(e) = refused {
            let status = e.to_status();
            tracing::warn!(lease = %lease.lease_id, error = %e, "outputs not collected");
            (tonic::Code::from(status.code), status.message)
        } else if outcome.timed_out {
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
        // A limit the action ran into is why it failed: a failed build (its
        // exit code, status OK), not an error of Kiln's, for BuildStream
        // treats RESOURCE_EXHAUSTED as fatal to the whole session.
        append_note(&mut message, &limits_note(&outcome));
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

/// What the sandbox's limits did to an action, for the ExecuteResponse
/// message: the limits it ran into, and those this worker could not apply.
fn limits_note(outcome: &kiln_sandbox::Outcome) -> String {
    let mut parts = Vec::new();
    if !outcome.limits_hit.is_empty() {
        let hits: Vec<String> = outcome.limits_hit.iter().map(|h| h.to_string()).collect();
        parts.push(format!(
            "the action ran into its limits: {}",
            hits.join("; ")
        ));
    }
    if !outcome.warnings.is_empty() {
        parts.push(format!("on this worker: {}", outcome.warnings.join("; ")));
    }
    parts.join(". ")
}

fn append_note(message: &mut String, note: &str) {
    if note.is_empty() {
        return;
    }
    if !message.is_empty() {
        message.push_str(". ");
    }
    message.push_str(note);
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

/// `r`'s value, or its default when `r` failed for going over an output
/// limit or past the collection deadline (the first such error is kept in
/// `refused`).
fn soft<T: Default>(r: Result<T>, refused: &mut Option<Error>) -> Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e @ (Error::OutputLimit { .. } | Error::CollectDeadline { .. })) => {
            refused.get_or_insert(e);
            Ok(T::default())
        }
        Err(e) => Err(e),
    }
}

/// stdout or stderr as a blob to upload, within the budget.
fn log_blob(cache: &BlobCache, log: &LogFile, what: &str, budget: &mut Budget) -> Result<Upload> {
    let file = &log.read;
    // The action had this file as its fd 1 or 2 and may have chmod-ed it
    // (`chmod 4755 /proc/self/fd/1`): nothing set-id stays, even here.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod", &log.path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("stat", &log.path, e))?;
    let size = meta.len();
    if size == 0 {
        return Ok(Upload::Bytes(digest::empty(), Bytes::new()));
    }
    // Before reading: `truncate -s 1G /proc/self/fd/1` costs the action nothing.
    budget.charge(what, size)?;
    if size <= SMALL_LOG {
        let mut data = vec![0u8; size as usize];
        file.read_exact_at(&mut data, 0)
            .map_err(|e| Error::io("read", &log.path, e))?;
        return Ok(Upload::Bytes(digest::of_bytes(&data), Bytes::from(data)));
    }
    let d = collect::hash_file(file, size, what, budget)?;
    // Hardlink the log into the cache (it is ours and done) rather than
    // copy: holes stay holes.
    let tmp = cache.tmp_path();
    std::fs::hard_link(&log.path, &tmp).map_err(|e| Error::io("link", &log.path, e))?;
    cache.insert_file(&d, &tmp)?;
    Ok(Upload::Cached(d))
}

/// The file an action's stdout or stderr goes to: created by the worker,
/// private, and read back through the worker's own handle.
struct LogFile {
    path: PathBuf,
    read: std::fs::File,
}

impl LogFile {
    fn create(path: PathBuf) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let read = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("create", &path, e))?;
        Ok(Self { path, read })
    }

    /// A write-only descriptor of it for the sandbox.
    fn for_sandbox(&self) -> Result<std::os::fd::OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map(Into::into)
            .map_err(|e| Error::io("open", &self.path, e))
    }
}

/// One action's scratch space: the overlay's upper and work directories and
/// the stdout/stderr files. Deleted in the background when dropped.
struct Scratch {
    dir: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    stdout: Arc<LogFile>,
    stderr: Arc<LogFile>,
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
            stdout: Arc::new(LogFile::create(dir.join("stdout"))?),
            stderr: Arc::new(LogFile::create(dir.join("stderr"))?),
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
