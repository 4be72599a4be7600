//! Shared helpers for the end-to-end tests: the real `kiln` binary started
//! as a child process on 127.0.0.1:0, and REAPI clients talking to it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use kiln_proto::digest;
use kiln_proto::longrunning::{Operation, operation};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::{
    Action, BatchUpdateBlobsRequest, Command as ReCommand, Digest, Directory, ExecuteRequest,
    ExecuteResponse, FileNode, Platform, WaitExecutionRequest, batch_update_blobs_request,
    command::EnvironmentVariable, platform::Property,
};
use prost::Message;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_kiln");

/// The busybox root the test scripts build (scripts/fixtures).
pub fn busybox_root() -> Option<PathBuf> {
    fixture("busybox", "bin/busybox")
}

/// The top of the repository.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Says loudly that a test is skipped and why; in CI (`CI=true`), where
/// the test command installs everything, a skip is a failure instead.
pub fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why} in CI: run scripts/install-test-deps");
    }
    eprintln!("\n======== skipped: {why} ========\n");
}

/// A root filesystem built by scripts/fixtures (`busybox`, `tcc`, `gcc`),
/// if its `marker` file is there.
pub fn fixture(name: &str, marker: &str) -> Option<PathBuf> {
    let base = std::env::var_os("KILN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/fixtures"));
    let root = base.join(name);
    if root.join(marker).exists() && root.join(".done").exists() {
        return Some(root);
    }
    skip(&format!(
        "the {name} fixture is missing at {} (run scripts/fixtures)",
        root.display()
    ));
    None
}

/// Uploads a directory the way a user pushes a base root filesystem: with
/// `kiln cas upload-dir`. Returns the root Directory digest, HASH/SIZE.
pub fn kiln_cas_upload_dir(url: &str, dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["cas", "--server", url, "upload-dir"])
        .arg(dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("run kiln cas upload-dir");
    assert!(
        out.status.success(),
        "kiln cas upload-dir {} failed",
        dir.display()
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A `kiln` process (server, worker) killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    /// The metrics and status address, when started with `--metrics-listen`.
    pub metrics: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `kiln <args>` and waits for its "listening on" line (servers)
    /// or just starts it (workers, `wait_listen` false).
    pub fn start(args: &[&str], log: &Path, wait_listen: bool) -> Proc {
        Self::start_in(None, args, log, wait_listen)
    }

    /// [`Proc::start`] in the working directory `cwd` (for relative paths
    /// in `args`, as a user types them).
    pub fn start_in(cwd: Option<&Path>, args: &[&str], log: &Path, wait_listen: bool) -> Proc {
        let log_file = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new(BIN);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("spawn kiln");
        let mut addr = String::new();
        let mut metrics = String::new();
        // The metrics line comes after the gRPC one, when asked for.
        let want_metrics = args.contains(&"--metrics-listen");
        if wait_listen {
            let stdout = child.stdout.take().unwrap();
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 {
                    panic!(
                        "kiln exited before listening; log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
                if let Some(rest) = line.trim().strip_prefix("kiln: listening on ") {
                    addr = rest.to_string();
                } else if let Some(rest) = line.trim().strip_prefix("kiln: metrics on ") {
                    metrics = rest.to_string();
                }
                if !addr.is_empty() && (!want_metrics || !metrics.is_empty()) {
                    break;
                }
            }
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                    sink.clear();
                }
            });
        }
        Proc {
            child,
            addr,
            metrics,
            log: log.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server with `workers` embedded workers in a fresh data directory.
pub fn serve(dir: &Path, extra: &[&str]) -> Proc {
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", data];
    args.extend_from_slice(extra);
    Proc::start(&args, &dir.join("server.log"), true)
}

/// A standalone `kiln worker` joining `url`, its data under `dir/<name>` and
/// its log in `dir/<name>.log`.
pub fn worker(dir: &Path, name: &str, url: &str, slots: u32) -> Proc {
    let data = dir.join(name);
    let slots = slots.to_string();
    Proc::start(
        &[
            "worker",
            "--server",
            url,
            "--slots",
            &slots,
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &dir.join(format!("{name}.log")),
        false,
    )
}

pub async fn channel(url: &str) -> Channel {
    for _ in 0..100 {
        if let Ok(c) = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {url}");
}

/// Uploads blobs by BatchUpdateBlobs.
pub async fn upload(ch: &Channel, blobs: Vec<(Digest, Vec<u8>)>) {
    let mut cas = ContentAddressableStorageClient::new(ch.clone())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    for chunk in blobs.chunks(500) {
        let resp = cas
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: String::new(),
                requests: chunk
                    .iter()
                    .map(|(d, data)| batch_update_blobs_request::Request {
                        digest: Some(d.clone()),
                        data: data.clone(),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for r in resp.responses {
            assert_eq!(r.status.unwrap_or_default().code, 0, "upload failed");
        }
    }
}

/// Uploads a host directory tree (files, dirs, symlinks) and returns its
/// root digest. Large files are fine: the busybox binary is 2 MB.
pub async fn upload_dir(ch: &Channel, path: &Path) -> Digest {
    let mut blobs = Vec::new();
    let root = dir_blobs(path, &mut blobs);
    upload(ch, blobs).await;
    root
}

fn dir_blobs(path: &Path, blobs: &mut Vec<(Digest, Vec<u8>)>) -> Digest {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: BTreeMap<String, std::fs::Metadata> = BTreeMap::new();
    for e in std::fs::read_dir(path).unwrap() {
        let e = e.unwrap();
        entries.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::symlink_metadata(e.path()).unwrap(),
        );
    }
    let mut dir = Directory::default();
    for (name, meta) in entries {
        let p = path.join(&name);
        if meta.file_type().is_symlink() {
            dir.symlinks.push(kiln_proto::reapi::SymlinkNode {
                name,
                target: std::fs::read_link(&p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                node_properties: None,
            });
        } else if meta.is_dir() {
            let d = dir_blobs(&p, blobs);
            dir.directories.push(kiln_proto::reapi::DirectoryNode {
                name,
                digest: Some(d),
            });
        } else if meta.is_file() {
            let data = std::fs::read(&p).unwrap();
            let d = digest::of_bytes(&data);
            blobs.push((d.clone(), data));
            dir.files.push(FileNode {
                name,
                digest: Some(d),
                is_executable: meta.permissions().mode() & 0o111 != 0,
                node_properties: None,
            });
        }
    }
    let (d, bytes) = digest::of_message(&dir);
    blobs.push((d.clone(), bytes));
    d
}

/// Builds a Directory blob from entries and returns (digest, bytes).
pub fn directory(dir: &Directory) -> (Digest, Vec<u8>) {
    let (d, b) = digest::of_message(dir);
    (d, b)
}

/// An action: builds and uploads the Command and Action.
pub struct ActionSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub input_root: Digest,
    pub working_directory: String,
    pub output_paths: Vec<String>,
    pub output_files: Vec<String>,
    pub output_directories: Vec<String>,
    pub platform: Vec<(String, String)>,
    pub timeout: Option<Duration>,
    pub do_not_cache: bool,
    pub directory_only: bool,
    pub salt: Vec<u8>,
}

impl ActionSpec {
    pub fn shell(input_root: Digest, script: &str) -> Self {
        ActionSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("PATH".into(), "/bin".into())],
            input_root,
            working_directory: String::new(),
            output_paths: Vec::new(),
            output_files: Vec::new(),
            output_directories: Vec::new(),
            platform: vec![
                ("OSFamily".into(), "linux".into()),
                ("ISA".into(), "x86-64".into()),
            ],
            timeout: None,
            do_not_cache: false,
            directory_only: false,
            salt: Vec::new(),
        }
    }

    /// Uploads Command and Action; returns the Action digest.
    pub async fn upload(&self, ch: &Channel) -> Digest {
        self.upload_with(ch, |_| {}).await
    }

    /// Like [`upload`](Self::upload), with a last change to the Command
    /// (fields the spec does not cover, e.g. `output_node_properties`).
    #[allow(deprecated)]
    pub async fn upload_with(&self, ch: &Channel, edit: impl FnOnce(&mut ReCommand)) -> Digest {
        let mut props: Vec<Property> = self
            .platform
            .iter()
            .map(|(n, v)| Property {
                name: n.clone(),
                value: v.clone(),
            })
            .collect();
        props.sort_by(|a, b| a.name.cmp(&b.name));
        let platform = Some(Platform { properties: props });
        let mut env = self.env.clone();
        env.sort();
        let mut cmd = ReCommand {
            arguments: self.argv.clone(),
            environment_variables: env
                .into_iter()
                .map(|(name, value)| EnvironmentVariable { name, value })
                .collect(),
            output_files: self.output_files.clone(),
            output_directories: self.output_directories.clone(),
            output_paths: self.output_paths.clone(),
            platform: platform.clone(),
            working_directory: self.working_directory.clone(),
            output_node_properties: Vec::new(),
            output_directory_format: if self.directory_only { 1 } else { 0 },
        };
        edit(&mut cmd);
        let (cd, cb) = digest::of_message(&cmd);
        let action = Action {
            command_digest: Some(cd.clone()),
            input_root_digest: Some(self.input_root.clone()),
            timeout: self.timeout.map(|t| kiln_proto::protobuf::Duration {
                seconds: t.as_secs() as i64,
                nanos: t.subsec_nanos() as i32,
            }),
            do_not_cache: self.do_not_cache,
            salt: self.salt.clone(),
            platform,
        };
        let (ad, ab) = digest::of_message(&action);
        upload(ch, vec![(cd, cb), (ad.clone(), ab)]).await;
        ad
    }
}

/// Starts an execution and returns the first Operation and the stream.
pub async fn execute(
    ch: &Channel,
    action: &Digest,
    skip_cache_lookup: bool,
) -> Result<tonic::Streaming<Operation>, tonic::Status> {
    ExecutionClient::new(ch.clone())
        .execute(ExecuteRequest {
            instance_name: String::new(),
            skip_cache_lookup,
            action_digest: Some(action.clone()),
            execution_policy: None,
            results_cache_policy: None,
            digest_function: 0,
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: Vec::new(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Follows a stream to the final Operation.
pub async fn finish(mut stream: tonic::Streaming<Operation>) -> Operation {
    let mut last = None;
    while let Some(op) = stream.message().await.expect("operation stream failed") {
        let done = op.done;
        last = Some(op);
        if done {
            break;
        }
    }
    last.expect("no operation received")
}

pub async fn run(ch: &Channel, action: &Digest) -> (Operation, ExecuteResponse) {
    let op = finish(execute(ch, action, false).await.expect("Execute")).await;
    let resp = response(&op);
    (op, resp)
}

pub async fn wait(ch: &Channel, name: &str) -> Result<tonic::Streaming<Operation>, tonic::Status> {
    ExecutionClient::new(ch.clone())
        .wait_execution(WaitExecutionRequest { name: name.into() })
        .await
        .map(|r| r.into_inner())
}

pub fn response(op: &Operation) -> ExecuteResponse {
    match &op.result {
        Some(operation::Result::Response(any)) => {
            ExecuteResponse::decode(any.value.as_slice()).unwrap()
        }
        other => panic!("operation ended without a response: {other:?}"),
    }
}

/// Reads a blob by ByteStream.
pub async fn read_blob(ch: &Channel, d: &Digest) -> Bytes {
    use kiln_proto::bytestream::ReadRequest;
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    if d.size_bytes == 0 {
        return Bytes::new();
    }
    let mut stream = ByteStreamClient::new(ch.clone())
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        out.extend_from_slice(&chunk.data);
    }
    Bytes::from(out)
}

pub async fn read_directory(ch: &Channel, d: &Digest) -> Directory {
    Directory::decode(read_blob(ch, d).await).unwrap()
}

pub fn stage_of(op: &Operation) -> i32 {
    let meta = op.metadata.as_ref().expect("metadata");
    kiln_proto::reapi::ExecuteOperationMetadata::decode(meta.value.as_slice())
        .unwrap()
        .stage
}

/// Polls until `f` is true, at most `secs` seconds.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 20 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A plain HTTP/1.0 GET (no client library needed; the server closes the
/// connection after the response).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// The value of one sample (`name{labels}` exactly as rendered), 0 if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}
