//! End-to-end remote execution over real gRPC: `kiln serve` with its
//! embedded worker (or standalone `kiln worker`s), a busybox root uploaded
//! to CAS, actions run in the full sandbox.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{CancelOperationRequest, GetOperationRequest, operation};
use kiln_proto::reapi::{Directory, DirectoryNode, FileNode};
use tonic::Code;

macro_rules! need_busybox {
    () => {
        match busybox_root() {
            Some(r) => r,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_an_action_and_returns_outputs_then_hits_the_cache() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    let mut spec = ActionSpec::shell(
        input,
        "mkdir -p out/sub && echo hello > out/sub/a.txt && ln -s /etc/passwd out/link \
         && printf x > file && echo to-stdout && echo to-stderr >&2 && id -u > out/uid",
    );
    spec.output_paths = vec!["out".into(), "file".into(), "out/link".into()];
    let action = spec.upload(&ch).await;
    let (op, resp) = run(&ch, &action).await;
    assert!(op.done);
    let result = resp.result.expect("result");
    assert_eq!(resp.status.unwrap_or_default().code, 0);
    assert_eq!(
        result.exit_code,
        0,
        "stderr: {:?}",
        read_blob(&ch, result.stderr_digest.as_ref().unwrap()).await
    );
    assert!(!resp.cached_result);
    assert_eq!(
        &read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await[..],
        b"to-stdout\n"
    );
    assert_eq!(
        &read_blob(&ch, result.stderr_digest.as_ref().unwrap()).await[..],
        b"to-stderr\n"
    );
    assert_eq!(result.output_files.len(), 1);
    assert_eq!(result.output_files[0].path, "file");
    assert_eq!(
        &read_blob(&ch, result.output_files[0].digest.as_ref().unwrap()).await[..],
        b"x"
    );
    assert_eq!(result.output_symlinks.len(), 1);
    assert_eq!(result.output_symlinks[0].target, "/etc/passwd");
    let out = &result.output_directories[0];
    let tree = kiln_proto::reapi::Tree::decode_from(
        &read_blob(&ch, out.tree_digest.as_ref().unwrap()).await,
    );
    let names: Vec<&str> = tree
        .root
        .as_ref()
        .unwrap()
        .files
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["uid"]);
    let meta = result.execution_metadata.unwrap();
    assert!(!meta.worker.is_empty());
    for ts in [
        &meta.queued_timestamp,
        &meta.worker_start_timestamp,
        &meta.input_fetch_start_timestamp,
        &meta.execution_start_timestamp,
        &meta.execution_completed_timestamp,
        &meta.output_upload_completed_timestamp,
        &meta.worker_completed_timestamp,
    ] {
        assert!(ts.is_some(), "metadata timestamps filled: {meta:?}");
    }

    // The same action again: served from the action cache.
    let (_, again) = run(&ch, &action).await;
    assert!(again.cached_result);
    assert_eq!(again.result.unwrap().exit_code, 0);
}

trait DecodeFrom: Sized {
    fn decode_from(b: &[u8]) -> Self;
}
impl<T: prost::Message + Default> DecodeFrom for T {
    fn decode_from(b: &[u8]) -> Self {
        T::decode(b).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_root_output_and_failed_command_outputs_are_kept() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    // BuildStream's script element: the whole root is the output.
    let mut spec = ActionSpec::shell(input.clone(), "echo built > /made-here; exit 3");
    spec.output_paths = vec![".".into()];
    spec.directory_only = true;
    let action = spec.upload(&ch).await;
    let (_, resp) = run(&ch, &action).await;
    let result = resp.result.expect("a failed command still has a result");
    assert_eq!(result.exit_code, 3);
    assert!(
        result.output_files.is_empty(),
        "BuildStream errors on unasked output_files"
    );
    let whole = &result.output_directories[0];
    assert_eq!(whole.path, ".");
    assert!(whole.tree_digest.is_none(), "DIRECTORY_ONLY");
    let top = read_directory(&ch, whole.root_directory_digest.as_ref().unwrap()).await;
    let made = top
        .files
        .iter()
        .find(|f| f.name == "made-here")
        .expect("the new file");
    assert_eq!(
        &read_blob(&ch, made.digest.as_ref().unwrap()).await[..],
        b"built\n"
    );
    assert!(
        top.directories.iter().any(|d| d.name == "bin"),
        "inputs are part of the root"
    );
    let proc_dir = top.directories.iter().find(|d| d.name == "proc").unwrap();
    assert!(
        read_directory(&ch, proc_dir.digest.as_ref().unwrap())
            .await
            .directories
            .is_empty(),
        "the sandbox's /proc is reported as the empty directory it was staged as"
    );

    // A failing action is not cached.
    let (_, again) = run(&ch, &action).await;
    assert!(!again.cached_result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_is_deadline_exceeded_with_partial_outputs() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    let mut spec = ActionSpec::shell(input, "echo partial > out.txt; sleep 30");
    spec.output_files = vec!["out.txt".into()];
    spec.timeout = Some(Duration::from_secs(1));
    let action = spec.upload(&ch).await;
    let started = Instant::now();
    let (_, resp) = run(&ch, &action).await;
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(resp.status.unwrap().code, Code::DeadlineExceeded as i32);
    let result = resp.result.expect("partial result");
    assert_eq!(
        &read_blob(&ch, result.output_files[0].digest.as_ref().unwrap()).await[..],
        b"partial\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_action() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    let spec = ActionSpec::shell(input.clone(), "sleep 60");
    let action = spec.upload(&ch).await;
    let mut stream = execute(&ch, &action, false).await.unwrap();
    let first = stream.message().await.unwrap().unwrap();
    let name = first.name.clone();
    // Wait until it runs.
    let mut ops = OperationsClient::new(ch.clone());
    for _ in 0..100 {
        let op = ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        if stage_of(&op) == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    ops.cancel_operation(CancelOperationRequest { name: name.clone() })
        .await
        .unwrap();
    let done = finish(stream).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    match done.result {
        Some(operation::Result::Error(s)) => assert_eq!(s.code, Code::Cancelled as i32),
        other => panic!("expected a cancelled operation, got {other:?}"),
    }
    // The worker's slot comes back: a next action runs.
    let quick = ActionSpec::shell(input, "true").upload(&ch).await;
    let (_, resp) = tokio::time::timeout(Duration::from_secs(20), run(&ch, &quick))
        .await
        .expect("slot freed");
    assert_eq!(resp.result.unwrap().exit_code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_platforms_fail_at_once_and_unknown_keys_are_invalid() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    // Make sure the embedded worker is there.
    let ok = ActionSpec::shell(input.clone(), "true").upload(&ch).await;
    run(&ch, &ok).await;

    let mut arm = ActionSpec::shell(input.clone(), "true");
    arm.platform = vec![
        ("OSFamily".into(), "linux".into()),
        ("ISA".into(), "aarch64".into()),
    ];
    let action = arm.upload(&ch).await;
    let t = Instant::now();
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("ISA=aarch64"), "{}", err.message());
    assert!(
        err.message().contains("ISA=x86-64"),
        "names what exists: {}",
        err.message()
    );

    let mut odd = ActionSpec::shell(input, "true");
    odd.platform.push(("gpu".into(), "yes".into()));
    let action = odd.upload(&ch).await;
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("gpu") && err.message().contains("OSFamily"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_inputs_and_bad_trees_are_refused_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let ghost = kiln_proto::digest::of_bytes(b"never uploaded");
    let root = Directory {
        files: vec![FileNode {
            name: "input".into(),
            digest: Some(ghost.clone()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let (rd, rb) = directory(&root);
    upload(&ch, vec![(rd.clone(), rb)]).await;
    let action = ActionSpec::shell(rd, "true").upload(&ch).await;
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let status = kiln_proto::rpc::Status::decode_from(err.details());
    let failure =
        kiln_proto::error_details::PreconditionFailure::decode_from(&status.details[0].value);
    assert_eq!(failure.violations[0].r#type, "MISSING");
    assert_eq!(
        failure.violations[0].subject,
        format!("blobs/{}/{}", ghost.hash, ghost.size_bytes)
    );

    // A directory entry named "..".
    let evil = Directory {
        directories: vec![DirectoryNode {
            name: "..".into(),
            digest: Some(kiln_proto::digest::empty()),
        }],
        ..Default::default()
    };
    let (ed, eb) = directory(&evil);
    upload(&ch, vec![(ed.clone(), eb)]).await;
    let action = ActionSpec::shell(ed.clone(), "true").upload(&ch).await;
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(&ed.hash),
        "names the directory: {}",
        err.message()
    );

    // An output path escaping the root.
    let mut escape = ActionSpec::shell(kiln_proto::digest::empty(), "true");
    escape.output_files = vec!["../../etc/shadow".into()];
    let action = escape.upload(&ch).await;
    let err = execute(&ch, &action, false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("../../etc/shadow"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_the_action_completes_elsewhere() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "0"]);
    let url = server.url();
    let mut w1 = worker(dir.path(), "w1", &url, 1);
    let ch = channel(&url).await;
    let input = upload_dir(&ch, &root).await;
    let action = ActionSpec::shell(input, "sleep 2; echo survived")
        .upload(&ch)
        .await;
    let stream = execute(&ch, &action, false).await.unwrap();
    // Let it start on w1, then kill w1 and bring w2.
    assert!(
        eventually(20, || w1.log_text().contains("dispatched")
            || std::fs::read_to_string(dir.path().join("server.log"))
                .unwrap_or_default()
                .contains("dispatched"))
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    w1.kill();
    let _w2 = worker(dir.path(), "w2", &url, 1);
    let done = tokio::time::timeout(Duration::from_secs(60), finish(stream))
        .await
        .expect("completed");
    let resp = response(&done);
    let result = resp.result.expect("result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        &read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await[..],
        b"survived\n"
    );
    assert!(
        server.log_text().contains("re-queued"),
        "{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_still_answers_wait_execution() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let mut server = serve(dir.path(), &["--workers", "0"]);
    let addr = server.addr.clone();
    let url = server.url();
    let _worker = worker(dir.path(), "w", &url, 2);
    let ch = channel(&url).await;
    let input = upload_dir(&ch, &root).await;
    let action = ActionSpec::shell(input, "sleep 3; echo after-restart")
        .upload(&ch)
        .await;
    let mut stream = execute(&ch, &action, false).await.unwrap();
    let name = stream.message().await.unwrap().unwrap().name;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    let data = dir.path().join("data");
    let _server2 = Proc::start(
        &[
            "serve",
            "--listen",
            &addr,
            "--data-dir",
            data.to_str().unwrap(),
            "--workers",
            "0",
        ],
        &dir.path().join("server2.log"),
        true,
    );
    let ch = channel(&url).await;
    let stream = wait(&ch, &name)
        .await
        .expect("the operation is known after a restart");
    let done = tokio::time::timeout(Duration::from_secs(60), finish(stream))
        .await
        .expect("completes");
    let result = response(&done).result.expect("result");
    assert_eq!(result.exit_code, 0);
    assert_eq!(
        &read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await[..],
        b"after-restart\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_policies_and_reattaching_to_an_operation() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;

    // skip_cache_lookup runs again even though the result is cached.
    let action = ActionSpec::shell(input.clone(), "cat /proc/sys/kernel/random/uuid")
        .upload(&ch)
        .await;
    let (_, first) = run(&ch, &action).await;
    assert!(!first.cached_result);
    let (_, hit) = run(&ch, &action).await;
    assert!(hit.cached_result);
    let again = finish(execute(&ch, &action, true).await.unwrap()).await;
    let again = response(&again);
    assert!(!again.cached_result, "skip_cache_lookup executes");
    assert_ne!(
        again.result.unwrap().stdout_digest,
        first.result.unwrap().stdout_digest,
        "it really ran again"
    );

    // do_not_cache: never written to the cache, so never served from it.
    let mut spec = ActionSpec::shell(input.clone(), "true");
    spec.do_not_cache = true;
    let action = spec.upload(&ch).await;
    run(&ch, &action).await;
    let (_, second) = run(&ch, &action).await;
    assert!(!second.cached_result);
    let mut ac = kiln_proto::reapi::action_cache_client::ActionCacheClient::new(ch.clone());
    let miss = ac
        .get_action_result(kiln_proto::reapi::GetActionResultRequest {
            action_digest: Some(action.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(miss.code(), Code::NotFound);

    // A dropped Execute stream: WaitExecution picks the operation up again.
    let slow = ActionSpec::shell(input, "sleep 1; echo waited")
        .upload(&ch)
        .await;
    let mut stream = execute(&ch, &slow, false).await.unwrap();
    let name = stream.message().await.unwrap().unwrap().name;
    drop(stream);
    let done = finish(wait(&ch, &name).await.unwrap()).await;
    assert_eq!(done.name, name);
    let result = response(&done).result.unwrap();
    assert_eq!(
        &read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await[..],
        b"waited\n"
    );
    let err = wait(&ch, "operations/no-such-operation").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut ops = OperationsClient::new(ch.clone());
    let got = ops
        .get_operation(GetOperationRequest { name: name.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.done);
    let listed = ops
        .list_operations(kiln_proto::longrunning::ListOperationsRequest {
            filter: "done=true".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.operations.iter().any(|o| o.name == name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_running_actions_share_one_execution() {
    let root = need_busybox!();
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;
    let input = upload_dir(&ch, &root).await;
    let action = ActionSpec::shell(input, "sleep 1; cat /proc/sys/kernel/random/uuid")
        .upload(&ch)
        .await;
    let a = execute(&ch, &action, false).await.unwrap();
    let b = execute(&ch, &action, false).await.unwrap();
    let (a, b) = tokio::join!(finish(a), finish(b));
    assert_eq!(a.name, b.name, "the second request joined the first");
    assert_eq!(
        response(&a).result.unwrap().stdout_digest,
        response(&b).result.unwrap().stdout_digest
    );
}
