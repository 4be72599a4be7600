//! A client for the server's CAS and ByteStream services: the calls the
//! worker needs to fetch inputs and upload outputs, with batching for small
//! blobs and streaming for large ones.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::digest;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    BatchReadBlobsRequest, BatchUpdateBlobsRequest, Digest, Directory, FindMissingBlobsRequest,
    GetTreeRequest, batch_update_blobs_request,
};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// Blobs up to this size travel in batch calls; larger ones by ByteStream.
pub const BATCH_BLOB_LIMIT: i64 = 1 << 20;
/// Total payload of one batch call; below every server's advertised limit
/// that Kiln talks to (its own advertises more).
pub const BATCH_TOTAL_LIMIT: i64 = 3 << 20;
const BYTESTREAM_CHUNK: usize = 1 << 20;
/// Max digests per FindMissingBlobs call.
const FIND_MISSING_CHUNK: usize = 8192;
/// gRPC messages the worker accepts: a full batch plus headroom.
pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
pub struct CasClient {
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    instance: String,
}

impl CasClient {
    pub fn new(channel: Channel, instance: &str) -> Self {
        Self {
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            bytestream: ByteStreamClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            instance: instance.to_string(),
        }
    }

    pub fn with_instance(&self, instance: &str) -> Self {
        let mut c = self.clone();
        c.instance = instance.to_string();
        c
    }

    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let resp = self
                .cas
                .clone()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.to_vec(),
                    digest_function: 0,
                })
                .await
                .map_err(|s| Error::remote("FindMissingBlobs", s))?;
            missing.extend(resp.into_inner().missing_blob_digests);
        }
        Ok(missing)
    }

    /// Every Directory of the tree under `root`, keyed by digest, each
    /// verified against its digest. GetTree returns messages, not bytes, so
    /// a directory whose re-encoding differs from what the client uploaded
    /// is fetched again by digest.
    pub async fn get_tree(&self, root: &Digest) -> Result<HashMap<String, Directory>> {
        let mut found: HashMap<String, Directory> = HashMap::new();
        let mut page_token = String::new();
        loop {
            let mut stream = self
                .cas
                .clone()
                .get_tree(GetTreeRequest {
                    instance_name: self.instance.clone(),
                    root_digest: Some(root.clone()),
                    page_size: 0,
                    page_token: page_token.clone(),
                    digest_function: 0,
                })
                .await
                .map_err(|s| tree_error(root, s))?
                .into_inner();
            let mut next = String::new();
            while let Some(resp) = stream.next().await {
                let resp = resp.map_err(|s| tree_error(root, s))?;
                for dir in resp.directories {
                    let (d, _) = digest::of_message(&dir);
                    found.insert(d.hash, dir);
                }
                next = resp.next_page_token;
            }
            if next.is_empty() {
                break;
            }
            page_token = next;
        }
        // Walk from the root; fetch by digest whatever the re-encoding missed.
        // Each distinct directory once: a tree that names the same
        // directory twice at every level must not make this walk explode.
        let mut seen = std::collections::HashSet::new();
        seen.insert(root.hash.clone());
        let mut pending = vec![root.clone()];
        while !pending.is_empty() {
            let absent: Vec<Digest> = pending
                .iter()
                .filter(|d| !found.contains_key(&d.hash) && !digest::is_empty(d))
                .cloned()
                .collect();
            if !absent.is_empty() {
                for (d, bytes) in self.read_small(&absent).await? {
                    let dir: Directory = prost::Message::decode(bytes).map_err(|e| {
                        Error::InvalidTree(format!(
                            "Directory {} does not decode: {e}",
                            digest::key(&d)
                        ))
                    })?;
                    found.insert(d.hash.clone(), dir);
                }
            }
            let mut children = Vec::new();
            for d in &pending {
                if let Some(dir) = found.get(&d.hash) {
                    children.extend(
                        dir.directories
                            .iter()
                            .filter_map(|n| n.digest.clone())
                            .filter(|c| seen.insert(c.hash.clone())),
                    );
                }
            }
            pending = children;
        }
        Ok(found)
    }

    /// Reads blobs that fit batch calls, verifying each one.
    pub async fn read_small(&self, digests: &[Digest]) -> Result<Vec<(Digest, Bytes)>> {
        let mut out = Vec::with_capacity(digests.len());
        for batch in batches(digests.to_vec(), |d| d.size_bytes) {
            let resp = self
                .cas
                .clone()
                .batch_read_blobs(BatchReadBlobsRequest {
                    instance_name: self.instance.clone(),
                    digests: batch.clone(),
                    acceptable_compressors: Vec::new(),
                    digest_function: 0,
                })
                .await
                .map_err(|s| Error::remote("BatchReadBlobs", s))?
                .into_inner();
            let mut missing = Vec::new();
            for r in resp.responses {
                let d = r.digest.unwrap_or_default();
                let code = r.status.as_ref().map_or(0, |s| s.code);
                if code == tonic::Code::NotFound as i32 {
                    missing.push(d);
                    continue;
                }
                if code != 0 {
                    let msg = r.status.map(|s| s.message).unwrap_or_default();
                    return Err(Error::remote(
                        format!("BatchReadBlobs {}", digest::key(&d)),
                        tonic::Status::new(tonic::Code::from(code), msg),
                    ));
                }
                verify(&d, &r.data)?;
                out.push((d, Bytes::from(r.data)));
            }
            if !missing.is_empty() {
                return Err(Error::MissingBlobs(missing));
            }
        }
        Ok(out)
    }

    /// Streams one blob into `dest` (created or truncated), verifying it.
    pub async fn read_to_file(&self, d: &Digest, dest: &Path) -> Result<()> {
        let resource = format!("{}blobs/{}", prefix(&self.instance), digest::key(d));
        let mut stream = self
            .bytestream
            .clone()
            .read(ReadRequest {
                resource_name: resource,
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map_err(|s| read_error(d, s))?
            .into_inner();
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| Error::io("create", dest, e))?;
        let mut hasher = digest::Hasher::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|s| read_error(d, s))?;
            hasher.update(&chunk.data);
            file.write_all(&chunk.data)
                .await
                .map_err(|e| Error::io("write", dest, e))?;
        }
        file.flush()
            .await
            .map_err(|e| Error::io("write", dest, e))?;
        let actual = hasher.finish();
        if actual != *d {
            return Err(Error::CorruptBlob {
                digest: digest::key(d),
                actual: digest::key(&actual),
            });
        }
        Ok(())
    }

    /// Uploads small blobs, one batch call per group that fits.
    pub async fn write_small(&self, blobs: Vec<(Digest, Bytes)>) -> Result<()> {
        for batch in batches(blobs, |(d, _)| d.size_bytes) {
            let requests = batch
                .into_iter()
                .map(|(d, data)| batch_update_blobs_request::Request {
                    digest: Some(d),
                    data: data.to_vec(),
                    compressor: 0,
                })
                .collect();
            self.send_batch(requests).await?;
        }
        Ok(())
    }

    async fn send_batch(&self, requests: Vec<batch_update_blobs_request::Request>) -> Result<()> {
        let resp = self
            .cas
            .clone()
            .batch_update_blobs(BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests,
                digest_function: 0,
            })
            .await
            .map_err(|s| Error::remote("BatchUpdateBlobs", s))?
            .into_inner();
        for r in resp.responses {
            if let Some(status) = r.status.filter(|s| s.code != 0) {
                let d = r.digest.unwrap_or_default();
                return Err(Error::remote(
                    format!("BatchUpdateBlobs {}", digest::key(&d)),
                    tonic::Status::new(tonic::Code::from(status.code), status.message),
                ));
            }
        }
        Ok(())
    }

    /// Uploads one blob from a file by ByteStream.
    pub async fn write_file(&self, d: &Digest, path: &Path) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let resource = format!(
            "{}uploads/{}/blobs/{}",
            prefix(&self.instance),
            uuid::Uuid::new_v4(),
            digest::key(d)
        );
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io("open", path, e))?;
        let total = d.size_bytes;
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let path_owned = path.to_path_buf();
        let reader = tokio::spawn(async move {
            let mut offset = 0i64;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; BYTESTREAM_CHUNK];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io("read", &path_owned, e))?;
                buf.truncate(n);
                let finish = n == 0 || offset + n as i64 >= total;
                let req = WriteRequest {
                    resource_name: if first {
                        resource.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset,
                    finish_write: finish,
                    data: buf,
                };
                first = false;
                offset += n as i64;
                if tx.send(req).await.is_err() || finish {
                    return Ok::<(), Error>(());
                }
            }
        });
        let result = self
            .bytestream
            .clone()
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        reader
            .await
            .map_err(|e| Error::Internal(format!("upload task: {e}")))??;
        result.map_err(|s| Error::remote(format!("ByteStream.Write {}", digest::key(d)), s))?;
        Ok(())
    }
}

fn prefix(instance: &str) -> String {
    if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    }
}

/// Splits items into groups whose total size fits one batch call.
pub fn batches<T>(items: Vec<T>, size_of: impl Fn(&T) -> i64) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut size = 0i64;
    for item in items {
        let n = size_of(&item);
        if out.is_empty() || size + n > BATCH_TOTAL_LIMIT {
            out.push(Vec::new());
            size = 0;
        }
        size += n;
        out.last_mut().expect("pushed above").push(item);
    }
    out
}

fn verify(d: &Digest, data: &[u8]) -> Result<()> {
    let actual = digest::of_bytes(data);
    if actual != *d {
        return Err(Error::CorruptBlob {
            digest: digest::key(d),
            actual: digest::key(&actual),
        });
    }
    Ok(())
}

fn read_error(d: &Digest, status: tonic::Status) -> Error {
    if status.code() == tonic::Code::NotFound {
        Error::MissingBlobs(vec![d.clone()])
    } else {
        Error::remote(format!("ByteStream.Read {}", digest::key(d)), status)
    }
}

fn tree_error(root: &Digest, status: tonic::Status) -> Error {
    if status.code() == tonic::Code::NotFound {
        Error::MissingBlobs(vec![root.clone()])
    } else {
        Error::remote(format!("GetTree {}", digest::key(root)), status)
    }
}
