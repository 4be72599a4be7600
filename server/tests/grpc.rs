//! The storage services over real gRPC on loopback: an in-process server on
//! 127.0.0.1:0 with a disk store in a temporary directory, and tonic
//! clients.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::asset::fetch_client::FetchClient;
use kiln_proto::asset::push_client::PushClient;
use kiln_proto::asset::{
    FetchBlobRequest, FetchDirectoryRequest, PushBlobRequest, PushDirectoryRequest, Qualifier,
};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{QueryWriteStatusRequest, ReadRequest, WriteRequest};
use kiln_proto::protobuf::Timestamp;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    ActionResult, BatchReadBlobsRequest, BatchUpdateBlobsRequest, Directory, DirectoryNode,
    FileNode, FindMissingBlobsRequest, GetActionResultRequest, GetCapabilitiesRequest,
    GetTreeRequest, OutputDirectory, OutputFile, Tree, UpdateActionResultRequest,
    batch_update_blobs_request, compressor, digest_function,
};
use kiln_server::error::PreconditionFailure;
use kiln_server::{Digest, KilnServer, RunningServer, ServerConfig};
use prost::Message;
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

struct Harness {
    server: RunningServer,
    channel: Channel,
    _dir: Option<TempDir>,
}

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(dir.to_path_buf()),
        instance_names: vec!["main".into(), "ci/linux".into()],
        ..Default::default()
    }
}

async fn start_with(config: ServerConfig) -> (RunningServer, Channel) {
    let server = KilnServer::open(config).await.expect("open server");
    let routes = server.routes().routes();
    let running = server.start(routes).await.expect("start server");
    let channel = kiln_server::client::connect(&running.url())
        .await
        .expect("connect");
    (running, channel)
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (server, channel) = start_with(config(dir.path())).await;
    Harness {
        server,
        channel,
        _dir: Some(dir),
    }
}

impl Harness {
    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    fn bs(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }
    fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }
}

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn req(d: &Digest, bytes: Vec<u8>) -> batch_update_blobs_request::Request {
    batch_update_blobs_request::Request {
        digest: Some(d.to_proto()),
        data: bytes,
        compressor: 0,
    }
}

async fn upload(h: &Harness, blobs: &[Vec<u8>]) -> Vec<Digest> {
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let resp = h
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: digests
                .iter()
                .zip(blobs)
                .map(|(d, b)| req(d, b.clone()))
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    for r in &resp.responses {
        assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
    }
    digests
}

async fn missing(h: &Harness, instance: &str, digests: &[Digest]) -> Vec<Digest> {
    h.cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests.iter().map(Digest::to_proto).collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
        .iter()
        .map(|d| Digest::from_proto(d).unwrap())
        .collect()
}

fn write_reqs(name: &str, bytes: &[u8], chunk: usize, start: usize) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut off = start;
    while off < bytes.len() || (out.is_empty() && bytes.is_empty()) {
        let end = (off + chunk).min(bytes.len());
        out.push(WriteRequest {
            resource_name: if out.is_empty() {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: off as i64,
            finish_write: end == bytes.len(),
            data: bytes[off..end].to_vec(),
        });
        off = end;
        if bytes.is_empty() {
            break;
        }
    }
    out
}

async fn read_all(
    h: &Harness,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = h
        .bs()
        .read(ReadRequest {
            resource_name: name.into(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.next().await {
        out.extend(m?.data);
    }
    Ok(out)
}

fn upload_name(d: &Digest) -> String {
    format!(
        "uploads/{}/blobs/{}/{}",
        uuid::Uuid::new_v4(),
        d.hex(),
        d.size()
    )
}

fn assert_status(s: &tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(s.code(), code, "{s:?}");
    for n in needles {
        assert!(
            s.message().contains(n),
            "{:?} should mention {n:?}",
            s.message()
        );
    }
}

#[tokio::test]
async fn capabilities_and_instances() {
    let h = start().await;
    let mut caps = CapabilitiesClient::new(h.channel.clone());
    let c = caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "ci/linux".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cache = c.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![digest_function::Value::Sha256 as i32]
    );
    assert!(cache.max_batch_total_size_bytes >= 4 << 20);
    assert_eq!(
        cache.supported_compressors,
        vec![compressor::Value::Zstd as i32]
    );
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(!c.execution_capabilities.unwrap().exec_enabled);
    assert!(c.high_api_version.unwrap().minor >= 1);

    let e = caps
        .get_capabilities(GetCapabilitiesRequest {
            instance_name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["\"nope\"", "\"main\""]);
    let e = h
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: "other".into(),
            blob_digests: vec![],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["\"other\""]);
    let e = read_all(&h, &format!("bogus/blobs/{}/0", Digest::EMPTY.hex()), 0, 0)
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["\"bogus\""]);
    // Instances share the CAS.
    let d = upload(&h, &[b"shared".to_vec()]).await;
    assert!(missing(&h, "main", &d).await.is_empty());
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_roundtrip_and_the_empty_blob() {
    let h = start().await;
    let blobs: Vec<Vec<u8>> = (0..50).map(|i| data(i, 4096 + i as usize)).collect();
    let mut big = data(99, 600 << 10);
    big[0] = 1;
    let mut all = blobs.clone();
    all.push(big);
    let digests: Vec<Digest> = all.iter().map(|b| Digest::of(b)).collect();
    assert_eq!(missing(&h, "", &digests).await.len(), digests.len());
    upload(&h, &all).await;
    assert!(missing(&h, "", &digests).await.is_empty());
    let resp = h
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            instance_name: String::new(),
            digests: digests
                .iter()
                .chain([&Digest::EMPTY])
                .map(Digest::to_proto)
                .collect(),
            acceptable_compressors: vec![],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses.len(), all.len() + 1);
    for (r, b) in resp.responses.iter().zip(all.iter().chain([&Vec::new()])) {
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        assert_eq!(&r.data, b);
    }
    // The empty blob: never missing, readable, an empty Directory.
    assert!(missing(&h, "", &[Digest::EMPTY]).await.is_empty());
    let name = format!("blobs/{}/0", Digest::EMPTY.hex());
    assert_eq!(read_all(&h, &name, 0, 0).await.unwrap(), Vec::<u8>::new());
    let tree: Vec<_> = h
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(Digest::EMPTY.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(tree.len(), 1);
    assert_eq!(
        tree[0].as_ref().unwrap().directories,
        vec![Directory::default()]
    );

    // zstd-compressed batch entries, and zstd responses when acceptable.
    let text = b"compressible ".repeat(500);
    let d = Digest::of(&text);
    let resp = h
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(d.to_proto()),
                data: zstd::bulk::compress(&text, 3).unwrap(),
                compressor: compressor::Value::Zstd as i32,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().unwrap().code, 0);
    let resp = h
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: vec![d.to_proto()],
            acceptable_compressors: vec![compressor::Value::Zstd as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = &resp.responses[0];
    assert_eq!(r.compressor, compressor::Value::Zstd as i32);
    assert_eq!(zstd::bulk::decompress(&r.data, text.len()).unwrap(), text);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn batch_bad_input_is_named_and_stores_nothing() {
    let h = start().await;
    let good = b"good blob".to_vec();
    let gd = Digest::of(&good);
    let wrong_hash = Digest::of(b"something else entirely");
    let wrong_hash = Digest::new(*wrong_hash.hash(), good.len() as u64);
    let wrong_size = Digest::new(*gd.hash(), 3);
    let resp = h
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: String::new(),
            requests: vec![
                req(&wrong_hash, good.clone()),
                req(&wrong_size, good.clone()),
                batch_update_blobs_request::Request {
                    digest: Some(kiln_proto::reapi::Digest {
                        hash: "abc".into(),
                        size_bytes: 9,
                    }),
                    data: good.clone(),
                    compressor: 0,
                },
                batch_update_blobs_request::Request {
                    digest: Some(kiln_proto::reapi::Digest {
                        hash: gd.hex(),
                        size_bytes: -9,
                    }),
                    data: good.clone(),
                    compressor: 0,
                },
                req(&gd, good.clone()),
            ],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = resp
        .responses
        .iter()
        .map(|r| r.status.as_ref().unwrap().code)
        .collect();
    let ia = Code::InvalidArgument as i32;
    assert_eq!(codes, vec![ia, ia, ia, ia, 0]);
    let msg = |i: usize| resp.responses[i].status.as_ref().unwrap().message.clone();
    assert!(
        msg(0).contains(&wrong_hash.to_string()) && msg(0).contains("hashes to"),
        "{}",
        msg(0)
    );
    assert!(msg(1).contains(&wrong_size.to_string()), "{}", msg(1));
    assert!(
        msg(2).contains("abc/9") && msg(2).contains("hex"),
        "{}",
        msg(2)
    );
    assert!(msg(3).contains("negative"), "{}", msg(3));
    assert_eq!(missing(&h, "", &[wrong_hash, wrong_size]).await.len(), 2);
    assert!(missing(&h, "", &[gd]).await.is_empty());
    let usage = h.server.storage().cas.usage();
    assert_eq!(usage.blobs, 1, "only the good blob was stored");

    // Over the advertised limit: the whole call fails and stores nothing.
    let blobs: Vec<Vec<u8>> = (0..5).map(|i| data(i + 100, 1 << 20)).collect();
    let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
    let e = h
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest {
            requests: digests
                .iter()
                .zip(&blobs)
                .map(|(d, b)| req(d, b.clone()))
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::InvalidArgument,
        &["max_batch_total_size_bytes", "5242880"],
    );
    assert_eq!(missing(&h, "", &digests).await.len(), 5);
    let e = h
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::InvalidArgument,
        &["BatchReadBlobs", "max_batch_total_size_bytes"],
    );

    // A batch right at the limit decodes (its message is over tonic's
    // default 4 MiB).
    let blobs: Vec<Vec<u8>> = (0..1024)
        .map(|i| {
            data((i % 200) as u8, 4096 - 8)
                .into_iter()
                .chain((i as u64).to_le_bytes())
                .collect()
        })
        .collect();
    let digests = upload(&h, &blobs).await;
    assert!(missing(&h, "", &digests).await.is_empty());

    // Malformed digests in FindMissingBlobs name their position.
    let e = h
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![
                gd.to_proto(),
                kiln_proto::reapi::Digest {
                    hash: "XYZ".into(),
                    size_bytes: 1,
                },
            ],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["blob_digests[1]", "XYZ/1"]);
    let e = h
        .cas()
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: String::new(),
            blob_digests: vec![gd.to_proto()],
            digest_function: digest_function::Value::Sha1 as i32,
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["SHA1"]);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn bytestream_read_write_offsets_and_errors() {
    let h = start().await;
    let blob = data(7, 3 << 20);
    let d = Digest::of(&blob);
    let resp = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &upload_name(&d),
            &blob,
            1 << 20,
            0,
        )))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().committed_size, blob.len() as i64);
    let name = format!("blobs/{}/{}", d.hex(), d.size());
    assert_eq!(read_all(&h, &name, 0, 0).await.unwrap(), blob);
    assert_eq!(read_all(&h, &name, 1000, 0).await.unwrap(), &blob[1000..]);
    assert_eq!(read_all(&h, &name, 5, 100).await.unwrap(), &blob[5..105]);
    assert_eq!(
        read_all(&h, &format!("main/{name}"), 0, 10).await.unwrap(),
        &blob[..10]
    );
    assert!(
        read_all(&h, &name, blob.len() as i64, 0)
            .await
            .unwrap()
            .is_empty()
    );
    let e = read_all(&h, &name, blob.len() as i64 + 1, 0)
        .await
        .unwrap_err();
    assert_status(&e, Code::OutOfRange, &[&name]);
    let e = read_all(&h, &name, -1, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let e = read_all(&h, &name, 0, -1).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Absent blob, malformed names.
    let absent = Digest::of(b"absent");
    let e = read_all(
        &h,
        &format!("blobs/{}/{}", absent.hex(), absent.size()),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_status(&e, Code::NotFound, &[&absent.to_string()]);
    for (bad, needle) in [
        ("blobs/abc/3".to_string(), "abc"),
        (format!("blobs/{}/-4", d.hex()), "negative"),
        (format!("blobs/{}/ten", d.hex()), "ten"),
        ("nothing-here".to_string(), "nothing-here"),
    ] {
        let e = read_all(&h, &bad, 0, 0).await.unwrap_err();
        assert_status(&e, Code::InvalidArgument, &[needle]);
    }
    let e = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            "uploads/x/blobs/zz/1",
            b"a",
            10,
            0,
        )))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["uploads/x/blobs/zz/1"]);

    // Wrong data: rejected naming the digest, nothing stored, no resumable
    // state left behind.
    let claimed = Digest::of(b"claimed content!");
    let name = upload_name(&claimed);
    let e = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &name,
            b"not the content!",
            4,
            0,
        )))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &[&claimed.to_string()]);
    assert_eq!(missing(&h, "", &[claimed]).await, vec![claimed]);
    let e = h
        .bs()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Too much data.
    let e = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &upload_name(&claimed),
            b"claimed content!!!",
            4,
            0,
        )))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["more than the declared size"]);
    // A write that skips ahead.
    let mut reqs = write_reqs(&upload_name(&claimed), b"claimed content!", 4, 0);
    reqs[1].write_offset = 8;
    let e = h.bs().write(futures::stream::iter(reqs)).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["write_offset 8"]);
    assert_eq!(h.server.storage().cas.usage().blobs, 1);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn bytestream_resumes_an_interrupted_upload() {
    let h = start().await;
    let blob = data(3, 5 << 20);
    let d = Digest::of(&blob);
    let name = upload_name(&d);
    // First attempt: three chunks, then the client goes away.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let reqs = write_reqs(&name, &blob, 1 << 20, 0);
    for r in reqs.iter().take(3) {
        tx.send(r.clone()).await.unwrap();
    }
    let mut bs = h.bs();
    let call = tokio::spawn(async move {
        bs.write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let committed = loop {
        let s = h
            .bs()
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        if let Ok(s) = s
            && s.get_ref().committed_size == 3 << 20
        {
            break s.into_inner();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!committed.complete);
    call.abort();
    drop(tx);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Resume from where the server says it is.
    let s = h
        .bs()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.committed_size, s.complete), (3 << 20, false));
    let resp = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &name,
            &blob,
            1 << 20,
            3 << 20,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, blob.len() as i64);
    let s = h
        .bs()
        .query_write_status(QueryWriteStatusRequest {
            resource_name: name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.complete);
    assert_eq!(
        read_all(&h, &format!("blobs/{}/{}", d.hex(), d.size()), 0, 0)
            .await
            .unwrap(),
        blob
    );
    // Writing it again ends at once.
    let resp = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &upload_name(&d),
            &blob[..1 << 20],
            1 << 20,
            0,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, blob.len() as i64);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_writers_of_one_blob_all_succeed() {
    let h = start().await;
    for size in [100 << 10, 3 << 20] {
        let blob = Bytes::from(data(size as u8, size));
        let d = Digest::of(&blob);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let mut bs = h.bs();
            let blob = blob.clone();
            tasks.push(tokio::spawn(async move {
                // Small chunks, with pauses, so the writers interleave.
                let reqs = write_reqs(&upload_name(&d), &blob, 64 << 10, 0);
                let stream = futures::stream::iter(reqs).then(|r| async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    r
                });
                bs.write(stream)
                    .await
                    .map(|r| r.into_inner().committed_size)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), size as i64);
        }
        assert_eq!(
            read_all(&h, &format!("blobs/{}/{}", d.hex(), d.size()), 0, 0)
                .await
                .unwrap(),
            blob
        );
    }
    let usage = h.server.storage().cas.usage();
    assert_eq!((usage.blobs, usage.bytes), (2, (100 << 10) + (3 << 20)));
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn bytestream_zstd() {
    let h = start().await;
    let blob = b"0123456789abcdef".repeat(200_000);
    let d = Digest::of(&blob);
    let z = zstd::bulk::compress(&blob, 3).unwrap();
    let name = format!(
        "uploads/{}/compressed-blobs/zstd/{}/{}",
        uuid::Uuid::new_v4(),
        d.hex(),
        d.size()
    );
    let resp = h
        .bs()
        .write(futures::stream::iter(write_reqs(&name, &z, 1000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, z.len() as i64);
    let plain = read_all(&h, &format!("blobs/{}/{}", d.hex(), d.size()), 0, 0)
        .await
        .unwrap();
    assert_eq!(plain, blob);
    let zname = format!("compressed-blobs/zstd/{}/{}", d.hex(), d.size());
    let back = read_all(&h, &zname, 0, 0).await.unwrap();
    assert_eq!(zstd::stream::decode_all(&back[..]).unwrap(), blob);
    // Offsets count compressed bytes.
    let tail = read_all(&h, &zname, 10, 0).await.unwrap();
    assert_eq!(tail, &back[10..]);
    // A second compressed upload of a present blob ends early with -1.
    let resp = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &format!(
                "uploads/{}/compressed-blobs/zstd/{}/{}",
                uuid::Uuid::new_v4(),
                d.hex(),
                d.size()
            ),
            &z,
            1000,
            0,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.committed_size, -1);
    // Garbage is not zstd.
    let other = Digest::of(b"other");
    let e = h
        .bs()
        .write(futures::stream::iter(write_reqs(
            &format!(
                "uploads/u/compressed-blobs/zstd/{}/{}",
                other.hex(),
                other.size()
            ),
            b"definitely not zstd",
            100,
            0,
        )))
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &[&other.to_string()]);
    h.server.stop().await.unwrap();
}

/// Uploads a tree: root with `fanout` subdirectories, each with `fanout`
/// leaf directories holding one file. Returns (root, directory digests).
async fn upload_tree(h: &Harness, fanout: usize) -> (Digest, Vec<Digest>) {
    let mut blobs = Vec::new();
    let mut all_dirs = Vec::new();
    let mut mids = Vec::new();
    for i in 0..fanout {
        let mut mid = Directory::default();
        for j in 0..fanout {
            let content = format!("file {i} {j}").into_bytes();
            let fd = Digest::of(&content);
            blobs.push(content);
            let leaf = Directory {
                files: vec![FileNode {
                    name: "f".into(),
                    digest: Some(fd.to_proto()),
                    is_executable: j % 2 == 0,
                    node_properties: None,
                }],
                ..Default::default()
            };
            let (ld, lb) = Digest::of_message(&leaf);
            blobs.push(lb);
            all_dirs.push(ld);
            mid.directories.push(DirectoryNode {
                name: format!("leaf{j:03}"),
                digest: Some(ld.to_proto()),
            });
        }
        let (md, mb) = Digest::of_message(&mid);
        blobs.push(mb);
        all_dirs.push(md);
        mids.push(DirectoryNode {
            name: format!("mid{i:03}"),
            digest: Some(md.to_proto()),
        });
    }
    let root = Directory {
        directories: mids,
        ..Default::default()
    };
    let (rd, rb) = Digest::of_message(&root);
    blobs.push(rb);
    all_dirs.push(rd);
    upload(h, &blobs).await;
    (rd, all_dirs)
}

#[tokio::test]
async fn get_tree_pages_and_errors() {
    let h = start().await;
    let (root, dirs) = upload_tree(&h, 6).await;
    // Everything in one call, no page size.
    let pages: Vec<_> = h
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(root.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    let got: Vec<Directory> = pages
        .into_iter()
        .flat_map(|p| p.unwrap().directories)
        .collect();
    assert_eq!(got.len(), 1 + 6 + 6 * 6);
    // Page by page, one call per page, following tokens.
    let mut token = String::new();
    let mut seen = Vec::new();
    let mut calls = 0;
    loop {
        let mut stream = h
            .cas()
            .get_tree(GetTreeRequest {
                root_digest: Some(root.to_proto()),
                page_size: 5,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert!(first.directories.len() <= 5);
        seen.extend(first.directories.iter().map(|d| Digest::of_message(d).0));
        calls += 1;
        if first.next_page_token.is_empty() {
            break;
        }
        token = first.next_page_token;
    }
    assert!(calls >= 7, "{calls}");
    assert_eq!(seen.len(), got.len());
    assert_eq!(seen[0], root, "breadth-first, root first");
    for d in &seen {
        assert!(dirs.contains(d));
    }

    let absent = Digest::of(b"no such directory");
    let e = h
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(absent.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::NotFound, &[&absent.to_string()]);
    let not_dir = upload(&h, &[vec![0xff, 0xff, 0xff]]).await[0];
    let e = h
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(not_dir.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::InvalidArgument,
        &[&not_dir.to_string(), "Directory"],
    );
    let e = h
        .cas()
        .get_tree(GetTreeRequest {
            root_digest: Some(root.to_proto()),
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["garbage"]);
    h.server.stop().await.unwrap();
}

fn output_file(path: &str, d: &Digest) -> OutputFile {
    OutputFile {
        path: path.into(),
        digest: Some(d.to_proto()),
        is_executable: false,
        contents: vec![],
        node_properties: None,
    }
}

async fn get_result(
    h: &Harness,
    instance: &str,
    action: &Digest,
    inline: bool,
) -> Result<ActionResult, tonic::Status> {
    h.ac()
        .get_action_result(GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.to_proto()),
            inline_stdout: inline,
            inline_stderr: inline,
            inline_output_files: vec![],
            digest_function: 0,
        })
        .await
        .map(|r| r.into_inner())
}

async fn update_result(
    h: &Harness,
    instance: &str,
    action: &Digest,
    result: ActionResult,
) -> Result<ActionResult, tonic::Status> {
    h.ac()
        .update_action_result(UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.to_proto()),
            action_result: Some(result),
            results_cache_policy: None,
            digest_function: 0,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn action_cache_completeness() {
    let h = start().await;
    let action = Digest::of(b"action 1");
    let out = b"output".to_vec();
    let stdout = b"hello from the action\n".to_vec();
    let (od, sd) = (Digest::of(&out), Digest::of(&stdout));
    let result = ActionResult {
        output_files: vec![output_file("out/a", &od)],
        stdout_digest: Some(sd.to_proto()),
        exit_code: 0,
        ..Default::default()
    };
    assert_eq!(
        get_result(&h, "", &action, false).await.unwrap_err().code(),
        Code::NotFound
    );
    // Outputs not uploaded yet: refused, each missing blob listed.
    let e = update_result(&h, "", &action, result.clone())
        .await
        .unwrap_err();
    assert_status(
        &e,
        Code::FailedPrecondition,
        &[&od.to_string(), &sd.to_string()],
    );
    let details = kiln_proto::rpc::Status::decode(e.details()).unwrap();
    let pf = PreconditionFailure::decode(&details.details[0].value[..]).unwrap();
    let subjects: Vec<&str> = pf.violations.iter().map(|v| v.subject.as_str()).collect();
    assert!(
        subjects.contains(&format!("blobs/{}/{}", od.hex(), od.size()).as_str()),
        "{subjects:?}"
    );
    assert!(pf.violations.iter().all(|v| v.r#type == "MISSING"));

    upload(&h, &[out.clone(), stdout.clone()]).await;
    update_result(&h, "", &action, result.clone())
        .await
        .unwrap();
    let got = get_result(&h, "", &action, true).await.unwrap();
    assert_eq!(got.output_files, result.output_files);
    assert_eq!(got.stdout_raw, stdout, "inlined on request");
    let got = get_result(&h, "", &action, false).await.unwrap();
    assert!(got.stdout_raw.is_empty());
    // Per instance.
    assert_eq!(
        get_result(&h, "main", &action, false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // A referenced blob disappears: the entry becomes a miss.
    h.server
        .storage()
        .cas
        .store()
        .owned()
        .unwrap()
        .delete(&[od])
        .await
        .unwrap();
    let e = get_result(&h, "", &action, false).await.unwrap_err();
    assert_status(&e, Code::NotFound, &[&action.to_string()]);

    // Failed actions are not cached.
    let failed = Digest::of(b"failing action");
    update_result(
        &h,
        "",
        &failed,
        ActionResult {
            exit_code: 1,
            stdout_digest: Some(sd.to_proto()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        get_result(&h, "", &failed, false).await.unwrap_err().code(),
        Code::NotFound
    );

    // Output directories: both a Tree message and a root directory digest
    // are checked down to every file.
    let (root, _) = upload_tree(&h, 3).await;
    let file_in_tree = b"inside the tree".to_vec();
    let fd = Digest::of(&file_in_tree);
    let tree = Tree {
        root: Some(Directory {
            files: vec![FileNode {
                name: "x".into(),
                digest: Some(fd.to_proto()),
                is_executable: false,
                node_properties: None,
            }],
            ..Default::default()
        }),
        children: vec![],
    };
    let (td, tb) = Digest::of_message(&tree);
    upload(&h, &[tb, file_in_tree]).await;
    let action2 = Digest::of(b"action with dirs");
    let result2 = ActionResult {
        output_directories: vec![
            OutputDirectory {
                path: "d1".into(),
                tree_digest: Some(td.to_proto()),
                is_topologically_sorted: false,
                root_directory_digest: None,
            },
            OutputDirectory {
                path: "d2".into(),
                tree_digest: None,
                is_topologically_sorted: false,
                root_directory_digest: Some(root.to_proto()),
            },
        ],
        ..Default::default()
    };
    update_result(&h, "main", &action2, result2.clone())
        .await
        .unwrap();
    assert_eq!(
        get_result(&h, "main", &action2, false).await.unwrap(),
        result2
    );
    h.server
        .storage()
        .cas
        .store()
        .owned()
        .unwrap()
        .delete(&[fd])
        .await
        .unwrap();
    assert_eq!(
        get_result(&h, "main", &action2, false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    upload(&h, &[b"inside the tree".to_vec()]).await;
    assert!(get_result(&h, "main", &action2, false).await.is_ok());
    let leaf_file = Digest::of(b"file 2 1");
    h.server
        .storage()
        .cas
        .store()
        .owned()
        .unwrap()
        .delete(&[leaf_file])
        .await
        .unwrap();
    assert_eq!(
        get_result(&h, "main", &action2, false)
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Bad digests inside a result are named.
    let e = update_result(
        &h,
        "",
        &action,
        ActionResult {
            output_files: vec![OutputFile {
                path: "p".into(),
                digest: Some(kiln_proto::reapi::Digest {
                    hash: "12".into(),
                    size_bytes: 1,
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["output_files[0]", "\"p\""]);
    h.server.stop().await.unwrap();
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: 0,
    }
}

#[tokio::test]
async fn remote_asset_push_and_fetch() {
    let h = start().await;
    let mut push = PushClient::new(h.channel.clone());
    let mut fetch = FetchClient::new(h.channel.clone());
    // BuildStream's start-up probe: empty requests are INVALID_ARGUMENT.
    assert_eq!(
        fetch
            .fetch_blob(FetchBlobRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        push.push_blob(PushBlobRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    let artifact = b"artifact proto".to_vec();
    let log = b"build log".to_vec();
    let (ad, ld) = (Digest::of(&artifact), Digest::of(&log));
    let (files_root, _) = upload_tree(&h, 2).await;
    let uri = "urn:fdc:buildstream.build:2020:artifact:proj/el/abc123".to_string();
    let push_req = PushBlobRequest {
        instance_name: String::new(),
        uris: vec![uri.clone()],
        qualifiers: vec![],
        expire_at: None,
        blob_digest: Some(ad.to_proto()),
        references_blobs: vec![ld.to_proto()],
        references_directories: vec![files_root.to_proto()],
        digest_function: 0,
    };
    // The artifact itself must be there.
    let e = push.push_blob(push_req.clone()).await.unwrap_err();
    assert_status(&e, Code::FailedPrecondition, &[&ad.to_string()]);
    upload(&h, &[artifact.clone(), log.clone()]).await;
    // A reference BuildStream could not upload (say, a buildtree it does
    // not have) is accepted, and does not keep the artifact from being
    // found.
    let absent_buildtree = Digest::of(b"a buildtree nobody uploaded");
    let mut with_absent = push_req.clone();
    with_absent
        .references_directories
        .push(absent_buildtree.to_proto());
    push.push_blob(with_absent).await.unwrap();

    let fetch_req = FetchBlobRequest {
        uris: vec!["urn:other".into(), uri.clone()],
        ..Default::default()
    };
    let r = fetch
        .fetch_blob(fetch_req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, 0);
    assert_eq!(r.uri, uri);
    assert_eq!(r.blob_digest.unwrap(), ad.to_proto());
    // Other qualifiers, other instance: not found.
    let mut q = fetch_req.clone();
    q.qualifiers = vec![Qualifier {
        name: "resource_type".into(),
        value: "application/x-tar".into(),
    }];
    let r = fetch.fetch_blob(q).await.unwrap().into_inner();
    assert_eq!(r.status.unwrap().code, Code::NotFound as i32);
    let mut other = fetch_req.clone();
    other.instance_name = "main".into();
    assert_eq!(
        fetch
            .fetch_blob(other)
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap()
            .code,
        Code::NotFound as i32
    );
    // Duplicate qualifier names are rejected.
    let mut dup = fetch_req.clone();
    dup.qualifiers = vec![
        Qualifier {
            name: "a".into(),
            value: "1".into(),
        },
        Qualifier {
            name: "a".into(),
            value: "2".into(),
        },
    ];
    let e = fetch.fetch_blob(dup).await.unwrap_err();
    assert_status(&e, Code::InvalidArgument, &["\"a\""]);
    // Evicting referenced content turns the mapping into a miss.
    let leaf = Digest::of(b"file 1 1");
    h.server
        .storage()
        .cas
        .store()
        .owned()
        .unwrap()
        .delete(&[leaf])
        .await
        .unwrap();
    let r = fetch
        .fetch_blob(fetch_req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::NotFound as i32);

    // Directories, with an expiry.
    let (dir_root, _) = upload_tree(&h, 1).await;
    let src = "https://example.com/src.tar.gz".to_string();
    let qual = vec![Qualifier {
        name: "vcs.commit".into(),
        value: "deadbeef".into(),
    }];
    push.push_directory(PushDirectoryRequest {
        uris: vec![src.clone()],
        qualifiers: qual.clone(),
        root_directory_digest: Some(dir_root.to_proto()),
        expire_at: Some(ts(SystemTime::now() + Duration::from_secs(3600))),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = fetch
        .fetch_directory(FetchDirectoryRequest {
            uris: vec![src.clone()],
            qualifiers: qual.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.root_directory_digest.unwrap(), dir_root.to_proto());
    assert!(r.expires_at.is_some());
    push.push_directory(PushDirectoryRequest {
        uris: vec![src.clone()],
        qualifiers: qual.clone(),
        root_directory_digest: Some(dir_root.to_proto()),
        expire_at: Some(ts(SystemTime::now() - Duration::from_secs(10))),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = fetch
        .fetch_directory(FetchDirectoryRequest {
            uris: vec![src],
            qualifiers: qual,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::NotFound as i32);
    // A root that is not a Directory.
    let junk = upload(&h, &[vec![0xff; 7]]).await[0];
    let e = push
        .push_directory(PushDirectoryRequest {
            uris: vec!["urn:junk".into()],
            root_directory_digest: Some(junk.to_proto()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_status(&e, Code::InvalidArgument, &[&junk.to_string()]);
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_every_committed_blob() {
    let dir = tempfile::tempdir().unwrap();
    let (server, channel) = start_with(config(dir.path())).await;
    let h = Harness {
        server,
        channel,
        _dir: None,
    };
    let small: Vec<Vec<u8>> = (0..300).map(|i| data(i as u8, 1000 + i)).collect();
    let small_d = upload(&h, &small).await;
    let large = data(42, 2 << 20);
    let ld = Digest::of(&large);
    h.bs()
        .write(futures::stream::iter(write_reqs(
            &upload_name(&ld),
            &large,
            1 << 20,
            0,
        )))
        .await
        .unwrap();
    let action = Digest::of(b"restart action");
    update_result(
        &h,
        "ci/linux",
        &action,
        ActionResult {
            output_files: vec![output_file("a", &ld)],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    h.server.stop().await.unwrap();

    let (server, channel) = start_with(config(dir.path())).await;
    let h = Harness {
        server,
        channel,
        _dir: None,
    };
    let mut all = small_d.clone();
    all.push(ld);
    assert!(missing(&h, "", &all).await.is_empty());
    assert_eq!(
        read_all(&h, &format!("blobs/{}/{}", ld.hex(), ld.size()), 0, 0)
            .await
            .unwrap(),
        large
    );
    let resp = h
        .cas()
        .batch_read_blobs(BatchReadBlobsRequest {
            digests: small_d.iter().map(Digest::to_proto).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for (r, b) in resp.responses.iter().zip(&small) {
        assert_eq!(&r.data, b);
    }
    assert!(get_result(&h, "ci/linux", &action, false).await.is_ok());
    h.server.stop().await.unwrap();
}

#[tokio::test]
async fn eviction_keeps_the_limit_and_spares_a_blob_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.storage.max_size_bytes = 40 << 20;
    let (server, channel) = start_with(c).await;
    let h = Harness {
        server,
        channel,
        _dir: Some(dir),
    };
    let big = data(1, 24 << 20);
    let bd = Digest::of(&big);
    h.bs()
        .write(futures::stream::iter(write_reqs(
            &upload_name(&bd),
            &big,
            1 << 20,
            0,
        )))
        .await
        .unwrap();
    // Start reading it, take one chunk, and leave the rest pending.
    let mut stream = h
        .bs()
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", bd.hex(), bd.size()),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = stream.next().await.unwrap().unwrap().data;
    // Now push the store well past its limit.
    let mut others = Vec::new();
    for i in 0..6u8 {
        let b = data(100 + i, 4 << 20);
        let d = Digest::of(&b);
        h.bs()
            .write(futures::stream::iter(write_reqs(
                &upload_name(&d),
                &b,
                1 << 20,
                0,
            )))
            .await
            .unwrap();
        others.push(d);
    }
    for _ in 0..200 {
        if h.server.storage().cas.usage().bytes <= 40 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let usage = h.server.storage().cas.usage();
    assert!(usage.bytes <= 40 << 20, "{usage:?}");
    assert!(usage.removals > 0);
    assert!(
        missing(&h, "", &[bd]).await.is_empty(),
        "the blob being read was not evicted"
    );
    while let Some(m) = stream.next().await {
        got.extend(m.unwrap().data);
    }
    assert_eq!(Digest::of(&got), bd);
    h.server.stop().await.unwrap();
}

/// A stand-in for a service another part of Kiln adds to the endpoint: it
/// answers every Join with one Welcome.
struct Welcomer;

#[tonic::async_trait]
impl kiln_proto::worker::workers_server::Workers for Welcomer {
    type JoinStream = std::pin::Pin<
        Box<
            dyn futures::Stream<Item = Result<kiln_proto::worker::ServerMessage, tonic::Status>>
                + Send,
        >,
    >;

    async fn join(
        &self,
        _request: tonic::Request<tonic::Streaming<kiln_proto::worker::WorkerMessage>>,
    ) -> Result<tonic::Response<Self::JoinStream>, tonic::Status> {
        let welcome = kiln_proto::worker::ServerMessage {
            kind: Some(kiln_proto::worker::server_message::Kind::Welcome(
                kiln_proto::worker::Welcome {
                    server_id: "test".into(),
                    ..Default::default()
                },
            )),
        };
        Ok(tonic::Response::new(Box::pin(futures::stream::iter([Ok(
            welcome,
        )]))))
    }
}

#[tokio::test]
async fn other_services_share_the_endpoint() {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        storage: kiln_server::config::StorageConfig {
            backend: kiln_server::config::Backend::Memory,
            ..Default::default()
        },
        ..Default::default()
    };
    let server = KilnServer::open(config).await.unwrap();
    server.execution_capabilities().set_enabled(true);
    let storage = server.storage().clone();
    let mut routes = server.routes();
    routes.add_service(
        kiln_proto::worker::workers_server::WorkersServer::new(Welcomer)
            .max_decoding_message_size(server.max_message_bytes()),
    );
    let running = server.start(routes.routes()).await.unwrap();
    let channel = kiln_server::client::connect(&running.url()).await.unwrap();

    let mut workers = kiln_proto::worker::workers_client::WorkersClient::new(channel.clone());
    let mut stream = workers
        .join(futures::stream::empty())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(kiln_proto::worker::server_message::Kind::Welcome(_))
    ));

    let caps = CapabilitiesClient::new(channel.clone())
        .get_capabilities(GetCapabilitiesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(caps.execution_capabilities.unwrap().exec_enabled);

    // The storage handle and the gRPC services see the same blobs.
    let d = storage
        .cas
        .put(Bytes::from_static(b"put through the handle"))
        .await
        .unwrap();
    let client = kiln_server::client::CasClient::with_channel(channel, "")
        .await
        .unwrap();
    assert_eq!(
        &client.read(d).await.unwrap()[..],
        b"put through the handle"
    );
    running.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_does_not_wait_forever_for_open_streams() {
    let mut config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    config.storage.backend = kiln_server::config::Backend::Memory;
    config.grpc.shutdown_grace_secs = 1;
    let (server, channel) = start_with(config).await;
    // An upload that never finishes keeps its stream open.
    let blob = data(5, 1 << 20);
    let d = Digest::of(&blob);
    let name = upload_name(&d);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(write_reqs(&name, &blob, 4096, 0).remove(0))
        .await
        .unwrap();
    let mut bs = ByteStreamClient::new(channel.clone());
    let _call = tokio::spawn(async move {
        bs.write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    loop {
        let s = ByteStreamClient::new(channel.clone())
            .query_write_status(QueryWriteStatusRequest {
                resource_name: name.clone(),
            })
            .await;
        if s.is_ok_and(|s| s.get_ref().committed_size == 4096) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(20), server.stop())
        .await
        .expect("shutdown finished")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(tx);
}
