//! recc's request shape, sent over real gRPC to `kiln serve`.
//!
//! recc (the Remote Execution Caching Compiler) is not packaged anywhere we
//! can install from, so this test speaks its exact sequence for one
//! compile (KILN-CONTRACT §7): GetActionResult → FindMissingBlobs →
//! BatchUpdateBlobs (≤ 2 MiB per batch, whatever the server advertises) →
//! Execute → ByteStream.Read, with what recc puts in the Command: the
//! compiler's absolute host path as argv[0], a working directory relative
//! to the input root, REAPI 2.0 `output_files` relative to it whose parent
//! directories do not exist, and the toolchain as a base root
//! (`chrootRootDigest`) pushed once with `kiln cas upload-dir`.

mod common;

use common::*;
use kiln_proto::digest;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    BatchUpdateBlobsRequest, Digest, Directory, DirectoryNode, FileNode, FindMissingBlobsRequest,
    GetActionResultRequest, batch_update_blobs_request,
};
use tonic::Code;
use tonic::transport::Channel;

/// recc's batch limit: it never sends more than this in one
/// BatchUpdateBlobs, whatever the server advertises.
const RECC_BATCH_BYTES: usize = 2 << 20;

fn file(name: &str, data: &[u8], blobs: &mut Vec<(Digest, Vec<u8>)>) -> FileNode {
    let d = digest::of_bytes(data);
    blobs.push((d.clone(), data.to_vec()));
    FileNode {
        name: name.into(),
        digest: Some(d),
        is_executable: false,
        node_properties: None,
    }
}

fn dir(name: &str, d: Directory, blobs: &mut Vec<(Digest, Vec<u8>)>) -> DirectoryNode {
    let (digest, bytes) = directory(&d);
    blobs.push((digest.clone(), bytes));
    DirectoryNode {
        name: name.into(),
        digest: Some(digest),
    }
}

/// What recc does for one compile: AC lookup, then upload only what the
/// server lacks in ≤ 2 MiB batches, then Execute. Returns the response
/// and whether the AC lookup hit.
async fn recc_compile(
    ch: &Channel,
    spec: &ActionSpec,
    mut blobs: Vec<(Digest, Vec<u8>)>,
) -> (kiln_proto::reapi::ExecuteResponse, bool) {
    let action = spec.upload(ch).await;
    let cached = ActionCacheClient::new(ch.clone())
        .get_action_result(GetActionResultRequest {
            instance_name: String::new(),
            action_digest: Some(action.clone()),
            inline_stdout: false,
            inline_stderr: false,
            inline_output_files: Vec::new(),
            digest_function: 0,
        })
        .await;
    match cached {
        // recc takes a hit as is: no Execute, only the outputs are read.
        Ok(r) => {
            let resp = kiln_proto::reapi::ExecuteResponse {
                result: Some(r.into_inner()),
                cached_result: true,
                ..Default::default()
            };
            return (resp, true);
        }
        Err(s) => assert_eq!(s.code(), Code::NotFound, "a miss is NOT_FOUND: {s:?}"),
    }

    let mut cas = ContentAddressableStorageClient::new(ch.clone())
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    blobs.sort_by(|a, b| a.0.hash.cmp(&b.0.hash));
    blobs.dedup_by(|a, b| a.0 == b.0);
    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: blobs.iter().map(|(d, _)| d.clone()).collect(),
            digest_function: 0,
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests;
    let mut batch: Vec<batch_update_blobs_request::Request> = Vec::new();
    let mut batch_bytes = 0;
    let mut batches = 0;
    let todo: Vec<_> = blobs
        .into_iter()
        .filter(|(d, _)| missing.contains(d))
        .collect();
    for (i, (d, data)) in todo.iter().enumerate() {
        batch_bytes += data.len();
        batch.push(batch_update_blobs_request::Request {
            digest: Some(d.clone()),
            data: data.clone(),
            compressor: 0,
        });
        let next = todo.get(i + 1).map_or(usize::MAX, |(_, n)| n.len());
        if i + 1 == todo.len() || batch_bytes + next > RECC_BATCH_BYTES {
            let resp = cas
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    instance_name: String::new(),
                    requests: std::mem::take(&mut batch),
                    digest_function: 0,
                })
                .await
                .expect("BatchUpdateBlobs")
                .into_inner();
            for r in resp.responses {
                assert_eq!(r.status.unwrap_or_default().code, 0, "blob stored");
            }
            batches += 1;
            batch_bytes = 0;
        }
    }
    assert!(todo.is_empty() || batches > 0);
    let (_, resp) = run(ch, &action).await;
    (resp, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recc_compile_on_a_pushed_base_root() {
    let Some(tcc) = fixture("tcc", "usr/bin/tcc") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(tmp.path(), &["--workers", "1"]);
    let ch = channel(&server.url()).await;

    // Pushed once by the user, then named by every action.
    let base = kiln_cas_upload_dir(&server.url(), &tcc);

    // The project as recc sees it: sources below the working directory
    // src/app, a header one level up, and a generated 1.5 MiB header so
    // the upload needs more than one 2 MiB batch together with the rest.
    let mut blobs = Vec::new();
    let big: String = (0..60_000)
        .map(|i| format!("#define BIG_{i} {i}\n"))
        .collect();
    assert!(big.len() > 1 << 20);
    let big2 = big.replace("BIG_", "BIG2_");
    let include = Directory {
        files: vec![
            file("answer.h", b"#define ANSWER 42\n", &mut blobs),
            file("big.h", big.as_bytes(), &mut blobs),
            file("big2.h", big2.as_bytes(), &mut blobs),
        ],
        ..Default::default()
    };
    let app = Directory {
        files: vec![file(
            "hello.c",
            b"#include <stdio.h>\n#include \"../include/answer.h\"\n#include \"../include/big.h\"\n\
              #include \"../include/big2.h\"\n\
              int main(void) { printf(\"answer %d %d\\n\", ANSWER, BIG_59999 - BIG2_59999); return 0; }\n",
            &mut blobs,
        )],
        ..Default::default()
    };
    let src = Directory {
        directories: vec![
            dir("app", app, &mut blobs),
            dir("include", include, &mut blobs),
        ],
        ..Default::default()
    };
    let root = Directory {
        directories: vec![dir("src", src, &mut blobs)],
        ..Default::default()
    };
    let (root_digest, root_bytes) = directory(&root);
    blobs.push((root_digest.clone(), root_bytes));

    let platform = vec![
        ("OSFamily".to_string(), "linux".to_string()),
        ("ISA".to_string(), "x86-64".to_string()),
        ("chrootRootDigest".to_string(), base.clone()),
    ];
    let compile = ActionSpec {
        argv: ["/usr/bin/tcc", "-c", "hello.c", "-o", "build/obj/hello.o"]
            .map(String::from)
            .to_vec(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        input_root: root_digest.clone(),
        working_directory: "src/app".into(),
        output_paths: Vec::new(),
        output_files: vec!["build/obj/hello.o".into()],
        output_directories: Vec::new(),
        platform: platform.clone(),
        timeout: None,
        do_not_cache: false,
        directory_only: false,
        salt: Vec::new(),
    };
    let (resp, hit) = recc_compile(&ch, &compile, blobs.clone()).await;
    assert!(!hit && !resp.cached_result);
    assert_eq!(resp.status.clone().unwrap_or_default().code, 0, "{resp:?}");
    let result = resp.result.expect("a result");
    let stderr = read_blob(&ch, result.stderr_digest.as_ref().unwrap()).await;
    assert_eq!(result.exit_code, 0, "tcc failed: {stderr:?}");
    // REAPI 2.0 clients read output_files, with paths as they asked.
    assert_eq!(result.output_files.len(), 1, "{result:?}");
    let obj = &result.output_files[0];
    assert_eq!(obj.path, "build/obj/hello.o");
    let object = read_blob(&ch, obj.digest.as_ref().unwrap()).await;
    assert_eq!(&object[..4], b"\x7fELF", "an object file came back");

    // The object links and runs on the same base: it really was compiled.
    let mut blobs = Vec::new();
    let obj_dir = Directory {
        files: vec![file("hello.o", &object, &mut blobs)],
        ..Default::default()
    };
    let root = Directory {
        directories: vec![dir("obj", obj_dir, &mut blobs)],
        ..Default::default()
    };
    let (link_root, bytes) = directory(&root);
    blobs.push((link_root.clone(), bytes));
    upload(&ch, blobs).await;
    let mut link = ActionSpec::shell(
        link_root,
        "/usr/bin/tcc -o bin/hello obj/hello.o && ./bin/hello",
    );
    link.platform = platform.clone();
    link.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    link.output_files = vec!["bin/hello".into()];
    let (_, resp) = run(&ch, &link.upload(&ch).await).await;
    let result = resp.result.expect("a result");
    let stdout = read_blob(&ch, result.stdout_digest.as_ref().unwrap()).await;
    let stderr = read_blob(&ch, result.stderr_digest.as_ref().unwrap()).await;
    assert_eq!(result.exit_code, 0, "link/run failed: {stderr:?}");
    assert_eq!(&stdout[..], b"answer 42 0\n");
    assert!(result.output_files[0].is_executable);

    // The same compile again (another developer, a clean build): recc's
    // GetActionResult hits, nothing is uploaded or run.
    let (again, hit) = recc_compile(&ch, &compile, Vec::new()).await;
    assert!(hit && again.cached_result);
    assert_eq!(again.result.unwrap().output_files[0].digest, obj.digest);

    // A base root that is not in CAS: refused up front, naming the blob,
    // so the client knows to push it (it never reaches a worker).
    let mut no_base = compile;
    no_base.salt = b"other".to_vec();
    no_base.platform[2].1 = format!("{}/{}", "ab".repeat(32), 123);
    let action = no_base.upload(&ch).await;
    match execute(&ch, &action, false).await {
        Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        Ok(stream) => {
            let resp = response(&finish(stream).await);
            let status = resp.status.unwrap_or_default();
            assert_eq!(status.code, Code::FailedPrecondition as i32, "{status:?}");
        }
    }
}
