//! Hardening of the worker and server against hostile actions (issue 17,
//! the worker/server findings), each reproduced the way a user meets it:
//! through real gRPC to a `kiln serve` child with its embedded worker.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_proto::reapi::{ActionResult, ExecuteResponse};
use tonic::Code;

macro_rules! need_busybox {
    () => {
        match busybox_root() {
            Some(r) => r,
            None => return,
        }
    };
}

/// Runs an action to its end, failing the test (instead of hanging it) if
/// that takes longer than `limit`.
async fn run_within(
    ch: &tonic::transport::Channel,
    action: &kiln_proto::reapi::Digest,
    limit: Duration,
) -> ExecuteResponse {
    let stream = execute(ch, action, true).await.expect("Execute");
    let op = tokio::time::timeout(limit, finish(stream))
        .await
        .unwrap_or_else(|_| panic!("the action did not finish within {limit:?}"));
    response(&op)
}

fn code(resp: &ExecuteResponse) -> Code {
    Code::from(resp.status.clone().unwrap_or_default().code)
}

fn every_output_path(r: &ActionResult) -> Vec<String> {
    #[allow(deprecated)]
    r.output_files
        .iter()
        .map(|f| f.path.clone())
        .chain(r.output_directories.iter().map(|d| d.path.clone()))
        .chain(r.output_symlinks.iter().map(|s| s.path.clone()))
        .chain(r.output_file_symlinks.iter().map(|s| s.path.clone()))
        .collect()
}

/// Finding 1: `/proc`, `/dev`, `/tmp` and `/dev/shm` are Kiln's mounts, not
/// the action's outputs. Declared as outputs, directly or through a
/// symlink the action made, they must never be read by the worker: on
/// today's main the worker returned the host's hostname and kernel symbols
/// (read with its own credentials), and `proc/kmsg` wedged a worker thread
/// for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_under_kiln_mounts_are_never_read_by_the_worker() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    let mut spec = ActionSpec::shell(
        input.clone(),
        "echo secret > /tmp/t && echo shm > /dev/shm/s && ln -s /proc/sys/kernel lnk \
         && ln -s /tmp tmplink && echo ok",
    );
    spec.output_paths = [
        "proc/sys/kernel/hostname",
        "proc/kallsyms",
        "proc/self/environ",
        "lnk/hostname",
        "tmp/t",
        "tmplink/t",
        "dev/shm/s",
        "dev/null",
    ]
    .map(String::from)
    .to_vec();
    let action = spec.upload(&ch).await;
    let resp = run_within(&ch, &action, Duration::from_secs(60)).await;
    assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    let result = resp.result.expect("result");
    assert_eq!(result.exit_code, 0);
    let paths = every_output_path(&result);
    assert!(
        paths.is_empty(),
        "nothing under Kiln's mounts is an output: {paths:?}"
    );

    // The kernel log blocks a reader until something is logged: the worker
    // must never open it (nor any other special file).
    let mut spec = ActionSpec::shell(input.clone(), "mkfifo out.fifo; echo done");
    spec.output_paths = ["proc/kmsg", "out.fifo", "dev/tty"]
        .map(String::from)
        .to_vec();
    let action = spec.upload(&ch).await;
    let started = Instant::now();
    let resp = run_within(&ch, &action, Duration::from_secs(60)).await;
    assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    assert!(every_output_path(resp.result.as_ref().unwrap()).is_empty());
    assert!(started.elapsed() < Duration::from_secs(30));

    // The whole root as the output: Kiln's mounts are the empty directories
    // they were staged as, whatever the action left in them.
    let mut spec = ActionSpec::shell(input, "echo secret > /tmp/t");
    spec.output_paths = vec![".".into()];
    spec.directory_only = true;
    let action = spec.upload(&ch).await;
    let resp = run_within(&ch, &action, Duration::from_secs(60)).await;
    let result = resp.result.expect("result");
    let top = read_directory(
        &ch,
        result.output_directories[0]
            .root_directory_digest
            .as_ref()
            .unwrap(),
    )
    .await;
    for mount in ["dev", "proc", "tmp"] {
        let node = top
            .directories
            .iter()
            .find(|d| d.name == mount)
            .unwrap_or_else(|| panic!("{mount} listed"));
        let listed = read_directory(&ch, node.digest.as_ref().unwrap()).await;
        assert!(
            listed.files.is_empty() && listed.directories.is_empty(),
            "{mount}: {listed:?}"
        );
    }
}

/// Finding 2: an output directory nested 1,500 levels deep overflowed the
/// collector's stack and aborted the whole `kiln serve`. Now it is a precise
/// result and the service carries on; an input tree as deep is refused at
/// Execute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_output_is_refused_and_the_service_survives() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    let mut spec = ActionSpec::shell(
        input.clone(),
        "i=0; while [ $i -lt 1500 ]; do mkdir d && cd d || exit 9; i=$((i+1)); done; echo deep > f",
    );
    spec.output_paths = vec!["d".into()];
    let action = spec.upload(&ch).await;
    let resp = run_within(&ch, &action, Duration::from_secs(120)).await;
    let status = resp.status.clone().unwrap_or_default();
    assert_eq!(code(&resp), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message.contains("deeper than") && status.message.contains("d/d/d/"),
        "names the limit and the path: {}",
        status.message
    );
    let result = resp.result.expect("the command's own result is kept");
    assert_eq!(result.exit_code, 0);
    assert!(every_output_path(&result).is_empty());

    // The service is still there and runs the next action.
    let spec = ActionSpec::shell(input.clone(), "echo still-here");
    let resp = run_within(&ch, &spec.upload(&ch).await, Duration::from_secs(60)).await;
    assert_eq!(code(&resp), Code::Ok);
    assert_eq!(resp.result.unwrap().exit_code, 0);

    // An input tree as deep never reaches a worker.
    let mut blobs = Vec::new();
    let mut child = kiln_proto::digest::empty();
    for _ in 0..1500 {
        let (d, b) = directory(&kiln_proto::reapi::Directory {
            directories: vec![kiln_proto::reapi::DirectoryNode {
                name: "d".into(),
                digest: Some(child),
            }],
            ..Default::default()
        });
        blobs.push((d.clone(), b));
        child = d;
    }
    upload(&ch, blobs).await;
    let action = ActionSpec::shell(child.clone(), "true").upload(&ch).await;
    let err = execute(&ch, &action, true).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("deeper than") && err.message().contains(&child.hash),
        "{}",
        err.message()
    );

    // Nor one that names the same directory twice at each of 64 levels: a
    // few kilobytes of Directory messages, 2^64 directories once staged.
    let mut blobs = Vec::new();
    let mut child = kiln_proto::digest::empty();
    for _ in 0..64 {
        let node = |name: &str| kiln_proto::reapi::DirectoryNode {
            name: name.into(),
            digest: Some(child.clone()),
        };
        let (d, b) = directory(&kiln_proto::reapi::Directory {
            directories: vec![node("a"), node("b")],
            ..Default::default()
        });
        blobs.push((d.clone(), b));
        child = d;
    }
    upload(&ch, blobs).await;
    let action = ActionSpec::shell(child.clone(), "true").upload(&ch).await;
    let err = execute(&ch, &action, true).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("expands to more than"),
        "{}",
        err.message()
    );
}

/// Finding 3 (worker side): an action may `chmod 4755` what it owns, its
/// outputs and its stdout; no set-id bit may reach a result (`unix_mode`)
/// or stay on the worker. The seccomp filter refuses such a `chmod` by
/// default; the worker must not depend on it, so it is allowed back here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_id_bits_never_reach_results_or_the_worker() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1", "--seccomp-allow", "setid"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    let mut spec = ActionSpec::shell(
        input,
        "echo x > f && chmod 4755 f && mkdir o && echo y > o/g && chmod 6755 o/g \
         && chmod 2755 o && chmod 4755 /proc/self/fd/1 /proc/self/fd/2 && echo out",
    );
    spec.output_paths = vec!["f".into(), "o".into()];
    spec.directory_only = true;
    let action = spec
        .upload_with(&ch, |cmd| {
            cmd.output_node_properties = vec!["unix_mode".into()]
        })
        .await;
    let resp = run_within(&ch, &action, Duration::from_secs(60)).await;
    assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    let result = resp.result.expect("result");
    assert_eq!(result.exit_code, 0);
    let mode = |p: &Option<kiln_proto::reapi::NodeProperties>| {
        p.as_ref()
            .and_then(|p| p.unix_mode)
            .expect("unix_mode asked for")
            .value
    };
    let f = &result.output_files[0];
    assert_eq!(mode(&f.node_properties), 0o755, "set-uid bit dropped");
    assert!(f.is_executable);
    let o = read_directory(
        &ch,
        result.output_directories[0]
            .root_directory_digest
            .as_ref()
            .unwrap(),
    )
    .await;
    assert_eq!(mode(&o.node_properties), 0o755, "set-gid directory");
    assert_eq!(mode(&o.files[0].node_properties), 0o755);

    // Nothing with a set-id bit stays in the worker's data directory once
    // the action's scratch space is cleaned up.
    let data = dir.path().join("data");
    let clean = eventually(30, || set_id_files(&data).is_empty()).await;
    assert!(clean, "{:?}", set_id_files(&data));
}

fn set_id_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() && meta.permissions().mode() & 0o6000 != 0 {
                out.push(e.path());
            }
        }
    }
    out
}

/// Finding 8: sparse files amplify. A 1 GiB sparse output or stdout costs
/// the action nothing but the worker a full read, hash and two dense
/// writes. The output limit (`--output-limit`) covers outputs, stdout and
/// stderr, is checked before anything is read, and ends the action with a
/// result naming the path and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_beyond_the_output_limit_are_refused_before_they_are_read() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1", "--output-limit", "64M"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    for (script, outputs, named) in [
        ("truncate -s 1G big", vec!["big"], "big"),
        ("truncate -s 1G /proc/self/fd/1", vec![], "stdout"),
        // Together over the limit: the one that crosses it is named.
        (
            "mkdir o && truncate -s 40M o/a && truncate -s 40M o/b",
            vec!["o"],
            "o/b",
        ),
    ] {
        let mut spec = ActionSpec::shell(input.clone(), script);
        spec.output_paths = outputs.into_iter().map(String::from).collect();
        let started = Instant::now();
        let resp = run_within(&ch, &spec.upload(&ch).await, Duration::from_secs(60)).await;
        let status = resp.status.clone().unwrap_or_default();
        assert_eq!(code(&resp), Code::ResourceExhausted, "{script}: {status:?}");
        assert!(
            status.message.contains(named) && status.message.contains("64 MiB"),
            "{script}: names {named} and the limit: {}",
            status.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{script}: refused without reading: {:?}",
            started.elapsed()
        );
        let result = resp.result.expect("the command's result is kept");
        assert_eq!(result.exit_code, 0);
        assert!(every_output_path(&result).is_empty());
    }

    // Within the limit, a sparse output is collected, and the next action
    // runs as usual.
    let mut spec = ActionSpec::shell(input, "truncate -s 16M sparse");
    spec.output_paths = vec!["sparse".into()];
    let resp = run_within(&ch, &spec.upload(&ch).await, Duration::from_secs(60)).await;
    assert_eq!(code(&resp), Code::Ok, "{resp:?}");
    let f = &resp.result.unwrap().output_files[0];
    assert_eq!(f.digest.as_ref().unwrap().size_bytes, 16 << 20);
    let data = read_blob(&ch, f.digest.as_ref().unwrap()).await;
    assert!(data.iter().all(|b| *b == 0));
}

/// Finding 2, the other half: an action that takes the service down with it
/// (here: `kiln serve` killed while it runs) was dispatched again after
/// every restart, past `max_attempts`, so one request could keep the
/// service in a crash loop. Each dispatch is journaled before the lease
/// goes out, and restarts count as attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_count_as_attempts_so_no_action_crash_loops_the_service() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[execution]\nmax_attempts = 2\nreattach_grace_secs = 1\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let start = |log: &str| {
        Proc::start(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--workers",
                "1",
                "--config",
                config.to_str().unwrap(),
            ],
            &dir.path().join(log),
            true,
        )
    };
    let mut server = start("server1.log");
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    let action = ActionSpec::shell(input, "sleep 600").upload(&ch).await;
    let mut stream = execute(&ch, &action, true).await.unwrap();
    let name = stream.message().await.unwrap().unwrap().name;

    // Attempt 1, then a "crash"; attempt 2 after the restart, another crash.
    for (attempt, log) in [(1, "server1.log"), (2, "server2.log")] {
        if attempt > 1 {
            server = start(log);
        }
        // Each start dispatches it once: attempt 1, then 2 (the log's field
        // formatting carries colour codes, so only the word is matched).
        assert!(
            eventually(30, || server.log_text().contains("dispatched")).await,
            "attempt {attempt} dispatched: {}",
            server.log_text()
        );
        server.kill();
    }

    // Both attempts are used up: the third start does not run it again.
    let server = start("server3.log");
    let ch = channel(&server.url()).await;
    let stream = wait(&ch, &name).await.expect("known after the restarts");
    let op = tokio::time::timeout(Duration::from_secs(30), finish(stream))
        .await
        .expect("the operation ends instead of running a third time");
    let status = response(&op).status.unwrap_or_default();
    assert_eq!(Code::from(status.code), Code::Internal, "{status:?}");
    assert!(
        status.message.contains("2 attempts") && status.message.contains(&name),
        "{}",
        status.message
    );
    assert!(
        !server.log_text().contains("dispatched"),
        "{}",
        server.log_text()
    );
}

/// Finding 12 (server side): a NUL byte in an argument, an environment
/// variable, a path or a symlink target cannot reach a system call; it was
/// caught only by the worker (INTERNAL after queueing). Execute refuses it
/// with INVALID_ARGUMENT naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_are_invalid_arguments_at_execute_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let empty = kiln_proto::digest::empty();

    let mut argv = ActionSpec::shell(empty.clone(), "echo a\0b");
    argv.argv.push("more".into());
    let mut env = ActionSpec::shell(empty.clone(), "true");
    env.env.push(("BAD".into(), "x\0y".into()));
    let mut out = ActionSpec::shell(empty.clone(), "true");
    out.output_paths = vec!["out\0put".into()];
    let mut wd = ActionSpec::shell(empty.clone(), "true");
    wd.working_directory = "src\0".into();
    let mut prop = ActionSpec::shell(empty.clone(), "true");
    prop.platform
        .push(("container-image".into(), "img\0".into()));
    let (link_root, link_blob) = directory(&kiln_proto::reapi::Directory {
        symlinks: vec![kiln_proto::reapi::SymlinkNode {
            name: "lnk".into(),
            target: "/etc\0/passwd".into(),
            node_properties: None,
        }],
        ..Default::default()
    });
    upload(&ch, vec![(link_root.clone(), link_blob)]).await;
    let link = ActionSpec::shell(link_root, "true");

    for (spec, field) in [
        (&argv, "arguments[2]"),
        (&env, "environment variable \"BAD\""),
        (&out, "output path"),
        (&wd, "working_directory"),
        (&prop, "platform property \"container-image\""),
        (&link, "symlink \"lnk\""),
    ] {
        let action = spec.upload(&ch).await;
        let err = execute(&ch, &action, true)
            .await
            .expect_err(&format!("{field}: refused at Execute"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field) && err.message().contains("NUL"),
            "{field}: {}",
            err.message()
        );
    }
}

/// A ByteStream write of `data` as `digest`, its requests fed by the
/// returned sender (dropping it ends the client's side of the stream).
fn bytestream_write(
    ch: &tonic::transport::Channel,
) -> (
    tokio::sync::mpsc::Sender<kiln_proto::bytestream::WriteRequest>,
    tokio::task::JoinHandle<Result<i64, tonic::Status>>,
) {
    use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = ByteStreamClient::new(ch.clone());
    let call = tokio::spawn(async move {
        client
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner().committed_size)
    });
    (tx, call)
}

/// Sends `data[from..to]` of an upload of `digest` in 1 MiB pieces.
async fn send_range(
    tx: &tokio::sync::mpsc::Sender<kiln_proto::bytestream::WriteRequest>,
    name: &str,
    data: &[u8],
    from: usize,
    to: usize,
) {
    let mut at = from;
    while at < to {
        let end = (at + (1 << 20)).min(to);
        let req = kiln_proto::bytestream::WriteRequest {
            resource_name: if at == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: at as i64,
            finish_write: end == data.len(),
            data: data[at..end].to_vec(),
        };
        if tx.send(req).await.is_err() {
            return; // the server ended the call; its answer says why
        }
        at = end;
    }
}

/// Finding 9: abandoned ByteStream uploads were never counted against the
/// storage limit, and a write stream held open was never swept, so a client
/// could keep any amount of disk outside `max_size`. Uploads in progress
/// now hold their size against the limit, and a stream that stays silent
/// for `cas.upload_idle_timeout_secs` is ended and its data dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_progress_count_against_the_limit_and_idle_ones_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[storage]\nmax_size_bytes = 67108864\n[cas]\nupload_idle_timeout_secs = 5\n",
    )
    .unwrap();
    let server = serve(
        dir.path(),
        &["--workers", "0", "--config", config.to_str().unwrap()],
    );
    let ch = channel(&server.url()).await;
    let blob = |seed: u8| -> (Vec<u8>, String) {
        let data = vec![seed; 48 << 20];
        let d = kiln_proto::digest::of_bytes(&data);
        let name = format!(
            "uploads/{}/blobs/{}/{}",
            uuid::Uuid::new_v4(),
            d.hash,
            d.size_bytes
        );
        (data, name)
    };

    let (a_data, a_name) = blob(1);
    let (b_data, b_name) = blob(2);

    // A: 40 of its 48 MiB sent, then the client goes silent, stream open.
    let (a_tx, a_call) = bytestream_write(&ch);
    send_range(&a_tx, &a_name, &a_data, 0, 40 << 20).await;

    // B: 48 MiB more would put the storage over its 64 MiB while A holds
    // its space: refused, as retryable.
    let (b_tx, b_call) = bytestream_write(&ch);
    send_range(&b_tx, &b_name, &b_data, 0, b_data.len()).await;
    drop(b_tx);
    let err = match b_call.await.unwrap() {
        Err(e) => e,
        Ok(n) => panic!(
            "no room while A holds its space, yet {n} bytes were taken: {}",
            server.log_text()
        ),
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("in progress"), "{}", err.message());

    // A silent stream is ended by the server after the idle timeout, even
    // though the client never closes it, and its space is released.
    let ended = tokio::time::timeout(Duration::from_secs(30), a_call)
        .await
        .expect("the server ends a silent upload")
        .unwrap();
    let status = ended.expect_err("an unfinished upload is not a success");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(a_tx);

    // Now B fits.
    let (b_tx, b_call) = bytestream_write(&ch);
    let (_, b_retry_name) = blob(2);
    send_range(&b_tx, &b_retry_name, &b_data, 0, b_data.len()).await;
    drop(b_tx);
    assert_eq!(b_call.await.unwrap().unwrap(), 48 << 20);
    let _ = b_name;
}
